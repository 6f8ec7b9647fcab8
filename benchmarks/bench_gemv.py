"""Benchmark the skinny-GEMM kernel (kvtier/kernels/gemv.py) against cuBLAS (F.linear) at decode
row counts (GPU only).

Qwen3-30B-A3B's projections: qkv_proj [5120, 2048], o_proj [2048, 4096], the MoE router gate
[128, 2048] and lm_head [151936, 2048] (weight [N, K], bf16), times x [T, K] for T = 1, 2, 4, 8,
16. Each side is timed as CUDA-graph replays of back-to-back calls, call i on weight copy
i % copies, with enough copies that together they exceed 200 MB (4x an H200's 50 MB L2): every
call reads its weight from HBM, as in a decode step that walks the layers. At least 20 calls a
graph (the router's 0.5 MB weight takes ~400 copies, and as many calls). Reported: us per call
(median replay / calls, launch gaps included, as in the engine's decode graph), the weight's
GB/s and that as a fraction of the HBM traffic of a 1 GiB device-to-device copy measured in the
same run (a copy reads and writes every byte: 2x its one-way rate).

--sweep searches configs per shape and T. Stage 1 times block_n x block_k x split_k x the
product path (elementwise for T <= 4, tl.dot for T >= 2) at 4 warps and 3 stages, pruned to
what can make sense: at least 66 programs (or the most the shape allows), split-K only up to
the first split count that reaches one program per SM, 2-32 KB weight tiles, 16 bytes of tile a
thread or more, float32 accumulators of at most 128 registers a thread. Stage 2 tries the other
warp counts (2, 4, 8) on the best, then the other stage counts on the best of those (tl.dot
only: the elementwise loop prefetches by hand). Each candidate is first run once and checked
against the float64 product (a wrong one is reported, never ranked). Compiles dominate: ~170
distinct configs for the default shapes and T in stage 1 (one compile per config and T, shared
by the shapes), a few per shape and T in stage 2; Triton's disk cache makes a second run fast.

--norm times the RMSNorm prologue (``gemv(..., norm=NormPrologue(...))``) instead: per call,
``fused_add_rms_norm`` then cuBLAS, ``fused_add_rms_norm`` then gemv (two kernels), and the one
gemv that computes the norm itself, for the qkv and router shapes at T = 1, 2, 4 (unless
--shapes / --tokens say otherwise). The same weight copies and graphs as above; x and the residual
are the same every call (L2 hits, as the previous kernel's output would be), the residual and
(router: the MoE's experts read them) the normed rows written as in a layer. Also reported: how
far the fused output is from the two-kernel one (the norm's sum of squares adds in another order
on a GPU) and whether the new residual is bitwise the same.

    python benchmarks/bench_gemv.py                       # the table, default configs
    python benchmarks/bench_gemv.py --check               # also the max error vs float32
    python benchmarks/bench_gemv.py --sweep --tokens 1 4  # search configs per shape and T
    python benchmarks/bench_gemv.py --norm                # the norm prologue vs norm + GEMM
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from common import (
    GiB,
    fmt_float,
    fmt_str,
    format_table,
    run_metadata,
    time_copy_gbps,
    time_cuda_ms,
    write_json,
)

if TYPE_CHECKING:
    from kvtier.kernels.gemv import GemvConfig

# name -> (N, K) of weight [N, K]: Qwen3-30B-A3B.
SHAPES: dict[str, tuple[int, int]] = {
    "qkv": (5120, 2048),
    "o": (2048, 4096),
    "router": (128, 2048),
    "lm_head": (151936, 2048),
    # Qwen3-8B: qkv, o, gate_up, down.
    "qkv_8b": (6144, 4096),
    "o_8b": (4096, 4096),
    "gate_up_8b": (24576, 4096),
    "down_8b": (4096, 12288),
}
DEFAULT_SHAPES = ["qkv", "o", "router", "lm_head"]
DEFAULT_TOKENS = [1, 2, 4, 8, 16]
# --norm: the projections that follow a decoder layer's RMSNorm (input norm -> qkv, post-attention
# norm -> the MoE router), at the decode row counts.
NORM_SHAPES = ["qkv", "router"]
NORM_TOKENS = [1, 2, 4]
NORM_EPS = 1e-6
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
NUM_SMS = 132  # H200; the pruning only needs a rough count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tokens", type=int, nargs="+", default=None, help="rows of x (default: 1 2 4 8 16)"
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted(SHAPES),
        default=None,
        help="default: qkv o router lm_head (--norm: qkv router)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--calls", type=int, default=20, help="calls per graph (at least)")
    p.add_argument("--min-mb", type=float, default=200.0, help="weight copies' total, MB")
    p.add_argument("--replays", type=int, default=20, help="timed graph replays (median)")
    p.add_argument("--sweep", action="store_true", help="search configs per shape and T")
    p.add_argument("--sweep-replays", type=int, default=3, help="timed replays per candidate")
    p.add_argument("--top", type=int, default=2, help="sweep: configs listed per shape and T")
    p.add_argument("--check", action="store_true", help="max error against the float32 product")
    p.add_argument(
        "--norm",
        action="store_true",
        help="time fused_add_rms_norm + GEMM against gemv with the norm in its prologue "
        "(default shapes qkv router, T = 1 2 4)",
    )
    p.add_argument("--output", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.norm and args.sweep:
        p.error("--norm and --sweep are separate runs")
    if args.shapes is None:
        args.shapes = NORM_SHAPES if args.norm else DEFAULT_SHAPES
    if args.tokens is None:
        args.tokens = NORM_TOKENS if args.norm else DEFAULT_TOKENS
    return args


def gemv_module() -> ModuleType:
    """``kvtier.kernels.gemv``, also from a checkout that is not installed."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    import kvtier.kernels.gemv as mod

    return mod


