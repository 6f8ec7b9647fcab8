"""Benchmark one MoE layer's experts at decode sizes (GPU only): FusedExperts' grouped-GEMM path
against the fused small-batch kernels (kvtier/kernels/fused_moe.py).

Qwen3-30B-A3B geometry by default (128 experts, top-8, hidden 2048, expert intermediate 768,
bf16), T = 1, 4, 16 tokens with random top-k routing (distinct experts per token). For each T:
the median time of each path, eager (each kernel launched from Python) and replayed as a CUDA
graph (no launch overhead, as in the engine's decode); the expert weight bytes the layer needs
(each distinct routed expert's w13 and w2 once) per second, as GB/s and as a fraction of the
HBM traffic of a device-to-device copy measured in the same run (a copy reads and writes each
byte: 2x its one-way rate); and the bytes the fused kernels actually stream (each (token,
expert) pair reads its expert, so repeats hit L2 or HBM again).

Times are ``triton.testing.do_bench`` medians: it clears L2 before each call, so the weights
come from HBM as they do when a decode step walks 48 layers.

    python benchmarks/bench_moe.py                    # the table
    python benchmarks/bench_moe.py --check --sweep    # also compare outputs and time other tiles
    python benchmarks/bench_moe.py --tokens 1 2 4 8 16 32 --output results/moe.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import copy_bandwidth, fmt_float, fmt_str, format_table, run_metadata, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--num-experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768, help="expert intermediate size")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time, ms")
    p.add_argument("--check", action="store_true", help="compare fused against grouped outputs")
    p.add_argument("--sweep", action="store_true", help="also time alternative fused tiles")
    p.add_argument("--output", type=Path, default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def bench(fn: Callable[[], object], rep: int) -> float:
    """Median milliseconds (L2 cleared before each call)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def as_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def routing(t: int, e: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(e, device="cuda", generator=gen)[:k] for _ in range(t)])
    weights = torch.softmax(torch.randn(t, k, device="cuda", generator=gen), dim=-1)
    return ids, weights.to(torch.bfloat16)


