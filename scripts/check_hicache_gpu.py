"""Greedy multi-turn chats under cache pressure on the GPU, against a no-cache reference, with
parts of the fast path switched off one at a time (per-layer graphs, all graphs, fused
kernels, IO backend): which part, if any, changes the output. A GPU diagnostic, not a test.

    python scripts/check_hicache_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from engine_utils import chats, make_engine, make_hicache_engine

from kvtier.kernels import fused


def run(engine):  # the chats of tests/test_hicache_engine.py
    return chats(engine, 5, 3, 0, False, first_len=36, extra_len=9)


def main() -> None:
    with make_engine(disable_radix_cache=True) as ref:
        want, _ = run(ref)
    variants = {
        "default": {},
        "no piecewise graphs": {"piecewise_cuda_graph_max_tokens": 0},
        "no CUDA graphs": {"disable_cuda_graph": True},
        "fused kernels off": {"_fused": False},
        # The default IO backend (auto) is direct for dram: the kernel as a variant.
        "kernel IO": {"hicache_io_backend": "kernel"},
        "write_back": {"hicache_write_policy": "write_back"},
    }
    for name, kw in variants.items():
        kw = dict(kw)
        fused.ENABLED = kw.pop("_fused", True)
        with make_hicache_engine(**kw) as e:
            got, metas = run(e)
            bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
            tiers = [m["cached_tokens_by_tier"] for m in metas]
            at = [tiers[i] for i in bad[:3]]
            print(f"{name:22s} equal={not bad} mismatches={bad[:6]} tiers_at={at}")
            e.check_integrity()
    fused.ENABLED = True


if __name__ == "__main__":
    main()
