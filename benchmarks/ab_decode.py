"""A/B of decode speed across run-time switches, in one engine: for each variant the switches
are set, the decode CUDA graphs captured again, and decode steps timed; the variants take turns
round after round, so that drift between them shows as the spread of a variant's rounds.

    python benchmarks/ab_decode.py --batch 1,4 --rounds 3 \\
        --variant base: \\
        --variant qkv:kvtier.kernels.fused:PREFETCH=["qkv"]

A variant is ``NAME:`` followed by ``module:ATTR=JSON`` settings joined by ``;`` (none: the
defaults). A JSON list becomes a frozenset where the attribute holds a set. Every setting is put
back after its variant. GPU only (it times CUDA graphs).

Knock-outs (``knockout=route,norm``): timing probes that drop a decode kernel from the step
(its caller gets a stand-in of the right shape, no launch), to measure what a kernel costs in
the step's chain of dependent launches, i.e. the most that fusing it away could save. The
outputs are then wrong: for timing only. ``route`` (MoE routing: fixed ids), ``norm`` (the
fused add + RMSNorm), ``qknorm`` (q/k norm + RoPE + KV store), ``stage2`` (decode attention's
merge), ``attn`` (both attention stages), ``experts`` (the MoE expert kernels).
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from bench_engine import copy_gbps, decode_bytes, decode_step_seconds, parse_lengths


def parse_variant(spec: str, engine: Any = None) -> tuple[str, list[tuple[Any, str, Any]]]:
    """``NAME:SETTING;...`` -> (NAME, [(object, ATTR, value)]); ValueError on a bad spec. A
    setting is ``module:ATTR=JSON``, ``@path.ATTR=JSON`` (an attribute reached from the engine,
    e.g. ``@scheduler.runner.attn_backend.max_kv_splits=128``; resolved only when ``engine`` is
    given, else only checked for form) or ``knockout=NAMES``."""
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"--variant {spec!r}: expected NAME:[module:ATTR=JSON;...]")
    settings = []
    for item in filter(None, (x.strip() for x in rest.split(";"))):
        target, eq, raw = item.partition("=")
        if target == "knockout":
            settings += knockout_settings([n for n in raw.split(",") if n])
            continue
        if target.startswith("@"):
            path, dot, attr = target[1:].rpartition(".")
            if not eq or not dot:
                raise ValueError(f"--variant {spec!r}: setting {item!r} is not @path.ATTR=JSON")
            if engine is None:
                continue
            obj = engine
            for part in path.split("."):
                obj = getattr(obj, part)
            where = f"engine.{path}"
        else:
            mod_name, colon, attr = target.rpartition(":")
            if not eq or not colon:
                raise ValueError(f"--variant {spec!r}: setting {item!r} is not module:ATTR=JSON")
            obj = importlib.import_module(mod_name)
            where = mod_name
        if not hasattr(obj, attr):
            raise ValueError(f"--variant {spec!r}: {where} has no attribute {attr}")
        value = json.loads(raw)
        if isinstance(getattr(obj, attr), (set, frozenset)):
            value = frozenset(value)
        settings.append((obj, attr, value))
    return name, settings


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _fixed_route(logits, top_k, renormalize, *, out_dtype=None, use_triton=None):
    # Experts 0, 16, 32, ... for every token (allocated outside graph capture: the warm-up
    # forward passes before a capture call it first).
    t = logits.shape[0]
    key = (t, top_k, logits.device, out_dtype or logits.dtype)
    if key not in _ROUTE_CACHE:
        step = max(1, logits.shape[1] // top_k)
        ids = (torch.arange(top_k, device=logits.device) * step).repeat(t, 1)
        weights = torch.full((t, top_k), 1.0 / top_k, dtype=key[3], device=logits.device)
        _ROUTE_CACHE[key] = (weights, ids)
    return _ROUTE_CACHE[key]


_ROUTE_CACHE: dict = {}


def knockout_settings(names: list[str]) -> list[tuple[Any, str, Any]]:
    """The (module or class, attribute, stand-in) settings of the knock-outs ``names``."""
    from kvtier.kernels import attention, fused
    from kvtier.models import layers

    def no_norm(x, residual, weight, eps, **kwargs):
        return x, residual

    def no_qknorm(qkv, q_weight, k_weight, positions, inv_freq, hq, hkv, d, *args, **kwargs):
        return qkv[:, : hq * d].view(qkv.shape[0], hq, d)

    def no_experts(self, x, topk_ids, topk_weights):
        return x

    table = {
        "route": [(fused, "moe_route", _fixed_route)],
        "norm": [(fused, "fused_add_rms_norm", no_norm)],
        "qknorm": [(fused, "qk_norm_rope_store", no_qknorm)],
        "stage2": [(attention, "_decode_stage2_kernel", _NoLaunch())],
        "attn": [
            (attention, "_decode_stage1_kernel", _NoLaunch()),
            (attention, "_decode_stage2_kernel", _NoLaunch()),
        ],
        "experts": [(layers.FusedExperts, "forward", no_experts)],
    }
    out = []
    for name in names:
        if name not in table:
            raise ValueError(f"knockout={name!r}: expected one of {', '.join(table)}")
        out += table[name]
    return out


def recapture(engine) -> None:
    """Capture the decode graphs again (the kernels a graph launches are fixed at capture)."""
    from kvtier.runner.cuda_graph import CudaGraphRunner

    runner = engine.scheduler.runner
    old = runner.graph_runner
    if old is None:
        return
    runner.graph_runner = None
    max_bs = old.max_bs
    del old
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    runner.graph_runner = CudaGraphRunner(runner, max_bs, runner.max_pages_per_req)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen/Qwen3-30B-A3B-Instruct-2507")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--context", default="4K", help="comma-separated context lengths")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:SETTINGS")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("ab_decode.py times CUDA graphs; no CUDA device is visible", file=sys.stderr)
        return 2
    specs = args.variant or ["default:"]
    for spec in specs:
        parse_variant(spec)  # the form, before the engine's minute of start-up
    batches = parse_lengths(args.batch)
    cases = [(c, b) for c in parse_lengths(args.context) for b in batches]
    import kvtier

    gbps = copy_gbps()
    torch.cuda.empty_cache()  # the copy's 8 GB, before the engine sizes its KV pool
    engine = kvtier.Engine(
        model_path=args.model,
        load_format="dummy",
        disable_radix_cache=True,
        cuda_graph_max_bs=max(batches),
        log_level="warning",
    )
    variants = [parse_variant(spec, engine) for spec in specs]
    cfg = engine.scheduler.runner.model_config
    kvb = engine.scheduler.runner.kv_pool.token_bytes
    rng = random.Random(0)
    times: dict[str, dict[str, list[float]]] = {n: {} for n, _ in variants}
    for r in range(args.rounds):
        for name, settings in variants:
            saved = [(m, a, getattr(m, a)) for m, a, _ in settings]
            for m, a, v in settings:
                setattr(m, a, v)
            try:
                recapture(engine)
                for c, b in cases:
                    dt = decode_step_seconds(engine, b, c, args.steps, rng)
                    times[name].setdefault(f"{c}/{b}", []).append(dt)
                    print(f"round {r} {name:>16} ctx {c:>6} batch {b:>3}: {dt * 1e3:7.3f} ms/step")
            finally:
                for m, a, v in saved:
                    setattr(m, a, v)
    print(
        f"\nmedian of {args.rounds} rounds, ms a step (+- half the spread), and the bytes a step "
        f"reads over it as a ratio of the device copy rate ({gbps:.0f} GB/s r+w, this run)"
    )
    summary: dict[str, dict] = {}
    for name, _ in variants:
        summary[name] = {}
        cells = []
        for c, b in cases:
            key = f"{c}/{b}"
            xs = times[name][key]
            med = statistics.median(xs)
            ratio = decode_bytes(cfg, b, c, kvb) / med / 1e9 / gbps
            summary[name][key] = {"median_s": med, "all_s": xs, "ratio": ratio}
            cells.append(
                f"{key} {med * 1e3:.3f} (+-{(max(xs) - min(xs)) * 1e3 / 2:.3f}) {ratio:.2f}"
            )
        print(f"{name:>16}: " + "  ".join(cells))
    engine.shutdown()
    if args.output:
        Path(args.output).write_text(
            json.dumps({"copy_gbps_rw": gbps, "variants": summary}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
