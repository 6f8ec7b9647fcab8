"""Skinny GEMM ("GEMV") for decode: ``x @ weight.T`` for a few rows of ``x`` (T = 1..16) against
an nn.Linear weight [N, K], as one Triton launch that streams the weight once at HBM rate.

At decode batch 1 of Qwen3-30B-A3B on an H200 the dense projections run as cuBLAS GEMVs that
reach ~1.8 of the ~4.3 TB/s: qkv_proj ([T, 2048] @ [5120, 2048]^T, 20 MB) 7.75 us, o_proj
([T, 4096] @ [2048, 4096]^T) 7.2 us plus a 1.7 us split-K reduce kernel, the MoE router gate
([T, 2048] @ [128, 2048]^T, 0.5 MB) 5 us. A GEMV's cost is the weight read, so the kernel is
built around streaming it:

- Grid (cdiv(N, BLOCK_N), splits). Program (i, s) owns output columns [i * BLOCK_N, +BLOCK_N)
  of every row and the s-th of ``splits`` ranges of K (whole K steps each). Each K step loads
  a [BLOCK_N, BLOCK_K] tile of weight (contiguous along K: 16-byte loads, marked evict-first as
  it is read once) and x's rows at the same columns (a few KB that every program reads: L2 /
  L1 hits). Weight rows past N and x rows past T are clamped to the last valid one rather than
  masked (their results are never stored), so only a K tail needs a mask (EVEN_K otherwise).
- Two ways to form the products, by a constexpr (``GemvConfig.use_dot``):
  elementwise, for T <= 4 (``MAX_FMA_ROWS``; tensor cores would mostly multiply padding): one
  float32 [BLOCK_N, BLOCK_K] accumulator per row of x, FMAs on CUDA cores, summed over K once
  after the loop. x's row is loaded as a [BLOCK_N, BLOCK_K] tile of repeated addresses, so it
  gets the weight tile's register layout (a [1, BLOCK_K] load gets another one, and Triton then
  moves the weight tile through shared memory every step; seen in the sm_90 TTGIR). Triton
  pipelines only loads that feed a tl.dot, so this loop prefetches the next weight tile by hand
  (two tiles in flight per program); num_stages does not apply to it.
  tl.dot, for any T: ``tl.dot(w_tile, x_tile^T)`` into [BLOCK_N, BLOCK_T] on tensor cores; the
  weight is the MMA's M side (BLOCK_N >= 16) and the rows of x, padded to BLOCK_T >= 16, its N
  side. Triton pipelines the tile loads (cp.async into shared memory, num_stages deep).
- One split (``split_k == 1``): the program writes its output tile. Several: it writes a
  float32 partial tile to a scratch buffer, then bumps its N block's arrival counter (after a
  CTA barrier, with acq_rel semantics: its partial is visible before the count is); the program
  that arrives last sums the ``splits`` partials in split order 0, 1, ... (so the result does
  not depend on which program was last: deterministic, no float atomics), writes the output and
  resets the counter to 0 for the next launch. One launch, no second reduce kernel.

Split-K is for problems with too few N blocks to fill the GPU (the router: N = 128, above one
row); where cdiv(N, BLOCK_N) already gives ~2 programs per SM it only adds the partial round
trip. At one row the router takes no split: each of its 64 programs loads its whole [2, K] slab
before the PDL wait, and after the wait only the norm and the products remain (no partials,
no counter), which in the engine's chain of kernels beat the split (run 18).

Programmatic dependent launch (``fused.pdl_options``, Hopper): each program issues its first
weight tile's load before it waits for the previous kernel (whose output is x), so the weight
stream starts while that kernel finishes. The split-K partials and counters are touched only
after the wait.

Norm prologue (``norm=NormPrologue(...)``). A decoder layer runs its RMSNorm (with the residual
add: ``fused.fused_add_rms_norm``, ~2 us at decode batch 1) right before qkv_proj and before the
MoE router; with ``norm`` the GEMV computes it itself, one kernel fewer each time. After the PDL
wait every program reads the whole rows of x (and of the residual: T x K elements, a few KB, L2
hits after the first program), sums their squares in one block, and then normalises each x tile
as it streams the weight: ``round(w * round(h * rsqrt(mean(h^2) + eps)))`` with h = x or
``round(x + residual)``, _rms_norm_kernel's formula with its roundings (every split's program
computes the scale over all K). Program (0, 0) alone writes h (the new residual) and, if asked,
the normed rows. Numerics: in the interpreter the result is bitwise that of ``rms_norm`` /
``fused_add_rms_norm`` followed by ``gemv`` (the same reduction of the same block); on a GPU
the sum of squares is reduced in another order (the GEMV's layout and warps, not the norm
kernel's), so it can differ in its last float32 bit, and a normed value then by 1 ulp where
that crosses a rounding boundary (rare; with an exact sum, e.g. few-bit inputs, all is bitwise
the same). The other operations are rounded as there: multiplies that feed an add use
libdevice's ``mul_rn`` / ``add_rn``, which FMA contraction (on for the GEMV) never fuses.
Costs: each program re-reads x (L2) and spends a few integer / bf16 ops per x element of a
tile; the prologue (T row passes) sits between the wait and the first FMA.

Scratch and CUDA graphs. The partials and counters live in a module-level cache keyed by
(device, N, splits, rows), allocated once (counters zeroed) and reused by every later launch of
that size; every launch leaves the counters at zero, so a graph can replay it any number of
times. A graph bakes the buffers' addresses in, so they are never freed or replaced. Allocating
inside a capture is refused: run the shape once before capturing (the usual warm-up does it) or
call ``reserve_scratch``. Launches that share a scratch entry must not run concurrently (two
streams, or two graphs replayed on two streams): they would mix their partials and counters.
``split_k == 1`` needs no scratch at all.

Numerics: float32 accumulation of exact products (bf16 / fp16 products are exact in float32;
FMA contraction is on, which only makes float32 inputs' sums more exact), rounded once to x's
dtype: a bf16 / fp16 result is the exact product rounded to nearest, up to the float32 sum's
own error, so it equals ``gemv_ref`` (and cuBLAS) except where the two float32 sums straddle a
rounding boundary (1 ulp). float32 inputs multiply in full float32 (``input_precision="ieee"``
for tl.dot, never TF32). Bitwise the same run to run for a given config; another config (tiles,
splits) adds in another order.

``default_config`` and ``prefer_gemv`` hold the winners of an H200 sweep of the Qwen3-30B-A3B
shapes (``benchmarks/bench_gemv.py --sweep``); other GPUs and shapes may want others.
``use_gemv`` is the switch for callers: CUDA, bf16 / fp16, 1 <= T <= ``MAX_ROWS``, a shape where
``prefer_gemv`` says the kernel beat cuBLAS, unless ``KVTIER_GEMV=0`` was set at import
(``ENABLED``); ``use_gemv_norm`` the same for the norm prologue (plus K <= ``MAX_NORM_K``).
On CPU tensors the kernel needs Triton's interpreter (TRITON_INTERPRET=1), as the tests use.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from kvtier.kernels import fused

triton = fused.triton
tl = fused.tl

# Read once; use_gemv checks it on every call (may also be set at run time).
ENABLED: bool = triton is not None and os.environ.get("KVTIER_GEMV", "1") != "0"
# Most rows of x that use_gemv sends to the kernel: past ~16 rows the weight is reused enough for
# a tiled GEMM (cuBLAS) to win.
MAX_ROWS = 16
# Most rows the elementwise (CUDA-core) path takes: one accumulator tile per row.
MAX_FMA_ROWS = 4
# Programs a launch aims for when choosing splits: one per SM of an H200 (132 SMs); fewer leave
# SMs idle while the weight streams through the others.
_MIN_PROGRAMS = 132
# ~2 programs per SM: the N blocking alone is then enough (no split-K needed).
_TARGET_PROGRAMS = 264
_MAX_SPLIT_K = 8
# Widest K a small-N GEMV at one row takes in one step, unsplit (see default_config): the
# accumulator is a float32 [2, K] tile, 32 registers a thread in four warps at K = 2048 ([4, K]
# in four warps, with the norm prologue, spilled 744 bytes for sm_90).
_WHOLE_K = 2048
# Shape classes of default_config / prefer_gemv.
_SMALL_N = 512
_LONG_K = 4096
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Widest x (K) the norm prologue takes: every program holds a whole row of x in registers for
# the one-block sum of squares (as _rms_norm_kernel does): at 4 warps 64 float32 a thread for
# K = 8192, twice that while the residual is added.
MAX_NORM_K = 8192


# Configs by shape for A/B runs, {"T,N,K": {GemvConfig field: value}} (KVTIER_GEMV_TILES, JSON,
# read at import; default_config consults it on every call, so it may also be set at run time).
TILE_OVERRIDES: dict[str, dict[str, int | bool]] = json.loads(
    os.environ.get("KVTIER_GEMV_TILES", "{}")
)


def _cdiv(a: int, b: int) -> int:
    """Ceiling division (triton.cdiv, also where Triton is not installed)."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of the GEMV kernel.

    ``block_n`` output columns (weight rows) and ``block_k`` reduction columns per tile, both
    powers of two (capped to the problem's size at launch); ``num_warps`` / ``num_stages`` as for
    any Triton launch; ``split_k`` the number of K ranges (programs per N block, the partials
    reduced in-kernel; capped so that no range is empty); ``use_dot`` forms the products with
    ``tl.dot`` (tensor cores, needs ``block_n`` and ``block_k`` >= 16) instead of an
    elementwise multiply and a sum over K.
    """

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    use_dot: bool = False

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps", "split_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two >= 1, got {v!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"GemvConfig.num_stages must be >= 1, got {self.num_stages!r}")
        if self.use_dot and (self.block_n < 16 or self.block_k < 16):
            raise ValueError(
                f"GemvConfig.use_dot needs block_n and block_k >= 16 (tl.dot's smallest tile), "
                f"got block_n={self.block_n}, block_k={self.block_k}"
            )


@dataclasses.dataclass(frozen=True, eq=False)
class NormPrologue:
    """An RMSNorm that ``gemv`` applies to x in its prologue: the GEMM input is then
    ``fused.rms_norm(x, weight, eps)``, or with ``residual`` the normed half of
    ``fused.fused_add_rms_norm(x, residual, weight, eps)`` (h = x + residual rounded to x's
    dtype, then normed), computed inside the GEMV kernel instead of by a kernel of its own.

    ``weight`` [K] is the norm's weight (a dtype that promotes with x's to x's: the normed
    rows have x's dtype, the GEMM weight's). ``residual`` [T, K] (x's dtype) is added first,
    and h is written to ``residual_out`` [T, K], required with it. ``normed_out`` [T, K]
    (optional) receives the normed rows (e.g. for a second consumer of them). The outputs may
    not overlap x, the residual or each other (one program writes them while the others still
    read x). Compared by identity (holds tensors)."""

    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None
    normed_out: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.residual is not None and self.residual_out is None:
            raise ValueError(
                "NormPrologue: residual_out is required with residual (h = x + residual is "
                "written there)"
            )
        if self.residual is None and self.residual_out is not None:
            raise ValueError("NormPrologue: residual_out given without residual")


def default_config(t: int, n: int, k: int) -> GemvConfig:
    """A config for ``x [t, k] @ weight [n, k].T``: ``TILE_OVERRIDES``' entry for the shape if
    there is one, else from the H200 sweep of the Qwen3-30B-A3B shapes
    (``benchmarks/bench_gemv.py --sweep``, docs/benchmarks.md):

    - small N (the router, N = 128): 4 rows a program and K split until ~one program per SM
      (x8); K steps of 256; tl.dot above 4 rows. At one row with K <= ``_WHOLE_K`` instead 2
      rows a program, the whole of K in one step, no split (64 programs of four warps for the
      router): in the engine's decode step (batch 1, Qwen3-30B-A3B, run 18, ``ab_decode.py``,
      median of 3 rounds) 2.768 ms a step against 2.833 with the split, which the single-kernel
      sweep had preferred; 1 row 2.765, 4 rows in eight warps 2.773, in four 2.757 (but it
      spills).
    - one row: 4 weight rows a program; K steps of 1024 with 8 warps for K >= 4096 (o_proj),
      256 with 4 below (qkv, lm_head).
    - 2..16 rows with K >= 4096 (where cuBLAS splits K and adds a reduce kernel): the
      elementwise path with K steps of 1024 (2 rows) or 512 (3-4 rows); tl.dot on 64-row tiles
      with K split in 4 above.
    Other shapes (``prefer_gemv`` says no to them) get the small-N rule's tiles.
    """
    override = TILE_OVERRIDES.get(f"{t},{n},{k}")
    if override is not None:
        return GemvConfig(**override)
    if n > _SMALL_N and t == 1:
        wide = k >= _LONG_K
        return GemvConfig(4, 1024 if wide else 256, num_warps=8 if wide else 4, num_stages=3)
    if n > _SMALL_N and k >= _LONG_K:
        if t <= MAX_FMA_ROWS:
            return GemvConfig(4, 1024 if t <= 2 else 512, num_warps=4, num_stages=3)
        return GemvConfig(64, 256, num_warps=4, num_stages=3, split_k=4, use_dot=True)
    if t == 1 and n <= _SMALL_N and k <= _WHOLE_K:
        return GemvConfig(2, _next_pow2(k), num_warps=4, num_stages=3)
    use_dot = t > MAX_FMA_ROWS
    block_n, block_k = (16, 256) if use_dot else (4, 256)
    programs = _cdiv(n, block_n)
    split_k = 1
    while (
        programs * split_k < _MIN_PROGRAMS
        and split_k < _MAX_SPLIT_K
        and _cdiv(k, 2 * split_k) >= 128
    ):
        split_k *= 2
    # One range's worth at most (a longer step would only be masked).
    block_k = max(16, min(block_k, _next_pow2(_cdiv(k, split_k))))
    return GemvConfig(block_n, block_k, num_warps=4, num_stages=3, split_k=split_k, use_dot=use_dot)


def prefer_gemv(t: int, n: int, k: int) -> bool:
    """Whether ``gemv`` beat cuBLAS for this shape on an H200 (bench_gemv.py, the Qwen3-30B-A3B
    and Qwen3-8B projections, docs/benchmarks.md):

    - small N (the router, N = 128): any T <= 16 (2.95 vs 5.38 us at T = 1);
    - T = 1: all but a wide weight over K >= 4096 (Qwen3-8B gate_up, 24576 x 4096: cuBLAS
      already at the copy rate; 50.5 vs 48.2 us); o_proj 6.3 vs 9.6 us, qkv 7.0 vs 7.7,
      lm_head 137 vs 144, Qwen3-8B o / down 11.1 / 26.7 vs 13.6 / 30.7;
    - K >= 4096 at T = 2 with N <= 4096 (o_proj 6.9 vs 9.5 us, Qwen3-8B o / down 1.13 /
      1.11x), and at T = 3..16 with N <= 2048 (o_proj 8.0-8.1 vs 9.5-9.7 us; Qwen3-8B's
      4096-row o_proj lost, 0.93x).
    Elsewhere (e.g. qkv at T >= 2) cuBLAS was as fast or faster."""
    if not 1 <= t <= MAX_ROWS:
        return False
    if n <= _SMALL_N:
        return True
    if t == 1:
        return not (k >= _LONG_K and n >= 16384)
    if k < _LONG_K:
        return False
    return n <= (4096 if t == 2 else 2048)


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a caller should take ``gemv`` for ``x @ weight.T``: CUDA, bf16 / fp16 (the same
    for both), 1 <= T <= MAX_ROWS, x's columns and the 2-D weight contiguous, ``prefer_gemv``,
    and the switch on. Never on CPU."""
    return (
        ENABLED
        and x.is_cuda
        and x.dim() == 2
        and weight.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.device == x.device
        and 1 <= x.shape[0] <= MAX_ROWS
        and x.shape[1] == weight.shape[1]
        and (x.stride(1) == 1 or x.shape[1] == 1)
        and weight.is_contiguous()
        and prefer_gemv(x.shape[0], weight.shape[0], weight.shape[1])
    )


