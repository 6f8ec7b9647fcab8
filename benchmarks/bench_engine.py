"""Recompute speed of the engine: prefill of one prompt and decode steps, against ceilings
measured in the same run (bf16 matmul rate, device copy bandwidth).

    python benchmarks/bench_engine.py --model Qwen/Qwen3-30B-A3B-Instruct-2507
    python benchmarks/bench_engine.py --prefill 4K,16K,80K --decode-batch 1,32,128
    python benchmarks/bench_engine.py --prefill '' --decode-batch 1 --decode-context 4K,32K,64K

Prefill ratio: model FLOPs / time / matmul rate. Decode ratio: bytes read per step (the weights
the batch touches + KV) / time / device copy bandwidth (read + write). GPU only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch


def parse_lengths(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip().upper()
        if not part:  # "--prefill ''": none
            continue
        out.append(int(float(part[:-1]) * 1024) if part.endswith("K") else int(part))
    return out


def matmul_tflops(n: int = 8192, iters: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def copy_gbps(nbytes: int = 4 << 30, iters: int = 5) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * nbytes * iters / (start.elapsed_time(end) / 1e3) / 1e9


def prefill_flops(cfg, tokens: int) -> float:
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * tokens * tokens
    return 2 * cfg.active_param_count * tokens + attn


def decode_bytes(cfg, batch: int, context: int, kv_bytes_per_token: int) -> float:
    """Bytes a decode step must read: the weights the batch touches and every KV byte."""
    elem = 2
    dense = cfg.active_param_count
    if cfg.is_moe:
        # Active params count top-k experts per token; a layer reads each expert its batch
        # routed to once: E (1 - (1 - k/E)^batch) distinct experts expected when each token
        # picks k distinct experts uniformly (the benchmark's random prompts; bench_moe's
        # random ids measured 83 at T = 16 and 111 at T = 32 of 82.4 and 111.7 expected). It
        # counted min(E, batch k) before, 128 at batch 16: a step's bytes overstated, so that
        # batch 16 read "1.23 of the copy bandwidth".
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        e, k = cfg.num_experts, cfg.num_experts_per_tok
        shared = dense - moe_layers * k * per_expert
        touched = e * (1 - (1 - k / e) ** batch)
        weights = shared + moe_layers * touched * per_expert
    else:
        weights = dense
    return weights * elem + batch * context * kv_bytes_per_token


def decode_step_seconds(engine, batch: int, context: int, steps: int, rng: random.Random) -> float:
    """Mean seconds of a decode step of ``batch`` requests with ``context``-token random prompts
    (greedy, ignore EOS), timed over ``steps`` steps after one untimed step; the requests run
    to completion before it returns."""
    from kvtier.sampling_params import SamplingParams
    from kvtier.scheduler.request import Req

    sched = engine.scheduler
    vocab = sched.runner.model_config.vocab_size
    dsp = SamplingParams(max_new_tokens=steps + 8, temperature=0, ignore_eos=True)
    tag = f"d{batch}-{time.monotonic_ns()}"
    for i in range(batch):
        ids = [rng.randrange(vocab) for _ in range(context)]
        sched.add_request(Req(rid=f"{tag}-{i}", input_ids=ids, sampling=dsp))
    while any(r.pending > 1 for r in sched.running) or sched.waiting:
        sched.step()
    sched.step()  # first decode step (may compile)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        sched.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    while sched.has_work():
        sched.step()
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen/Qwen3-30B-A3B-Instruct-2507")
    ap.add_argument("--prefill", default="4K,16K,80K")
    ap.add_argument("--decode-batch", default="1,32,128")
    ap.add_argument(
        "--decode-context", default="4K", help="comma-separated contexts (e.g. 4K,32K,64K)"
    )
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_engine.py measures GPU speed; no CUDA device is visible", file=sys.stderr)
        return 2
    import kvtier

    extra = {}
    for kv in args.engine_arg:
        k, v = kv.split("=", 1)
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    tflops = matmul_tflops()
    gbps = copy_gbps()
    print(f"ceilings: bf16 matmul {tflops:.0f} TFLOP/s, device copy {gbps:.0f} GB/s (r+w)")
    engine = kvtier.Engine(
        model_path=args.model,
        load_format="dummy",
        mem_fraction_static=args.mem_fraction_static,
        disable_radix_cache=True,
        log_level="warning",
        **extra,
    )
    cfg = engine.scheduler.runner.model_config
    kvb = engine.scheduler.runner.kv_pool.token_bytes
    vocab = cfg.vocab_size
    rng = random.Random(0)
    results: dict[str, list] = {"prefill": [], "decode": []}
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    engine.generate(input_ids=[rng.randrange(vocab) for _ in range(1024)], sampling_params=sp)
    for n in parse_lengths(args.prefill):
        if n >= engine.scheduler.context_length:
            # e.g. Qwen3-8B's 40,960 positions. With dummy weights the timing does not depend on
            # the positions' RoPE, so a longer context may be forced for a timing-only row.
            print(
                f"prefill {n:>6} tokens: skipped, the context length is "
                f"{engine.scheduler.context_length} (--engine-arg context_length={n + 1} "
                "times it anyway)"
            )
            results["prefill"].append({"tokens": n, "skipped": "longer than the context"})
            continue
        times = []
        for _ in range(2):
            ids = [rng.randrange(vocab) for _ in range(n)]
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.generate(input_ids=ids, sampling_params=sp)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        best = min(times)
        rate = prefill_flops(cfg, n) / best / 1e12
        results["prefill"].append({"tokens": n, "seconds": best, "tflops": rate})
        print(
            f"prefill {n:>6} tokens: {best * 1e3:9.1f} ms  {rate:6.1f} TFLOP/s  "
            f"{rate / tflops:.2f} of matmul"
        )
    for ctx in parse_lengths(args.decode_context):
        for b in parse_lengths(args.decode_batch):
            dt = decode_step_seconds(engine, b, ctx, args.decode_steps, rng)
            nbytes = decode_bytes(cfg, b, ctx, kvb)
            # The roofline is the copy bandwidth counting read plus write: what HBM moves per
            # second.
            ratio = nbytes / dt / 1e9 / gbps
            results["decode"].append({"batch": b, "context": ctx, "step_s": dt, "ratio": ratio})
            print(
                f"decode batch {b:>4} ctx {ctx}: {dt * 1e3:8.2f} ms/step  {b / dt:9.0f} tok/s  "
                f"{nbytes / dt / 1e9:7.0f} GB/s read = {ratio:.2f} of the HBM copy bandwidth"
            )
    engine.shutdown()
    if args.output:
        Path(args.output).write_text(
            json.dumps({"matmul_tflops": tflops, "copy_gbps_rw": gbps, **results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
