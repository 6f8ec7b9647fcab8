"""The skinny-GEMM kernel (kvtier/kernels/gemv.py) against the float32 / float64 product.

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on small
shapes with small tiles so that every loop runs several K steps and the tiles have tails
(N = 37, K = 80: neither a multiple of the tiles). Both product paths (elementwise and tl.dot),
one split and several (the in-kernel "last program reduces"). The RMSNorm prologue (``norm=``)
against fused.rms_norm / fused_add_rms_norm followed by gemv: bitwise in the interpreter. The
CUDA tests use Qwen3-30B-A3B's shapes and CUDA graph capture.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.kernels import fused
from kvtier.kernels import gemv as gemv_mod
from kvtier.kernels.gemv import GemvConfig, NormPrologue, gemv, gemv_ref

pytestmark = pytest.mark.skipif(gemv_mod.triton is None, reason="needs Triton")

# The kernel on the GPU where there is one, else in the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small tiles: several K steps, masked K tails, clamped N tails; both product paths.
FMA = GemvConfig(block_n=8, block_k=32)
DOT = GemvConfig(block_n=16, block_k=32, use_dot=True)
SPLIT_FMA = GemvConfig(block_n=8, block_k=16, split_k=4)
SPLIT_DOT = GemvConfig(block_n=16, block_k=16, split_k=2, use_dot=True)


def _inputs(t, n, k, dtype, seed, device=DEVICE):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, k, generator=gen, device=device).to(dtype)
    w = torch.randn(n, k, generator=gen, device=device).to(dtype)
    return x, w


def _exact(x, w):
    """x @ w.T in float64 (the products of bf16 / fp16 / fp32 values are exact there, the sums
    good to ~1e-16), and the sum of |x_i w_i|, which bounds a float32 sum's rounding error."""
    x64, w64 = x.double(), w.double()
    return x64 @ w64.T, x64.abs() @ w64.abs().T


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |v| (floored at its smallest normal's)."""
    fi = torch.finfo(dtype)
    a = v.double().abs().clamp_min(fi.tiny)
    return fi.eps * torch.exp2(torch.floor(torch.log2(a)))


# ---------------------------------------------------------------------------- numerics
# (t, n, k, config): T = 1, 3, 4 on both paths, T = 5 on tl.dot (the elementwise path takes
# T <= 4), one split and several.
CASES = [
    pytest.param(t, n, k, cfg, id=f"t{t}-{name}")
    for t, n, k in [(1, 37, 80), (3, 37, 80), (4, 40, 96), (5, 40, 96)]
    for name, cfg in [
        ("fma", FMA),
        ("dot", DOT),
        ("fma-split", SPLIT_FMA),
        ("dot-split", SPLIT_DOT),
    ]
    if cfg.use_dot or t <= gemv_mod.MAX_FMA_ROWS
]


@pytest.mark.parametrize(("t", "n", "k", "config"), CASES)
def test_float32_matches_exact_product(t, n, k, config):
    x, w = _inputs(t, n, k, torch.float32, seed=t)
    out = gemv(x, w, config=config)
    exact, abs_sum = _exact(x, w)
    assert out.shape == (t, n) and out.dtype == torch.float32
    # A float32 dot product of k terms is off by at most ~k * 2^-24 of the sum of |terms|:
    # 1e-5 of it covers k <= 96 with room; TF32 (2^-11) or a dropped term would not pass.
    err = (out.double() - exact).abs()
    assert (err <= 1e-5 * abs_sum).all(), (err / abs_sum).max().item()
    torch.testing.assert_close(out, gemv_ref(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("t", "n", "k", "config"), [c for c in CASES if c.values[0] in (1, 5)])
def test_half_precision_is_the_rounded_float32_product(t, n, k, config, dtype):
    # Exact products, a float32 sum, one rounding to nearest: within half an ulp of the exact
    # value, plus the float32 sum's own error (far below an ulp of the output).
    x, w = _inputs(t, n, k, dtype, seed=10 + t)
    out = gemv(x, w, config=config)
    exact, abs_sum = _exact(x, w)
    assert out.dtype == dtype
    err = (out.double() - exact).abs()
    assert (err <= 0.5 * _ulp(exact, dtype) + 1e-5 * abs_sum).all()
    # So it is gemv_ref's value except where the two float32 sums straddle a rounding boundary.
    ref = gemv_ref(x, w)
    assert ((out.double() - ref.double()).abs() <= _ulp(ref, dtype)).all()
    assert (out == ref).float().mean().item() >= 0.95


def test_elementwise_path_takes_at_most_four_rows():
    x, w = _inputs(5, 8, 32, torch.float32, seed=4)
    with pytest.raises(ValueError, match="at most 4 rows"):
        gemv(x, w, config=FMA)


def test_default_config_small_problem():
    x, w = _inputs(3, 37, 80, torch.bfloat16, seed=3)
    out = gemv(x, w)
    exact, abs_sum = _exact(x, w)
    assert (
        (out.double() - exact).abs() <= 0.5 * _ulp(exact, torch.bfloat16) + 1e-5 * abs_sum
    ).all()


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
def test_strided_x_rows(t, config):
    # x as a column slice of a wider tensor: row stride 200, columns contiguous. bf16, whose
    # products are exact in float32: with float32 inputs the compiler may contract a multiply
    # and add into an FMA in one specialisation (x's stride) and not the other (seen on an
    # H200), which moves the last bit.
    x_wide, w = _inputs(t, 37, 200, torch.bfloat16, seed=20 + t)
    w = w[:, :80].contiguous()
    x = x_wide[:, 50:130]
    assert x.stride() == (200, 1)
    out = gemv(x, w, config=config)
    assert torch.equal(out, gemv(x.contiguous(), w, config=config))
    exact, abs_sum = _exact(x, w)
    bound = 0.5 * _ulp(exact, torch.bfloat16) + 1e-5 * abs_sum
    assert ((out.double() - exact).abs() <= bound).all()


# ---------------------------------------------------------------------------- split-K
# K = 80 in 16-column steps: each range is a whole number of steps (cdiv(80 / split, 16)), so
# 4 splits become ranges of 32, 32, 16 and 8 splits five ranges of 16 (none empty).
@pytest.mark.parametrize(("split_k", "ranges"), [(2, 2), (4, 3), (8, 5)])
@pytest.mark.parametrize("use_dot", [False, True])
def test_split_k_is_deterministic_and_matches_one_split(split_k, ranges, use_dot):
    t, n, k = 3, 37, 80
    x, w = _inputs(t, n, k, torch.float32, seed=30 + split_k)
    config = GemvConfig(block_n=16, block_k=16, split_k=split_k, use_dot=use_dot)
    one = gemv(x, w, config=GemvConfig(block_n=16, block_k=16, use_dot=use_dot))
    first = gemv(x, w, config=config)
    # Another order of the same float32 additions: equal to rounding.
    torch.testing.assert_close(first, one, rtol=1e-5, atol=1e-5)
    assert not torch.equal(first, torch.zeros_like(first))
    # Bitwise the same run to run (the partials are summed in split order).
    assert torch.equal(gemv(x, w, config=config), first)
    assert gemv_mod.launch_grid(t, n, k, config) == (3, ranges)
    # Every N block's counter is back at zero for the next launch (CUDA graph replays).
    _, counters, _ = gemv_mod._get_scratch(x.device, t, n, ranges)
    assert int(counters.abs().sum()) == 0


def test_split_k_scratch_is_allocated_once_and_shared_by_small_t():
    n, k = 40, 64
    config = GemvConfig(block_n=8, block_k=16, split_k=2)
    gemv_mod.reserve_scratch(DEVICE, 2, n, k, config)
    key = (torch.device(DEVICE), n, 2, gemv_mod.MAX_ROWS)
    if DEVICE == "cuda":
        key = (torch.device("cuda", torch.cuda.current_device()), n, 2, gemv_mod.MAX_ROWS)
    part, counters = gemv_mod._SCRATCH[key]
    assert part.shape == (2, gemv_mod.MAX_ROWS, n) and counters.shape == (n,)
    for t in (1, 2, 4):
        x, w = _inputs(t, n, k, torch.float32, seed=40 + t)
        out = gemv(x, w, config=config)
        torch.testing.assert_close(out, gemv_ref(x, w), rtol=1e-5, atol=1e-5)
    # The same buffers served every T <= MAX_ROWS (a captured graph keeps their addresses).
    assert gemv_mod._SCRATCH[key][0].data_ptr() == part.data_ptr()
    assert gemv_mod._SCRATCH[key][1].data_ptr() == counters.data_ptr()
    # One split needs no scratch: reserving it adds nothing.
    before = len(gemv_mod._SCRATCH)
    gemv_mod.reserve_scratch(DEVICE, 1, 4099, k, GemvConfig(block_n=8, block_k=16))
    assert len(gemv_mod._SCRATCH) == before


# ---------------------------------------------------------------------------- API
def test_out_argument_with_row_stride():
    x, w = _inputs(3, 37, 80, torch.float32, seed=50)
    buf = torch.full((3, 50), -7.0, device=DEVICE)
    out = buf[:, 5:42]
    result = gemv(x, w, out=out, config=FMA)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, gemv(x, w, config=FMA))
    # Nothing outside the view written.
    assert (buf[:, :5] == -7.0).all() and (buf[:, 42:] == -7.0).all()


def test_empty_problems():
    w = torch.randn(6, 8, device=DEVICE)
    out = gemv(torch.empty(0, 8, device=DEVICE), w)
    assert out.shape == (0, 6)
    given = torch.empty(0, 6, device=DEVICE)
    assert gemv(torch.empty(0, 8, device=DEVICE), w, out=given) is given
    # K = 0: the empty sum.
    assert torch.equal(
        gemv(torch.empty(2, 0, device=DEVICE), torch.empty(6, 0, device=DEVICE)),
        torch.zeros(2, 6, device=DEVICE),
    )


def test_errors_name_the_problem():
    x, w = _inputs(2, 8, 32, torch.float32, seed=60)
    with pytest.raises(ValueError, match="K=32"):
        gemv(x, torch.randn(8, 16, device=DEVICE))
    with pytest.raises(ValueError, match="weight must be contiguous"):
        gemv(x, torch.randn(32, 8, device=DEVICE).T)
    with pytest.raises(ValueError, match="stride"):
        gemv(torch.randn(32, 2, device=DEVICE).T, w)
    with pytest.raises(ValueError, match="dtype"):
        gemv(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        gemv(x, w, out=torch.empty(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        gemv(x[0], w)
    with pytest.raises(ValueError, match="block_n"):
        GemvConfig(block_n=3, block_k=32)
    with pytest.raises(ValueError, match="use_dot"):
        GemvConfig(block_n=8, block_k=32, use_dot=True)
    with pytest.raises(ValueError, match="num_stages"):
        GemvConfig(block_n=8, block_k=32, num_stages=0)


def test_gemv_ref():
    x, w = _inputs(2, 5, 7, torch.bfloat16, seed=70, device="cpu")
    assert torch.equal(gemv_ref(x, w), (x.float() @ w.float().T).to(torch.bfloat16))


def test_use_gemv_conditions(monkeypatch):
    monkeypatch.setattr(gemv_mod, "ENABLED", True)
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert not gemv_mod.use_gemv(x, w)  # CPU: never
    meta_x = torch.empty(1, 8, dtype=torch.bfloat16, device="meta")
    meta_w = torch.empty(4, 8, dtype=torch.bfloat16, device="meta")
    assert not gemv_mod.use_gemv(meta_x, meta_w)


def test_default_config_shapes():
    # The H200 sweep's winners for Qwen3-30B-A3B (docs/benchmarks.md).
    C = gemv_mod.GemvConfig
    assert gemv_mod.default_config(1, 5120, 2048) == C(4, 256, 4, 3)  # qkv
    assert gemv_mod.default_config(1, 151936, 2048) == C(4, 256, 4, 3)  # lm_head
    assert gemv_mod.default_config(1, 2048, 4096) == C(4, 1024, 8, 3)  # o_proj
    assert gemv_mod.default_config(2, 2048, 4096) == C(4, 1024, 4, 3)
    assert gemv_mod.default_config(4, 2048, 4096) == C(4, 512, 4, 3)
    assert gemv_mod.default_config(16, 2048, 4096) == C(64, 256, 4, 3, split_k=4, use_dot=True)
    # The router (N = 128) at one row: the whole of K in one step, no split (run 18's engine
    # A/B); a wider K and more rows split along K to ~one program per SM.
    cfg = gemv_mod.default_config(1, 128, 2048)
    assert cfg == C(2, 2048, 4, 3)
    assert gemv_mod.launch_grid(1, 128, 2048, cfg) == (64, 1)
    assert gemv_mod.default_config(1, 128, 1000) == C(2, 1024, 4, 3)
    cfg = gemv_mod.default_config(1, 128, 4096)
    assert cfg == C(4, 256, 4, 3, split_k=8)
    assert gemv_mod.launch_grid(1, 128, 4096, cfg) == (32, 8)
    cfg = gemv_mod.default_config(2, 128, 2048)
    assert cfg == C(4, 256, 4, 3, split_k=8)
    assert gemv_mod.default_config(16, 128, 2048) == C(16, 256, 4, 3, split_k=8, use_dot=True)
    # Tiny problems: tiles capped to the problem, still valid.
    assert gemv_mod.launch_grid(1, 1, 1) == (1, 1)


def test_prefer_gemv_follows_the_sweep():
    assert gemv_mod.prefer_gemv(1, 5120, 2048)  # one row: always
    assert not gemv_mod.prefer_gemv(2, 5120, 2048)  # qkv at 2+ rows: cuBLAS
    assert gemv_mod.prefer_gemv(16, 2048, 4096)  # K >= 4096: up to 16 rows
    assert gemv_mod.prefer_gemv(16, 128, 2048)  # the router
    assert not gemv_mod.prefer_gemv(17, 128, 2048)  # past MAX_ROWS
    assert not gemv_mod.prefer_gemv(1, 24576, 4096)  # Qwen3-8B gate_up: cuBLAS at copy rate
    assert gemv_mod.prefer_gemv(2, 4096, 12288)  # Qwen3-8B down at 2 rows
    assert not gemv_mod.prefer_gemv(4, 4096, 4096)  # Qwen3-8B o_proj at 4 rows
    assert not gemv_mod.prefer_gemv(0, 128, 2048)


# ---------------------------------------------------------------------------- norm prologue
EPS = 1e-6


def _norm_inputs(t, k, dtype, seed, device=DEVICE):
    """x, residual [t, k] and a norm weight [k] near 1."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, k, generator=gen, device=device).to(dtype)
    residual = torch.randn(t, k, generator=gen, device=device).to(dtype)
    nw = (1 + 0.2 * torch.randn(k, generator=gen, device=device)).to(dtype)
    return x, residual, nw


def _two_kernels(x, residual, nw, w, config=None):
    """The unfused path: the norm kernel, then gemv on its output. (out, normed, h)."""
    if residual is None:
        normed, h = fused.rms_norm(x, nw, EPS, use_triton=True), None
    else:
        normed, h = fused.fused_add_rms_norm(x, residual, nw, EPS, use_triton=True)
    return gemv(normed, w, config=config), normed, h


def _assert_same(fused_out, ref, normed=None, w=None, ulps=1):
    """Bitwise in the interpreter (the same reduction). On a GPU the norm's sum of squares may
    add in another order: a normed value may then be off by an ulp, and a product by that
    term's share (bounded by ``ulps`` of the output plus 4 eps of the sum of |products|: a
    float32 normed value may move by a few ulps)."""
    if fused.INTERPRETED:
        assert torch.equal(fused_out, ref)
        return
    bound = ulps * _ulp(ref, ref.dtype)
    if normed is not None:
        bound = bound + 4 * torch.finfo(ref.dtype).eps * (
            normed.double().abs() @ w.double().abs().T
        )
    assert ((fused_out.double() - ref.double()).abs() <= bound).all()


# (t, n, k): K = 64 / 256 (whole tiles), 200 (not a power of two, tails of 32- and 16-wide
# steps), 96; N with and without a tail; T = 1..5 (5: tl.dot only). Split-K: every split's
# programs need the scale of the whole row. (32-wide steps for the elementwise splits: the
# interpreter is slow on many small steps.)
NORM_CASES = [
    pytest.param(t, n, k, cfg, id=f"t{t}-n{n}-k{k}-{name}")
    for t, n, k in [(1, 37, 64), (2, 40, 200), (4, 37, 256), (5, 40, 96)]
    for name, cfg in [
        ("fma", FMA),
        ("dot", DOT),
        ("fma-split", GemvConfig(block_n=8, block_k=32, split_k=4)),
        ("dot-split", SPLIT_DOT),
    ]
    if cfg.use_dot or t <= gemv_mod.MAX_FMA_ROWS
]


@pytest.mark.parametrize("add", [False, True], ids=["norm", "add-norm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("t", "n", "k", "config"), NORM_CASES)
def test_norm_prologue_matches_norm_then_gemv(t, n, k, config, dtype, add):
    x, residual, nw = _norm_inputs(t, k, dtype, seed=100 + t + k)
    w = _inputs(t, n, k, dtype, seed=200 + n)[1]
    residual = residual if add else None
    ref, ref_normed, ref_h = _two_kernels(x, residual, nw, w, config)
    residual_out = torch.full_like(x, 7.0) if add else None
    normed_out = torch.full_like(x, 7.0)
    x_before = x.clone()
    norm = NormPrologue(nw, EPS, residual, residual_out, normed_out)
    out = gemv(x, w, config=config, norm=norm)
    assert out.shape == (t, n) and out.dtype == dtype
    _assert_same(out, ref, ref_normed, w)
    # The side outputs, each written by one program: what the norm kernel returns.
    _assert_same(normed_out, ref_normed, ulps=4)
    if add:
        assert torch.equal(residual_out, ref_h)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("add", [False, True], ids=["norm", "add-norm"])
def test_norm_prologue_without_normed_out_and_strided_rows(add):
    # x, the residual and residual_out as column slices of wider buffers (row stride 300):
    # nothing outside residual_out's view is written; no normed_out.
    t, n, k = 3, 37, 200
    x, residual, nw = _norm_inputs(t, k, torch.bfloat16, seed=300)
    w = _inputs(t, n, k, torch.bfloat16, seed=301)[1]
    x_wide = torch.zeros(t, 300, dtype=torch.bfloat16, device=DEVICE)
    r_wide = torch.zeros_like(x_wide)
    out_wide = torch.full_like(x_wide, 7.0)
    x_wide[:, 50:250] = x
    r_wide[:, 20:220] = residual
    xs, rs, ro = x_wide[:, 50:250], r_wide[:, 20:220], out_wide[:, 100:]
    ref, ref_normed, ref_h = _two_kernels(x, residual if add else None, nw, w, FMA)
    norm = NormPrologue(nw, EPS, rs if add else None, ro if add else None)
    out = gemv(xs, w, config=FMA, norm=norm)
    _assert_same(out, ref, ref_normed, w)
    if add:
        assert torch.equal(ro, ref_h)
    assert (out_wide[:, :100] == 7.0).all()
    if not add:
        assert (ro == 7.0).all()


@pytest.mark.parametrize(
    ("dtype", "nw_dtype"),
    [(torch.float16, torch.float16), (torch.float32, torch.bfloat16)],
    ids=["fp16", "fp32-x-bf16-norm-weight"],
)
@pytest.mark.parametrize("config", [FMA, SPLIT_DOT], ids=["fma", "dot-split"])
def test_norm_prologue_other_dtypes(dtype, nw_dtype, config):
    # A norm weight of a narrower dtype than x: the normed rows are x's dtype (torch's promotion).
    t, n, k = 3, 37, 96
    x, residual, nw = _norm_inputs(t, k, dtype, seed=310)
    nw = nw.to(nw_dtype)
    w = _inputs(t, n, k, dtype, seed=311)[1]
    ref, ref_normed, ref_h = _two_kernels(x, residual, nw, w, config)
    assert ref_normed.dtype == dtype
    residual_out = torch.empty_like(x)
    out = gemv(x, w, config=config, norm=NormPrologue(nw, EPS, residual, residual_out))
    _assert_same(out, ref, ref_normed, w)
    assert torch.equal(residual_out, ref_h)


def test_norm_prologue_errors_name_the_problem():
    t, n, k = 2, 8, 32
    x, residual, nw = _norm_inputs(t, k, torch.bfloat16, seed=320)
    w = _inputs(t, n, k, torch.bfloat16, seed=321)[1]
    h = torch.empty_like(x)
    with pytest.raises(ValueError, match="residual_out is required"):
        NormPrologue(nw, EPS, residual)
    with pytest.raises(ValueError, match="residual_out given without residual"):
        NormPrologue(nw, EPS, residual_out=h)
    bad = {
        r"norm\.weight": [
            NormPrologue(nw[:-1], EPS),  # shape
            NormPrologue(nw.to(torch.float16), EPS),  # promotes with bf16 to float32
            NormPrologue(nw.float(), EPS),  # the normed rows would be float32
            NormPrologue(torch.ones(2 * k, dtype=torch.bfloat16, device=DEVICE)[::2], EPS),
        ],
        r"norm\.residual must": [
            NormPrologue(nw, EPS, residual[:1], h),
            NormPrologue(nw, EPS, residual.float(), h),
        ],
        r"norm\.residual_out": [
            NormPrologue(nw, EPS, residual, h[:, :16]),
            NormPrologue(nw, EPS, residual, h.float()),
        ],
        r"norm\.normed_out": [
            NormPrologue(nw, EPS, normed_out=torch.empty(t, k + 1, device=DEVICE)),
            NormPrologue(nw, EPS, normed_out=torch.empty_like(x, dtype=torch.float16)),
        ],
    }
    for name, norms in bad.items():
        for norm in norms:
            with pytest.raises(ValueError, match=name):
                gemv(x, w, norm=norm)
    # Outputs that overlap an input or each other: one program writes them while the others
    # still read x and the residual.
    overlapping = [
        (NormPrologue(nw, EPS, residual, residual), "norm.residual_out overlaps norm.residual"),
        (NormPrologue(nw, EPS, normed_out=x), "norm.normed_out overlaps x"),
        (NormPrologue(nw, EPS, residual, h, h), "norm.residual_out overlaps norm.normed_out"),
    ]
    for norm, message in overlapping:
        with pytest.raises(ValueError, match=message):
            gemv(x, w, norm=norm)
    with pytest.raises(ValueError, match="out overlaps x"):
        gemv(x, w, out=x.view(-1)[: t * n].view(t, n), norm=NormPrologue(nw, EPS))
    # The prologue's one-block reduction: K <= MAX_NORM_K.
    kk = gemv_mod.MAX_NORM_K + 1
    wide = torch.zeros(1, kk, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"norm .*K <= "):
        gemv(wide, wide, norm=NormPrologue(wide[0], EPS))
    with pytest.raises(ValueError, match="N >= 1"):
        gemv(x, w[:0], norm=NormPrologue(nw, EPS))
    with pytest.raises(TypeError, match="NormPrologue"):
        gemv(x, w, norm=(nw, EPS))


def test_use_gemv_norm_conditions(monkeypatch):
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    nw = torch.ones(8, dtype=torch.bfloat16)
    assert not gemv_mod.use_gemv_norm(x, w, nw)  # CPU: never (use_gemv's rule)
    # Past use_gemv: the norm weight, and K within the prologue's block.
    monkeypatch.setattr(gemv_mod, "use_gemv", lambda x, w: True)
    assert gemv_mod.use_gemv_norm(x, w, nw)
    assert gemv_mod.use_gemv_norm(x.float(), w.float(), nw)  # bf16 weight, float32 x
    assert not gemv_mod.use_gemv_norm(x, w, nw.float())
    assert not gemv_mod.use_gemv_norm(x, w, nw[:4])
    monkeypatch.setattr(gemv_mod, "MAX_NORM_K", 4)
    assert not gemv_mod.use_gemv_norm(x, w, nw)


# ---------------------------------------------------------------------------- CUDA
QWEN3_30B = {"qkv": (5120, 2048), "o": (2048, 4096), "router": (128, 2048)}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", sorted(QWEN3_30B))
@pytest.mark.parametrize("t", [1, 4, 16])
def test_cuda_qwen3_shapes(shape, t):
    n, k = QWEN3_30B[shape]
    gen = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, k, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    assert gemv_mod.use_gemv(x, w) == (gemv_mod.ENABLED and gemv_mod.prefer_gemv(t, n, k))
    out = gemv(x, w)
    exact, abs_sum = _exact(x, w)
    err = (out.double() - exact).abs()
    assert (err <= 0.5 * _ulp(exact, torch.bfloat16) + 1e-5 * abs_sum).all()
    assert torch.equal(gemv(x, w), out)
    # cuBLAS also rounds a float32 sum: mostly the same value, and never closer to the exact
    # product (on an H200 its split-K o_proj at 4 and 16 rows was more than 1 ulp from ours in
    # places, while ours stayed within half an ulp plus the float32 sum's error).
    lin = torch.nn.functional.linear(x, w)
    assert (out != lin).float().mean().item() <= 0.01
    assert err.max() <= (lin.double() - exact).abs().max()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "config", [None, GemvConfig(block_n=16, block_k=256, split_k=4, use_dot=True)]
)
def test_cuda_graph_capture_with_split_k(config):
    t, (n, k) = 4, QWEN3_30B["router"]
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(t, k, generator=gen, device="cuda").to(torch.bfloat16)
    x2 = torch.randn(t, k, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    assert gemv_mod.launch_grid(t, n, k, config)[1] > 1  # split-K: the scratch is needed
    gemv_mod.reserve_scratch(x.device, t, n, k, config)
    expected = gemv(x2, w, config=config)  # also compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gemv(x, w, config=config)
    x.copy_(x2)
    for _ in range(3):  # the counters are reset by every replay
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture_without_scratch_is_refused():
    # A size nothing else used: no scratch yet, and none may be allocated inside the capture.
    t, n, k = 2, 136, 2048
    config = GemvConfig(block_n=8, block_k=256, split_k=8)
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="reserve_scratch"), torch.cuda.graph(graph):
        gemv(x, w, config=config)


def _cuda_norm_inputs(t, n, k, seed, exact_sum=False):
    """x, residual [t, k], a norm weight [k] and a weight [n, k] (bf16, CUDA). With
    ``exact_sum``: multiples of 1/8 in [-1, 1] (and a weight of multiples of 1/32), so that
    h = x + residual and the sum of its squares are exact in float32 in any order."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if exact_sum:
        x, residual = (
            torch.randint(-8, 9, (t, k), generator=gen, device="cuda").to(torch.bfloat16) / 8
            for _ in range(2)
        )
        nw = (1 + torch.randint(-4, 5, (k,), generator=gen, device="cuda") / 32).to(torch.bfloat16)
    else:
        x = torch.randn(t, k, generator=gen, device="cuda").to(torch.bfloat16)
        residual = torch.randn(t, k, generator=gen, device="cuda").to(torch.bfloat16)
        nw = (1 + 0.1 * torch.randn(k, generator=gen, device="cuda")).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    return x, residual, nw, w


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", ["qkv", "router"])
@pytest.mark.parametrize("t", [1, 2, 4])
def test_cuda_norm_prologue_within_an_ulp_of_two_kernels(shape, t):
    n, k = QWEN3_30B[shape]
    x, residual, nw, w = _cuda_norm_inputs(t, n, k, seed=t)
    for res in (residual, None):  # fused_add_rms_norm, rms_norm
        ref, ref_normed, ref_h = _two_kernels(x, res, nw, w)
        residual_out = None if res is None else torch.empty_like(x)
        normed_out = torch.empty_like(x)
        out = gemv(x, w, norm=NormPrologue(nw, EPS, res, residual_out, normed_out))
        if res is not None:
            assert torch.equal(residual_out, ref_h)  # the add and its rounding: elementwise
        # The sum of squares adds in another order than the norm kernel's: a normed value may
        # cross a rounding boundary (1 ulp, 2 after the weight's multiply and rounding).
        moved = normed_out.double() - ref_normed.double()
        assert (moved.abs() <= 2 * _ulp(ref_normed, torch.bfloat16)).all()
        # Within 1 ulp of the two-kernel result, plus the share of the inputs that moved and
        # the two float32 sums' own errors (the same config: the same order of additions).
        share = moved.abs() @ w.double().abs().T
        abs_sum = normed_out.double().abs() @ w.double().abs().T
        err = (out.double() - ref.double()).abs()
        ulp = _ulp(torch.maximum(out.double().abs(), ref.double().abs()), torch.bfloat16)
        assert (err <= ulp + share + 1e-5 * abs_sum).all()
        # A row whose normed input did not move is bitwise the same.
        same_rows = (moved == 0).all(dim=1)
        assert torch.equal(out[same_rows], ref[same_rows])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", ["qkv", "router"])
@pytest.mark.parametrize("t", [1, 4])
def test_cuda_norm_prologue_bitwise_with_an_exact_sum(shape, t):
    # When the sum of squares is exact its order does not matter: every rounding is the norm
    # kernel's, so the results are bitwise the two kernels' (also the GEMV's sums: same config).
    n, k = QWEN3_30B[shape]
    x, residual, nw, w = _cuda_norm_inputs(t, n, k, seed=10 + t, exact_sum=True)
    ref, ref_normed, ref_h = _two_kernels(x, residual, nw, w)
    residual_out, normed_out = torch.empty_like(x), torch.empty_like(x)
    out = gemv(x, w, norm=NormPrologue(nw, EPS, residual, residual_out, normed_out))
    assert torch.equal(residual_out, ref_h)
    assert torch.equal(normed_out, ref_normed)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture_with_norm_prologue_and_split_k():
    t, (n, k) = 4, QWEN3_30B["router"]
    x, residual, nw, w = _cuda_norm_inputs(t, n, k, seed=20)
    x2, residual2, _, _ = _cuda_norm_inputs(t, n, k, seed=21)
    assert gemv_mod.launch_grid(t, n, k)[1] > 1  # split-K: every split computes the scale
    residual_out, normed_out = torch.empty_like(x), torch.empty_like(x)
    norm = NormPrologue(nw, EPS, residual, residual_out, normed_out)
    gemv_mod.reserve_scratch(x.device, t, n, k)
    h2, n2 = torch.empty_like(x), torch.empty_like(x)
    expected = gemv(x2, w, norm=NormPrologue(nw, EPS, residual2, h2, n2))  # also compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gemv(x, w, norm=norm)
    x.copy_(x2)
    residual.copy_(residual2)
    for _ in range(3):
        captured.zero_()
        residual_out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)
        assert torch.equal(residual_out, h2) and torch.equal(normed_out, n2)