# ---------------------------------------------------------------------------- timing
def capture(fn: Callable[[int], object], calls: int) -> Callable[[], None]:
    """``fn(0) .. fn(calls - 1)`` captured in one CUDA graph; returns its replay. Run twice on a
    side stream first: compiles the kernel and allocates any scratch outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, 2)):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    return graph.replay


def time_replay(replay: Callable[[], None], replays: int) -> float:
    """Median milliseconds of one replay, after an untimed one."""
    return statistics.median(time_cuda_ms(replay, torch.device("cuda"), replays))


def hbm_gbps() -> float:
    """HBM traffic of a 1 GiB device-to-device copy (read + write), GB/s."""
    a = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    one_way = statistics.median(time_copy_gbps(b, a, repeats=5))
    del a, b
    torch.cuda.empty_cache()
    return 2 * one_way


# ---------------------------------------------------------------------------- configs
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def config_str(cfg: GemvConfig) -> str:
    kind = "dot" if cfg.use_dot else "fma"
    return f"{kind} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} x{cfg.split_k}"


def grid_str(t: int, n: int, k: int, cfg: GemvConfig) -> str:
    return "x".join(map(str, gemv_module().launch_grid(t, n, k, cfg)))


def _acc_regs(cfg: GemvConfig, t: int) -> float:
    """float32 accumulator registers a thread holds."""
    bt = 1 << max(t - 1, 0).bit_length()
    per_cta = cfg.block_n * max(bt, 16) if cfg.use_dot else cfg.block_n * bt * cfg.block_k
    return per_cta / (32 * cfg.num_warps)


def _sensible(cfg: GemvConfig, t: int) -> bool:
    # Each thread loads at least 16 bytes of the weight tile a step (8 elements), and the
    # accumulator fits in registers.
    tile = cfg.block_n * cfg.block_k
    return tile // (32 * cfg.num_warps) >= 8 and _acc_regs(cfg, t) <= 128


def stage1(t: int, n: int, k: int) -> list[GemvConfig]:
    """Tiles, splits and product kind at 4 warps, 3 stages (see the module docstring)."""
    mod = gemv_module()
    out = []
    for use_dot in (False, True):
        if (use_dot and t < 2) or (not use_dot and t > mod.MAX_FMA_ROWS):
            continue
        for bn in (16, 32, 64) if use_dot else (4, 8, 16, 32):
            blocks = cdiv(n, bn)
            for bk in (128, 256, 512, 1024):
                tile = bn * bk
                if bk > k or (use_dot and bk > 512) or not 1024 <= tile <= 16384:
                    continue
                for split in (1, 2, 4, 8):
                    # Split only while the N blocks alone fill less than the GPU, each range
                    # at least one step long.
                    if split > 1 and (blocks * split // 2 >= NUM_SMS or cdiv(k, split) < bk):
                        continue
                    cfg = mod.GemvConfig(bn, bk, 4, 3, split, use_dot)
                    if _sensible(cfg, t):
                        out.append(cfg)
    programs = [math.prod(mod.launch_grid(t, n, k, c)) for c in out]
    floor = min(NUM_SMS // 2, max(programs, default=0))
    return [c for c, p in zip(out, programs) if p >= floor]


def stage2_warps(cfg: GemvConfig, t: int) -> list[GemvConfig]:
    alts = [dataclasses.replace(cfg, num_warps=w) for w in (2, 4, 8) if w != cfg.num_warps]
    return [c for c in alts if _sensible(c, t)]


def stage2_stages(cfg: GemvConfig, k: int) -> list[GemvConfig]:
    if not cfg.use_dot or cdiv(cdiv(k, cfg.split_k), cfg.block_k) < 2:
        return []  # the elementwise loop prefetches by hand; one step: nothing to pipeline
    return [dataclasses.replace(cfg, num_stages=s) for s in (2, 3, 4) if s != cfg.num_stages]


# ---------------------------------------------------------------------------- errors
def ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |out - ref| in units of out's dtype's spacing at |ref| (ref in float64); elements
    below 1/64 of the largest are measured at that floor (cancellation there is float32's, not
    the rounding's)."""
    eps = torch.finfo(out.dtype).eps
    mag = ref.abs().clamp_min(ref.abs().max().item() / 64 + 1e-30)
    ulp = eps * torch.exp2(torch.floor(torch.log2(mag)))
    return ((out.double() - ref).abs() / ulp).max().item()


