"""Batch-1 GEMV tiles that take a whole row of K in one step (all of a program's weight loads
issued at once), against ``gemv.default_config``, for Qwen3-30B-A3B's projections; CUDA-graph
replays with L2 cleared before each (``bench_moe.bench``), each output against ``gemv_ref``
(ulps). ``bench_gemv.py --sweep`` stops at 1024-column steps. A diagnostic, not part of the
suite.

    python scripts/probe_gemv_rows.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_moe import as_graph, bench, ulps  # noqa: E402

from kvtier.kernels.gemv import GemvConfig, default_config, gemv, gemv_ref  # noqa: E402

SHAPES = {"qkv": (5120, 2048), "o_proj": (2048, 4096), "lm_head": (151936, 2048)}


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, (n, k) in SHAPES.items():
            w = torch.empty(n, k, device="cuda", dtype=torch.bfloat16).normal_(
                0, 0.02, generator=gen
            )
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = gemv_ref(x, w)
            mb = n * k * 2 / 1e6
            configs = [default_config(1, n, k)] + [
                GemvConfig(bn, k, nw, 3) for bn, nw in ((2, 4), (4, 4), (4, 8), (8, 8), (8, 16))
            ]
            if k > 2048:
                configs += [GemvConfig(bn, 2048, nw, 3) for bn, nw in ((4, 8), (8, 8))]
            print(f"{name} [{n} x {k}], {mb:.1f} MB:", flush=True)
            for cfg in configs:
                err = ulps(gemv(x, w, config=cfg), ref).max().item()
                ms = bench(as_graph(lambda cfg=cfg, x=x, w=w: gemv(x, w, config=cfg)), 100)
                print(
                    f"  {ms * 1e3:.2f} us ({mb / ms:.0f} GB/s) [{cfg.block_n}, {cfg.block_k}] "
                    f"{cfg.num_warps} warps split {cfg.split_k}, max ulps {err:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
