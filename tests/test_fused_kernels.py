"""Fused Triton kernels (kvtier.kernels.fused) against the torch math of kvtier.models.layers.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``use_triton=True``; the
wrappers' default on CPU is the torch reference). On CUDA the same tests compare the compiled
kernels with torch's CUDA ops, and a CUDA-graph replay test runs as well.

Two kinds of comparison, for every dtype (float32, bfloat16, float16):

* Exact (torch.equal). The kernels do the reference's operations in the same order with the same
  roundings; what they cannot reproduce is the order in which a reduction adds its terms, and (in
  the interpreter only) torch's CPU transcendentals, which differ from numpy's in the last bit.
  So the exact tests use inputs whose sums of squares are exact in float32 (multiples of 1/8:
  any summation order gives the same sum), and, in the interpreter, take the reference's
  cos / sin / exp from numpy, the functions the interpreter runs (on CUDA: torch's own, which
  are libdevice's, as in the kernels). Everything else is the reference's own code, so these
  tests pin the rounding order: e.g. RMSNorm's bf16 cast of the normalised value before the bf16
  weight multiply (a test checks that the other order would fail).
* Random inputs against the unmodified reference: bf16 / fp16 outputs within 1 ulp (a float32
  sum or transcendental one ulp apart only moves a half-precision result when it sits at a
  rounding boundary, by one ulp); float32 within a few ulps (the same ulp carried through
  rsqrt and a product or two).
"""

import os
import textwrap

import torch

# Must precede the first import of triton in this process (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from compile_utils import run_compile_check

pytest.importorskip("triton")

from kvtier.kernels import fused as FK

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6
# float32 ulps allowed on random inputs (measured over 30 seeds in the interpreter: at most 5).
FP32_ULPS = 8


def test_interpreter_mode_matches_device():
    assert FK.INTERPRETED is not CUDA, "set TRITON_INTERPRET=1 before importing triton on CPU"


# ---------------------------------------------------------------------------- helpers
def ulp_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place of their dtype (0 when bitwise equal; +0
    and -0 count as equal), as int64."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert not a.isnan().any() and not b.isnan().any()
    bits = torch.finfo(a.dtype).bits
    int_dtype = {32: torch.int32, 16: torch.int16}[bits]

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(int_dtype).to(torch.int64)
        mag = i & ((1 << (bits - 1)) - 1)
        return torch.where(i < 0, -mag, mag)

    return (ordered(a) - ordered(b)).abs()


def assert_close_ulps(out: torch.Tensor, ref: torch.Tensor, what: str, half_ulps: int = 1) -> None:
    """Every element within ``half_ulps`` ulps (bf16 / fp16) or FP32_ULPS ulps (float32), or
    else within FP32_ULPS float32 epsilons of the tensor's largest magnitude.

    Half precision: 1 ulp where the output is one rounding of a float32 value that is off by an
    ulp or so; 2 where a value already rounded to half precision (RMSNorm's normalised value,
    F.silu's output, the q/k-normed head) goes through one more op and rounding: the first
    rounding can be 1 ulp off, and the next op can stretch that to 2 ulps of its result. The
    absolute floor covers results much smaller than their inputs (RoPE's ``x1 * c - x2 * s``
    can cancel: an ulp of ``c`` is then many ulps of the result)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.numel() == 0:
        return
    allowed = FP32_ULPS if ref.dtype == torch.float32 else half_ulps
    floor = FP32_ULPS * torch.finfo(torch.float32).eps * ref.float().abs().max().item()
    d = ulp_distances(out, ref)
    bad = (d > allowed) & ((out.float() - ref.float()).abs() > floor)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements more than {allowed} ulps apart (worst {d.max().item()})"
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, seed, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen(seed)) * scale).to(dtype).to(DEVICE)


def eighths(shape, dtype, seed, limit=16) -> torch.Tensor:
    """Multiples of 1/8 in [-limit, limit), exact in every dtype here, whose squares (multiples of
    1/64 below 2^8) sum exactly in float32 in any order for rows below 2^16 elements."""
    k = torch.randint(-8 * limit, 8 * limit, shape, generator=gen(seed))
    return (k.float() / 8).to(dtype).to(DEVICE)


def norm_weight(n, dtype, seed) -> torch.Tensor:
    return (1.0 + 0.5 * torch.randn(n, generator=gen(seed))).to(dtype).to(DEVICE)


def transcendental(fn: str, x: torch.Tensor) -> torch.Tensor:
    """``fn`` (cos, sin, exp) of float32 ``x`` as the kernel computes it: numpy's in the
    interpreter, torch's (libdevice) on CUDA."""
    if FK.INTERPRETED:
        return torch.from_numpy(getattr(np, fn)(x.cpu().numpy())).to(x.device)
    return getattr(torch, fn)(x)