def use_gemv_norm(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor) -> bool:
    """Whether a caller should take ``gemv(x, weight, norm=NormPrologue(norm_weight, ...))``
    for ``rms_norm(x [+ residual]) @ weight.T``: one row of x, a small N (the router),
    ``use_gemv(x, weight)``, K <= MAX_NORM_K and a contiguous norm weight [K]
    on x's device whose dtype promotes with x's to x's.

    Only where it won on an H200 (bench_gemv.py --norm, CUDA-graph replays, 2026-12-01): the
    router at T = 1 took 3.00 us against 3.27 for the norm kernel then gemv; at T = 2 / 4 it
    lost (3.83 / 5.07 against 3.53 / 3.75), and qkv (5120 x 2048) lost at every T (10.31
    against 7.28 us at T = 1): the prologue doubles the registers a thread holds, and a
    program streams the weight with fewer programs resident."""
    return (
        x.shape[0] == 1
        and weight.shape[0] <= _SMALL_N
        and use_gemv(x, weight)
        and x.shape[1] <= MAX_NORM_K
        and norm_weight.dim() == 1
        and norm_weight.shape[0] == x.shape[1]
        and norm_weight.device == x.device
        and norm_weight.is_contiguous()
        and norm_weight.dtype in _DTYPES
        and torch.promote_types(norm_weight.dtype, x.dtype) == x.dtype
    )


