"""Profile one tier-hit request, one GPU-hit request and one decode step on the GPU
(torch.profiler), printing where host and device time go. A diagnostic for the lent GPU, not
part of the test suite.

    python scripts/profile_step.py --tokens 32768
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kvtier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen3-30B-A3B-Instruct-2507")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=18)
    args = ap.parse_args()
    eng = kvtier.Engine(
        model_path=args.model,
        load_format="dummy",
        page_size=64,
        mem_fraction_static=0.85,
        enable_hierarchical_cache=True,
        hicache_size=8,
        log_level="warning",
    )
    rng = random.Random(0)
    ids = [rng.randrange(1000, 100000) for _ in range(args.tokens)]
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    eng.generate(input_ids=ids, sampling_params=sp)
    eng.generate(input_ids=[5] + ids[1:2048], sampling_params=sp)  # warm the small path
    eng.flush_cache(tier="device")
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=acts) as prof:
        out = eng.generate(input_ids=ids, sampling_params=sp)
        torch.cuda.synchronize()
    print("tier hit:", out["meta_info"]["cached_tokens_by_tier"], out["meta_info"]["e2e_latency"])
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(ka.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    # The same prompt again, now on the GPU: a GPU hit (its last token computed, its tail
    # copied), the request path without any load.
    eng.generate(input_ids=ids, sampling_params=sp)
    torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        out = eng.generate(input_ids=ids, sampling_params=sp)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    print(f"GPU hit: {out['meta_info']['cached_tokens_by_tier']}, {wall * 1e3:.1f} ms wall")
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print(ka.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    dsp = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}
    eng.generate(input_ids=ids[:1024], sampling_params=dsp)
    with profile(activities=acts) as prof:
        eng.generate(input_ids=ids[:1024], sampling_params=dsp)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print("decode (40 tokens after a cached 1K prompt):")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    eng.shutdown()


if __name__ == "__main__":
    main()
