"""Host-side cost of a decode step's bookkeeping, without a model: building the ForwardBatch of a
decode step (ScheduleBatch.to_forward_batch) at batch 1, 32 and 128, and the incremental
detokenizer per generated token. Runs anywhere (CPU tensors); on a GPU server these costs sit
between two forward passes, where the GPU waits for them.

    python benchmarks/bench_host.py
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from kvtier.attention.torch_backend import TorchAttention
from kvtier.cache.kv_pool import KVPool, ReqToPageTable
from kvtier.runner.forward_batch import ForwardMode
from kvtier.sampling_params import SamplingParams
from kvtier.scheduler.batch import ScheduleBatch
from kvtier.scheduler.detokenizer import Detokenizer
from kvtier.scheduler.request import Req
from kvtier.tokenizer import load_tokenizer


def per_call_us(fn, repeats: int) -> float:
    for _ in range(max(1, repeats // 10)):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e6


def decode_batch_us(batch: int, context: int, page_size: int, repeats: int) -> float:
    rng = random.Random(0)
    pages_per_req = (context + page_size) // page_size + 1
    pool = KVPool(batch * pages_per_req + 1, page_size, 1, 1, 8, torch.float32, "cpu")
    table = ReqToPageTable(batch, pages_per_req, "cpu")
    reqs = []
    for i in range(batch):
        r = Req(rid=str(i), input_ids=[1] * context, sampling=SamplingParams(max_new_tokens=8))
        r.tokens = [rng.randrange(1000) for _ in range(context + 1)]
        r.kv_len = context
        r.pages = [1 + i * pages_per_req + j for j in range(pages_per_req)]
        r.row = i
        table.set_pages(i, 0, r.pages)
        reqs.append(r)
    sb = ScheduleBatch(ForwardMode.DECODE, reqs, [1] * batch)
    backend = TorchAttention()
    return per_call_us(lambda: sb.to_forward_batch(pool, table, backend), repeats)


def detok_us_per_token(tokens: int) -> float:
    tok = load_tokenizer("builtin:tiny-qwen3")
    detok = Detokenizer(tok)
    rng = random.Random(0)
    req = Req(rid="r", input_ids=[1], sampling=SamplingParams())
    t = time.perf_counter()
    for _ in range(tokens):
        req.output_ids.append(rng.randrange(len(tok)))
        detok.update(req)
    return (time.perf_counter() - t) / tokens * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    for b in args.batch:
        us = decode_batch_us(b, args.context, args.page_size, args.repeats)
        print(f"ForwardBatch of a decode step, batch {b:>4}: {us:8.0f} us")
    print(f"detokenizer, per generated token:        {detok_us_per_token(2000):8.1f} us")


if __name__ == "__main__":
    main()