def rope_inputs(t: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Positions up to 40K: large cos/sin arguments exercise the range reduction.
    positions = torch.randint(0, 40000, (t,), generator=gen(seed)).to(DEVICE)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return positions, inv_freq.to(DEVICE)


# ---------------------------------------------------------------------------- default path
def test_default_path_off_cuda_is_the_reference():
    # CPU tensors always take the torch reference by default: the CPU engine is unchanged.
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    r = torch.randn(3, 48, dtype=torch.bfloat16)
    w = torch.randn(48, dtype=torch.bfloat16)
    assert torch.equal(FK.rms_norm(x, w, EPS), FK.rms_norm_ref(x, w, EPS))
    for a, b in zip(FK.fused_add_rms_norm(x, r, w, EPS), FK.fused_add_rms_norm_ref(x, r, w, EPS)):
        assert torch.equal(a, b)
    assert torch.equal(FK.silu_and_mul(x), FK.silu_and_mul_ref(x))
    lw, li = FK.moe_route(x, 4, True)
    rw, ri = FK.moe_route_ref(x, 4, True)
    assert torch.equal(lw, rw) and torch.equal(li, ri)
    qkv = torch.randn(3, 8 * 16, dtype=torch.bfloat16)
    pos, inv = torch.arange(3), torch.rand(8)
    for use_norm in (True, False):
        out = FK.qk_norm_rope(qkv, w[:16], w[16:32], pos, inv, 4, 2, 16, EPS, use_norm)
        ref = FK.qk_norm_rope_ref(qkv, w[:16], w[16:32], pos, inv, 4, 2, 16, EPS, use_norm)
        for a, b in zip(out, ref):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("n", [48, 37])
def test_rms_norm_exact(dtype, t, n):
    x = eighths((t, n), dtype, seed=t * 100 + n)
    w = norm_weight(n, dtype, seed=1)
    out = FK.rms_norm(x, w, EPS, use_triton=True)
    ref = FK.rms_norm_ref(x, w, EPS)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.equal(out, ref)

    r = eighths((t, n), dtype, seed=t * 100 + n + 1)
    y, h = FK.fused_add_rms_norm(x, r, w, EPS, use_triton=True)
    y_ref, h_ref = FK.fused_add_rms_norm_ref(x, r, w, EPS)
    assert torch.equal(h, h_ref) and torch.equal(y, y_ref)


def test_rms_norm_rounding_order_is_pinned():
    # Rounding the normalised value to bf16 before the bf16 weight multiply (what the reference
    # and the kernel do) differs from one rounding of the float32 product, so the exact test
    # above would catch a kernel that multiplied in float32.
    x = eighths((17, 48), torch.bfloat16, seed=5)
    w = norm_weight(48, torch.bfloat16, seed=1)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    one_rounding = (w.float() * normed).to(torch.bfloat16)
    out = FK.rms_norm(x, w, EPS, use_triton=True)
    assert not torch.equal(out, one_rounding)
    assert torch.equal(out, FK.rms_norm_ref(x, w, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 48), (17, 37), (2, 3, 130)])
def test_rms_norm_random(dtype, shape):
    n = shape[-1]
    x = randn(shape, dtype, seed=n)
    r = randn(shape, dtype, seed=n + 1, scale=4.0)
    w = norm_weight(n, dtype, seed=2)
    y = FK.rms_norm(x, w, EPS, use_triton=True)
    assert_close_ulps(y, FK.rms_norm_ref(x, w, EPS), "y", half_ulps=2)
    y, h = FK.fused_add_rms_norm(x, r, w, EPS, use_triton=True)
    y_ref, h_ref = FK.fused_add_rms_norm_ref(x, r, w, EPS)
    assert torch.equal(h, h_ref)  # the add is elementwise: always exact
    assert_close_ulps(y, y_ref, "fused y", half_ulps=2)