# ---------------------------------------------------------------------------- main
@dataclasses.dataclass
class Case:
    """One shape at one T: its inputs, the graph size and the baseline times."""

    name: str
    t: int
    n: int
    k: int
    weight_bytes: int
    calls: int
    linear: Callable[[int], torch.Tensor]  # F.linear on weight copy i % copies
    kernel: Callable[[int, GemvConfig | None], torch.Tensor]  # gemv on the same
    ref: torch.Tensor  # x @ weight copy 0 ^T in float64 (--check, --sweep)
    cublas_ms: float = math.nan
    default_ms: float = math.nan


def measure(case: Case, cfg: GemvConfig | None, replays: int) -> float:
    """Milliseconds per gemv call with ``cfg`` (None: the default config)."""
    replay = capture(lambda i: case.kernel(i, cfg), case.calls)
    return time_replay(replay, replays) / case.calls


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemv.py needs a CUDA GPU (Triton kernel, cuBLAS); none here: skipped.")
        return 0
    mod = gemv_module()
    if mod.triton is None:
        print("bench_gemv.py needs Triton, which is not installed: skipped.")
        return 0
    dtype = DTYPES[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    hbm = hbm_gbps()
    print(f"device-to-device copy: {hbm:.0f} GB/s of HBM traffic (read + write): the ceiling\n")

    if args.norm:
        return run_norm(args, mod, dtype, hbm)

    rows: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    failures = 0
    started = time.perf_counter()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.shapes:
        n, k = SHAPES[name]
        weight_bytes = n * k * torch.finfo(dtype).bits // 8
        copies = max(1, math.ceil(args.min_mb * 1e6 / weight_bytes))
        weights = torch.empty(copies, n, k, dtype=dtype, device="cuda")
        weights.normal_(0, 0.02, generator=gen)
        for t in args.tokens:
            x = torch.randn(t, k, device="cuda", generator=gen).to(dtype)
            case = Case(
                name, t, n, k, weight_bytes, max(args.calls, copies),
                linear=lambda i, x=x, w=weights, c=copies: F.linear(x, w[i % c]),
                kernel=lambda i, cfg, x=x, w=weights, c=copies: mod.gemv(x, w[i % c], config=cfg),
                # Only --check and --sweep use it (lm_head's is a 2.5 GB float64 product).
                ref=x.double() @ weights[0].double().T if args.check or args.sweep else x,
            )  # fmt: skip
            capture_linear = capture(case.linear, case.calls)
            case.cublas_ms = time_replay(capture_linear, args.replays) / case.calls
            del capture_linear
            case.default_ms = measure(case, None, args.replays)
            default = mod.default_config(t, n, k)
            row: dict[str, Any] = {
                "shape": name,
                "n": n,
                "k": k,
                "tokens": t,
                "weight_mb": weight_bytes / 1e6,
                "copies": copies,
                "calls": case.calls,
                "cublas_us": case.cublas_ms * 1e3,
                "gemv_us": case.default_ms * 1e3,
                "cublas_gbps": weight_bytes / case.cublas_ms / 1e6,
                "gemv_gbps": weight_bytes / case.default_ms / 1e6,
                "speedup": case.cublas_ms / case.default_ms,
                "config": config_str(default),
                "grid": grid_str(t, n, k, default),
            }
            row["cublas_of_hbm"] = row["cublas_gbps"] / hbm
            row["gemv_of_hbm"] = row["gemv_gbps"] / hbm
            if args.check:
                out = case.kernel(0, None)
                row["gemv_ulps"] = ulps(out, case.ref)
                row["cublas_ulps"] = ulps(case.linear(0), case.ref)
                row["gemv_max_err"] = (out.double() - case.ref).abs().max().item()
                row["deterministic"] = all(torch.equal(case.kernel(0, None), out) for _ in range(5))
            rows.append(row)
            print(
                f"{name} T={t}: cuBLAS {row['cublas_us']:.2f} us, gemv {row['gemv_us']:.2f} us",
                file=sys.stderr,
            )
            if args.sweep:
                failures += sweep(case, args, sweeps)
        del weights, case  # the case's calls hold the copies
        torch.cuda.empty_cache()

    columns = [
        ("shape", "shape", fmt_str),
        ("tokens", "T", fmt_str),
        ("weight_mb", "MB", fmt_float(1)),
        ("cublas_us", "cuBLAS us", fmt_float(2)),
        ("gemv_us", "gemv us", fmt_float(2)),
        ("cublas_gbps", "cuBLAS GB/s", fmt_float(0)),
        ("gemv_gbps", "gemv GB/s", fmt_float(0)),
        ("cublas_of_hbm", "cuBLAS/HBM", fmt_float(2)),
        ("gemv_of_hbm", "gemv/HBM", fmt_float(2)),
        ("speedup", "speedup", fmt_float(2)),
        ("config", "default config", fmt_str),
        ("grid", "grid", fmt_str),
    ]
    if args.check:
        columns += [
            ("gemv_ulps", "gemv ulps", fmt_float(2)),
            ("cublas_ulps", "cuBLAS ulps", fmt_float(2)),
            ("gemv_max_err", "gemv max err", fmt_float(6)),
            ("deterministic", "same x5", fmt_str),
        ]
    print(format_table(rows, columns))
    print(
        f"\nus per call: a graph replay of >= {args.calls} calls on distinct weight copies "
        f"(>= {args.min_mb:.0f} MB together) / calls; GB/s: weight bytes per call / time; "
        "speedup: cuBLAS time / gemv time."
    )
    if args.check:
        print(
            "ulps: max |out - x @ W^T (float64)| in the output dtype's spacing at the reference "
            "(floored at 1/64 of its largest element); a correctly rounded float32 sum is <= 0.5."
        )
    if args.sweep:
        for s in sweeps:
            s["of_hbm"] = s["gbps"] / hbm
        elapsed = time.perf_counter() - started
        print(f"\nsweep (whole run {elapsed:.0f} s), fastest configs per shape and T:")
        sweep_cols = [
            ("shape", "shape", fmt_str),
            ("tokens", "T", fmt_str),
            ("rank", "#", fmt_str),
            ("config", "config", fmt_str),
            ("grid", "grid", fmt_str),
            ("us", "us", fmt_float(2)),
            ("gbps", "GB/s", fmt_float(0)),
            ("of_hbm", "of HBM", fmt_float(2)),
            ("vs_cublas", "vs cuBLAS", fmt_float(2)),
            ("vs_default", "vs default", fmt_float(2)),
            ("tried", "tried", fmt_str),
        ]
        print(format_table(sweeps, sweep_cols))
        print("vs X: X's time / this config's (> 1: this one is faster).")
        if failures:
            print(f"\n{failures} candidate config(s) gave WRONG results (see stderr)")
    if args.output:
        summary = {"hbm_gbps": hbm, "dtype": args.dtype, "sweep_failures": failures}
        write_json(
            args.output, {"meta": run_metadata(), "summary": summary, "rows": rows, "sweep": sweeps}
        )
        print(f"\nwrote {args.output}")
    return 1 if failures else 0


# ---------------------------------------------------------------------------- --norm
def norm_sides(
    mod: ModuleType,
    fused: ModuleType,
    x: torch.Tensor,
    residual: torch.Tensor,
    nw: torch.Tensor,
    weights: torch.Tensor,
    prologue: Any,
) -> dict[str, Callable[[int], torch.Tensor]]:
    """The three ways --norm times call i (on weight copy i % copies): the norm kernel then
    cuBLAS, the norm kernel then gemv, gemv with the norm in its prologue."""
    copies = weights.shape[0]

    def two_kernels(gemm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], i: int):
        normed, _ = fused.fused_add_rms_norm(x, residual, nw, NORM_EPS)
        return gemm(normed, weights[i % copies])

    return {
        "norm_cublas": lambda i: two_kernels(F.linear, i),
        "norm_gemv": lambda i: two_kernels(mod.gemv, i),
        "fused": lambda i: mod.gemv(x, weights[i % copies], norm=prologue),
    }


