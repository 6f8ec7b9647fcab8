"""Whether cuDNN's ragged (THD) attention could serve new turns of any length without a graph
build per length. A probe for the lent GPU, not part of the test suite.

Why: a new turn's attention over a long cached prefix runs at ~500 TFLOP/s in the packed Triton
kernel and ~650 in cuDNN's dense one (run 15), but torch builds one cuDNN graph per shape
(49-1277 ms the first time), and turns come in every length. The ragged entry point
(``aten._cudnn_attention_forward`` with cumulative lengths, as nested tensors use) takes the
lengths as device tensors; if a graph built for buffers of bucket size serves any actual lengths
up to it, a turn could run on cuDNN with a handful of graphs.

For each case: the first call's wall time (a graph build shows as tens of ms), the steady time,
and the error of the first 64 queries against a float32 reference on the actual lengths.

Answer on an H200 (torch 2.11, cuDNN 9.19; docs/benchmarks.md run 16): no. The ragged call ran
47-68 ms for 700-2048 queries over 40K-80K keys, with exact or bucket-sized buffers, where the
dense kernel takes 4.5 ms for 2048 x 81,920.

    python scripts/probe_cudnn_varlen.py
"""

from __future__ import annotations

import functools
import time

import torch

HQ, HKV, D = 32, 4, 128


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, Hq, D], k / v [s, Hkv, D]: non-causal attention in float32, [n, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,shd->hns", q.float(), kf) * scale
    return torch.einsum("hns,shd->nhd", scores.softmax(-1), vf)


def ragged(q, k, v, n, s, max_q, max_k, scale):
    """The ragged call on buffers q [>= n, Hq, D], k / v [>= s, Hkv, D] (one sequence)."""
    cu_q = torch.tensor([0, n], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, s], dtype=torch.int32, device=q.device)
    out = torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu_q, cu_k, max_q, max_k, True, 0.0, False, False, scale=scale
    )
    return out[0]


def timed(fn) -> tuple[float, float, torch.Tensor]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    res = fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    return first, (time.perf_counter() - t) * 1e3 / 5, res


def main() -> None:
    dev = torch.device("cuda")
    scale = D**-0.5
    gen = torch.Generator(device=dev).manual_seed(0)
    max_q, max_k = 2048, 81920
    q = torch.randn(max_q, HQ, D, device=dev, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(max_k, HKV, D, device=dev, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(max_k, HKV, D, device=dev, generator=gen, dtype=torch.bfloat16)
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("buffers   actual n x s          first ms  steady ms  rel err")
    for label, sized in (("exact", True), ("bucket", False)):
        for n, s in ((2048, 81920), (1500, 77777), (1500, 60001), (700, 81000), (2048, 40000)):
            # exact: tensors cut to the actual lengths (shapes change with them); bucket:
            # the whole buffers, the lengths only in the cumulative-length tensors.
            qq, kk, vv = (q[:n], k[:s], v[:s]) if sized else (q, k, v)
            try:
                call = functools.partial(ragged, qq, kk, vv, n, s, max_q, max_k, scale)
                first, steady, out = timed(call)
            except RuntimeError as e:
                print(f"{label:>7}  {n:>5} x {s:>6}  failed: {str(e)[:150]}")
                continue
            # The first 64 queries (a float32 score matrix of all of them would not fit).
            ref = reference(q[:64], k[:s], v[:s], scale)
            err = ((out[:64].float() - ref).norm() / ref.norm()).item()
            print(f"{label:>7}  {n:>5} x {s:>6}  {first:>13.1f}  {steady:>9.3f}  {err:.1e}")


if __name__ == "__main__":
    main()