def test_rms_norm_mixed_dtypes_and_strides():
    # float32 weight on bf16 activations: float32 out, as torch promotes; a strided input.
    base = eighths((5, 96), torch.bfloat16, seed=9)
    x = base[:, ::2]
    w = norm_weight(48, torch.float32, seed=3)
    out = FK.rms_norm(x, w, EPS, use_triton=True)
    ref = FK.rms_norm_ref(x, w, EPS)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


# ---------------------------------------------------------------------------- q/k norm + RoPE
# (q heads, kv heads, head_dim): a small Qwen3-like config, and one whose half head_dim (6) is
# not a power of two.
QK_CONFIGS = [(4, 2, 16), (3, 1, 12)]


def qk_exact_ref(qkv, qw, kw, positions, inv_freq, hq, hkv, d, use_norm):
    """The reference with cos / sin from ``transcendental`` (see the module docstring)."""
    t = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
    if use_norm:
        q, k = FK.rms_norm_ref(q, qw, EPS), FK.rms_norm_ref(k, kw, EPS)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = transcendental("cos", freqs), transcendental("sin", freqs)
    return FK.apply_rotary_ref(q, cos, sin), FK.apply_rotary_ref(k, cos, sin), v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("config", QK_CONFIGS)
@pytest.mark.parametrize("use_norm", [True, False])
def test_qk_norm_rope_exact(dtype, t, config, use_norm):
    hq, hkv, d = config
    qkv = eighths((t, (hq + 2 * hkv) * d), dtype, seed=t + d)
    qw, kw = norm_weight(d, dtype, seed=3), norm_weight(d, dtype, seed=4)
    positions, inv_freq = rope_inputs(t, d, seed=t)
    q, k, v = FK.qk_norm_rope(
        qkv, qw, kw, positions, inv_freq, hq, hkv, d, EPS, use_norm, use_triton=True
    )
    q_ref, k_ref, v_ref = qk_exact_ref(qkv, qw, kw, positions, inv_freq, hq, hkv, d, use_norm)
    assert q.shape == (t, hq, d) and k.shape == (t, hkv, d) and v.shape == (t, hkv, d)
    assert torch.equal(q, q_ref)
    assert torch.equal(k, k_ref)
    assert torch.equal(v, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", QK_CONFIGS)
@pytest.mark.parametrize("use_norm", [True, False])
def test_qk_norm_rope_random(dtype, config, use_norm):
    hq, hkv, d = config
    t = 17
    qkv = randn((t, (hq + 2 * hkv) * d), dtype, seed=d)
    qw, kw = norm_weight(d, dtype, seed=5), norm_weight(d, dtype, seed=6)
    positions, inv_freq = rope_inputs(t, d, seed=7)
    out = FK.qk_norm_rope(
        qkv, qw, kw, positions, inv_freq, hq, hkv, d, EPS, use_norm, use_triton=True
    )
    ref = FK.qk_norm_rope_ref(qkv, qw, kw, positions, inv_freq, hq, hkv, d, EPS, use_norm)
    for name, a, b in zip("qkv", out, ref):
        assert_close_ulps(a, b, name, half_ulps=2 if use_norm else 1)


@pytest.mark.parametrize("use_norm", [True, False])
def test_qk_norm_rope_inplace(use_norm):
    hq, hkv, d, t = 4, 2, 16, 3
    qkv = randn((t, (hq + 2 * hkv) * d), torch.bfloat16, seed=11)
    qw, kw = norm_weight(d, torch.bfloat16, seed=3), norm_weight(d, torch.bfloat16, seed=4)
    positions, inv_freq = rope_inputs(t, d, seed=12)
    args = (qw, kw, positions, inv_freq, hq, hkv, d, EPS, use_norm)
    q, k, v = FK.qk_norm_rope(qkv, *args, use_triton=True)
    work = qkv.clone()
    qi, ki, vi = FK.qk_norm_rope(work, *args, inplace=True, use_triton=True)
    assert qi.data_ptr() == work.data_ptr()
    assert ki.data_ptr() == work[:, hq * d :].data_ptr()
    assert torch.equal(qi, q) and torch.equal(ki, k) and torch.equal(vi, v)
    assert torch.equal(work[:, : hq * d], q.reshape(t, -1))
    assert torch.equal(work[:, (hq + hkv) * d :], qkv[:, (hq + hkv) * d :])  # v untouched


@pytest.mark.parametrize("qkv_dtype,cache_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
])  # fmt: skip
@pytest.mark.parametrize("use_norm", [True, False])
def test_qk_norm_rope_store(qkv_dtype, cache_dtype, use_norm):
    """The store variant returns the same q and leaves in the cache exactly what qk_norm_rope
    followed by KVPool.write's index copies leaves; other slots keep their contents."""
    hq, hkv, d, t, slots = 4, 2, 16, 5, 23
    qkv = randn((t, (hq + 2 * hkv) * d), qkv_dtype, seed=21)
    qw, kw = norm_weight(d, qkv_dtype, seed=3), norm_weight(d, qkv_dtype, seed=4)
    positions, inv_freq = rope_inputs(t, d, seed=22)
    args = (qkv, qw, kw, positions, inv_freq, hq, hkv, d, EPS, use_norm)
    loc = torch.tensor([7, 2, 19, 3, 11], dtype=torch.int64, device=DEVICE)
    k_cache = randn((slots, hkv, d), cache_dtype, seed=23)
    v_cache = randn((slots, hkv, d), cache_dtype, seed=24)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    q_ref, k_ref, v_ref = FK.qk_norm_rope(*args, use_triton=True)
    k_want.index_copy_(0, loc, k_ref.to(cache_dtype))
    v_want.index_copy_(0, loc, v_ref.to(cache_dtype))
    q = FK.qk_norm_rope_store(*args, k_cache, v_cache, loc, use_triton=True)
    assert torch.equal(q, q_ref)
    assert torch.equal(k_cache, k_want)
    assert torch.equal(v_cache, v_want)
    # The reference path (what CPU runs) stores the same way.
    k_cache2, v_cache2 = (
        randn((slots, hkv, d), cache_dtype, seed=23),
        randn((slots, hkv, d), cache_dtype, seed=24),
    )
    q2 = FK.qk_norm_rope_store(*args, k_cache2, v_cache2, loc, use_triton=False)
    ref_q, ref_k, ref_v = FK.qk_norm_rope_ref(*args)
    assert torch.equal(q2, ref_q)
    assert torch.equal(k_cache2[loc], ref_k.to(cache_dtype))
    assert torch.equal(v_cache2[loc], ref_v.to(cache_dtype))