def run_norm(args: argparse.Namespace, mod: ModuleType, dtype: torch.dtype, hbm: float) -> int:
    """The --norm table: per shape and T, the norm kernel + cuBLAS, the norm kernel + gemv, and
    gemv with the norm in its prologue (see the module docstring). Returns the exit status."""
    from kvtier.kernels import fused  # importable: gemv_module() put the checkout on the path

    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.shapes:
        n, k = SHAPES[name]
        weight_bytes = n * k * torch.finfo(dtype).bits // 8
        copies = max(1, math.ceil(args.min_mb * 1e6 / weight_bytes))
        calls = max(args.calls, copies)
        weights = torch.empty(copies, n, k, dtype=dtype, device="cuda")
        weights.normal_(0, 0.02, generator=gen)
        nw = (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).to(dtype)
        for t in args.tokens:
            x = torch.randn(t, k, device="cuda", generator=gen).to(dtype)
            residual = torch.randn(t, k, device="cuda", generator=gen).to(dtype)
            residual_out = torch.empty_like(x)
            # The router's normed rows are also the MoE experts' input.
            normed_out = torch.empty_like(x) if name == "router" else None
            prologue = mod.NormPrologue(nw, NORM_EPS, residual, residual_out, normed_out)
            sides = norm_sides(mod, fused, x, residual, nw, weights, prologue)
            us = {}
            for side, fn in sides.items():
                replay = capture(fn, calls)
                us[side] = time_replay(replay, args.replays) / calls * 1e3
                del replay
            # The fused result against the two kernels' (the same gemv config).
            ref = sides["norm_gemv"](0)
            ref_normed, ref_h = fused.fused_add_rms_norm(x, residual, nw, NORM_EPS)
            out = sides["fused"](0)
            cfg = mod.default_config(t, n, k)
            row: dict[str, Any] = {
                "shape": name,
                "n": n,
                "k": k,
                "tokens": t,
                "weight_mb": weight_bytes / 1e6,
                "calls": calls,
                "norm_cublas_us": us["norm_cublas"],
                "norm_gemv_us": us["norm_gemv"],
                "fused_us": us["fused"],
                "saved_us": us["norm_gemv"] - us["fused"],
                "vs_norm_gemv": us["norm_gemv"] / us["fused"],
                "vs_norm_cublas": us["norm_cublas"] / us["fused"],
                "config": config_str(cfg),
                "grid": grid_str(t, n, k, cfg),
                "out_ulps": ulps(out, ref.double()),
                "out_equal": (out == ref).float().mean().item(),
                "residual_bitwise": torch.equal(residual_out, ref_h),
                "normed_ulps": ulps(normed_out, ref_normed.double()) if normed_out is not None
                else math.nan,
            }  # fmt: skip
            rows.append(row)
            print(
                f"{name} T={t}: norm+cuBLAS {us['norm_cublas']:.2f} us, norm+gemv "
                f"{us['norm_gemv']:.2f} us, fused {us['fused']:.2f} us",
                file=sys.stderr,
            )
        del weights
        torch.cuda.empty_cache()

    columns = [
        ("shape", "shape", fmt_str),
        ("tokens", "T", fmt_str),
        ("weight_mb", "MB", fmt_float(1)),
        ("norm_cublas_us", "norm+cuBLAS us", fmt_float(2)),
        ("norm_gemv_us", "norm+gemv us", fmt_float(2)),
        ("fused_us", "fused us", fmt_float(2)),
        ("saved_us", "saved us", fmt_float(2)),
        ("vs_norm_gemv", "vs norm+gemv", fmt_float(2)),
        ("vs_norm_cublas", "vs norm+cuBLAS", fmt_float(2)),
        ("config", "config", fmt_str),
        ("grid", "grid", fmt_str),
        ("out_ulps", "ulps vs 2 kernels", fmt_float(2)),
        ("out_equal", "equal", fmt_float(4)),
        ("residual_bitwise", "residual same", fmt_str),
        ("normed_ulps", "normed ulps", fmt_float(2)),
    ]
    print(format_table(rows, columns))
    print(
        f"\nus per call: a graph replay of >= {args.calls} calls on distinct weight copies "
        f"(>= {args.min_mb:.0f} MB together) / calls, the norm's launch included; vs X: X's "
        "time / the fused one's (> 1: fused faster). ulps: max |fused - two kernels| in the "
        "output dtype's spacing (floored at 1/64 of the largest); equal: the fraction bitwise "
        "equal; normed ulps: the normed rows (router) against the norm kernel's."
    )
    if args.output:
        summary = {"hbm_gbps": hbm, "dtype": args.dtype, "norm_eps": NORM_EPS}
        write_json(args.output, {"meta": run_metadata(), "summary": summary, "norm_rows": rows})
        print(f"\nwrote {args.output}")
    return 0


