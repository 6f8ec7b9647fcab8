"""What an engine's start costs: seconds to build it (weights, KV pool, CUDA graph capture) and
the GPU memory in use after, for one set of Engine arguments; run once per setting, each in its
own process, to compare e.g. per-layer graphs to 256 and to 2048 tokens:

    python scripts/probe_startup.py --engine-arg piecewise_cuda_graph_max_tokens=256
    python scripts/probe_startup.py --engine-arg piecewise_cuda_graph_max_tokens=2048
"""

from __future__ import annotations

import argparse
import time

import torch

import kvtier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Qwen/Qwen3-30B-A3B-Instruct-2507")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    extra: dict[str, object] = {}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        extra[key] = int(value) if value.lstrip("-").isdigit() else value
    start = time.perf_counter()
    eng = kvtier.Engine(
        model_path=args.model, load_format="dummy", page_size=64, mem_fraction_static=0.85,
        skip_tokenizer_init=True, log_level="warning", **extra,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    free, total = torch.cuda.mem_get_info()
    print(
        f"{' '.join(args.engine_arg) or 'defaults'}: built in {seconds:.1f} s; GPU memory in use "
        f"{(total - free) / 2**30:.2f} GiB, reserved by torch "
        f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB"
    )
    eng.shutdown()


if __name__ == "__main__":
    main()
