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
   (L2 hits rather than a second HBM read). The H loop prefetches by hand: the
   next step's tiles are loaded before this step's products, two steps in flight (at decode
   batch sizes the default step is all of H: the whole slab's loads are issued at once).
2. ``_down_kernel``, grid (T, cdiv(H, BLOCK_H)): each program takes all k slots of its token at
   once, [k, BLOCK_H, BLOCK_I] tiles (slot j's rows of ``w2[e_tj]``), forms
   ``h[t, j] @ w2[e_tj, rows].T`` per slot in float32, rounds it, and accumulates
   ``w[t, j] * y_j`` in float32 in slot order; the I loop prefetches like the gate/up loop. One
   program owns each output element: no atomics, so the result is the same run to run.

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
SiLU itself is the same function torch's CUDA kernel evaluates. A sum's tree follows the
register layout, which Triton derives from the tile shapes and num_warps: the same tiles give
the same result, other tiles may differ in last bits. Prefetching does not change it.

Tiles and warps by token count (``default_tiles``): up to T = 16 the gate/up kernel takes a
whole row of H in one step in four warps, the down kernel one warp a program; from T = 16 both
one warp a program.

Programmatic dependent launch (``fused.pdl_options``, Hopper): the gate/up kernel waits for the
previous kernel first (the router's ids). The down kernel reads its token's ids and weights and
issues its first I tile of all k experts before it waits for the gate/up kernel: the ids were
written two kernels back, and the gate/up kernel lets the down kernel launch only once past its
own wait.

CUDA-graph safe: grids come from T, k and the weight shapes (host ints), nothing is read back,
the outputs are ``torch.empty``. Expert and row offsets are int64 (a full layer's w13 is 400M
elements, more for bigger models).

On by default: ``FusedExperts.forward`` calls ``fused_moe_small`` when x is bf16 on CUDA and T * k
<= ``MAX_PAIRS``, unless ``KVTIER_FUSED_MOE=0`` was set at import (``ENABLED``). Measured on an H200
(Qwen3-30B-A3B layer, CUDA-graph replays, benchmarks/bench_moe.py, 2026-12-01): T = 1 34.4 us
against 91.2 us for the grouped path (the sort, two grouped GEMMs, un-sort and combine), T = 4 87.3
against 161.6, T = 16 265.3 against 324.5. An earlier run of the previous kernels (four warps, a
down kernel that looped over the k slots; not the same call, its grouped times differ too) gave
T = 1 37.1 against 86.8, T = 4 87.4 against 156.0, T = 16 250.5 against 339.5, T = 32 445.8 against
438.7 (even: every pair reads its expert, so past ~16 tokens the grouped GEMMs' one read per expert
catches up). With the swept tiles (run 8) T = 32 takes 388.7 us against 440.9 grouped. Routing
inside the expert kernels (every program computing its token's top-k from the router logits, no
routing kernel) was tried and measured slower than ``fused.moe_route`` then these two
(T = 1 39.3 against 35.8 us, T = 4 102.9 against 91.1, T = 16 291.6 against 265.1: the routing on
each gate/up program's critical path costs more than the routing kernel's launch, which PDL hides),
and removed.
``fused_moe_ref`` is FusedExperts' math in plain torch, for the tests.
"""

from __future__ import annotations

import json
import os

import torch

from kvtier.kernels import fused
from kvtier.kernels.fused import silu_and_mul_ref

triton = fused.triton
tl = fused.tl

# Read once: FusedExperts.forward checks it on every call (may also be set at run time).
ENABLED: bool = triton is not None and os.environ.get("KVTIER_FUSED_MOE", "1") != "0"
# Largest T * k that takes the fused path. Each pair reads its expert's weights, so once T * k
# grows the expert-major kernels (grouped_moe), which read each chosen expert once per 16 pairs,
# win; benchmarks/bench_moe.py times all the paths. H200, run 9 (Qwen3-30B-A3B's layer, k = 8):
# T = 4 (32 pairs) 88.9 us here against 90.5 expert-major, T = 8 (64 pairs) 146.4 against
# 137.8, T = 16 230.0 against 192.9. KVTIER_FUSED_MOE_MAX_PAIRS (read at import) sets it, for
# A/B runs (0: never).
MAX_PAIRS = int(os.environ.get("KVTIER_FUSED_MOE_MAX_PAIRS", "32"))
# Entries that replace default_tiles' for every T (JSON, e.g. '{"num_warps": 1}'), for A/B runs.
_TILES_OVERRIDE: dict[str, int] = json.loads(os.environ.get("KVTIER_FUSED_MOE_TILES", "{}"))


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
    @triton.constexpr_function
    def _pow2(n):
        return triton.next_power_of_2(n)

    @triton.jit
    def swiglu(gate_sum, up_sum, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        """``silu(gate) * up`` in ``dtype`` from the float32 gate and up dot products, rounded
        where the torch path rounds: the first GEMM's output dtype, then F.silu (float32,
        rounded) and the rounded product."""
        gate = _round(gate_sum, dtype, INTERPRET).to(tl.float32)
        up = _round(up_sum, dtype, INTERPRET).to(tl.float32)
        act = _round(tl.math.div_rn(gate, 1.0 + _exp(-gate, INTERPRET)), dtype, INTERPRET)
        return _round(act.to(tl.float32) * up, dtype, INTERPRET)

    @triton.jit
    def _tile(ptrs, mask, cols, N_COLS: tl.constexpr, stride_c):
        """Columns ``cols`` of the rows at ``ptrs`` (broadcast against each other), 0 where
        ``mask`` is off or past N_COLS: a tile wholly past N_COLS reads no memory."""
        return tl.load(ptrs + cols.to(tl.int64) * stride_c, mask=mask & (cols < N_COLS),
                       other=0.0)

    @triton.jit
    def _gate_up_pair(
        X, W_GATE, W_UP, HOUT, pair, tok, expert,
        stride_xt, stride_we, stride_wn, stride_wk, stride_ht,
        HIDDEN: tl.constexpr, INTER: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """One (token, expert) pair's [BLOCK_N] rows of ``h = silu(x W_gate^T) * (x W_up^T)``.
        Call after the wait (x is the previous kernel's output)."""
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < INTER
        row_off = expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn
        gate_rows = W_GATE + row_off
        up_rows = W_UP + row_off
        x_row = X + tok * stride_xt
        # 2-D float32 accumulators, reduced once after the loop (one tree per output row).
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_K)
        # Triton pipelines only loads that feed a tl.dot: the next K tile's loads are issued
        # by hand before this one's products, two tiles in flight per program (as gemv's
        # _fma_sums). The last step's "next" tile lies past HIDDEN: fully masked, no reads.
        g_next = _tile(gate_rows, row_mask[:, None], cols[None, :], HIDDEN, stride_wk)
        u_next = _tile(up_rows, row_mask[:, None], cols[None, :], HIDDEN, stride_wk)
        for k0 in range(0, HIDDEN, BLOCK_K):
            g = g_next
            u = u_next
            nxt = (k0 + BLOCK_K + cols)[None, :]
            g_next = _tile(gate_rows, row_mask[:, None], nxt, HIDDEN, stride_wk)
            u_next = _tile(up_rows, row_mask[:, None], nxt, HIDDEN, stride_wk)
            xv = tl.load(x_row + k0 + cols, mask=k0 + cols < HIDDEN,
                         other=0.0).to(tl.float32)[None, :]
            acc_g += g.to(tl.float32) * xv
            acc_u += u.to(tl.float32) * xv
        h = swiglu(tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1), HOUT.dtype.element_ty,
                   INTERPRET)
        tl.store(HOUT + pair * stride_ht + rows, h, mask=row_mask)

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
        expert = tl.load(IDS + pair).to(tl.int64)
        _gate_up_pair(X, W_GATE, W_UP, HOUT, pair, pair // TOPK, expert,
                      stride_xt, stride_we, stride_wn, stride_wk, stride_ht,
                      HIDDEN, INTER, BLOCK_N, BLOCK_K, INTERPRET)

    @triton.jit
    def down_first_tile(
        W2, ids, rows, stride_we, stride_wn, stride_wk,
        HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """The first [BLOCK_S, BLOCK_H, BLOCK_I] tile of ``down_rows``: columns [0, BLOCK_I) of
        output rows ``rows`` [BLOCK_H] of each slot's expert ``ids`` [BLOCK_S] (weights only,
        so it may be loaded before the wait for h)."""
        slots = tl.arange(0, BLOCK_S)
        w_rows = (W2 + ids[:, None, None] * stride_we
                  + rows.to(tl.int64)[None, :, None] * stride_wn)
        mask = (slots < TOPK)[:, None, None] & (rows < HIDDEN)[None, :, None]
        return _tile(w_rows, mask, tl.arange(0, BLOCK_I)[None, None, :], INTER, stride_wk)

    @triton.jit
    def down_rows(
        HIN, W2, OUT, tok, ids, weights, rows, w_next,
        stride_ht, stride_we, stride_wn, stride_wk, stride_ot,
        HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRET: tl.constexpr,
        H_CACHE: tl.constexpr,
    ):
        """Output rows ``rows`` [BLOCK_H] of token ``tok``: ``sum_j weights[j] * (h[tok, j] @
        W2[ids[j], rows].T)``, all TOPK slots at once ([BLOCK_S, BLOCK_H, BLOCK_I] tiles, one
        expert per slot). ``ids`` / ``weights`` [BLOCK_S] (float32 weights already rounded to
        the output dtype, as moe_route returns them); ``w_next``: ``down_first_tile``. h is
        loaded with cache modifier ``H_CACHE``."""
        row_mask = rows < HIDDEN
        slots = tl.arange(0, BLOCK_S)
        w_rows = (W2 + ids[:, None, None] * stride_we
                  + rows.to(tl.int64)[None, :, None] * stride_wn)
        mask = (slots < TOPK)[:, None, None] & row_mask[None, :, None]
        # h's rows as full [BLOCK_S, BLOCK_H, BLOCK_I] tiles (every output row the same
        # addresses), as gemv loads x: in the weight tile's own register layout.
        h_rows = HIN + ((tok * TOPK + slots) * stride_ht)[:, None, None] + (rows * 0)[None, :, None]
        cols = tl.arange(0, BLOCK_I)[None, None, :]
        # One float32 accumulator per (slot, row, column), reduced over I once after the loop.
        acc = tl.zeros([BLOCK_S, rows.shape[0], BLOCK_I], dtype=tl.float32)
        # The next I tile's loads before this one's products (two tiles a slot in flight);
        # the last step's "next" tile lies past INTER: fully masked, no reads.
        for i0 in range(0, INTER, BLOCK_I):
            w = w_next
            w_next = _tile(w_rows, mask, i0 + BLOCK_I + cols, INTER, stride_wk)
            hv = tl.load(h_rows + i0 + cols, mask=mask & (i0 + cols < INTER), other=0.0,
                         cache_modifier=H_CACHE)
            acc += w.to(tl.float32) * hv.to(tl.float32)
        out = down_combine(acc, weights, OUT.dtype.element_ty, TOPK, BLOCK_S, INTERPRET)
        tl.store(OUT + tok * stride_ot + rows, out, mask=row_mask)

    @triton.jit
    def down_combine(acc, weights, dtype: tl.constexpr, TOPK: tl.constexpr,
                     BLOCK_S: tl.constexpr, INTERPRET: tl.constexpr):
        """The token's output rows in ``dtype`` from the float32 partial products ``acc``
        [BLOCK_S, BLOCK_H, BLOCK_I] of its slots' down projections: each slot's sum rounded to
        the second GEMM's output dtype, then ``sum_j weights[j] * y_j`` accumulated in float32
        in slot order (bmm) and rounded once."""
        slots = tl.arange(0, BLOCK_S)
        # Slot j's row is picked by a sum over the slot axis whose other terms are 0: exact (a
        # -0.0 term comes out +0.0, and out, which starts at +0.0, never holds -0.0, so
        # out + (-0.0) and out + 0.0 agree).
        wy = weights[:, None] * _round(tl.sum(acc, axis=2), dtype, INTERPRET).to(tl.float32)
        out = tl.zeros([acc.shape[1]], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            out = out + tl.sum(tl.where(slots[:, None] == j, wy, 0.0), axis=0)
        return _round(out, dtype, INTERPRET)

    @triton.jit
    def _down_kernel(
        HIN, W2, IDS, TW, OUT,
        stride_ht, stride_we, stride_wn, stride_wk, stride_ot,
        HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        tok = tl.program_id(0).to(tl.int64)
        # The ids and weights come from the router, two kernels back: readable before the wait
        # (the gate/up kernel lets this one launch only once past its own wait).
        BLOCK_S: tl.constexpr = _pow2(TOPK)
        slots = tl.arange(0, BLOCK_S)
        s_mask = slots < TOPK
        ids = tl.load(IDS + tok * TOPK + slots, mask=s_mask, other=0).to(tl.int64)
        weights = tl.load(TW + tok * TOPK + slots, mask=s_mask, other=0.0).to(tl.float32)
        rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        # Before the wait: the first I tile of all TOPK experts (weights only).
        w_first = down_first_tile(W2, ids, rows, stride_we, stride_wn, stride_wk,
                                  HIDDEN, INTER, TOPK, BLOCK_I, BLOCK_S)
        _pdl_wait(PDL)
        down_rows(HIN, W2, OUT, tok, ids, weights, rows, w_first,
                  stride_ht, stride_we, stride_wn, stride_wk, stride_ot,
                  HIDDEN, INTER, TOPK, BLOCK_I, BLOCK_S, INTERPRET, "")
# fmt: on


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(n), cap)


def default_tiles(num_tokens: int) -> dict[str, int]:
    """Tiles by token count: ``num_warps`` the gate/up kernel's warps a program,
    ``down_warps`` the down kernel's. Chosen by GPU sweeps (H200, graph replays of both
    kernels, one at its swept tiles, the other at these; docs/benchmarks.md).

    Below T = 16 (run 10, ``scripts/probe_moe_tiles.py``): gate/up [4, 2048] tiles of gate
    rows and of up rows in four warps, the whole row in one step (T = 1: 32.7 us against 33.5
    for run 8's [4, 256] in one warp; T = 4: 82.8 against 85.9; [4, 2048] in eight warps and
    [2, 2048] in four within a microsecond; [8, 1024] in four 38.3 / 105.1). Down every slot's
    expert at once, [k, 2, 128] a step in one warp (run 8; in run 10 no other tile, in one to
    eight warps, beat it by more than 0.5 us).

    From T = 16 (run 8, ``bench_moe.py --sweep``) gate/up [4, 128] in one warp: T = 16 233.9 us
    against 243.2 for [4, 256] and 271.5 for [8, 128] (four warps: 243.7); T = 32 388.7 against
    413.6 and 465.7 (four warps: 421.0). Register counts (ptxas for sm_90, run 8's one-warp
    tiles): ~180 a thread for gate/up, ~200 for down, no spills.
    ``KVTIER_FUSED_MOE_TILES`` (JSON, read at import) replaces entries for every T, for A/B
    runs."""
    tiles = {
        "block_n": 4, "block_k": 2048, "block_h": 2, "block_i": 128, "num_warps": 4,
        "down_warps": 1,
    }  # fmt: skip
    if num_tokens >= 16:
        tiles.update(block_k=128, num_warps=1)
    tiles.update(_TILES_OVERRIDE)
    return tiles


def _check_shapes(
    what: str, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> tuple[int, int, int, int]:
    """(T, H, E, I) of ``x`` [T, H], ``w13`` [E, 2I, H], ``w2`` [E, H, I]; ValueError naming
    the argument that does not fit."""
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be [T, H], got shape {tuple(x.shape)}")
    t, hidden = x.shape
    if w13.dim() != 3 or w13.shape[1] % 2 or w13.shape[2] != hidden:
        raise ValueError(
            f"{what}: w13 must be [E, 2I, H] with H = {hidden} (x's), got {tuple(w13.shape)}"
        )
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (num_experts, hidden, inter):
        raise ValueError(
            f"{what}: w2 must be [E, H, I] = {(num_experts, hidden, inter)} (from w13 and x), "
            f"got {tuple(w2.shape)}"
        )
    return t, hidden, num_experts, inter


def check_moe_args(
    what: str,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    """(T, H, E, I, k) of an MoE layer's arguments (``x`` [T, H], ``w13`` [E, 2I, H], ``w2``
    [E, H, I], ``topk_ids`` / ``topk_weights`` [T, k]); ValueError, prefixed with ``what``,
    naming the argument that does not fit."""
    t, hidden, num_experts, inter = _check_shapes(what, x, w13, w2)
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t:
        raise ValueError(
            f"{what}: topk_ids must be [T, k] with T = {t} (x's), got {tuple(topk_ids.shape)}"
        )
    k = topk_ids.shape[1]
    if topk_weights.shape != (t, k):
        raise ValueError(
            f"{what}: topk_weights must be [T, k] = {(t, k)} (topk_ids'), "
            f"got {tuple(topk_weights.shape)}"
        )
    return t, hidden, num_experts, inter, k


def check_runnable(what: str, x: torch.Tensor) -> None:
    """RuntimeError, prefixed with ``what``, where the Triton kernels cannot run on ``x``."""
    if triton is None:
        raise RuntimeError(f"{what}: Triton is not installed")
    if not x.is_cuda and not fused.INTERPRETED:
        raise RuntimeError(f"{what}: CPU tensors need Triton's interpreter")


def _launch_shape(
    x: torch.Tensor, k: int, inter: int, tiles: dict[str, int | None]
) -> tuple[tuple[int, int], tuple[int, int], dict[str, int]]:
    """Both kernels' grids and (capped) blocks; tiles left None come from default_tiles(T)."""
    t, hidden = x.shape
    full = default_tiles(t)
    full.update({key: v for key, v in tiles.items() if v is not None})
    blocks = {
        "BLOCK_N": _block(inter, full["block_n"]),
        "BLOCK_K": _block(hidden, full["block_k"]),
        "BLOCK_H": _block(hidden, full["block_h"]),
        "BLOCK_I": _block(inter, full["block_i"]),
        "num_warps": full["num_warps"],
        "down_warps": full["down_warps"],
    }
    gate_up_grid = (t * k, triton.cdiv(inter, blocks["BLOCK_N"]))
    down_grid = (t, triton.cdiv(hidden, blocks["BLOCK_H"]))
    return gate_up_grid, down_grid, blocks


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
    down_warps: int | None = None,
) -> torch.Tensor:
    """``FusedExperts.forward(x, topk_ids, topk_weights)`` for small T * k: ``x`` [T, H],
    ``w13`` [E, 2I, H] (gate rows, then up rows), ``w2`` [E, H, I], ``topk_ids`` /
    ``topk_weights`` [T, k]. Returns [T, H] in x's dtype.

    Tiles (powers of two, capped to the problem): ``block_n`` gate/up rows x ``block_k`` hidden
    columns per step of kernel 1, ``block_h`` output rows x ``block_i`` columns (of each of the
    k slots' experts) per step of kernel 2, ``num_warps`` / ``down_warps`` each kernel's warps
    a program; each one left None comes from ``default_tiles(T)``. ValueError names an
    argument whose shape does not fit. On CPU tensors the kernels need Triton's interpreter
    (TRITON_INTERPRET=1).
    """
    what = "fused_moe_small"
    check_runnable(what, x)
    t, hidden, _, inter, k = check_moe_args(what, x, w13, w2, topk_ids, topk_weights)
    out = torch.empty(t, hidden, dtype=x.dtype, device=x.device)
    if t == 0 or k == 0:
        return out.zero_()
    if x.stride(-1) != 1:
        x = x.contiguous()
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    h = torch.empty(t * k, inter, dtype=x.dtype, device=x.device)
    tiles = dict(
        block_n=block_n, block_k=block_k, block_h=block_h, block_i=block_i, num_warps=num_warps,
        down_warps=down_warps,
    )  # fmt: skip
    gate_up_grid, down_grid, blocks = _launch_shape(x, k, inter, tiles)
    common = dict(
        HIDDEN=hidden, INTER=inter, TOPK=k, INTERPRET=fused.INTERPRETED,
        num_warps=blocks["num_warps"], **fused._EXACT, **fused.pdl_options(x.device),
    )  # fmt: skip
    _gate_up_kernel[gate_up_grid](
        # w13's up rows as a view: its pointer starts at row I of expert 0.
        x, w13, w13[:, inter:], ids, h,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        BLOCK_N=blocks["BLOCK_N"], BLOCK_K=blocks["BLOCK_K"], **common,
    )  # fmt: skip
    common["num_warps"] = blocks["down_warps"]
    _down_kernel[down_grid](
        h, w2, ids, weights, out,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
        BLOCK_H=blocks["BLOCK_H"], BLOCK_I=blocks["BLOCK_I"], **common,
    )  # fmt: skip
    return out


__all__ = [
    "ENABLED",
    "MAX_PAIRS",
    "check_moe_args",
    "check_runnable",
    "default_tiles",
    "fused_moe_ref",
    "fused_moe_small",
    "use_fused",
]
