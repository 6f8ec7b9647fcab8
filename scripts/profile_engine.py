"""Where a recompute prefill and a decode step spend their time on the GPU (torch.profiler).

Builds the engine as benchmarks/bench_engine.py does (dummy weights, no radix cache), then
profiles one prefill of ``--prefill`` tokens and ``--steps`` decode steps at ``--batch``
sequences of ``--context`` tokens, with the CUDA graphs on and then off. For each it prints the
wall time, the summed kernel time and the kernels that took the most device time, grouped by
name. A diagnostic for the lent GPU, not part of the test suite.

    python scripts/profile_engine.py --prefill 16384 --batch 1 --steps 8
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kvtier
from kvtier.sampling_params import SamplingParams
from kvtier.scheduler.request import Req


def sync() -> None:
    # A no-op on a CPU-only build, so the script's logic can be tried on a tiny model there.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_table(prof: profile, rows: int, per: int) -> str:
    """The ``rows`` kernels with the most device time, in microseconds per step (``per``)."""
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(ev.name, [0.0, 0])
            t[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time
            t[1] += 1
    total = sum(v[0] for v in totals.values())
    lines = [f"  kernel time {total / per:10.1f} us per step, {len(totals)} distinct kernels"]
    for name, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"  {us / per:9.1f} us {n / per:6.1f}x  {name[:110]}")
    return "\n".join(lines)


def profile_prefill(engine: kvtier.Engine, n: int, rows: int, vocab: int) -> None:
    rng = random.Random(1)
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    engine.generate(input_ids=[rng.randrange(vocab) for _ in range(n)], sampling_params=sp)
    ids = [rng.randrange(vocab) for _ in range(n)]
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        engine.generate(input_ids=ids, sampling_params=sp)
        sync()
        wall = time.perf_counter() - t
    print(f"prefill {n} tokens: wall {wall * 1e3:.1f} ms (under the profiler)")
    print(kernel_table(prof, rows, 1))


def profile_decode(engine: kvtier.Engine, batch: int, ctx: int, steps: int, rows: int) -> None:
    sched = engine.scheduler
    vocab = sched.runner.model_config.vocab_size
    rng = random.Random(2)
    sp = SamplingParams(max_new_tokens=2 * steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        ids = [rng.randrange(vocab) for _ in range(ctx)]
        sched.add_request(Req(rid=f"p{batch}-{i}-{time.time()}", input_ids=ids, sampling=sp))
    while any(r.pending > 1 for r in sched.running) or sched.waiting:
        sched.step()
    for _ in range(3):
        sched.step()
    sync()
    # Host time of a step with no profiler: the step returns when the host is done with it
    # (it syncs on the sampled tokens), so wall = max(host work, device work) + the gap.
    t = time.perf_counter()
    for _ in range(steps):
        sched.step()
    sync()
    wall = (time.perf_counter() - t) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            sched.step()
        sync()
    graphs = sched.runner.graph_runner is not None
    print(f"decode batch {batch} ctx {ctx} graphs={graphs}: {wall * 1e3:.2f} ms/step (no profiler)")
    if graphs and torch.cuda.is_available():
        # The device time of the step's graph alone, replayed back to back: what the step
        # would take with no host work between graphs. wall - this = the host's share.
        gr = sched.runner.graph_runner
        g = gr.graphs[min(b for b in gr.batch_sizes if b >= batch)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            g.replay()
        end.record()
        sync()
        replay = start.elapsed_time(end) / steps
        print(f"  graph replay alone: {replay:.2f} ms/step; host {wall * 1e3 - replay:.2f} ms")
    print(kernel_table(prof, rows, steps))
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
    while sched.has_work():
        sched.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen3-30B-A3B-Instruct-2507")
    ap.add_argument("--prefill", type=int, default=16384, help="0: skip")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--no-eager", action="store_true", help="skip the run without CUDA graphs")
    args = ap.parse_args()
    for disable in (False, True) if not args.no_eager else (False,):
        engine = kvtier.Engine(
            model_path=args.model,
            load_format="dummy",
            mem_fraction_static=0.85,
            disable_radix_cache=True,
            disable_cuda_graph=disable,
            log_level="warning",
        )
        vocab = engine.scheduler.runner.model_config.vocab_size
        if args.prefill and not disable:
            profile_prefill(engine, args.prefill, args.rows, vocab)
        for b in args.batch:
            profile_decode(engine, b, args.context, args.steps, args.rows)
        engine.shutdown()
        del engine


if __name__ == "__main__":
    main()