def sweep(case: Case, args: argparse.Namespace, sweeps: list[dict[str, Any]]) -> int:
    """Time the candidates for one shape and T; append the fastest ``args.top`` to ``sweeps``.
    Returns the number of candidates whose output was wrong (never ranked)."""
    results: dict[GemvConfig, float] = {}
    failures = 0

    def try_all(cfgs: list[GemvConfig]) -> None:
        nonlocal failures
        for cfg in cfgs:
            if cfg in results:
                continue
            err = ulps(case.kernel(0, cfg), case.ref)  # also compiles it outside the capture
            if not err <= 1.0:
                failures += 1
                print(f"WRONG: {case.name} T={case.t} {config_str(cfg)}: {err:.1f} ulps",
                      file=sys.stderr)  # fmt: skip
                continue
            results[cfg] = measure(case, cfg, args.sweep_replays)

    def best() -> GemvConfig:
        return min(results, key=results.__getitem__)

    try_all(stage1(case.t, case.n, case.k))
    if results:
        try_all(stage2_warps(best(), case.t))
        try_all(stage2_stages(best(), case.k))
    ranked = sorted(results.items(), key=lambda r: r[1])
    for rank, (cfg, ms) in enumerate(ranked[: args.top], 1):
        sweeps.append(
            {
                "shape": case.name,
                "tokens": case.t,
                "rank": rank,
                "config": config_str(cfg),
                "grid": grid_str(case.t, case.n, case.k, cfg),
                "us": ms * 1e3,
                "gbps": case.weight_bytes / ms / 1e6,
                "vs_cublas": case.cublas_ms / ms,
                "vs_default": case.default_ms / ms,
                "tried": len(results),
                **dataclasses.asdict(cfg),
            }
        )
    print(f"{case.name} T={case.t}: swept {len(results)} configs", file=sys.stderr)
    return failures


if __name__ == "__main__":
    sys.exit(main())
