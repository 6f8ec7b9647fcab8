"""Profile new turns of a conversation whose prefix is on the GPU: a prompt of --prefix tokens,
then --turn-tokens fresh ones (one output token), as ``kvcache_benchmark.py --turn-tokens``
times them. Prints each prefix's turn wall times, then one profiled turn's device time
against its wall time and the kernels that took it. A diagnostic for the lent GPU, not part
of the test suite.

    python scripts/profile_turn.py --prefix 32768 81920 --turn-tokens 512
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kvtier


def host_probe() -> str:
    """This process's host speed, for telling a slow process (a 32K turn at 83-116 ms where
    others take 50-55; docs/benchmarks.md runs 15-16) from a fast one: the load average, the
    CPUs it may run on and their mean clock, then the time of a fixed pure-Python loop, of
    1,000 tiny CPU torch ops and of 1,000 tiny CUDA kernel launches (synchronised)."""
    load = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        clock = f"{sum(mhz) / len(mhz):.0f} MHz" if mhz else "?"
    except OSError:
        clock = "?"
    t = time.perf_counter()
    acc = 0
    for i in range(1_000_000):
        acc += i
    py_ms = (time.perf_counter() - t) * 1e3
    cpu_op_us = _op_us(torch.zeros(1))
    launch_us = _op_us(torch.zeros(1, device="cuda"))
    return (
        f"host: load {load:.1f}, {cpus} CPUs at {clock}, python loop {py_ms:.1f} ms, "
        f"CPU op {cpu_op_us:.2f} us, CUDA launch {launch_us:.2f} us"
    )


def _op_us(x: torch.Tensor) -> float:
    """Microseconds a tiny in-place op on ``x`` takes, over 1,000 of them (synchronised on
    CUDA)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(1000):
        x.add_(1)
    sync()
    return (time.perf_counter() - t) * 1e3


def profile_turns(eng, ids, turn_tokens, fresh, sp, args) -> None:
    """Time ``args.repeats`` turns of ``turn_tokens`` fresh tokens after ``ids`` (on the GPU),
    after two warm-up turns; then profile one unless ``args.no_profile``."""
    prefix = len(ids)
    print(f"prefix {prefix}: {host_probe()}")
    for _ in range(2):  # warm-up turns
        eng.generate(input_ids=ids + fresh(turn_tokens), sampling_params=sp)
    walls = []
    for _ in range(args.repeats):
        turn = ids + fresh(turn_tokens)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = eng.generate(input_ids=turn, sampling_params=sp)
        walls.append((time.perf_counter() - t) * 1e3)
        assert out["meta_info"]["cached_tokens"] >= prefix - 64, out["meta_info"]
    print(f"prefix {prefix}: turn of {turn_tokens} tokens, wall ms", [round(w, 1) for w in walls])
    if args.no_profile:
        return
    turn = ids + fresh(turn_tokens)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        eng.generate(input_ids=turn, sampling_params=sp)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
    ka = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in ka)
    print(
        f"prefix {prefix}: profiled turn {wall:.1f} ms wall, "
        f"{device_us / 1e3:.1f} ms of kernels (PDL overlap counted twice)"
    )
    print(ka.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen3-30B-A3B-Instruct-2507")
    ap.add_argument("--prefix", type=int, nargs="+", default=[32768, 81920])
    ap.add_argument("--turn-tokens", type=int, nargs="+", default=[512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--no-profile", action="store_true", help="time the turns only")
    ap.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Engine keyword (an int where it parses as one), e.g. "
        "piecewise_cuda_graph_max_tokens=2048",
    )
    args = ap.parse_args()
    extra: dict[str, object] = {}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        extra[key] = int(value) if value.lstrip("-").isdigit() else value
    eng = kvtier.Engine(
        model_path=args.model,
        load_format="dummy",
        page_size=64,
        mem_fraction_static=0.85,
        enable_hierarchical_cache=True,
        hicache_size=24,
        skip_tokenizer_init=True,
        log_level="warning",
        **extra,
    )
    rng = random.Random(0)
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}

    def fresh(n: int) -> list[int]:
        return [rng.randrange(1000, 100000) for _ in range(n)]

    for prefix in args.prefix:
        ids = fresh(prefix)
        eng.generate(input_ids=ids, sampling_params=sp)
        for turn_tokens in args.turn_tokens:
            profile_turns(eng, ids, turn_tokens, fresh, sp, args)
    eng.shutdown()


if __name__ == "__main__":
    main()
