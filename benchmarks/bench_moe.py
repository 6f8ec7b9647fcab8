"""Benchmark one MoE layer's experts at decode sizes (GPU only): FusedExperts' grouped-GEMM path
against the fused small-batch kernels (kvtier/kernels/fused_moe.py) and the expert-major kernels
(kvtier/kernels/grouped_moe.py).

Qwen3-30B-A3B geometry by default (128 experts, top-8, hidden 2048, expert intermediate 768, bf16),
T = 1, 4, 16 tokens with random top-k routing (distinct experts per token). For each T: the median
time of each path, eager (each kernel launched from Python) and replayed as a CUDA graph (no launch
overhead, as in the engine's decode); the expert weight bytes the layer needs (each distinct routed
expert's w13 and w2 once) per second, as GB/s and as a fraction of the HBM traffic of a
device-to-device copy measured in the same run (a copy reads and writes each byte: 2x its one-way
rate); and the bytes the fused kernels actually stream (each (token, expert) pair reads its expert,
so repeats hit L2 or HBM again).

Times are ``triton.testing.do_bench`` medians: it clears L2 before each call, so the weights
come from HBM as they do when a decode step walks 48 layers.

--check compares the fused outputs with the grouped path's (ulps). --sweep times, in graph
replays of fused_moe_small, the gate/up kernel's tiles (block_n x block_k) with the down kernel
at its defaults, then the down kernel's (block_h x block_i) with the gate/up kernel at its
defaults (the two kernels' times add up, so each is tuned on its own), the swept kernel in
one-warp programs, then the default tiles with the gate/up kernel in 1 and 4 warps
(scripts/probe_moe_tiles.py sweeps tiles in several warps). --sweep-grouped
times the expert-major kernels' tiles the same way (gate/up tiles with the down kernel at its
defaults, then the down tiles), at each T of --tokens.

    python benchmarks/bench_moe.py                    # the table
    python benchmarks/bench_moe.py --check --sweep    # also compare outputs and time other tiles
    python benchmarks/bench_moe.py --tokens 1 2 4 8 16 32 --output results/moe.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import copy_bandwidth, fmt_float, fmt_str, format_table, run_metadata, write_json

GATE_UP_KEYS = ("block_n", "block_k")
DOWN_KEYS = ("block_h", "block_i")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--num-experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768, help="expert intermediate size")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time, ms")
    p.add_argument("--check", action="store_true", help="compare fused against grouped outputs")
    p.add_argument("--sweep", action="store_true", help="also time alternative tiles and options")
    p.add_argument(
        "--sweep-grouped", action="store_true", help="also time the expert-major kernels' tiles"
    )
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


# Tiles the sweep times: those of one-warp programs that ptxas compiles without spills for sm_90
# (79 to 224 registers a thread); e.g. a [8, 256] gate/up tile spills.
GATE_UP_TILES = ((2, 256), (2, 512), (4, 128), (4, 256), (8, 128))
DOWN_TILES = ((1, 128), (1, 256), (2, 64), (2, 128), (4, 64))


def gate_up_options() -> list[dict[str, Any]]:
    """fused_moe_small's gate/up tiles the sweep times (the down kernel at its defaults)."""
    return [dict(zip(GATE_UP_KEYS, tile, strict=True)) for tile in GATE_UP_TILES]


def down_options() -> list[dict[str, Any]]:
    """fused_moe_small's down tiles the sweep times (the gate/up kernel at its defaults)."""
    return [dict(zip(DOWN_KEYS, tile, strict=True)) for tile in DOWN_TILES]