def sweep_tiles() -> list[dict[str, int]]:
    out = []
    for bn, bk, bh, bi, w in itertools.product(
        (4, 8), (256, 512, 1024), (2, 4, 8), (256, 1024), (4, 8)
    ):
        out.append({"block_n": bn, "block_k": bk, "block_h": bh, "block_i": bi, "num_warps": w})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU (Triton kernels, grouped GEMM); none is here.")
    # Run from a checkout without installing: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kvtier.kernels.fused_moe import fused_moe_small
    from kvtier.models.layers import FusedExperts

    e, k, hdim, inter = args.num_experts, args.top_k, args.hidden, args.inter
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bw = copy_bandwidth("cuda")
    hbm = 2 * bw["d2d_gbps"]
    print(
        f"device-to-device copy: {bw['d2d_gbps']:.0f} GB/s one-way = {hbm:.0f} GB/s of HBM "
        "traffic (read + write): the ceiling below"
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    experts = FusedExperts(e, hdim, inter).to("cuda", torch.bfloat16)
    with torch.no_grad():
        experts.w13.normal_(0, 0.02, generator=gen)
        experts.w2.normal_(0, 0.02, generator=gen)
    experts.use_grouped_mm = True  # pinned: the grouped path even with KVTIER_FUSED_MOE=1
    expert_bytes = (experts.w13[0].numel() + experts.w2[0].numel()) * 2
    print(
        f"layer: E={e} k={k} H={hdim} I={inter} bf16, {expert_bytes / 1e6:.2f} MB per expert "
        f"(w13 + w2)\n"
    )

    rows: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    for t in args.tokens:
        x = torch.randn(t, hdim, device="cuda", dtype=torch.bfloat16, generator=gen)
        ids, weights = routing(t, e, k, gen)
        distinct = int(ids.unique().numel())
        need = distinct * expert_bytes
        streamed = t * k * expert_bytes

        def grouped(x=x, ids=ids, weights=weights):
            return experts(x, ids, weights)

        def fused(x=x, ids=ids, weights=weights, **tiles):
            return fused_moe_small(x, experts.w13, experts.w2, ids, weights, **tiles)

        with torch.no_grad():
            times = {
                "grouped": bench(grouped, args.rep),
                "grouped_graph": bench(as_graph(grouped), args.rep),
                "fused": bench(fused, args.rep),
                "fused_graph": bench(as_graph(fused), args.rep),
            }
            row: dict[str, Any] = {
                "tokens": t,
                "pairs": t * k,
                "experts": distinct,
                "need_mb": need / 1e6,
                "fused_mb": streamed / 1e6,
            }
            for name, ms in times.items():
                row[f"{name}_us"] = ms * 1e3
                row[f"{name}_gbps"] = need / (ms * 1e-3) / 1e9
                row[f"{name}_of_hbm"] = row[f"{name}_gbps"] / hbm
            row["speedup_graph"] = times["grouped_graph"] / times["fused_graph"]
            if args.check:
                ref, out = grouped().float(), fused().float()
                ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0**-126))) - 7)
                err = (out - ref).abs() / ulp
                row["max_ulps"] = err.max().item()
                row["frac_gt_1ulp"] = (err > 1).float().mean().item()
                row["rel_err"] = ((out - ref).norm() / ref.norm()).item()
            if args.sweep:
                results = []
                for tiles in sweep_tiles():
                    fn = as_graph(lambda tiles=tiles: fused(**tiles))
                    results.append((bench(fn, max(20, args.rep // 4)), tiles))
                results.sort(key=lambda r: r[0])
                for ms, tiles in results[:5]:
                    sweeps.append({"tokens": t, "us": ms * 1e3, **tiles})
        rows.append(row)
        print(f"T={t}: {distinct} distinct experts of {t * k} pairs", file=sys.stderr)

    columns = [
        ("tokens", "T", fmt_str),
        ("experts", "experts", fmt_str),
        ("need_mb", "need MB", fmt_float(1)),
        ("fused_mb", "fused MB", fmt_float(1)),
        ("grouped_us", "grouped us", fmt_float(1)),
        ("fused_us", "fused us", fmt_float(1)),
        ("grouped_graph_us", "grouped graph us", fmt_float(1)),
        ("fused_graph_us", "fused graph us", fmt_float(1)),
        ("grouped_graph_gbps", "grouped GB/s", fmt_float(0)),
        ("fused_graph_gbps", "fused GB/s", fmt_float(0)),
        ("fused_graph_of_hbm", "fused/HBM", fmt_float(2)),
        ("speedup_graph", "speedup", fmt_float(2)),
    ]
    if args.check:
        columns += [
            ("max_ulps", "max ulps", fmt_float(1)),
            ("frac_gt_1ulp", ">1ulp", fmt_float(4)),
            ("rel_err", "rel err", fmt_float(5)),
        ]
    print(format_table(rows, columns))
    print(
        "\nGB/s: the needed bytes (each distinct routed expert once) over the graph time; "
        "'fused MB' is what the fused kernels stream (every pair reads its expert)."
    )
    if sweeps:
        print("\nfastest fused tiles (graph replay) per T:")
        tile_cols = [("tokens", "T", fmt_str), ("us", "us", fmt_float(1))] + [
            (key, key, fmt_str) for key in ("block_n", "block_k", "block_h", "block_i", "num_warps")
        ]
        print(format_table(sweeps, tile_cols))
    if args.output:
        summary = {
            "copy_d2d_gbps": bw["d2d_gbps"],
            "copy_d2d_samples": bw["samples"]["d2d"],
            "median_speedup": statistics.median(r["speedup_graph"] for r in rows),
        }
        write_json(
            args.output,
            {"meta": run_metadata(), "summary": summary, "rows": rows, "sweep": sweeps},
        )
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
