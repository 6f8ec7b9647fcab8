"""Does programmatic dependent launch (PDL) work for our Triton kernels inside a CUDA graph, and
what does it save a kernel boundary? A chain of small kernels, each reading a constant weight slab
(like a decode GEMV) and the previous kernel's output, captured in one graph and replayed, with
and without ``launch_pdl``; checks the chain's result (a kernel that read its input before the
previous one finished would break it) and prints the time a kernel.

Usage (H100 / H200): python3 scripts/probe_pdl.py [--kernels 480] [--mbytes 4]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _chain_kernel(W, X, Y, n_w, BLOCK: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if PDL:
        gdc_launch_dependents()
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if PREFETCH:
        # The weight does not depend on the previous kernel: read it before the wait.
        acc += tl.load(W + offs, mask=offs < n_w, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    if not PREFETCH:
        acc += tl.load(W + offs, mask=offs < n_w, other=0.0).to(tl.float32)
    # Every program adds the chain value + 1; the weight is zeros so acc stays 0.
    x = tl.load(X)
    if pid == 0:
        tl.store(Y, x + 1.0 + tl.sum(acc, axis=0))


def run(kernels: int, mbytes: float, pdl: bool, prefetch: bool) -> tuple[float, float]:
    n_w = int(mbytes * 2**20 / 2)
    block = 4096
    weights = [torch.zeros(n_w, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
    bufs = [torch.zeros(1, dtype=torch.float32, device="cuda") for _ in range(2)]
    grid = (triton.cdiv(n_w, block),)
    kw = {"launch_pdl": True} if pdl else {}

    def chain() -> None:
        for i in range(kernels):
            _chain_kernel[grid](
                weights[i % 8], bufs[i % 2], bufs[(i + 1) % 2], n_w,
                BLOCK=block, PDL=pdl, PREFETCH=prefetch, num_warps=4, **kw,
            )  # fmt: skip

    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        bufs[0].zero_()
        graph.capture_begin()
        chain()
        graph.capture_end()
    torch.cuda.synchronize()
    bufs[0].zero_()
    bufs[1].zero_()
    graph.replay()
    torch.cuda.synchronize()
    result = bufs[kernels % 2].item()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graph.replay()
    start.record()
    reps = 20
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return result, start.elapsed_time(end) * 1e3 / reps / kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kernels", type=int, default=480)
    parser.add_argument("--mbytes", type=float, nargs="+", default=[0.0, 1.0, 16.0])
    args = parser.parse_args()
    print(f"triton {triton.__version__} torch {torch.__version__} gdc={gdc_wait is not None}")
    for mb in args.mbytes:
        for pdl, prefetch in ((False, False), (True, False), (True, True)):
            try:
                result, us = run(args.kernels, mb, pdl, prefetch)
            except Exception as exc:  # a probe: report and go on
                print(f"{mb:5.1f} MB pdl={pdl} prefetch={prefetch}: {type(exc).__name__}: {exc}")
                continue
            ok = "ok" if result == args.kernels else f"WRONG {result}"
            gbs = mb * 2**20 / (us * 1e-6) / 1e9 if mb else 0.0
            print(
                f"{mb:5.1f} MB pdl={pdl!s:5} prefetch={prefetch!s:5}: {us:7.2f} us/kernel "
                f"{gbs:7.0f} GB/s chain {ok}"
            )


if __name__ == "__main__":
    main()
