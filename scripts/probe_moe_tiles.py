"""Sweep of the small-batch MoE kernels' (``fused_moe_small``) tiles and warps a program on the
GPU, beyond ``bench_moe.py --sweep``'s one-warp tiles: whole-row steps in several warps (more
loads in flight a program). Gate/up variants with the down kernel at one warp, then down
variants with gate/up at the defaults, then the best of each together; CUDA-graph replays with
L2 cleared before each (``bench_moe.bench``), each output against the defaults' (ulps) and
against itself run again (repeatable). A diagnostic, not part of the suite; run 10 in
docs/benchmarks.md chose ``default_tiles`` from it.

    python scripts/probe_moe_tiles.py --tokens 1 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_moe import as_graph, bench, routing, ulps  # noqa: E402

from kvtier.kernels.fused_moe import fused_moe_small  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rep", type=int, default=100)
    args = ap.parse_args()
    e, k, hdim, inter = 128, 8, 2048, 768
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.empty(e, 2 * inter, hdim, device="cuda", dtype=torch.bfloat16)
    w2 = torch.empty(e, hdim, inter, device="cuda", dtype=torch.bfloat16)
    w13.normal_(0, 0.02, generator=gen)
    w2.normal_(0, 0.02, generator=gen)
    expert_mb = (w13[0].numel() + w2[0].numel()) * 2 / 1e6
    # fused_moe_small's tiles: whole-row steps in more warps (more loads in flight a
    # program), gate/up with the down kernel at its defaults, then down with gate/up's.
    two_kernel = [
        dict(block_n=bn, block_k=bk, num_warps=nw, down_warps=1)
        for bn, bk, nw in [
            (4, 2048, 4),
            (4, 2048, 8),
            (2, 2048, 4),
            (8, 1024, 4),
            (8, 2048, 8),
            (4, 1024, 2),
            (4, 512, 1),
            (16, 512, 4),
            (8, 512, 2),
            (2, 1024, 1),
        ]
    ] + [
        dict(block_h=bh, block_i=bi, down_warps=nw)
        for bh, bi, nw in [
            (2, 1024, 4),
            (4, 1024, 8),
            (1, 1024, 2),
            (2, 256, 2),
            (4, 256, 4),
            (1, 256, 1),
            (8, 256, 8),
            (2, 512, 2),
            (1, 512, 1),
        ]
    ]
    with torch.no_grad():
        for t in args.tokens:
            x = torch.randn(t, hdim, device="cuda", dtype=torch.bfloat16, generator=gen)
            ids, weights = routing(t, e, k, gen)
            need = ids.unique().numel() * expert_mb
            ref = fused_moe_small(x, w13, w2, ids, weights)

            def timed(c, x=x, ids=ids, w=weights, need=need, ref=ref):
                out = fused_moe_small(x, w13, w2, ids, w, **c)
                same = torch.equal(out, fused_moe_small(x, w13, w2, ids, w, **c))
                ms = bench(as_graph(lambda: fused_moe_small(x, w13, w2, ids, w, **c)), args.rep)
                print(
                    f"  {ms * 1e3:.1f} us ({need / ms:.0f} GB/s) {c or 'defaults'}: "
                    f"max ulps vs defaults {ulps(out, ref).max().item():.0f}, repeatable {same}",
                    flush=True,
                )
                return ms

            print(f"T={t}: {need:.1f} MB of experts", flush=True)
            timed({})
            gate_up = min(two_kernel[:10], key=timed)
            down = min(two_kernel[10:], key=timed)
            print("  best of each:", flush=True)
            timed({**gate_up, **down})


if __name__ == "__main__":
    main()
