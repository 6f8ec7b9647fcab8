"""Sweep the ways of loading random KV pages from pinned host memory into the GPU pool, against
one bulk copy of the same bytes: the Triton copy kernel over (programs, warps), and the copy
engine through cudaMemcpyBatchAsync (one batch per layer). A GPU diagnostic, not a test.

    python scripts/io_sweep.py --pages 636
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from kvtier.kernels.kv_io import KVSpace, copy_pages_kernel
from kvtier.tiers.layout import device_pool_layout, make_layout

L, H, D, PS = 48, 4, 128, 64


def timed(fn, nbytes: int, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(nbytes / (a.elapsed_time(b) / 1e3) / 1e9)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=636)
    args = ap.parse_args()
    n = args.pages
    host_pages, dev_pages = n + 64, n + 400
    hl = make_layout("layer_first", host_pages, PS, L, H, D)
    host = torch.empty(hl.numel, dtype=torch.bfloat16, pin_memory=True)
    host.view(torch.int16).random_(-30000, 30000)
    hk, hv = host[: hl.kv_stride], host[hl.kv_stride :]
    dl = device_pool_layout(dev_pages, PS, L, H, D)
    dk = torch.empty(dl.numel, dtype=torch.bfloat16, device="cuda")
    dv = torch.empty(dl.numel, dtype=torch.bfloat16, device="cuda")
    src, dst = KVSpace(hk, hv, hl), KVSpace(dk, dv, dl)
    rng = random.Random(0)
    sp = rng.sample(range(host_pages), n)
    dp = rng.sample(range(1, dev_pages), n)
    s = torch.tensor(sp, dtype=torch.int32, device="cuda")
    d = torch.tensor(dp, dtype=torch.int32, device="cuda")
    chunk = PS * H * D * 2
    nbytes = n * L * 2 * chunk
    bulk_src = host[: nbytes // 2]
    bulk_dst = dk[: nbytes // 2]
    bulk = timed(lambda: bulk_dst.copy_(bulk_src, non_blocking=True), nbytes)
    print(f"{n} pages, {nbytes / 1e9:.2f} GB; bulk H2D {bulk:.1f} GB/s")
    for warps in (2, 4, 8):
        for progs in (32, 64, 96, 128, 192, 264):

            def load(progs: int = progs, warps: int = warps) -> None:
                for layer in range(L):
                    copy_pages_kernel(src, dst, s, d, range(layer, layer + 1), progs, warps)

            gbps = timed(load, nbytes, 3)
            print(f"kernel programs {progs:3d} warps {warps}: {gbps:6.1f} GB/s {gbps / bulk:.3f}")
    # Backups through the kernel at the default shape, for reference.
    gbps = timed(
        lambda: [copy_pages_kernel(dst, src, d, s, range(la, la + 1)) for la in range(L)], nbytes, 3
    )
    print(f"kernel backup default: {gbps:.1f} GB/s {gbps / bulk:.3f}")
    try:
        from cuda.bindings import runtime as rt

        esize = 2
        ptrs = []
        for layer in range(L):
            for hb, db in ((hk, dk), (hv, dv)):
                for a, b in zip(sp, dp):
                    so = hb.data_ptr() + (a * hl.page_stride + layer * hl.layer_stride) * esize
                    do = db.data_ptr() + (b * dl.page_stride + layer * dl.layer_stride) * esize
                    ptrs.append((do, so))
        per_layer = 2 * n
        attr = rt.cudaMemcpyAttributes()
        attr.srcAccessOrder = rt.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
        attr.flags = getattr(rt.cudaMemcpyFlags, "cudaMemcpyFlagPreferOverlapWithCompute", 1)
        layers_args = []
        for layer in range(L):
            part = ptrs[layer * per_layer : (layer + 1) * per_layer]
            layers_args.append(([p[0] for p in part], [p[1] for p in part], [chunk] * per_layer))

        def batch_load() -> None:
            stream = torch.cuda.current_stream().cuda_stream
            for dsts, srcs, sizes in layers_args:
                res = rt.cudaMemcpyBatchAsync(dsts, srcs, sizes, len(dsts), [attr], [0], 1, stream)
                if res[0] != rt.cudaError_t.cudaSuccess:
                    raise RuntimeError(f"cudaMemcpyBatchAsync: {res}")

        gbps = timed(batch_load, nbytes, 3)
        ok = torch.equal(
            dk.view(-1)[dp[0] * dl.page_stride : dp[0] * dl.page_stride + 8],
            hk.view(-1)[sp[0] * hl.page_stride : sp[0] * hl.page_stride + 8].cuda(),
        )
        print(f"cudaMemcpyBatchAsync per layer: {gbps:.1f} GB/s {gbps / bulk:.3f} (data ok {ok})")
    except Exception as e:  # a diagnostic: report and go on
        print(f"cudaMemcpyBatchAsync not measured: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
