"""Fused MoE experts for small token counts (decode): two Triton GEMV kernels instead of the
sort / two grouped GEMMs / un-sort / combine of ``kvtier.models.layers.FusedExperts``.

At decode batch 1 a Qwen3-30B-A3B layer (E=128, k=8, H=2048, I=768, bf16) has 8 (token, expert)
pairs. The grouped path spends ~55 us in each ``torch._grouped_mm`` plus a dozen small kernels,
while the 8 experts' weights (75 MB) take ~20 us to read at HBM rate. Here:

1. ``_gate_up_kernel``, grid (T * k pairs, cdiv(I, BLOCK_N)): each program reads a
   [BLOCK_N, H] slab of its expert's gate rows and the matching up rows (each weight once per
   pair), forms the two dot products with the token's ``x`` row in float32 and writes
   ``h = silu(gate) * up`` [T * k, I]. Pairs are the fast grid axis, so the pairs of one row
   block run together and pairs that share an expert read the same slab at about the same time
   (L2 hits rather than a second HBM read).
2. ``_down_kernel``, grid (T, cdiv(H, BLOCK_H)): each program loops over its token's k slots,
   computes ``h[t, j] @ w2[e_tj, rows].T`` in float32 and accumulates ``w[t, j] * y_j`` in
   float32 in slot order. One program owns each output element: no atomics, so the result is
   the same run to run.

Numerics against the torch path (grouped GEMMs on CUDA, the per-expert loop elsewhere). The
kernels round where the torch path rounds: the gate/up projection's output is rounded to x's
dtype (the GEMM's output dtype), SiLU is computed in float32 as ``x / (1 + exp(-x))`` (F.silu)
and rounded, its product with ``up`` rounded again; the down projection's output is rounded per
pair (the second GEMM's output), and the combine ``sum_j w_j * y_j`` (torch's bmm, float32
accumulation) is rounded once at the end. What differs is the order of the float32 sums inside
each dot product (a GEMV tree here, tensor-core MMA tiles or a CPU GEMM's blocking there), and
the order of the k-term combine if cuBLAS does not add the slots in order. bf16 x bf16 products
are exact in float32, so only the addition order matters: a float32 sum can differ in its last
bits, which changes a rounded bf16 value by 1 ulp where it lies next to a rounding boundary;
such a 1-ulp change in ``h`` moves an output by a fraction of an ulp, or by an ulp or two where
the output cancels. float32 inputs agree with the loop path to ~1e-6 relative. No FMA
contraction and libdevice's ``expf`` (launch options shared with ``kvtier.kernels.fused``), so
SiLU itself is the same function torch's CUDA kernel evaluates.

Programmatic dependent launch (``fused.pdl_options``, Hopper): the gate/up kernel waits for the
router first (its expert ids); the down kernel reads the ids and its first expert's weight tile
before it waits for the gate/up kernel (the ids were written two kernels back, and the gate/up
kernel lets the down kernel launch only once past its own wait).

CUDA-graph safe: grids come from T, k and the weight shapes (host ints), nothing is read back,
the outputs are ``torch.empty``. Expert and row offsets are int64 (a full layer's w13 is 400M
elements, more for bigger models).

On by default: ``FusedExperts.forward`` calls ``fused_moe_small`` when x is bf16 on CUDA and
T * k <= ``MAX_PAIRS``, unless ``KVTIER_FUSED_MOE=0`` was set at import (``ENABLED``). Measured on
an H200 (Qwen3-30B-A3B layer, CUDA-graph replays, benchmarks/bench_moe.py, 2026-12-01): T = 1
37.1 us against 86.8 us for the grouped path (the sort, two grouped GEMMs, un-sort and combine),
T = 4 87.4 against 156.0, T = 16 250.5 against 339.5, T = 32 445.8 against 438.7 (even: every pair
reads its expert, so past ~16 tokens the grouped GEMMs' one read per expert wins).
``fused_moe_ref`` is FusedExperts' math in plain torch, for the tests.
"""

from __future__ import annotations

import os

import torch

from kvtier.kernels import fused
from kvtier.kernels.fused import silu_and_mul_ref

triton = fused.triton
tl = fused.tl

# Read once: FusedExperts.forward checks it on every call (may also be set at run time).
ENABLED: bool = triton is not None and os.environ.get("KVTIER_FUSED_MOE", "1") != "0"
# Largest T * k that takes the fused path. Each pair reads its expert's weights, so once T * k
# is large the grouped GEMMs' one read per distinct expert wins; benchmarks/bench_moe.py times
# both sides of this limit (T = 16 at k = 8 is 128 pairs).
MAX_PAIRS = 128


