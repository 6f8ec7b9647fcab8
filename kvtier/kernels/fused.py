"""Fused Triton kernels for the small elementwise / per-row ops of a decoder layer, each a single
launch: RMSNorm (optionally with the residual add before it), per-head q/k RMSNorm + rotary
embedding, the MoE router (softmax, top-k, renormalisation) and SwiGLU's ``silu(gate) * up``.

Every op has a wrapper that runs the Triton kernel on CUDA tensors and, elsewhere, a torch
reference (``*_ref``) that is exactly the math of ``kvtier.models.layers`` (so the engine's CPU
behaviour does not change). ``use_triton=None`` picks between them (CUDA and Triton available,
and ``KVTIER_FUSED_KERNELS`` not set to 0); True forces the kernel (on CPU tensors it then needs
Triton's interpreter, TRITON_INTERPRET=1, as the tests use), False forces the reference.

Numerics. The kernels perform the reference's operations in the same order with the same
roundings: float32 compute, the same intermediate casts (e.g. RMSNorm's normalised value is
rounded to the input dtype before the weight multiply, and that product rounded again, exactly as
``weight * x.to(dtype)`` does), no FMA contraction (launched with ``enable_fp_fusion=False``),
IEEE division (``div_rn``) and, on CUDA, libdevice's ``expf`` / ``cosf`` / ``sinf`` /
``rsqrtf`` without flush-to-zero (``enable_reflect_ftz=False``): the same functions torch's
CUDA kernels call, so they are bitwise the same. The mean of squares is ``sum * fl(1/N)`` on
CUDA and ``sum / N`` in the interpreter, as torch computes ``mean`` on each device. What is not
reproduced is the order in which a reduction (sum of squares, softmax denominator, top-k sum)
adds its terms: torch's reduction trees differ from Triton's, so a sum can differ in its last
float32 bit, and a float32 result by a few ulps (at most 5 measured); a bf16 / fp16 result only
where that crosses a rounding boundary (rare), by 1 ulp, or 2 where the rounded value is
multiplied and rounded again (RMSNorm's weight product, F.silu's output times up). When the sum is
exact (e.g. inputs with few mantissa bits) the results are bitwise identical; elementwise parts
(the residual add, the rotary embedding, SiLU) should be bitwise identical on CUDA
(tests/test_fused_kernels.py checks all of this when run on a GPU). In the interpreter,
transcendentals come from numpy, which differ from torch's CPU ones in the last bit.

All kernels are CUDA-graph safe: the grids depend only on shapes, nothing is read back to the
host, and outputs are allocated with ``torch.empty`` (or written in place). Any T >= 1 works, as
do hidden sizes, head dims and expert counts that are not powers of two (masked blocks).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
try:  # grid dependency control (Triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older or no Triton
    gdc_launch_dependents = gdc_wait = None


# ---------------------------------------------------------------------------- torch references
# Exactly the math of kvtier/models/layers.py (RMSNorm.forward, RotaryEmbedding.forward,
# apply_rotary, SparseMoeBlock.forward's routing, silu_and_mul); the CPU path of the wrappers.
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def rope_cos_sin_ref(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return freqs.cos(), freqs.sin()


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(dtype)


def qk_norm_rope_ref(
    qkv: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    use_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = qkv.shape[0]
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(t, num_q_heads, head_dim)
    k = k.view(t, num_kv_heads, head_dim)
    v = v.view(t, num_kv_heads, head_dim)
    if use_norm:
        assert q_weight is not None and k_weight is not None
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    cos, sin = rope_cos_sin_ref(positions, inv_freq)
    return apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin), v


def moe_route_ref(
    logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype if out_dtype is None else out_dtype), ids


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------- device code
if triton is not None:

    @triton.jit
    def _round(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
        """Round float32 ``x`` to DTYPE, to nearest even (what torch's ``.to()`` does)."""
        if INTERPRET and DTYPE == tl.bfloat16:  # noqa: SIM300 (constexpr dtype compare)
            # The interpreter truncates float32 -> bf16 instead of rounding: round the bits.
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)

    @triton.jit
    def _exp(x, INTERPRET: tl.constexpr):
        # tl.exp is ex2.approx on CUDA; libdevice's expf is what torch calls. The interpreter
        # has no libdevice (numpy's exp instead).
        if INTERPRET:
            return tl.exp(x)
        else:
            return libdevice.exp(x)

    @triton.jit
    def _cos(x, INTERPRET: tl.constexpr):
        if INTERPRET:
            return tl.cos(x)
        else:
            return libdevice.cos(x)

    @triton.jit
    def _sin(x, INTERPRET: tl.constexpr):
        if INTERPRET:
            return tl.sin(x)
        else:
            return libdevice.sin(x)

    @triton.jit
    def _rsqrt(x, INTERPRET: tl.constexpr):
        if INTERPRET:
            return tl.math.rsqrt(x)
        else:
            return libdevice.rsqrt(x)

    @triton.jit
    def _mean(total, n, inv_n, INTERPRET: tl.constexpr):
        # torch's mean: sum / N on CPU, sum * fl(1/N) on CUDA (n and inv_n are float32).
        if INTERPRET:
            return tl.math.div_rn(total, n)
        else:
            return total * inv_n

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """With PDL (a launch with ``pdl_options``): wait until the previous kernel in the stream
        has finished and its writes are visible, then let the next kernel launch. Everything a
        kernel does before this call may overlap the previous kernel, so it may only read what
        no kernel of the step writes (weights, constants). Every program of a PDL kernel calls
        it before it exits: a kernel then finishes after the one before it, and a kernel that
        starts once this one has let it (all of this one's programs are past their wait) may
        read what the kernel before the previous one wrote."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _rms_norm_kernel(
        X, R, W, Y, RES_OUT,
        stride_x, stride_r, stride_y, stride_ro,
        n_cols, n_f, inv_n, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: before the wait
        pdl_wait(PDL)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            h = _round(x + r, RES_OUT.dtype.element_ty, INTERPRET)
            tl.store(RES_OUT + row * stride_ro + cols, h, mask=mask)
            x = h.to(tl.float32)
        ms = _mean(tl.sum(x * x, axis=0), n_f, inv_n, INTERPRET)
        xn = _round(x * _rsqrt(ms + eps, INTERPRET), X.dtype.element_ty, INTERPRET)
        y = _round(w * xn.to(tl.float32), Y.dtype.element_ty, INTERPRET)
        tl.store(Y + row * stride_y + cols, y, mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(
        QKV, QW, KW, POS, INV_FREQ, QOUT, KOUT, KCACHE, VCACHE, LOC,
        stride_t, stride_qt, stride_qh, stride_kt, stride_kh,
        stride_kc, stride_kch, stride_vc, stride_vch,
        d_f, inv_d, eps,
        NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
        USE_NORM: tl.constexpr, NORM_DTYPE: tl.constexpr, STORE_KV: tl.constexpr,
        KC_DTYPE: tl.constexpr, VC_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Program (token, block of heads): the heads are q heads 0..NUM_Q-1 then k heads; each
        is read as its two rotary halves [BLOCK_H, BLOCK_HALF].

        STORE_KV: k goes to the cache row ``LOC[t]`` of KCACHE instead of KOUT, and the same
        program copies the matching v head to VCACHE (the KV write of the step, no extra
        kernel); k is rounded to its own dtype first, then cast to the cache's, as the
        separate write (``k.to(cache dtype)``) does."""
        pdl_wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        j = tl.arange(0, BLOCK_HALF)
        j_mask = j < HALF
        mask = (heads < NUM_Q + NUM_KV)[:, None] & j_mask[None, :]
        # q and k heads are contiguous in the qkv row: head h starts at h * head_dim.
        src = QKV + t * stride_t + heads[:, None] * (2 * HALF) + j[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        is_q = (heads < NUM_Q)[:, None]
        if USE_NORM:
            ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
            r = _rsqrt(_mean(ss, d_f, inv_d, INTERPRET) + eps, INTERPRET)[:, None]
            x1 = _round(x1 * r, QKV.dtype.element_ty, INTERPRET).to(tl.float32)
            x2 = _round(x2 * r, QKV.dtype.element_ty, INTERPRET).to(tl.float32)
            qw1 = tl.load(QW + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            qw2 = tl.load(QW + HALF + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            kw1 = tl.load(KW + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            kw2 = tl.load(KW + HALF + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            x1 = _round(tl.where(is_q, qw1, kw1) * x1, NORM_DTYPE, INTERPRET).to(tl.float32)
            x2 = _round(tl.where(is_q, qw2, kw2) * x2, NORM_DTYPE, INTERPRET).to(tl.float32)
        pos = tl.load(POS + t).to(tl.float32)
        freq = pos * tl.load(INV_FREQ + j, mask=j_mask, other=0.0)
        c = _cos(freq, INTERPRET)[None, :]
        s = _sin(freq, INTERPRET)[None, :]
        o1 = _round(x1 * c - x2 * s, QOUT.dtype.element_ty, INTERPRET)
        o2 = _round(x2 * c + x1 * s, QOUT.dtype.element_ty, INTERPRET)
        q_dst = QOUT + t * stride_qt + heads[:, None] * stride_qh + j[None, :]
        q_mask = mask & is_q
        tl.store(q_dst, o1, mask=q_mask)
        tl.store(q_dst + HALF, o2, mask=q_mask)
        k_mask = mask & (heads >= NUM_Q)[:, None]
        if STORE_KV:
            # (Through float32 and _round: the interpreter's own casts to bf16 truncate.)
            slot = tl.load(LOC + t).to(tl.int64)
            kv_head = heads[:, None] - NUM_Q
            k_dst = KCACHE + slot * stride_kc + kv_head * stride_kch + j[None, :]
            tl.store(k_dst, _round(o1.to(tl.float32), KC_DTYPE, INTERPRET), mask=k_mask)
            tl.store(k_dst + HALF, _round(o2.to(tl.float32), KC_DTYPE, INTERPRET), mask=k_mask)
            # v head h sits NUM_KV heads after k head h in the qkv row.
            v_src = src + NUM_KV * (2 * HALF)
            v_dst = VCACHE + slot * stride_vc + kv_head * stride_vch + j[None, :]
            v1 = tl.load(v_src, mask=k_mask, other=0.0)
            v2 = tl.load(v_src + HALF, mask=k_mask, other=0.0)
            tl.store(v_dst, _round(v1.to(tl.float32), VC_DTYPE, INTERPRET), mask=k_mask)
            tl.store(v_dst + HALF, _round(v2.to(tl.float32), VC_DTYPE, INTERPRET), mask=k_mask)
        else:
            k_dst = KOUT + t * stride_kt + (heads[:, None] - NUM_Q) * stride_kh + j[None, :]
            tl.store(k_dst, o1, mask=k_mask)
            tl.store(k_dst + HALF, o2, mask=k_mask)

    @triton.jit
    def route_topk(
        x, e, num_experts, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        """Routing of one token from its float32 logits ``x`` [BLOCK_E] (-inf past
        ``num_experts``; ``e = arange(BLOCK_E)``): float32 softmax over the experts, then TOP_K
        rounds of arg-max (ties: lowest expert id), then the optional renormalisation. Returns
        (float32 weights [BLOCK_K], int64 ids [BLOCK_K]); entries past TOP_K are 0."""
        e_mask = e < num_experts
        ex = tl.where(e_mask, _exp(x - tl.max(x, axis=0), INTERPRET), 0.0)
        p = tl.math.div_rn(ex, tl.sum(ex, axis=0))
        p = tl.where(e_mask, p, -1.0)  # probabilities are >= 0: padding is never picked
        kk = tl.arange(0, BLOCK_K)
        w = tl.zeros([BLOCK_K], dtype=tl.float32)
        ids = tl.zeros([BLOCK_K], dtype=tl.int64)
        total = 0.0
        for i in tl.static_range(TOP_K):
            best = tl.max(p, axis=0)
            # Lowest id holding the max; clamped so that a NaN row still yields valid ids.
            idx = tl.minimum(tl.min(tl.where(p == best, e, BLOCK_E), axis=0), num_experts - 1)
            w = tl.where(kk == i, best, w)
            ids = tl.where(kk == i, idx.to(tl.int64), ids)
            total += best
            p = tl.where(e == idx, -1.0, p)
        if RENORMALIZE:
            w = tl.math.div_rn(w, total)
        return w, ids

    @triton.jit
    def _moe_route_kernel(
        LOGITS, W_OUT, ID_OUT,
        stride_l, stride_w, stride_id, num_experts,
        TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Program per token: ``route_topk`` of its logits row."""
        pdl_wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        x = tl.load(LOGITS + t * stride_l + e, mask=e < num_experts,
                    other=-float("inf")).to(tl.float32)  # fmt: skip
        w, ids = route_topk(x, e, num_experts, TOP_K, RENORMALIZE, BLOCK_E, BLOCK_K, INTERPRET)
        kk = tl.arange(0, BLOCK_K)
        k_mask = kk < TOP_K
        tl.store(W_OUT + t * stride_w + kk, _round(w, W_OUT.dtype.element_ty, INTERPRET),
                 mask=k_mask)  # fmt: skip
        tl.store(ID_OUT + t * stride_id + kk, ids, mask=k_mask)

    @triton.jit
    def _silu_and_mul_kernel(
        X, Y, stride_x, stride_y, n_cols,
        BLOCK: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        src = X + row * stride_x + cols
        gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(src + n_cols, mask=mask, other=0.0).to(tl.float32)
        # F.silu: x / (1 + exp(-x)) in float32, rounded to the input dtype; then the product.
        act = _round(tl.math.div_rn(gate, 1.0 + _exp(-gate, INTERPRET)), Y.dtype.element_ty,
                     INTERPRET)  # fmt: skip
        y = _round(act.to(tl.float32) * up, Y.dtype.element_ty, INTERPRET)
        tl.store(Y + row * stride_y + cols, y, mask=mask)

    # In Triton's interpreter (TRITON_INTERPRET=1, the CPU test path) triton.jit returns a plain
    # function, not a JITFunction.
    INTERPRETED: bool = not isinstance(_rms_norm_kernel, JITFunction)
else:  # pragma: no cover
    INTERPRETED = False


# Launch options of every kernel: no FMA contraction (torch runs each multiply and add as its own
# rounded op) and libdevice without flush-to-zero (torch's CUDA kernels keep subnormals).
# (enable_reflect_ftz is newer than enable_fp_fusion; an older Triton rejects unknown launch
# options, and its libdevice then flushes subnormals, which only matters for subnormal values.)
def _exact_options() -> dict[str, bool]:
    options = {"enable_fp_fusion": False}
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        if "enable_reflect_ftz" in CUDAOptions.__dataclass_fields__:
            options["enable_reflect_ftz"] = False
    except Exception:  # pragma: no cover - no NVIDIA backend
        pass
    return options


_EXACT = _exact_options() if triton is not None else {}

# Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the
# previous kernel of the stream is still running, and waits in ``pdl_wait`` for it to finish. At
# decode batch 1 a layer is ~10 short kernels, and each one's launch and ramp-up, and the first
# weight tiles it reads before its wait, then overlap the previous kernel's tail (on an H200,
# scripts/probe_pdl.py: a chain of 1 MB reads went from 1.37 to 0.80 us a kernel, of 16 MB from
# 5.35 to 4.23). Works inside CUDA graphs (captured as programmatic edges). KVTIER_PDL=0 turns it
# off (read at import; may also be set at run time).
PDL_ENABLED: bool = (
    triton is not None and gdc_wait is not None and os.environ.get("KVTIER_PDL", "1") != "0"
)


@functools.cache
def _sm_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_options(device: torch.device) -> dict[str, bool]:
    """Launch arguments of a kernel with a ``PDL`` constexpr that calls ``pdl_wait``:
    ``{"PDL": True, "launch_pdl": True}`` on a CUDA device of compute capability 9.0 or newer
    with ``PDL_ENABLED``, else ``{"PDL": False}`` (the interpreter, older GPUs)."""
    if not PDL_ENABLED or INTERPRETED or device.type != "cuda":
        return {"PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _sm_major(index) < 9:
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Widest row the single-pass kernels take in one block (the auto mode falls back to torch above).
MAX_BLOCK = 32768


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[
        dtype
    ]


# Whether use_triton=None launches the kernels on CUDA (KVTIER_FUSED_KERNELS=0 turns them off,
# e.g. to compare against the torch path); may also be set at run time.
ENABLED: bool = triton is not None and os.environ.get("KVTIER_FUSED_KERNELS", "1") != "0"


def _pick(use_triton: bool | None, device: torch.device, supported: bool, what: str) -> bool:
    """Whether to launch the kernel: auto on CUDA when the kernel supports the inputs."""
    if use_triton is None:
        return device.type == "cuda" and supported and ENABLED
    if use_triton:
        if triton is None:
            raise RuntimeError(f"{what}: Triton is not installed")
        if device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(
                f"{what}: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
            )
        if not supported:
            raise ValueError(f"{what}: the Triton kernel does not support these inputs")
    return use_triton


@functools.cache
def _inv(n: int) -> float:
    """fl32(1 / n), as a float that converts to float32 exactly."""
    return float(torch.tensor(1.0, dtype=torch.float32) / n)


def _norm_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


# ---------------------------------------------------------------------------- RMSNorm
def _rms_norm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n = x.shape[-1]
    return (
        x.dtype in _FLOAT_DTYPES
        and weight.dtype in _FLOAT_DTYPES
        and weight.shape == (n,)
        and weight.device == x.device
        and 0 < n <= MAX_BLOCK
    )


def _rms_norm_launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    y2 = y.view(-1, n)
    weight = weight.contiguous()
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ro2 = res_out.view(-1, n)
    else:
        r2, res_out, ro2 = x2, None, x2  # unused by the kernel
    if rows == 0:
        return y, res_out
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows,)](
        x2, r2, weight, y2, ro2,
        x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0),
        n, float(n), _inv(n), float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=block, INTERPRET=INTERPRETED,
        num_warps=_norm_warps(block), **_EXACT, **pdl_options(x.device),
    )  # fmt: skip
    return y, res_out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, use_triton: bool | None = None
) -> torch.Tensor:
    """``RMSNorm`` over the last dim of ``x`` (any leading shape): float32 math, normalised
    value cast to ``x.dtype``, then ``weight *`` it (dtype: promotion of both, as torch's)."""
    if _pick(use_triton, x.device, _rms_norm_supported(x, weight), "rms_norm"):
        return _rms_norm_launch(x, None, weight, eps)[0]
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass; the sum is rounded to ``x.dtype``
    (as torch's add) and normalised from that rounded value. Returns new tensors."""
    supported = (
        _rms_norm_supported(x, weight)
        and residual.shape == x.shape
        and residual.dtype == x.dtype
        and residual.device == x.device
    )
    if _pick(use_triton, x.device, supported, "fused_add_rms_norm"):
        y, h = _rms_norm_launch(x, residual, weight, eps)
        assert h is not None
        return y, h
    return fused_add_rms_norm_ref(x, residual, weight, eps)


# ---------------------------------------------------------------------------- q/k norm + RoPE
def _qk_supported(
    qkv: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    use_norm: bool,
) -> bool:
    t = qkv.shape[0]
    dtypes = [qkv.dtype] + ([q_weight.dtype, k_weight.dtype] if use_norm else [])
    supported = (
        qkv.dim() == 2
        and qkv.shape[1] == (num_q_heads + 2 * num_kv_heads) * head_dim
        and qkv.stride(1) == 1
        and head_dim % 2 == 0
        and positions.shape == (t,)
        and inv_freq.shape == (head_dim // 2,)
        and inv_freq.dtype == torch.float32
        and inv_freq.device == qkv.device
        and all(d in _FLOAT_DTYPES for d in dtypes)
    )
    if use_norm:
        assert q_weight is not None and k_weight is not None
        supported = supported and q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,)
    return supported


def _qk_out_dtype(
    qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, use_norm: bool
) -> torch.dtype:
    """The dtype q / k come out in: the normed value's (weight * x.to(dtype)), else qkv's."""
    if not use_norm:
        return qkv.dtype
    assert q_weight is not None and k_weight is not None
    return torch.promote_types(torch.promote_types(q_weight.dtype, k_weight.dtype), qkv.dtype)


def qk_norm_rope(
    qkv: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    use_norm: bool,
    *,
    inplace: bool = False,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection ``qkv`` [T, (Hq + 2 Hkv) * D] into q [T, Hq, D], k, v
    [T, Hkv, D]; when ``use_norm``, RMSNorm each q / k head with ``q_weight`` / ``k_weight``
    [D] (Qwen3); then rotate q and k by RoPE ("rotate half") at ``positions`` [T] with
    ``inv_freq`` [D / 2] float32 (cos / sin of ``positions * inv_freq`` in float32).

    v is always a view of ``qkv``. q and k are new contiguous tensors, or with ``inplace`` (kernel
    path only; the reference ignores it) written back into ``qkv`` and returned as views of it.
    Under CUDA graph capture ``inv_freq`` must already be on ``qkv``'s device.
    """
    t = qkv.shape[0]
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    supported = _qk_supported(qkv, q_weight, k_weight, positions, inv_freq, num_q_heads,
                              num_kv_heads, head_dim, use_norm)  # fmt: skip
    if not _pick(use_triton, qkv.device, supported, "qk_norm_rope"):
        return qk_norm_rope_ref(
            qkv, q_weight, k_weight, positions, inv_freq,
            num_q_heads, num_kv_heads, head_dim, eps, use_norm,
        )  # fmt: skip
    out_dtype = _qk_out_dtype(qkv, q_weight, k_weight, use_norm)
    v = qkv[:, q_size + kv_size :].view(t, num_kv_heads, head_dim)
    if inplace and out_dtype == qkv.dtype:
        q = qkv[:, :q_size].view(t, num_q_heads, head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(t, num_kv_heads, head_dim)
    else:
        q = torch.empty(t, num_q_heads, head_dim, dtype=out_dtype, device=qkv.device)
        k = torch.empty(t, num_kv_heads, head_dim, dtype=out_dtype, device=qkv.device)
    if t == 0:
        return q, k, v
    _qk_norm_rope_launch(
        qkv, q_weight, k_weight, positions, inv_freq, q, k, None, num_q_heads, num_kv_heads,
        head_dim, eps, use_norm, out_dtype,
    )  # fmt: skip
    return q, k, v


def _qk_norm_rope_launch(
    qkv: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor | None,
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    use_norm: bool,
    out_dtype: torch.dtype,
) -> None:
    t = qkv.shape[0]
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    heads = num_q_heads + num_kv_heads
    block_h = min(triton.next_power_of_2(heads), max(1, 1024 // block_half))
    qw = q_weight.contiguous() if use_norm else inv_freq  # unused pointers when not use_norm
    kw = k_weight.contiguous() if use_norm else inv_freq
    if store is None:
        assert k is not None
        k_cache, v_cache, loc = q, q, positions  # unused pointers
        k_strides = (k.stride(0), k.stride(1))
    else:
        k_cache, v_cache, loc = store
        k, k_strides = q, (0, 0)  # unused pointer
    _qk_norm_rope_kernel[(t, triton.cdiv(heads, block_h))](
        qkv, qw, kw, positions.contiguous(), inv_freq.contiguous(), q, k, k_cache, v_cache, loc,
        qkv.stride(0), q.stride(0), q.stride(1), *k_strides,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        float(head_dim), _inv(head_dim), float(eps),
        NUM_Q=num_q_heads, NUM_KV=num_kv_heads, HALF=half,
        BLOCK_H=block_h, BLOCK_HALF=block_half,
        USE_NORM=bool(use_norm), NORM_DTYPE=_tl_dtype(out_dtype), STORE_KV=store is not None,
        KC_DTYPE=_tl_dtype(k_cache.dtype), VC_DTYPE=_tl_dtype(v_cache.dtype),
        INTERPRET=INTERPRETED, num_warps=4 if block_h * block_half >= 512 else 1, **_EXACT,
        **pdl_options(qkv.device),
    )  # fmt: skip


def qk_norm_rope_store(
    qkv: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    use_norm: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    loc: torch.Tensor,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """``qk_norm_rope`` that stores k and v in the KV cache instead of returning them: row t's
    k and v go to slot ``loc[t]`` of ``k_cache`` / ``v_cache`` [slots, Hkv, D] (cast to the
    cache's dtype, as ``KVPool.write`` does). Returns q [T, Hq, D].

    On the kernel path this is the layer's only launch between the qkv GEMM and attention
    (decode ran a separate index_copy for k and one for v, ~2 us each a layer on an H200).
    Same values as ``qk_norm_rope`` followed by the two index copies; ``loc`` must hold distinct
    slots (as a step's out_cache_loc does).
    """
    t = qkv.shape[0]
    supported = (
        k_cache.dim() == 3
        and k_cache.shape[1:] == (num_kv_heads, head_dim)
        and v_cache.shape == k_cache.shape
        and k_cache.stride(2) == 1
        and v_cache.stride(2) == 1
        and k_cache.dtype in _FLOAT_DTYPES
        and v_cache.dtype in _FLOAT_DTYPES
        and k_cache.device == qkv.device
        and v_cache.device == qkv.device
        and loc.shape == (t,)
        and loc.dtype == torch.int64
    )
    use = _qk_supported(qkv, q_weight, k_weight, positions, inv_freq, num_q_heads,
                        num_kv_heads, head_dim, use_norm) and supported  # fmt: skip
    if not _pick(use_triton, qkv.device, use, "qk_norm_rope_store"):
        q, k, v = qk_norm_rope_ref(
            qkv, q_weight, k_weight, positions, inv_freq,
            num_q_heads, num_kv_heads, head_dim, eps, use_norm,
        )  # fmt: skip
        k_cache.index_copy_(0, loc, k.to(k_cache.dtype))
        v_cache.index_copy_(0, loc, v.to(v_cache.dtype))
        return q
    out_dtype = _qk_out_dtype(qkv, q_weight, k_weight, use_norm)
    q = torch.empty(t, num_q_heads, head_dim, dtype=out_dtype, device=qkv.device)
    if t:
        _qk_norm_rope_launch(
            qkv, q_weight, k_weight, positions, inv_freq, q, None, (k_cache, v_cache, loc),
            num_q_heads, num_kv_heads, head_dim, eps, use_norm, out_dtype,
        )  # fmt: skip
    return q


# ---------------------------------------------------------------------------- MoE routing
def moe_route(
    logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    *,
    out_dtype: torch.dtype | None = None,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router of a top-k MoE for ``logits`` [T, E]: float32 softmax over the experts, the
    ``top_k`` largest probabilities in descending order, renormalised to sum 1 when
    ``renormalize``. Returns (weights [T, k] in ``out_dtype``, default ``logits.dtype`` as
    SparseMoeBlock does today; ids [T, k] int64).

    Ties: the kernel puts the lowest expert id first. torch.topk makes no promise (on CPU it
    returns tied values in an arbitrary order), so on exactly tied probabilities the two can
    list different ids or orders; with real router logits ties essentially never happen.
    """
    t, e = logits.shape if logits.dim() == 2 else (0, 0)
    supported = (
        logits.dim() == 2
        and logits.stride(1) == 1
        and logits.dtype in _FLOAT_DTYPES
        and 0 < top_k <= e <= MAX_BLOCK
        and (out_dtype is None or out_dtype in _FLOAT_DTYPES)
    )
    if not _pick(use_triton, logits.device, supported, "moe_route"):
        return moe_route_ref(logits, top_k, renormalize, out_dtype)
    out_dtype = logits.dtype if out_dtype is None else out_dtype
    weights = torch.empty(t, top_k, dtype=out_dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    block_e = triton.next_power_of_2(e)
    _moe_route_kernel[(t,)](
        logits, weights, ids,
        logits.stride(0), weights.stride(0), ids.stride(0), e,
        TOP_K=top_k, RENORMALIZE=bool(renormalize),
        BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k), INTERPRET=INTERPRETED,
        num_warps=1 if block_e <= 512 else 4, **_EXACT, **pdl_options(logits.device),
    )  # fmt: skip
    return weights, ids


# ---------------------------------------------------------------------------- SwiGLU
_SILU_BLOCK = 1024


def silu_and_mul(x: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dim (any leading shape), with
    F.silu's rounding to ``x.dtype`` before the product."""
    supported = x.dtype in _FLOAT_DTYPES and x.shape[-1] % 2 == 0 and x.shape[-1] > 0
    if not _pick(use_triton, x.device, supported, "silu_and_mul"):
        return silu_and_mul_ref(x)
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    y2 = y.view(-1, n)
    block = min(triton.next_power_of_2(n), _SILU_BLOCK)
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
        x2, y2, x2.stride(0), y2.stride(0), n,
        BLOCK=block, INTERPRET=INTERPRETED, num_warps=max(1, min(4, block // 256)), **_EXACT,
        **pdl_options(x.device),
    )  # fmt: skip
    return y


__all__ = [
    "ENABLED",
    "INTERPRETED",
    "MAX_BLOCK",
    "PDL_ENABLED",
    "apply_rotary_ref",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "moe_route",
    "moe_route_ref",
    "pdl_options",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_cos_sin_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
]