# ---------------------------------------------------------------------------- torch reference
def gemv_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in float32, rounded once to x's dtype."""
    return (x.float() @ weight.float().T).to(x.dtype)


# ---------------------------------------------------------------------------- device code
# fmt: off
if triton is not None:
    _round = fused._round
    _pdl_wait = fused.pdl_wait
    _mean = fused._mean
    _rsqrt = fused._rsqrt
    libdevice = fused.libdevice

    # The GEMV is launched with FMA contraction on, _rms_norm_kernel without: in the norm
    # prologue a product that feeds an add (the squares of the sum, the mean before ``+ eps``)
    # must stay a separately rounded multiply, as there. Libdevice's _rn ops are never
    # contracted.
    @triton.jit
    def _mul_rn(a, b, INTERPRET: tl.constexpr):
        if INTERPRET:
            return a * b
        else:
            return libdevice.mul_rn(a, b)

    @triton.jit
    def _add_rn(a, b, INTERPRET: tl.constexpr):
        if INTERPRET:
            return a + b
        else:
            return libdevice.add_rn(a, b)

    @triton.jit
    def _load_k(ptrs, k0, k_end, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                EVICT: tl.constexpr):
        """A tile whose columns are k0 + [0, BLOCK_K), zero past k_end (unmasked if EVEN_K)."""
        if EVEN_K:
            return tl.load(ptrs, eviction_policy=EVICT)
        else:
            mask = (k0 + tl.arange(0, BLOCK_K)) < k_end
            return tl.load(ptrs, mask=mask[None, :], other=0.0, eviction_policy=EVICT)

    @triton.jit
    def _norm_rstd(
        X, R, NW, RES_OUT, NORM_OUT, T, K, stride_xt, stride_rt, stride_rot, stride_not,
        n_f, inv_n, eps, k_store,
        BLOCK_T: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_NORMED: tl.constexpr,
        NORM_BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """The norm prologue: [BLOCK_T] float32 ``rsqrt(mean(h^2) + eps)`` of each row h of x
        (h = round(x + residual) with HAS_RESIDUAL) over all K columns (0 past T). Exactly
        _rms_norm_kernel's math, row by row with one [NORM_BLOCK] block (the same reduction).
        One program (``k_store`` = K; 0 in the others, which only read) also stores h into
        RES_OUT and, with WRITE_NORMED, the normed rows into NORM_OUT. Call after the PDL wait
        (x and the residual are the previous kernels' outputs)."""
        dtype = X.dtype.element_ty
        toks = tl.arange(0, BLOCK_T)
        cols = tl.arange(0, NORM_BLOCK)
        mask = cols < K
        store = cols < k_store
        rstd = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t in range(0, T):
            h = tl.load(X + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(R + t * stride_rt + cols, mask=mask, other=0.0).to(tl.float32)
                hr = _round(h + r, dtype, INTERPRET)
                tl.store(RES_OUT + t * stride_rot + cols, hr, mask=store)
                h = hr.to(tl.float32)
            ms = _mean(tl.sum(_mul_rn(h, h, INTERPRET), axis=0), n_f, inv_n, INTERPRET)
            row_rstd = _rsqrt(_add_rn(ms, eps, INTERPRET), INTERPRET)
            if WRITE_NORMED:
                # Loaded per row (L1 hits) rather than held across the loop: fewer registers.
                nw = tl.load(NW + cols, mask=store, other=0.0).to(tl.float32)
                xn = _round(h * row_rstd, dtype, INTERPRET).to(tl.float32)
                tl.store(NORM_OUT + t * stride_not + cols, _round(nw * xn, dtype, INTERPRET),
                         mask=store)
            rstd = tl.where(toks == t, row_rstd, rstd)
        return rstd

    @triton.jit
    def _x_tile(x_ptrs, r_ptrs, nw_ptrs, rstd, k0, k_end, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                INTERPRET: tl.constexpr):
        """x's tile at columns k0 + [0, BLOCK_K) in x's dtype (zero past k_end): as stored, or
        with NORM the GEMM input round(w * round(h * rstd)) of the norm prologue, h = x or
        round(x + residual) (rstd: the rows' scale, broadcast against the tile)."""
        xv = _load_k(x_ptrs, k0, k_end, BLOCK_K, EVEN_K, "")
        if NORM:
            dtype = x_ptrs.dtype.element_ty
            h = xv.to(tl.float32)
            if HAS_RESIDUAL:
                r = _load_k(r_ptrs, k0, k_end, BLOCK_K, EVEN_K, "").to(tl.float32)
                h = _round(h + r, dtype, INTERPRET).to(tl.float32)
            xn = _round(h * rstd, dtype, INTERPRET).to(tl.float32)
            nw = _load_k(nw_ptrs, k0, k_end, BLOCK_K, EVEN_K, "").to(tl.float32)
            xv = _round(nw * xn, dtype, INTERPRET)
        return xv

    @triton.jit
    def _fma_sums(
        X, R, NW, w_rows, w_ptrs, w_next, rstd, T, stride_xt, stride_rt, k_start, k_end,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """[BLOCK_N, BLOCK_T] float32 dot products of weight rows and x rows over
        [k_start, k_end), on CUDA cores: one [BLOCK_N, BLOCK_K] accumulator per x row (at most
        4), reduced over K once after the loop. ``w_next`` is the first weight tile (at
        ``w_ptrs``), loaded by the caller before its PDL wait; x's tiles come from _x_tile
        (normed there with NORM, row i by the i-th entry of ``rstd``)."""
        cols = k_start + tl.arange(0, BLOCK_K)
        # x's row as a [BLOCK_N, BLOCK_K] tile (every row the same addresses): loaded in the
        # weight tile's own layout, so no tile is shuffled through shared memory each step (a
        # [1, BLOCK_K] load gets another layout). A thread that holds several rows of the tile
        # loads the same x chunk once per row: L1 hits, not HBM traffic. The residual and the
        # norm weight (NORM) are loaded the same way.
        x_ptrs = X + (w_rows * 0)[:, None] + cols[None, :]
        r_ptrs = R + (w_rows * 0)[:, None] + cols[None, :]
        nw_ptrs = NW + (w_rows * 0)[:, None] + cols[None, :]
        x1 = tl.minimum(1, T - 1) * stride_xt  # rows past T re-read row T - 1 (never stored)
        x2 = tl.minimum(2, T - 1) * stride_xt
        x3 = tl.minimum(3, T - 1) * stride_xt
        r1 = tl.minimum(1, T - 1) * stride_rt
        r2 = tl.minimum(2, T - 1) * stride_rt
        r3 = tl.minimum(3, T - 1) * stride_rt
        # The rows' norm scales as scalars (exact: the other entries added are zeros).
        toks = tl.arange(0, BLOCK_T)
        s0 = tl.sum(tl.where(toks == 0, rstd, 0.0), axis=0)
        s1 = tl.sum(tl.where(toks == 1, rstd, 0.0), axis=0)
        s2 = tl.sum(tl.where(toks == 2, rstd, 0.0), axis=0)
        s3 = tl.sum(tl.where(toks == 3, rstd, 0.0), axis=0)
        acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        # Triton pipelines only loads that feed a tl.dot, so this loop prefetches by hand: the
        # next weight tile's load is issued before this one's FMAs, keeping two tiles in flight
        # per program instead of one (HBM latency, not bandwidth, bounds one tile at a time).
        # The last step's "next" tile is its own again (an in-bounds re-read, never used).
        for k0 in range(k_start, k_end, BLOCK_K):
            w = w_next.to(tl.float32)
            w_ptrs += tl.where(k0 + BLOCK_K < k_end, BLOCK_K, 0)
            w_next = _load_k(w_ptrs, k0 + BLOCK_K, k_end, BLOCK_K, EVEN_K, "evict_first")
            acc0 += w * _x_tile(x_ptrs, r_ptrs, nw_ptrs, s0, k0, k_end, BLOCK_K, EVEN_K, NORM,
                                HAS_RESIDUAL, INTERPRET).to(tl.float32)
            if BLOCK_T > 1:
                acc1 += w * _x_tile(x_ptrs + x1, r_ptrs + r1, nw_ptrs, s1, k0, k_end, BLOCK_K,
                                    EVEN_K, NORM, HAS_RESIDUAL, INTERPRET).to(tl.float32)
            if BLOCK_T > 2:
                acc2 += w * _x_tile(x_ptrs + x2, r_ptrs + r2, nw_ptrs, s2, k0, k_end, BLOCK_K,
                                    EVEN_K, NORM, HAS_RESIDUAL, INTERPRET).to(tl.float32)
                acc3 += w * _x_tile(x_ptrs + x3, r_ptrs + r3, nw_ptrs, s3, k0, k_end, BLOCK_K,
                                    EVEN_K, NORM, HAS_RESIDUAL, INTERPRET).to(tl.float32)
            x_ptrs += BLOCK_K
            r_ptrs += BLOCK_K
            nw_ptrs += BLOCK_K
        res = tl.where(toks[None, :] == 0, tl.sum(acc0, axis=1)[:, None], 0.0)
        if BLOCK_T > 1:
            res = tl.where(toks[None, :] == 1, tl.sum(acc1, axis=1)[:, None], res)
        if BLOCK_T > 2:
            res = tl.where(toks[None, :] == 2, tl.sum(acc2, axis=1)[:, None], res)
            res = tl.where(toks[None, :] == 3, tl.sum(acc3, axis=1)[:, None], res)
        return res

    @triton.jit
    def _dot_sums(
        X, R, NW, w_ptrs, rstd, T, stride_xt, stride_rt, k_start, k_end,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """The same [BLOCK_N, BLOCK_T] sums on tensor cores: tl.dot(weight tile, x tile^T)
        (the weight is the MMA's M side; BLOCK_T >= 16 rows of x, the clamped ones repeats)."""
        cols = k_start + tl.arange(0, BLOCK_K)
        x_rows = tl.minimum(tl.arange(0, BLOCK_T), T - 1).to(tl.int64)
        x_ptrs = X + x_rows[:, None] * stride_xt + cols[None, :]
        r_ptrs = R + x_rows[:, None] * stride_rt + cols[None, :]
        nw_ptrs = NW + (x_rows * 0)[:, None] + cols[None, :]
        row_rstd = rstd[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            w = _load_k(w_ptrs, k0, k_end, BLOCK_K, EVEN_K, "evict_first")
            xv = _x_tile(x_ptrs, r_ptrs, nw_ptrs, row_rstd, k0, k_end, BLOCK_K, EVEN_K, NORM,
                         HAS_RESIDUAL, INTERPRET)
            if INTERPRET:
                # The interpreter's dot multiplies bf16's raw bits: widen first (exact).
                acc = tl.dot(w.to(tl.float32), tl.trans(xv.to(tl.float32)), acc,
                             input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(xv), acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            r_ptrs += BLOCK_K
            nw_ptrs += BLOCK_K
        return acc

    @triton.jit
    def _gemv_kernel(
        X, W, OUT, PART, COUNT, R, NW, RES_OUT, NORM_OUT,
        T, N, K, K_SPLIT, PART_ROWS, stride_xt, stride_ot, stride_rt, stride_rot, stride_not,
        n_f, inv_n, eps,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
        NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_NORMED: tl.constexpr,
        NORM_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
        toks = tl.arange(0, BLOCK_T)
        # Clamped, not masked: the tail's rows re-read the last valid row (never stored), so
        # the loads need no row mask and stay unpredicated 16-byte loads.
        w_rows = tl.minimum(rows, N - 1).to(tl.int64)
        k_start = pid_k * K_SPLIT
        k_end = tl.minimum(k_start + K_SPLIT, K)
        w_ptrs = W + w_rows[:, None] * K + (k_start + tl.arange(0, BLOCK_K))[None, :]
        if not USE_DOT:
            # The elementwise loop's first weight tile (see _fma_sums' prefetch): issued before
            # the wait, so the weight stream starts while the previous kernel finishes. tl.dot's
            # loads are pipelined by Triton inside the loop.
            w_first = _load_k(w_ptrs, k_start, k_end, BLOCK_K, EVEN_K, "evict_first")
        _pdl_wait(PDL)  # x (and the residual) are the previous kernels' outputs
        if NORM:
            # Every program needs its rows' scale over all K (whichever split it owns); only
            # program (0, 0) writes the residual / normed rows.
            k_store = tl.where((pid_n == 0) & (pid_k == 0), K, 0)
            rstd = _norm_rstd(X, R, NW, RES_OUT, NORM_OUT, T, K, stride_xt, stride_rt,
                              stride_rot, stride_not, n_f, inv_n, eps, k_store, BLOCK_T,
                              HAS_RESIDUAL, WRITE_NORMED, NORM_BLOCK, INTERPRET)
        else:
            rstd = tl.zeros([BLOCK_T], dtype=tl.float32)  # unused
        if USE_DOT:
            res = _dot_sums(X, R, NW, w_ptrs, rstd, T, stride_xt, stride_rt, k_start, k_end,
                            BLOCK_T, BLOCK_N, BLOCK_K, EVEN_K, NORM, HAS_RESIDUAL,
                            DOT_PRECISION, INTERPRET)
        else:
            res = _fma_sums(X, R, NW, w_rows, w_ptrs, w_first, rstd, T, stride_xt, stride_rt,
                            k_start, k_end, BLOCK_T, BLOCK_N, BLOCK_K, EVEN_K, NORM,
                            HAS_RESIDUAL, INTERPRET)
        out_mask = (rows < N)[:, None] & (toks < T)[None, :]
        out_ptrs = OUT + toks[None, :] * stride_ot + rows[:, None]
        dtype = OUT.dtype.element_ty
        if SPLIT_K == 1:
            tl.store(out_ptrs, _round(res, dtype, INTERPRET), mask=out_mask)
        else:
            part_off = toks[None, :] * N + rows[:, None]
            tl.store(PART + pid_k * PART_ROWS * N + part_off, res, mask=out_mask)
            # Every thread's partial stores happen before the counter's release (the barrier),
            # and the acq_rel increment is seen by the last arriver only after them.
            tl.debug_barrier()
            arrived = tl.atomic_add(COUNT + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                # Last of this N block's SPLIT_K programs: every partial is written. Sum them in
                # split order (deterministic whichever program got here), read through L2 (.cg:
                # never a stale L1 line).
                total = tl.load(PART + part_off, mask=out_mask, other=0.0, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT_K):
                    total += tl.load(PART + s * PART_ROWS * N + part_off, mask=out_mask,
                                     other=0.0, cache_modifier=".cg")
                tl.store(out_ptrs, _round(total, dtype, INTERPRET), mask=out_mask)
                # Ready for the next launch (all SPLIT_K programs have counted).
                tl.atomic_xchg(COUNT + pid_n, 0, sem="relaxed", scope="gpu")
# fmt: on


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A config fitted to one problem: the block sizes and splits the launch uses."""

    block_t: int
    block_n: int
    block_k: int
    split_k: int
    k_split: int  # columns per split, a multiple of block_k
    num_warps: int
    num_stages: int
    use_dot: bool

    def n_blocks(self, n: int) -> int:
        return _cdiv(n, self.block_n)


def _plan(t: int, n: int, k: int, config: GemvConfig) -> _Plan:
    if not config.use_dot and t > MAX_FMA_ROWS:
        raise ValueError(
            f"gemv: the elementwise path (use_dot=False) takes at most {MAX_FMA_ROWS} rows of x, "
            f"got T={t}; use a config with use_dot=True"
        )
    floor = 16 if config.use_dot else 1  # tl.dot's smallest tile side
    block_t = max(floor, _next_pow2(t))
    block_n = max(floor, min(config.block_n, _next_pow2(n)))
    block_k = max(floor, min(config.block_k, _next_pow2(k)))
    k_split = _cdiv(_cdiv(k, config.split_k), block_k) * block_k
    split_k = _cdiv(k, k_split)  # no empty range
    return _Plan(
        block_t, block_n, block_k, split_k, k_split, config.num_warps, config.num_stages,
        config.use_dot,
    )  # fmt: skip


def launch_grid(t: int, n: int, k: int, config: GemvConfig | None = None) -> tuple[int, int]:
    """The grid ``gemv`` launches for ``x [t, k] @ weight [n, k].T``: (N blocks, K splits),
    after ``config`` (default: ``default_config``) is fitted to the problem."""
    plan = _plan(t, n, k, config or default_config(t, n, k))
    return plan.n_blocks(n), plan.split_k


# ---------------------------------------------------------------------------- scratch
# (device, N, splits, rows) -> (float32 partials [splits, rows, N], int32 counters [N]). Never
# freed: a captured CUDA graph holds the addresses. The counters are zero between launches.
_SCRATCH: dict[tuple[torch.device, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _scratch_rows(t: int) -> int:
    # Every T up to MAX_ROWS shares one entry (the decode graphs of all batch sizes).
    return max(MAX_ROWS, _next_pow2(t))


def _get_scratch(
    device: torch.device, t: int, n: int, split_k: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    rows = _scratch_rows(t)
    key = (device, n, split_k, rows)
    entry = _SCRATCH.get(key)
    if entry is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"gemv: no split-K scratch for N={n}, split_k={split_k}, T={t} on {device} "
                "during CUDA graph capture; call reserve_scratch(...) (or run the shape once) "
                "before capturing"
            )
        # One counter per weight row: enough for any block_n.
        entry = (
            torch.empty(split_k, rows, n, dtype=torch.float32, device=device),
            torch.zeros(n, dtype=torch.int32, device=device),
        )
        _SCRATCH[key] = entry
    return entry[0], entry[1], rows


def reserve_scratch(
    device: torch.device | str, t: int, n: int, k: int, config: GemvConfig | None = None
) -> None:
    """Allocate the split-K scratch that ``gemv`` of ``x [t, k] @ weight [n, k].T`` with
    ``config`` (default: ``default_config``) will use, so that the call can be captured in a
    CUDA graph. Nothing to do when the launch has one split; idempotent."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if t < 1 or n < 1 or k < 1:
        return
    plan = _plan(t, n, k, config or default_config(t, n, k))
    if plan.split_k > 1:
        _get_scratch(device, t, n, plan.split_k)


# ---------------------------------------------------------------------------- entry point
# fused's launch options less its no-contraction one: libdevice without flush-to-zero (the norm
# prologue's mul_rn / add_rn / rsqrt must not flush subnormals, as _rms_norm_kernel's do not).
_NO_FTZ = {key: v for key, v in fused._EXACT.items() if key != "enable_fp_fusion"}


def _span(a: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses ``a`` can touch (non-negative strides)."""
    if a.numel() == 0:
        return 0, 0
    extent = sum((size - 1) * stride for size, stride in zip(a.shape, a.stride())) + 1
    return a.data_ptr(), a.data_ptr() + extent * a.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a.device == b.device and a0 < b1 and b0 < a1


def _check_norm(norm: NormPrologue, x: torch.Tensor, out: torch.Tensor) -> None:
    """Raise unless ``norm`` fits ``x`` [T, K] and ``out`` (see NormPrologue)."""
    t, k = x.shape
    if not isinstance(norm, NormPrologue):
        raise TypeError(f"gemv: norm must be a NormPrologue, got {type(norm).__name__}")
    if out.shape[1] == 0:
        # No program would run to write residual_out / normed_out.
        raise ValueError("gemv: norm needs a weight of N >= 1 rows")
    if not 1 <= k <= MAX_NORM_K:
        raise ValueError(
            f"gemv: norm (the RMSNorm prologue) takes 1 <= K <= {MAX_NORM_K} columns of x, got "
            f"K={k}; run fused.rms_norm / fused_add_rms_norm and a plain gemv"
        )
    w = norm.weight
    if (
        w.dim() != 1
        or w.shape[0] != k
        or w.device != x.device
        or w.dtype not in _DTYPES
        or torch.promote_types(w.dtype, x.dtype) != x.dtype
        or (k > 1 and w.stride(0) != 1)
    ):
        raise ValueError(
            f"gemv: norm.weight must be a contiguous [{k}] tensor on {x.device} whose dtype "
            f"promotes with x's ({x.dtype}) to x's, got {tuple(w.shape)} {w.dtype} on {w.device}"
        )
    for name in ("residual", "residual_out", "normed_out"):
        a = getattr(norm, name)
        if a is None:
            continue
        if a.shape != (t, k) or a.dtype != x.dtype or a.device != x.device:
            raise ValueError(
                f"gemv: norm.{name} must be [{t}, {k}] {x.dtype} on {x.device} (as x), got "
                f"{tuple(a.shape)} {a.dtype} on {a.device}"
            )
        if t > 0 and k > 1 and a.stride(1) != 1:
            raise ValueError(f"gemv: norm.{name}'s columns must be contiguous, got {a.stride()}")
    # One program writes these while the others still read x and the residual.
    reads = {"x": x, "norm.residual": norm.residual}
    writes = {
        "out": out,
        "norm.residual_out": norm.residual_out,
        "norm.normed_out": norm.normed_out,
    }
    names = [n for n, a in writes.items() if a is not None]
    for i, wname in enumerate(names):
        others = {**reads, **{n: writes[n] for n in names[i + 1 :]}}
        for oname, other in others.items():
            if other is not None and _overlap(writes[wname], other):
                raise ValueError(f"gemv: {wname} overlaps {oname} (it must be a buffer of its own)")


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    norm: NormPrologue | None = None,
) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` [T, K] (rows may be strided; columns contiguous) and an
    nn.Linear ``weight`` [N, K] (contiguous), accumulated in float32; returns [T, N] in x's dtype
    (bf16, fp16 or fp32), written into ``out`` when given ([T, N], x's dtype, contiguous rows).

    With ``norm`` (a ``NormPrologue``, K <= MAX_NORM_K) the product is
    ``rms_norm(x [+ norm.residual]) @ weight.T``, the norm computed in the kernel's prologue
    exactly as ``fused.rms_norm`` / ``fused.fused_add_rms_norm`` compute it (bitwise the same
    in the interpreter; on a GPU the sum of squares may add in another order, see the module
    docstring), and ``norm.residual_out`` / ``norm.normed_out`` written as those return them.

    ``config`` defaults to ``default_config(T, N, K)``. With ``split_k > 1`` the call uses a
    cached scratch buffer (see ``reserve_scratch`` for CUDA graph capture).
    On CPU tensors the kernel needs Triton's interpreter (TRITON_INTERPRET=1).
    """
    if triton is None:
        raise RuntimeError("gemv: Triton is not installed")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"gemv: x must be [T, K] and weight [N, K], got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    t, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"gemv: x has K={k} columns but weight [N, K] has {weight.shape[1]}")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(
            f"gemv: x and weight must share a dtype of bf16 / fp16 / fp32, got {x.dtype} and "
            f"{weight.dtype}"
        )
    if weight.device != x.device:
        raise ValueError(f"gemv: x on {x.device} but weight on {weight.device}")
    if not weight.is_contiguous():
        raise ValueError(
            f"gemv: weight must be contiguous [N, K] (the nn.Linear layout), got strides "
            f"{weight.stride()}"
        )
    if t > 0 and k > 1 and x.stride(1) != 1:
        raise ValueError(f"gemv: x's columns must be contiguous (stride(1) == 1), got {x.stride()}")
    if out is None:
        out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    elif out.shape != (t, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"gemv: out must be [{t}, {n}] {x.dtype} on {x.device}, got {tuple(out.shape)} "
            f"{out.dtype} on {out.device}"
        )
    elif t > 0 and n > 1 and out.stride(1) != 1:
        raise ValueError(f"gemv: out's columns must be contiguous, got strides {out.stride()}")
    if norm is not None:
        _check_norm(norm, x, out)
    if t == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    if not x.is_cuda and not fused.INTERPRETED:
        raise RuntimeError("gemv: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
    plan = _plan(t, n, k, config or default_config(t, n, k))
    # A single row's stride is irrelevant: any value addresses only row 0.
    stride_xt = x.stride(0) if t > 1 else k
    if plan.split_k > 1:
        part, count, part_rows = _get_scratch(x.device, t, n, plan.split_k)
    else:
        part, count, part_rows = out, out, 0  # unused by a one-split launch
    if norm is not None:
        # Unused pointers (no residual, no normed output) alias x; the kernel never touches them.
        nw = norm.weight
        res = norm.residual if norm.residual is not None else x
        res_out = norm.residual_out if norm.residual_out is not None else x
        normed = norm.normed_out if norm.normed_out is not None else x
        # As fused._rms_norm_launch passes them: the mean is sum / K or sum * fl(1 / K).
        n_f, inv_n, eps, norm_block = float(k), fused._inv(k), float(norm.eps), _next_pow2(k)
    else:
        nw = res = res_out = normed = x
        n_f, inv_n, eps, norm_block = 1.0, 1.0, 0.0, 1
    _gemv_kernel[(plan.n_blocks(n), plan.split_k)](
        x, weight, out, part, count, res, nw, res_out, normed,
        t, n, k, plan.k_split, part_rows, stride_xt, out.stride(0) if t > 1 else n,
        res.stride(0) if t > 1 else k, res_out.stride(0) if t > 1 else k,
        normed.stride(0) if t > 1 else k, n_f, inv_n, eps,
        BLOCK_T=plan.block_t, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, SPLIT_K=plan.split_k,
        USE_DOT=plan.use_dot, EVEN_K=k % plan.block_k == 0, NORM=norm is not None,
        HAS_RESIDUAL=norm is not None and norm.residual is not None,
        WRITE_NORMED=norm is not None and norm.normed_out is not None, NORM_BLOCK=norm_block,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        INTERPRET=fused.INTERPRETED, num_warps=plan.num_warps, num_stages=plan.num_stages,
        # Explicit: Triton 3.9 warns that its default turns to no contraction in 3.10.
        enable_fp_fusion=True, **_NO_FTZ, **fused.pdl_options(x.device),
    )  # fmt: skip
    return out


__all__ = [
    "ENABLED",
    "MAX_FMA_ROWS",
    "MAX_NORM_K",
    "MAX_ROWS",
    "GemvConfig",
    "NormPrologue",
    "default_config",
    "gemv",
    "gemv_ref",
    "launch_grid",
    "reserve_scratch",
    "use_gemv",
    "use_gemv_norm",
]
