"""Where does a tier hit's time go? One long prompt is prefilled, evicted from the GPU (its L2
copy kept) and sent again; for that hit this prints the host timeline of the scheduler step,
every synchronizing CUDA call the host made (with a stack), and from a profiler trace the
per-layer timeline of the load stream against the compute stream. A GPU diagnostic, not a test.

    python scripts/diag_tier_hit.py --tokens 81920 --tier dram --trace-dir out
"""

from __future__ import annotations

import argparse
import json
import random
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import kvtier
from kvtier.server_args import IO_BACKENDS


def wrap(obj: Any, name: str, marks: list[tuple[str, float]]) -> None:
    fn = getattr(obj, name)

    def timed(*a: Any, **kw: Any) -> Any:
        marks.append((f"{name} begin", time.perf_counter()))
        try:
            return fn(*a, **kw)
        finally:
            marks.append((f"{name} end", time.perf_counter()))

    setattr(obj, name, timed)


def kernel_timeline(trace_path: Path, num_layers: int) -> None:
    events = json.loads(trace_path.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if not kernels:
        print("no kernels in the trace")
        return
    t0 = min(k["ts"] for k in kernels)
    by_stream: dict[int, list[dict[str, Any]]] = {}
    for k in kernels:
        by_stream.setdefault(k["args"].get("stream", -1), []).append(k)
    for stream, ks in sorted(by_stream.items()):
        busy = sum(k["dur"] for k in ks)
        first = min(k["ts"] for k in ks) - t0
        last = max(k["ts"] + k["dur"] for k in ks) - t0
        names: dict[str, float] = {}
        for k in ks:
            names[k["name"][:50]] = names.get(k["name"][:50], 0.0) + k["dur"]
        top = sorted(names.items(), key=lambda kv: -kv[1])[:6]
        print(
            f"stream {stream}: {len(ks)} kernels, span {first / 1e3:.2f}..{last / 1e3:.2f} ms, "
            f"busy {busy / 1e3:.2f} ms; top: " + ", ".join(f"{n} {d / 1e3:.2f}ms" for n, d in top)
        )
    loads = sorted((k for k in kernels if "copy_pages" in k["name"]), key=lambda k: k["ts"])
    attn = sorted((k for k in kernels if "extend" in k["name"]), key=lambda k: k["ts"])
    print(f"{len(loads)} load kernels, {len(attn)} extend-attention kernels")
    rows = list(range(min(4, num_layers))) + list(range(max(4, num_layers - 3), num_layers))
    for i in rows:
        parts = [f"layer {i:2d}"]
        if i < len(loads):
            k = loads[i]
            parts.append(
                f"load {(k['ts'] - t0) / 1e3:7.2f}..{(k['ts'] + k['dur'] - t0) / 1e3:7.2f}"
            )
        if i < len(attn):
            k = attn[i]
            parts.append(
                f"attn {(k['ts'] - t0) / 1e3:7.2f}..{(k['ts'] + k['dur'] - t0) / 1e3:7.2f}"
            )
        print("  ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen3-30B-A3B-Instruct-2507")
    ap.add_argument("--tokens", type=int, default=81920)
    ap.add_argument("--tier", default="dram")
    ap.add_argument("--hicache-size", type=float, default=30)
    ap.add_argument("--io-backend", default="auto", choices=IO_BACKENDS)
    ap.add_argument("--trace-dir", type=Path, default=Path("."))
    args = ap.parse_args()
    eng = kvtier.Engine(
        model_path=args.model,
        load_format="dummy",
        page_size=64,
        mem_fraction_static=0.85,
        enable_hierarchical_cache=True,
        hicache_size=args.hicache_size,
        hicache_tier=args.tier,
        hicache_io_backend=args.io_backend,
        log_level="warning",
    )
    sched = eng.scheduler
    rng = random.Random(0)
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}

    def hit(ids: list[int]) -> dict[str, Any]:
        eng.generate(input_ids=ids, sampling_params=sp)
        eng.flush_cache(tier="device")
        torch.cuda.synchronize()
        return {}

    warm = [rng.randrange(1000, 100000) for _ in range(args.tokens)]
    hit(warm)
    eng.generate(input_ids=warm, sampling_params=sp)  # warm the hit path
    ids = [rng.randrange(1000, 100000) for _ in range(args.tokens)]
    hit(ids)

    marks: list[tuple[str, float]] = []
    wrap(sched, "_run", marks)
    wrap(sched.cache, "start_loads", marks)
    wrap(sched.runner, "forward", marks)
    wrap(sched, "_admit", marks)
    syncs: list[str] = []

    def show(message: Any, category: Any, filename: str, lineno: int, *a: Any) -> None:
        stack = "".join(traceback.format_stack(limit=9)[:-2])
        syncs.append(f"{message}\n{stack}")

    old_show = warnings.showwarning
    warnings.showwarning = show  # type: ignore[assignment]
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    t0 = time.perf_counter()
    out = eng.generate(input_ids=ids, sampling_params=sp)
    t1 = time.perf_counter()
    torch.cuda.set_sync_debug_mode("default")
    warnings.showwarning = old_show  # type: ignore[assignment]
    print("hit:", out["meta_info"]["cached_tokens_by_tier"], f"e2e {1e3 * (t1 - t0):.1f} ms")
    for name, t in marks:
        print(f"  {1e3 * (t - t0):8.2f} ms  {name}")
    print(f"{len(syncs)} synchronizing calls during the hit:")
    for s in syncs[:12]:
        print("----", s)

    ids2 = [rng.randrange(1000, 100000) for _ in range(args.tokens)]
    hit(ids2)
    marks.clear()
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        out = eng.generate(input_ids=ids2, sampling_params=sp)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
    print("profiled hit:", out["meta_info"]["cached_tokens_by_tier"], f"{1e3 * (t1 - t0):.1f} ms")
    args.trace_dir.mkdir(parents=True, exist_ok=True)
    path = args.trace_dir / f"trace_{args.tier}_{args.io_backend}.json"
    prof.export_chrome_trace(str(path))
    kernel_timeline(path, sched.runner.model_config.num_hidden_layers)
    # Same prompt, now a GPU hit: the forward alone.
    t0 = time.perf_counter()
    eng.generate(input_ids=ids2, sampling_params=sp)
    print(f"GPU hit: {1e3 * (time.perf_counter() - t0):.1f} ms")
    eng.shutdown()


if __name__ == "__main__":
    main()