def use_fused(x: torch.Tensor, num_pairs: int) -> bool:
    """Whether FusedExperts.forward takes the fused kernels for these inputs."""
    return ENABLED and x.is_cuda and x.dtype == torch.bfloat16 and 0 < num_pairs <= MAX_PAIRS


# ---------------------------------------------------------------------------- torch reference
def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """``FusedExperts.forward`` on its loop path (``use_grouped_mm=False``), op for op: sort the
    pairs by expert, one GEMM pair per expert, un-sort, combine the k outputs by bmm. Reads the
    expert counts on the host."""
    t, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.zeros(w13.shape[0], dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    sorted_x = x[order // k]
    sorted_y = torch.empty_like(sorted_x)
    start = 0
    for expert, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            h = silu_and_mul_ref(sorted_x[rows] @ w13[expert].t())
            sorted_y[rows] = h @ w2[expert].t()
            start += n
    y = torch.empty_like(sorted_y)
    y[order] = sorted_y
    return torch.bmm(topk_weights.unsqueeze(1), y.view(t, k, -1)).squeeze(1)


# ---------------------------------------------------------------------------- device code
# fmt: off
if triton is not None:
    _round = fused._round
    _exp = fused._exp
    _pdl_wait = fused.pdl_wait

    @triton.jit
    def _gate_up_kernel(
        X, W_GATE, W_UP, IDS, HOUT,
        stride_xt, stride_we, stride_wn, stride_wk, stride_ht,
        HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # The expert ids are the previous kernel's (the router's) output: nothing to prefetch.
        _pdl_wait(PDL)
        pair = tl.program_id(0).to(tl.int64)
        tok = pair // TOPK
        expert = tl.load(IDS + pair).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < INTER
        row_off = expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn
        gate_rows = W_GATE + row_off
        up_rows = W_UP + row_off
        x_row = X + tok * stride_xt
        # 2-D float32 accumulators, reduced once after the loop (one tree per output row).
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < HIDDEN
            xv = tl.load(x_row + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            mask = row_mask[:, None] & col_mask[None, :]
            woff = cols.to(tl.int64)[None, :] * stride_wk
            g = tl.load(gate_rows + woff, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(up_rows + woff, mask=mask, other=0.0).to(tl.float32)
            acc_g += g * xv
            acc_u += u * xv
        dtype = HOUT.dtype.element_ty
        # The first GEMM's output dtype, then F.silu (float32, rounded) and the rounded product.
        gate = _round(tl.sum(acc_g, axis=1), dtype, INTERPRET).to(tl.float32)
        up = _round(tl.sum(acc_u, axis=1), dtype, INTERPRET).to(tl.float32)
        act = _round(tl.math.div_rn(gate, 1.0 + _exp(-gate, INTERPRET)), dtype, INTERPRET)
        h = _round(act.to(tl.float32) * up, dtype, INTERPRET)
        tl.store(HOUT + pair * stride_ht + rows, h, mask=row_mask)

    @triton.jit
    def _down_kernel(
        HIN, W2, IDS, TW, OUT,
        stride_ht, stride_we, stride_wn, stride_wk, stride_ot,
        HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        tok = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_mask = rows < HIDDEN
        row_off = rows.to(tl.int64)[:, None] * stride_wn
        dtype = OUT.dtype.element_ty
        out = tl.zeros([BLOCK_H], dtype=tl.float32)
        # Unrolled: the k experts' loads are independent, so they can be in flight together.
        for j in tl.static_range(TOPK):
            pair = tok * TOPK + j
            # The ids and weights come from the router, two kernels back: readable before the
            # wait (the gate/up kernel lets this one launch only once past its own wait).
            expert = tl.load(IDS + pair).to(tl.int64)
            weight = tl.load(TW + pair).to(tl.float32)
            w_rows = W2 + expert * stride_we + row_off
            h_row = HIN + pair * stride_ht
            # The first I step peeled: its weight tile is read before the wait for h.
            cols = tl.arange(0, BLOCK_I)
            col_mask = cols < INTER
            w = tl.load(w_rows + cols.to(tl.int64)[None, :] * stride_wk,
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            if j == 0:
                _pdl_wait(PDL)
            hv = tl.load(h_row + cols, mask=col_mask, other=0.0).to(tl.float32)
            acc = w.to(tl.float32) * hv[None, :]
            for i0 in range(BLOCK_I, INTER, BLOCK_I):
                cols = i0 + tl.arange(0, BLOCK_I)
                col_mask = cols < INTER
                hv = tl.load(h_row + cols, mask=col_mask, other=0.0).to(tl.float32)
                w = tl.load(w_rows + cols.to(tl.int64)[None, :] * stride_wk,
                            mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                acc += w.to(tl.float32) * hv[None, :]
            # The second GEMM's output dtype; the combine then accumulates in float32 (bmm).
            y = _round(tl.sum(acc, axis=1), dtype, INTERPRET).to(tl.float32)
            out = out + weight * y
        tl.store(OUT + tok * stride_ot + rows, _round(out, dtype, INTERPRET), mask=row_mask)
# fmt: on


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(n), cap)


def default_tiles(num_tokens: int) -> dict[str, int]:
    """Tiles by token count, from the H200 sweep (bench_moe.py --sweep, graph replays): at
    T = 1 many programs with one step each; from T = 4 a shorter I step in the down kernel
    (256: more programs per token); from T = 16 wider gate/up row blocks over shorter H steps.
    The runners-up were within ~2% at T = 1 and ~5-8% behind at T = 4 and 16."""
    tiles = {"block_n": 4, "block_k": 512, "block_h": 4, "block_i": 1024, "num_warps": 4}
    if num_tokens >= 4:
        tiles["block_i"] = 256
    if num_tokens >= 16:
        tiles.update(block_n=8, block_k=256)
    return tiles


def fused_moe_small(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    block_h: int | None = None,
    block_i: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``FusedExperts.forward(x, topk_ids, topk_weights)`` for small T * k: ``x`` [T, H],
    ``w13`` [E, 2I, H] (gate rows, then up rows), ``w2`` [E, H, I], ``topk_ids`` /
    ``topk_weights`` [T, k]. Returns [T, H] in x's dtype.

    Tiles (powers of two, capped to the problem): ``block_n`` gate/up rows x ``block_k`` hidden
    columns per step of kernel 1, ``block_h`` output rows x ``block_i`` columns of kernel 2;
    each one left None comes from ``default_tiles(T)``.
    On CPU tensors the kernels need Triton's interpreter (TRITON_INTERPRET=1).
    """
    if triton is None:
        raise RuntimeError("fused_moe_small: Triton is not installed")
    if not x.is_cuda and not fused.INTERPRETED:
        raise RuntimeError("fused_moe_small: CPU tensors need Triton's interpreter")
    t, hidden = x.shape
    k = topk_ids.shape[1]
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    if w13.shape != (num_experts, 2 * inter, hidden) or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"fused_moe_small: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)}")
    if topk_ids.shape != (t, k) or topk_weights.shape != (t, k):
        raise ValueError("fused_moe_small: topk_ids / topk_weights must be [T, k]")
    out = torch.empty(t, hidden, dtype=x.dtype, device=x.device)
    if t == 0 or k == 0:
        return out.zero_()
    if x.stride(-1) != 1:
        x = x.contiguous()
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    h = torch.empty(t * k, inter, dtype=x.dtype, device=x.device)
    tiles = default_tiles(t)
    block_n = block_n or tiles["block_n"]
    block_k = block_k or tiles["block_k"]
    block_h = block_h or tiles["block_h"]
    block_i = block_i or tiles["block_i"]
    num_warps = num_warps or tiles["num_warps"]
    bn, bk = _block(inter, block_n), _block(hidden, block_k)
    pdl = fused.pdl_options(x.device)
    _gate_up_kernel[(t * k, triton.cdiv(inter, bn))](
        # w13's up rows as a view: its pointer starts at row I of expert 0.
        x, w13, w13[:, inter:], ids, h,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        HIDDEN=hidden, INTER=inter, TOPK=k, BLOCK_N=bn, BLOCK_K=bk, INTERPRET=fused.INTERPRETED,
        num_warps=num_warps, **fused._EXACT, **pdl,
    )  # fmt: skip
    bh, bi = _block(hidden, block_h), _block(inter, block_i)
    _down_kernel[(t, triton.cdiv(hidden, bh))](
        h, w2, ids, weights, out,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
        HIDDEN=hidden, INTER=inter, TOPK=k, BLOCK_H=bh, BLOCK_I=bi, INTERPRET=fused.INTERPRETED,
        num_warps=num_warps, **fused._EXACT, **pdl,
    )  # fmt: skip
    return out


__all__ = [
    "ENABLED",
    "MAX_PAIRS",
    "default_tiles",
    "fused_moe_ref",
    "fused_moe_small",
    "use_fused",
]