def test_qk_norm_rope_store_rejects_bad_cache():
    hq, hkv, d, t = 4, 2, 16, 2
    qkv = randn((t, (hq + 2 * hkv) * d), torch.float32, seed=1)
    positions, inv_freq = rope_inputs(t, d, seed=2)
    args = (qkv, None, None, positions, inv_freq, hq, hkv, d, EPS, False)
    cache = torch.zeros(8, hkv + 1, d, device=DEVICE)  # one kv head too many
    loc = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="qk_norm_rope_store: the Triton kernel does not support"):
        FK.qk_norm_rope_store(*args, cache, cache.clone(), loc, use_triton=True)


# ---------------------------------------------------------------------------- MoE routing
@pytest.mark.parametrize("t,num_experts,top_k", [(1, 128, 8), (3, 60, 3), (17, 128, 8), (17, 7, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_route_float32(t, num_experts, top_k, renormalize):
    # Continuous random logits: no ties, so the ids must be exactly torch's, in torch's order.
    logits = randn((t, num_experts), torch.float32, seed=t * num_experts, scale=2.0)
    w, ids = FK.moe_route(logits, top_k, renormalize, use_triton=True)
    w_ref, ids_ref = FK.moe_route_ref(logits, top_k, renormalize)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    assert_close_ulps(w, w_ref, "weights")
    # Weights in another dtype than the logits', as a caller may ask: the same values, rounded.
    w16, ids16 = FK.moe_route(logits, top_k, renormalize, out_dtype=torch.bfloat16,
                              use_triton=True)  # fmt: skip
    assert torch.equal(ids16, ids) and torch.equal(w16, w.bfloat16())


def check_route_with_ties(logits, w, ids, w_ref, ids_ref, top_k):
    """bf16 / fp16 logits tie often. A tie in logits is a tie in probabilities (both sides
    compute exp of the same float32 difference), and tied entries have the same weight, so:
    the weights agree position by position (1 ulp), the chosen logits are torch's (as a multiset:
    tied experts are interchangeable), and the kernel lists ties lowest id first."""
    assert_close_ulps(w, w_ref, "weights")
    chosen = logits.float().gather(1, ids)
    assert torch.equal(chosen, logits.float().gather(1, ids_ref))  # both sorted descending
    assert all(len(set(row)) == top_k for row in ids.tolist())
    tied = chosen[:, 1:] == chosen[:, :-1]
    assert bool((ids[:, 1:] > ids[:, :-1])[tied].all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_route_half(dtype, renormalize):
    t, num_experts, top_k = 17, 128, 8
    logits = randn((t, num_experts), dtype, seed=21, scale=2.0)
    w, ids = FK.moe_route(logits, top_k, renormalize, use_triton=True)
    w_ref, ids_ref = FK.moe_route_ref(logits, top_k, renormalize)
    assert w.dtype == dtype  # today's SparseMoeBlock casts the weights to x's dtype
    check_route_with_ties(logits, w, ids, w_ref, ids_ref, top_k)


def test_moe_route_ties_lowest_id_first():
    logits = torch.zeros(2, 12, device=DEVICE)
    logits[1, 5] = logits[1, 9] = 1.0  # two tied winners, then ten tied losers
    w, ids = FK.moe_route(logits, 4, False, use_triton=True)
    assert ids.tolist() == [[0, 1, 2, 3], [5, 9, 0, 1]]
    assert torch.equal(w[0], torch.full((4,), 1 / 12, device=DEVICE))
    w, _ = FK.moe_route(logits, 4, True, use_triton=True)
    assert torch.equal(w[0], torch.full((4,), 0.25, device=DEVICE))


# ---------------------------------------------------------------------------- SwiGLU
def silu_and_mul_exact_ref(x: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up with F.silu's math (x / (1 + exp(-x)) in float32, rounded to the dtype)
    and ``transcendental``'s exp."""
    gate, up = x.chunk(2, dim=-1)
    g = gate.float()
    return (g / (1 + transcendental("exp", -g))).to(x.dtype) * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 96), (3, 74), (17, 2 * 1030), (2, 3, 20)])
def test_silu_and_mul(dtype, shape):
    # (17, 2060): I = 1030 spans two column blocks, the second one masked.
    x = randn(shape, dtype, seed=shape[-1], scale=3.0)
    out = FK.silu_and_mul(x, use_triton=True)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    # Exact against F.silu's own formula (on CUDA this is F.silu itself); within 1 half-precision
    # ulp / a few float32 ulps of F.silu on CPU, whose exp differs from numpy's.
    assert torch.equal(out, silu_and_mul_exact_ref(x))
    assert_close_ulps(out, FK.silu_and_mul_ref(x), "silu_and_mul", half_ulps=2)


def test_silu_and_mul_matches_f_silu_on_cuda_formula():
    if not CUDA:
        pytest.skip("on CUDA, F.silu is x / (1 + expf(-x)), which the exact test relies on")
    x = randn((5, 64), torch.float32, seed=3, scale=3.0)
    g = x[:, :32]
    assert torch.equal(torch.nn.functional.silu(g), g / (1 + torch.exp(-g)))


# ---------------------------------------------------------------------------- edge cases
def test_zero_tokens():
    w = norm_weight(48, torch.float32, seed=1)
    x = torch.empty(0, 48, device=DEVICE)
    assert FK.rms_norm(x, w, EPS, use_triton=True).shape == (0, 48)
    y, h = FK.fused_add_rms_norm(x, x, w, EPS, use_triton=True)
    assert y.shape == h.shape == (0, 48)
    assert FK.silu_and_mul(x, use_triton=True).shape == (0, 24)
    wt, ids = FK.moe_route(torch.empty(0, 16, device=DEVICE), 4, True, use_triton=True)
    assert wt.shape == ids.shape == (0, 4)
    inv = torch.ones(8, device=DEVICE)
    pos = torch.empty(0, dtype=torch.int64, device=DEVICE)
    qkv = torch.empty(0, (4 + 2 * 2) * 16, device=DEVICE)
    q, k, v = FK.qk_norm_rope(qkv, w[:16], w[:16], pos, inv, 4, 2, 16, EPS, True, use_triton=True)
    assert q.shape == (0, 4, 16) and k.shape == v.shape == (0, 2, 16)


# ---------------------------------------------------------------------------- compiled code
_COMPILE_CHECK = textwrap.dedent(
    """
    import re, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kvtier.kernels import fused as FK
    assert not FK.INTERPRETED
    target = GPUTarget("cuda", 90, 32)
    options = dict(FK._EXACT, num_warps=4)

    def ptx(fn, sig, constexprs):
        for name in constexprs:
            sig[name] = "constexpr"
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        return triton.compile(src, target=target, options=options).asm["ptx"]

    for dt, tdt in [("bf16", tl.bfloat16), ("fp16", tl.float16), ("fp32", tl.float32)]:
        i32 = "i32"
        codes = [
            ptx(FK._rms_norm_kernel,
                dict(X="*" + dt, R="*" + dt, W="*" + dt, Y="*" + dt, RES_OUT="*" + dt,
                     stride_x=i32, stride_r=i32, stride_y=i32, stride_ro=i32, n_cols=i32,
                     n_f="fp32", inv_n="fp32", eps="fp32"),
                dict(HAS_RESIDUAL=True, BLOCK=2048, INTERPRET=False, PDL=True)),
            *(ptx(FK._qk_norm_rope_kernel,
                dict(QKV="*" + dt, QW="*" + dt, KW="*" + dt, POS="*i64", INV_FREQ="*fp32",
                     QOUT="*" + dt, KOUT="*" + dt, KCACHE="*" + dt, VCACHE="*" + dt,
                     LOC="*i64", stride_t=i32, stride_qt=i32, stride_qh=i32,
                     stride_kt=i32, stride_kh=i32, stride_kc=i32, stride_kch=i32,
                     stride_vc=i32, stride_vch=i32, d_f="fp32", inv_d="fp32", eps="fp32"),
                dict(NUM_Q=32, NUM_KV=4, HALF=64, BLOCK_H=16, BLOCK_HALF=64, USE_NORM=True,
                     NORM_DTYPE=tdt, STORE_KV=store, KC_DTYPE=tdt, VC_DTYPE=tdt,
                     INTERPRET=False, PDL=True)) for store in (False, True)),
            ptx(FK._moe_route_kernel,
                dict(LOGITS="*" + dt, W_OUT="*" + dt, ID_OUT="*i64", stride_l=i32,
                     stride_w=i32, stride_id=i32, num_experts=i32),
                dict(TOP_K=8, RENORMALIZE=True, BLOCK_E=128, BLOCK_K=8, INTERPRET=False,
                     PDL=True)),
            ptx(FK._silu_and_mul_kernel,
                dict(X="*" + dt, Y="*" + dt, stride_x=i32, stride_y=i32, n_cols=i32),
                dict(BLOCK=1024, INTERPRET=False, PDL=True)),
        ]
        for code in codes:
            # IEEE division only; no approximate sin / cos / rsqrt flushing subnormals.
            assert not re.search(r"div\\.(full|approx)", code)
            assert "sin.approx" not in code and "cos.approx" not in code
            assert "rsqrt.approx.ftz" not in code
        # No FMA contraction: the RMSNorm kernel calls no libdevice function, so it has no fma.
        assert not re.search(r"\\bfma\\.", codes[0])
        # The store variant writes k and v to the cache rows: more global stores.
        assert codes[2].count("st.global") > codes[1].count("st.global")
        # PDL: every kernel waits for the previous one and then lets the next one launch.
        for code in codes:
            wait = code.index("griddepcontrol.wait")
            assert wait < code.index("griddepcontrol.launch_dependents")

    # Loads issued before the wait stay before it: the GEMV's first weight tile and the MoE down
    # kernel's first expert tile overlap the previous kernel; the gate/up kernel, whose expert
    # ids the previous kernel writes, reads nothing before its wait.
    from kvtier.kernels import fused_moe as M, gemv as G
    i32 = "i32"
    gemv_code = ptx(G._gemv_kernel,
        dict(X="*bf16", W="*bf16", OUT="*bf16", PART="*fp32", COUNT="*i32", R="*bf16",
             NW="*bf16", RES_OUT="*bf16", NORM_OUT="*bf16", T=i32, N=i32, K=i32, K_SPLIT=i32,
             PART_ROWS=i32, stride_xt=i32, stride_ot=i32, stride_rt=i32, stride_rot=i32,
             stride_not=i32, n_f="fp32", inv_n="fp32", eps="fp32"),
        dict(BLOCK_T=1, BLOCK_N=4, BLOCK_K=256, SPLIT_K=1, USE_DOT=False, EVEN_K=True,
             NORM=False, HAS_RESIDUAL=False, WRITE_NORMED=False, NORM_BLOCK=1,
             DOT_PRECISION="tf32", INTERPRET=False, PDL=True))
    moe = dict(HIDDEN=2048, INTER=768, TOPK=8, INTERPRET=False, PDL=True)
    gate_up_code = ptx(M._gate_up_kernel,
        dict(X="*bf16", W_GATE="*bf16", W_UP="*bf16", IDS="*i64", HOUT="*bf16", stride_xt=i32,
             stride_we=i32, stride_wn=i32, stride_wk=i32, stride_ht=i32),
        dict(moe, BLOCK_N=4, BLOCK_K=512))
    down_code = ptx(M._down_kernel,
        dict(HIN="*bf16", W2="*bf16", IDS="*i64", TW="*bf16", OUT="*bf16", stride_ht=i32,
             stride_we=i32, stride_wn=i32, stride_wk=i32, stride_ot=i32),
        dict(moe, BLOCK_H=4, BLOCK_I=1024))
    assert gemv_code.index("ld.global") < gemv_code.index("griddepcontrol.wait")
    assert down_code.index("ld.global") < down_code.index("griddepcontrol.wait")
    assert gate_up_code.index("griddepcontrol.wait") < gate_up_code.index("ld.global")
    print("ok")
    """
)


@pytest.mark.skipif(CUDA, reason="on CUDA the kernels themselves run")
def test_kernels_compile_for_sm90():
    run_compile_check(_COMPILE_CHECK)


# ---------------------------------------------------------------------------- CUDA graphs
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay():
    dtype, t, hidden, hq, hkv, d, experts = torch.bfloat16, 5, 48, 4, 2, 16, 128
    x = randn((t, hidden), dtype, seed=1)
    res = randn((t, hidden), dtype, seed=2)
    w = norm_weight(hidden, dtype, seed=3)
    qkv = randn((t, (hq + 2 * hkv) * d), dtype, seed=4)
    qw, kw = norm_weight(d, dtype, seed=5), norm_weight(d, dtype, seed=6)
    positions, inv_freq = rope_inputs(t, d, seed=7)
    logits = randn((t, experts), dtype, seed=8)
    gate_up = randn((t, 2 * 96), dtype, seed=9)

    def step():
        y, h = FK.fused_add_rms_norm(x, res, w, EPS)
        return (
            FK.rms_norm(x, w, EPS),
            y,
            h,
            *FK.qk_norm_rope(qkv, qw, kw, positions, inv_freq, hq, hkv, d, EPS, True)[:2],
            *FK.moe_route(logits, 8, True),
            FK.silu_and_mul(gate_up),
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for i, tensor in enumerate((x, res, qkv, logits, gate_up)):
        tensor.copy_(randn(tensor.shape, dtype, seed=100 + i))
    positions.copy_(torch.randint(0, 40000, (t,), generator=gen(3)).to(DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):
        assert torch.equal(got, want)
