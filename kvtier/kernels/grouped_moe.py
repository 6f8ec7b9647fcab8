"""Expert-major MoE kernels for mid-size batches (decode at batch ~9-256 of a top-8 model).

``fused_moe.fused_moe_small`` gives every (token, expert) pair its own programs: each pair
streams its expert's weights, which is right while the pairs are few (batch 1: 8 pairs, 8
experts) but reads an expert as often as it was chosen once T * k grows (T = 32 on Qwen3-30B-A3B:
256 pairs over ~111 experts, 2.3x the bytes). The grouped-GEMM path (``FusedExperts``' sort,
two ``torch._grouped_mm``, un-sort and combine) reads each expert once, but is ~12 kernels.

Here an align kernel (one program an expert) lists each expert's pairs in pair order (a prefix
sum over the T * k ids, at most a few thousand, then a scatter of the hits to their ranks); then
program (e, n) of each GEMM kernel owns expert e's column block n and runs its pairs, BLOCK_M at
a time, through ``tl.dot`` against its weight tiles: each expert's weights are read once per
BLOCK_M pairs. A program whose expert was not chosen exits after reading its count. Three
kernels and the combine:

0. align: ``LIST[e, :count[e]]`` = the pairs routed to e;
1. gate/up: ``h[pair] = silu(x[tok] W_gate[e]^T) * (x[tok] W_up[e]^T)`` for e's pairs, a
   [BLOCK_M, BLOCK_N] tile of h per step of BLOCK_K hidden columns (gate and up rows of the same
   columns in the same program, so SiLU-and-mul happens in registers);
2. down: ``y[pair] = h[pair] W2[e]^T``, a [BLOCK_M, BLOCK_H] tile per step of BLOCK_I;
3. ``out[t] = sum_j w[t, j] y[t * k + j]`` as FusedExperts combines (its bmm: float32 sums
   of the k products in slot order, rounded once), as a Triton kernel: no atomics, the same
   result run to run.

Rounding as FusedExperts' loop path (``fused_moe.fused_moe_ref``): each GEMM's output rounded
to x's dtype, SiLU in float32 then rounded, the product rounded. The GEMMs sum in another order
than cuBLAS, so results agree to a few bf16 ulps (float32: to ~1e-6), not bitwise. For float32
inputs tl.dot runs in IEEE float32 (not TF32).

CUDA-graph safe: grids come from E and the weight shapes, the expert ids are read on the device,
outputs are ``torch.empty``. Whether FusedExperts takes these kernels: ``use_grouped``.

Measured (H200, docs/benchmarks.md run 9; Qwen3-30B-A3B's layer, graph replays): 203.1 / 263.6
/ 297.2 / 333.5 / 351.1 us at T = 16 / 32 / 64 / 128 / 256 against the grouped GEMMs' 340.0 /
440.0 / 478.2 / 497.6 / 507.1; engine decode at batch 32 / 64 / 128 17.51 / 24.16 / 31.13 ms a
step against 26.38 / 33.71 / 38.93 with the grouped GEMMs. A version without the align kernel
(every GEMM program scanning the ids) lost from T = 128 (run 8).
"""

from __future__ import annotations

import os

import torch

from kvtier.kernels import fused, fused_moe

triton = fused.triton
tl = fused.tl

# Read once at import (KVTIER_GROUPED_MOE=0: off); FusedExperts checks it on every call.
ENABLED: bool = triton is not None and os.environ.get("KVTIER_GROUPED_MOE", "1") != "0"
# Largest T * k these kernels take (the align kernel is one program an expert over all the ids);
# past it, and for prefill, the grouped GEMMs. Pairs up to fused_moe.MAX_PAIRS go to
# fused_moe_small first. KVTIER_GROUPED_MOE_MAX_PAIRS (read at import) moves it, for A/B runs.
MAX_PAIRS = int(os.environ.get("KVTIER_GROUPED_MOE_MAX_PAIRS", "2048"))


def use_grouped(x: torch.Tensor, num_pairs: int) -> bool:
    """Whether FusedExperts.forward takes these kernels for these inputs (after fused_moe's
    small-batch kernels, which take T * k <= fused_moe.MAX_PAIRS)."""
    return ENABLED and x.is_cuda and x.dtype == torch.bfloat16 and 0 < num_pairs <= MAX_PAIRS