def ulps(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in bf16 ulps of ref (8 significant bits)."""
    ref = ref.float()
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0**-126))) - 7)
    return (out.float() - ref).abs() / ulp


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU (Triton kernels, grouped GEMM); none is here.")
    # Run from a checkout without installing: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kvtier.kernels.fused_moe import default_tiles, fused_moe_small
    from kvtier.kernels.grouped_moe import grouped_moe
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
    w13, w2 = experts.w13, experts.w2
    expert_bytes = (w13[0].numel() + w2[0].numel()) * 2
    print(
        f"layer: E={e} k={k} H={hdim} I={inter} bf16, {expert_bytes / 1e6:.2f} MB per expert "
        "(w13 + w2)\n"
    )

    rows: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    for t in args.tokens:
        x = torch.randn(t, hdim, device="cuda", dtype=torch.bfloat16, generator=gen)
        ids, weights = routing(t, e, k, gen)
        distinct = int(ids.unique().numel())
        need = distinct * expert_bytes

        def grouped(x=x, ids=ids, weights=weights):
            return experts(x, ids, weights)

        def fused(x=x, ids=ids, weights=weights, **tiles):
            return fused_moe_small(x, w13, w2, ids, weights, **tiles)

        def expert_major(x=x, ids=ids, weights=weights, **tiles):
            return grouped_moe(x, w13, w2, ids, weights, **tiles)

        with torch.no_grad():
            times = {
                "grouped": bench(grouped, args.rep),
                "grouped_graph": bench(as_graph(grouped), args.rep),
                "fused": bench(fused, args.rep),
                "fused_graph": bench(as_graph(fused), args.rep),
                "major_graph": bench(as_graph(expert_major), args.rep),
            }
            row: dict[str, Any] = {
                "tokens": t,
                "pairs": t * k,
                "experts": distinct,
                "need_mb": need / 1e6,
                "fused_mb": t * k * expert_bytes / 1e6,
            }
            for name, ms in times.items():
                row[f"{name}_us"] = ms * 1e3
                row[f"{name}_gbps"] = need / (ms * 1e-3) / 1e9
                row[f"{name}_of_hbm"] = row[f"{name}_gbps"] / hbm
            row["speedup_graph"] = times["grouped_graph"] / times["fused_graph"]
            if args.check:
                reference = grouped()
                err = ulps(fused(), reference)
                row["max_ulps"] = err.max().item()
                row["frac_gt_1ulp"] = (err > 1).float().mean().item()
                err = ulps(expert_major(), reference)
                row["major_max_ulps"] = err.max().item()
                row["major_frac_gt_1ulp"] = (err > 1).float().mean().item()
            if args.sweep:
                sweeps += sweep(t, fused, args.rep, default_tiles(t))
            if args.sweep_grouped:
                sweeps += sweep_grouped(t, expert_major, args.rep)
        rows.append(row)
        print(f"T={t}: {distinct} distinct experts of {t * k} pairs", file=sys.stderr)

    print_report(rows, sweeps, args.check)
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


def sweep(
    t: int, fused: Callable[..., object], rep: int, defaults: dict[str, int]
) -> list[dict[str, Any]]:
    """Each kernel's one-warp tiles of fused_moe_small, fastest first (graph replays; the other
    kernel at its defaults), then the default tiles with the gate/up kernel in 1 and 4 warps
    (``scripts/probe_moe_tiles.py`` sweeps tiles in several warps)."""
    out: list[dict[str, Any]] = []
    for kernel, options, warps_key in (
        ("gate_up", gate_up_options(), "num_warps"),
        ("down", down_options(), "down_warps"),
    ):
        results = []
        for opts in options:
            opts = {**opts, warps_key: 1}
            fn = as_graph(lambda opts=opts: fused(**opts))
            results.append((bench(fn, max(20, rep // 4)), opts))
        results.sort(key=lambda r: r[0])
        for ms, opts in results:
            out.append({"tokens": t, "kernel": kernel, "us": ms * 1e3, **opts})
    for warps in (1, 4):
        ms = bench(as_graph(lambda warps=warps: fused(num_warps=warps)), max(20, rep // 4))
        out.append({"tokens": t, "kernel": "both", "us": ms * 1e3, **defaults, "num_warps": warps})
    return out


# The expert-major kernels' tiles the sweep times: (block_m, block_n, block_k) of gate/up and
# (block_m, block_h, block_i) of down, each at 3 and 4 pipeline stages; four warps for 16 rows,
# eight for more (as default_tiles).
GROUPED_GATE_UP = ((16, 32, 128), (16, 64, 64), (16, 64, 128), (16, 128, 64), (32, 32, 128),
                   (32, 64, 64), (32, 64, 128), (64, 32, 128), (64, 64, 64))  # fmt: skip
GROUPED_DOWN = ((16, 64, 128), (16, 128, 64), (16, 128, 128), (32, 64, 128), (32, 128, 64),
                (32, 128, 128), (64, 64, 128), (64, 128, 64))  # fmt: skip


def sweep_grouped(t: int, fn: Callable[..., object], rep: int) -> list[dict[str, Any]]:
    """grouped_moe's tiles, each kernel's on its own (the other at its defaults), fastest
    first; graph replays. block_m applies to both kernels, so its rows time both at it."""
    out: list[dict[str, Any]] = []
    for kernel, keys, tiles in (
        ("major_gate_up", ("block_m", "block_n", "block_k"), GROUPED_GATE_UP),
        ("major_down", ("block_m", "block_h", "block_i"), GROUPED_DOWN),
    ):
        results = []
        for tile in tiles:
            for stages in (3, 4):
                opts = dict(zip(keys, tile, strict=True)) | {"num_stages": stages}
                opts["num_warps"] = 8 if opts["block_m"] >= 32 else 4
                results.append((bench(as_graph(lambda o=opts: fn(**o)), max(20, rep // 4)), opts))
        results.sort(key=lambda r: r[0])
        for ms, opts in results:
            out.append({"tokens": t, "kernel": kernel, "us": ms * 1e3, **opts})
    return out


def print_report(rows: list[dict[str, Any]], sweeps: list[dict[str, Any]], check: bool) -> None:
    columns = [
        ("tokens", "T", fmt_str),
        ("experts", "experts", fmt_str),
        ("need_mb", "need MB", fmt_float(1)),
        ("fused_mb", "fused MB", fmt_float(1)),
        ("grouped_graph_us", "grouped graph us", fmt_float(1)),
        ("fused_graph_us", "fused graph us", fmt_float(1)),
        ("major_graph_us", "major graph us", fmt_float(1)),
        ("grouped_graph_gbps", "grouped GB/s", fmt_float(0)),
        ("fused_graph_gbps", "fused GB/s", fmt_float(0)),
        ("major_graph_gbps", "major GB/s", fmt_float(0)),
        ("fused_graph_of_hbm", "fused/HBM", fmt_float(2)),
        ("speedup_graph", "speedup", fmt_float(2)),
    ]
    if check:
        columns += [
            ("max_ulps", "max ulps", fmt_float(1)),
            ("frac_gt_1ulp", ">1ulp", fmt_float(4)),
            ("major_max_ulps", "major max ulps", fmt_float(1)),
            ("major_frac_gt_1ulp", "major >1ulp", fmt_float(4)),
        ]
    print("experts only (ids and weights given):")
    print(format_table(rows, columns))
    print(
        "GB/s: the needed bytes (each distinct routed expert once) over the graph time; "
        "'fused MB' is what the fused kernels stream (every pair reads its expert); 'major': "
        "the expert-major kernels (grouped_moe)."
    )
    if sweeps:
        print("\nsweep (graph replays of fused_moe_small; one kernel's tiles, the other at its")
        print("defaults; 'both': the default tiles, gate/up at 1 and 4 warps; major_*:")
        print("grouped_moe's):")
        keys = ("block_m", "block_n", "block_k", "block_h", "block_i", "num_stages", "down_warps")
        tile_cols = [
            ("tokens", "T", fmt_str),
            ("kernel", "kernel", fmt_str),
            ("us", "us", fmt_float(1)),
        ] + [(key, key, lambda v: "" if v is None else fmt_str(v)) for key in (*keys, "num_warps")]
        print(format_table([{key: None for key in keys} | s for s in sweeps], tile_cols))


if __name__ == "__main__":
    main()
