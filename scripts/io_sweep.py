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

from kvtier.kernels.kv_io import KVSpace, copy_pages_direct, copy_pages_kernel, page_runs
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
    bulk_dst = torch.empty_like(bulk_src, device="cuda")
    bulk = timed(lambda: bulk_dst.copy_(bulk_src, non_blocking=True), nbytes)
    print(f"{n} pages, {nbytes / 1e9:.2f} GB; bulk H2D {bulk:.1f} GB/s")
    for warps in (1, 2, 4):
        for progs in (8, 16, 32, 64, 128):

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
    runs = page_runs(sp, dp)
    for name, srcs, dsts in (("load", src, dst), ("backup", dst, src)):
        rr = runs if name == "load" else [(b, a, n) for a, b, n in runs]

        def direct(srcs=srcs, dsts=dsts, rr=rr) -> None:
            for layer in range(L):
                copy_pages_direct(srcs, dsts, rr, range(layer, layer + 1))

        gbps = timed(direct, nbytes, 3)
        print(f"direct {name} (cuMemcpyBatchAsync per layer): {gbps:.1f} GB/s {gbps / bulk:.3f}")
    dk.zero_()
    direct_load = [copy_pages_direct(src, dst, runs, range(la, la + 1)) for la in range(L)]
    torch.cuda.synchronize()
    del direct_load
    ok = all(
        torch.equal(
            dk[
                b * dl.page_stride + 7 * dl.layer_stride : (b + 1) * dl.page_stride
                + 7 * dl.layer_stride
            ].cpu(),
            hk[
                a * hl.page_stride + 7 * hl.layer_stride : (a + 1) * hl.page_stride
                + 7 * hl.layer_stride
            ],
        )
        for a, b in list(zip(sp, dp))[:50]
    )
    print(f"direct load data check (50 pages of layer 7): {ok}")


if __name__ == "__main__":
    main()