def default_tiles(num_pairs: int, num_experts: int) -> dict[str, int]:
    """Tiles by T * k and E. ``block_m`` is twice the mean pairs an expert, a power of two in
    [16, 64] (16: tl.dot's smallest), so that most experts' pairs fit one row block and their
    weights stream once (a second block re-reads them): with E = 128, k = 8, 16 rows up to
    T = 128, 32 at T = 256. From 32 rows 8 warps (ptxas for sm_90: 124 registers a thread for
    gate/up at 32 rows against 212 at 4 warps; no spills either way). From the H200 sweeps
    (bench_moe.py --sweep-grouped, graph replays of the whole layer, one kernel's tiles swept
    with the other's at defaults; docs/benchmarks.md runs 8 and 9): at T = 128 16 rows took
    305.6-306.3 us against 315.4-332.2 at 32 rows (run 9), and the column blocks below were
    within a microsecond of the best there; at T = 32 (run 8, the scan version) gate/up
    [16, 64, 128] at 4 stages 275.2 us, down [16, 128, 128] 264.8."""
    block_m = min(max(1 << (max(2 * num_pairs // max(num_experts, 1), 1) - 1).bit_length(), 16), 64)
    return {
        "block_m": block_m,
        "block_n": 64,
        "block_k": 128,
        "block_h": 128,
        "block_i": 128,
        "num_warps": 8 if block_m >= 32 else 4,
        "num_stages": 4,
    }


# ---------------------------------------------------------------------------- device code
# fmt: off
if triton is not None:
    _round = fused._round
    _exp = fused._exp
    _pdl_wait = fused.pdl_wait

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
        """``acc + a @ b``. The interpreter (Triton 3.9) gets bf16 tl.dot wrong (garbage of
        ~1e10): there the operands go in as float32, where bf16 products are exact."""
        if INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _align_kernel(IDS, EXPERTS, LIST, COUNT, num_pairs, BLOCK_P: tl.constexpr,
                      PDL: tl.constexpr = False):
        """Program e, slot e: the pairs whose id is e, in pair order, at LIST[e, :count] (int32),
        their count at COUNT[e], and e at EXPERTS[e]. Each hit's place is its rank among the
        hits (a prefix sum)."""
        # The ids are the previous kernel's (the router's) output.
        _pdl_wait(PDL)
        expert = tl.program_id(0)
        pos = tl.arange(0, BLOCK_P)
        ids = tl.load(IDS + pos, mask=pos < num_pairs, other=-1)
        hit = (ids == expert).to(tl.int32)
        rank = tl.cumsum(hit, axis=0) - 1
        tl.store(LIST + expert.to(tl.int64) * BLOCK_P + rank, pos, mask=hit != 0)
        tl.store(COUNT + expert, tl.sum(hit, axis=0))
        tl.store(EXPERTS + expert, expert)

    @triton.jit
    def _chunk(LIST, slot, m0, count, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
        """The pair indices of slot's pairs m0 .. m0 + BLOCK_M - 1 ([BLOCK_M]) and which are
        real (the rest read as pair 0, masked everywhere)."""
        want = m0 + tl.arange(0, BLOCK_M)
        valid = want < count
        pairs = tl.load(LIST + slot.to(tl.int64) * BLOCK_P + want, mask=valid, other=0)
        return pairs.to(tl.int64), valid

    @triton.jit
    def _grouped_gate_up_kernel(
        X, W13, EXPERTS, LIST, COUNT, HOUT,
        stride_xt, stride_we, stride_wn, stride_wk, stride_ht,
        HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # The pair lists are the previous kernel's (the align kernel's) output.
        _pdl_wait(PDL)
        slot = tl.program_id(0)
        count = tl.load(COUNT + slot)
        expert = tl.load(EXPERTS + slot)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < INTER
        ks = tl.arange(0, BLOCK_K)
        # [BLOCK_K, BLOCK_N] tiles of W_gate[e]^T and W_up[e]^T (the up rows start at row I).
        gate_ptrs = (W13 + expert.to(tl.int64) * stride_we + cols.to(tl.int64)[None, :] * stride_wn
                     + ks.to(tl.int64)[:, None] * stride_wk)
        up_ptrs = gate_ptrs + INTER * stride_wn
        dtype = HOUT.dtype.element_ty
        for m0 in range(0, count, BLOCK_M):
            pairs, valid = _chunk(LIST, slot, m0, count, BLOCK_P, BLOCK_M)
            x_ptrs = X + (pairs // TOPK)[:, None] * stride_xt + ks[None, :]
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, HIDDEN, BLOCK_K):
                k_mask = k0 + ks < HIDDEN
                xv = tl.load(x_ptrs + k0, mask=valid[:, None] & k_mask[None, :], other=0.0)
                w_mask = k_mask[:, None] & col_mask[None, :]
                g = tl.load(gate_ptrs + k0 * stride_wk, mask=w_mask, other=0.0)
                u = tl.load(up_ptrs + k0 * stride_wk, mask=w_mask, other=0.0)
                acc_g = _dot(xv, g, acc_g, PRECISION, INTERPRET)
                acc_u = _dot(xv, u, acc_u, PRECISION, INTERPRET)
            gate = _round(acc_g, dtype, INTERPRET).to(tl.float32)
            up = _round(acc_u, dtype, INTERPRET).to(tl.float32)
            act = _round(tl.math.div_rn(gate, 1.0 + _exp(-gate, INTERPRET)), dtype, INTERPRET)
            h = _round(act.to(tl.float32) * up, dtype, INTERPRET)
            tl.store(HOUT + pairs[:, None] * stride_ht + cols[None, :], h,
                     mask=valid[:, None] & col_mask[None, :])

    @triton.jit
    def _grouped_down_kernel(
        HIN, W2, EXPERTS, LIST, COUNT, Y,
        stride_ht, stride_we, stride_wn, stride_wk, stride_yt,
        HIDDEN: tl.constexpr, INTER: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_I: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # h is the previous kernel's (the gate/up kernel's) output.
        _pdl_wait(PDL)
        slot = tl.program_id(0)
        count = tl.load(COUNT + slot)
        expert = tl.load(EXPERTS + slot)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        col_mask = cols < HIDDEN
        ii = tl.arange(0, BLOCK_I)
        # [BLOCK_I, BLOCK_H] tiles of W2[e]^T.
        w_ptrs = (W2 + expert.to(tl.int64) * stride_we + cols.to(tl.int64)[None, :] * stride_wn
                  + ii.to(tl.int64)[:, None] * stride_wk)
        dtype = Y.dtype.element_ty
        for m0 in range(0, count, BLOCK_M):
            pairs, valid = _chunk(LIST, slot, m0, count, BLOCK_P, BLOCK_M)
            h_ptrs = HIN + pairs[:, None] * stride_ht + ii[None, :]
            acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
            for i0 in range(0, INTER, BLOCK_I):
                i_mask = i0 + ii < INTER
                hv = tl.load(h_ptrs + i0, mask=valid[:, None] & i_mask[None, :], other=0.0)
                w = tl.load(w_ptrs + i0 * stride_wk, mask=i_mask[:, None] & col_mask[None, :],
                            other=0.0)
                acc = _dot(hv, w, acc, PRECISION, INTERPRET)
            tl.store(Y + pairs[:, None] * stride_yt + cols[None, :],
                     _round(acc, dtype, INTERPRET), mask=valid[:, None] & col_mask[None, :])

    @triton.jit
    def _combine_kernel(Y, TW, OUT, stride_yt, stride_ot, HIDDEN: tl.constexpr,
                        TOPK: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
                        PDL: tl.constexpr = False):
        """out[t, cols] = sum_j w[t, j] * y[t * k + j, cols]: float32 products of the stored
        values, summed in slot order, rounded once (what FusedExperts' bmm computes)."""
        # y is the previous kernel's (the down kernel's) output.
        _pdl_wait(PDL)
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < HIDDEN
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            w = tl.load(TW + tok * TOPK + j).to(tl.float32)
            y = tl.load(Y + (tok * TOPK + j) * stride_yt + cols, mask=mask, other=0.0)
            acc += w * y.to(tl.float32)
        tl.store(OUT + tok * stride_ot + cols, _round(acc, OUT.dtype.element_ty, INTERPRET),
                 mask=mask)
# fmt: on


def _pow2_at_least(n: int, floor: int) -> int:
    return max(triton.next_power_of_2(n), floor)


def align_pairs(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, expert) pairs by expert, in slots: ``(experts, lists, counts)``, int32, where
    slot e holds expert ``experts[e] = e``'s pairs at ``lists[e, :counts[e]]`` (flat indices
    ``t * k + i`` with ``topk_ids[t, i] == e``, ascending; the rest of the row is unwritten).
    ``topk_ids`` [T, k], contiguous; one kernel, no host sync."""
    num_pairs = topk_ids.numel()
    block_p = _pow2_at_least(num_pairs, 16)
    device = topk_ids.device
    experts = torch.empty(num_experts, dtype=torch.int32, device=device)
    lists = torch.empty(num_experts, block_p, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    _align_kernel[(num_experts,)](
        topk_ids, experts, lists, counts, num_pairs, BLOCK_P=block_p, **fused.pdl_options(device)
    )
    return experts, lists, counts


def grouped_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    block_h: int | None = None,
    block_i: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """``FusedExperts.forward(x, topk_ids, topk_weights)`` by the expert-major kernels: ``x``
    [T, H], ``w13`` [E, 2I, H] (gate rows, then up rows), ``w2`` [E, H, I], ``topk_ids`` /
    ``topk_weights`` [T, k]. Returns [T, H] in x's dtype.

    Tiles (powers of two; ``block_m`` >= 16, tl.dot's smallest): ``block_m`` pairs a step, by
    ``block_n`` columns of h and ``block_k`` hidden columns (gate/up kernel), ``block_h`` output
    columns and ``block_i`` columns of h (down kernel); each left None comes from
    ``default_tiles(T * k, E)``. ValueError names an argument that does not fit. On CPU tensors
    the kernels need Triton's interpreter (TRITON_INTERPRET=1)."""
    what = "grouped_moe"
    fused_moe.check_runnable(what, x)
    t, hidden, num_experts, inter, k = fused_moe.check_moe_args(
        what, x, w13, w2, topk_ids, topk_weights
    )
    tiles = default_tiles(t * k, num_experts)
    given = dict(
        block_m=block_m, block_n=block_n, block_k=block_k, block_h=block_h, block_i=block_i,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    for name, value in given.items():
        if value is None:
            continue
        if value < 1 or (name.startswith("block") and value & (value - 1)):
            raise ValueError(f"{what}: {name} must be a positive power of two, got {value}")
        tiles[name] = value
    if tiles["block_m"] < 16:
        raise ValueError(f"{what}: block_m must be >= 16 (tl.dot's smallest), got {block_m}")
    if t == 0 or k == 0:
        return torch.zeros(t, hidden, dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    ids = topk_ids.contiguous()
    num_pairs = t * k
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    # tl.dot's operands need >= 16 along each dimension: tiles are at least that, masked.
    block_n = min(tiles["block_n"], _pow2_at_least(inter, 16))
    block_k = min(tiles["block_k"], _pow2_at_least(hidden, 16))
    block_h = min(tiles["block_h"], _pow2_at_least(hidden, 16))
    block_i = min(tiles["block_i"], _pow2_at_least(inter, 16))
    experts, pair_list, counts = align_pairs(ids, num_experts)
    num_slots, block_p = pair_list.shape
    pdl = fused.pdl_options(x.device)
    common = dict(
        INTER=inter, HIDDEN=hidden, BLOCK_P=block_p, BLOCK_M=tiles["block_m"],
        INTERPRET=fused.INTERPRETED, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"], **fused._EXACT, **pdl,
    )  # fmt: skip
    _grouped_gate_up_kernel[(num_slots, triton.cdiv(inter, block_n))](
        x, w13, experts, pair_list, counts, h,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        TOPK=k, BLOCK_N=block_n, BLOCK_K=block_k, **common,
    )  # fmt: skip
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _grouped_down_kernel[(num_slots, triton.cdiv(hidden, block_h))](
        h, w2, experts, pair_list, counts, y,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        BLOCK_H=block_h, BLOCK_I=block_i, **common,
    )  # fmt: skip
    # The combine: FusedExperts' bmm as a Triton kernel, so that the chain stays one of
    # PDL launches (a cuBLAS kernel does not let the next one start early).
    weights = topk_weights.to(x.dtype).contiguous()
    out = torch.empty(t, hidden, dtype=x.dtype, device=x.device)
    block = min(_pow2_at_least(hidden, 16), 1024)
    _combine_kernel[(t, triton.cdiv(hidden, block))](
        y, weights, out, y.stride(0), out.stride(0), HIDDEN=hidden, TOPK=k, BLOCK=block,
        INTERPRET=fused.INTERPRETED, num_warps=4, **fused._EXACT, **pdl,
    )  # fmt: skip
    return out


__all__ = [
    "ENABLED",
    "MAX_PAIRS",
    "align_pairs",
    "default_tiles",
    "grouped_moe",
    "use_grouped",
]
