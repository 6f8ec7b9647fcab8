"""The fused small-batch MoE kernels (kvtier/kernels/fused_moe.py) against FusedExperts' math.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on small
shapes with small tiles so that every loop runs several steps and every tile has a masked tail
(H = 40 and I = 24 are not powers of two); the interpreter does not compile them, so a
subprocess compiles them for sm_90 (no GPU needed) to check what only the compiled code shows
(the PDL load order at the default tiles). The CUDA tests use Qwen3-30B-A3B's layer shapes.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from compile_utils import SM90_HELPERS, run_compile_check
from moe_utils import NUM_EXPERTS
from moe_utils import moe_inputs as _inputs

from kvtier.kernels import fused_moe
from kvtier.kernels.fused_moe import fused_moe_ref, fused_moe_small
from kvtier.models.layers import FusedExperts

pytestmark = pytest.mark.skipif(fused_moe.triton is None, reason="needs Triton")

# The kernels on the GPU where there is one, else in the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small tiles: 2-4 steps along H and I, partial last tiles.
SMALL_TILES = {"block_n": 8, "block_k": 16, "block_h": 16, "block_i": 8}


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """bf16 spacing at |v| (8 significant bits), floored at the smallest normal's."""
    a = v.float().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def test_reference_is_fused_experts_loop_path():
    x, w13, w2, ids, weights = _inputs(5, 3, 40, 24, torch.bfloat16, seed=0)
    experts = FusedExperts(NUM_EXPERTS, 40, 24).to(torch.bfloat16)
    with torch.no_grad():
        experts.w13.copy_(w13)
        experts.w2.copy_(w2)
        experts.use_grouped_mm = False
        expected = experts(x, ids, weights)
    assert torch.equal(fused_moe_ref(x, w13, w2, ids, weights), expected)


@pytest.mark.parametrize(
    ("t", "k", "hidden", "inter"), [(1, 2, 32, 16), (3, 4, 40, 24), (5, 3, 48, 16)]
)
def test_float32_matches_reference(t, k, hidden, inter):
    x, w13, w2, ids, weights = _inputs(t, k, hidden, inter, torch.float32, seed=t, device=DEVICE)
    out = fused_moe_small(x, w13, w2, ids, weights, **SMALL_TILES)
    ref = fused_moe_ref(x, w13, w2, ids, weights)
    assert out.shape == (t, hidden) and out.dtype == torch.float32
    # Only the float32 summation order differs from the reference.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("t", "k", "hidden", "inter"), [(1, 4, 40, 24), (5, 2, 32, 16)])
def test_bf16_matches_reference_within_ulps(t, k, hidden, inter):
    # The kernels round where the reference rounds (each GEMM's output, F.silu, the product,
    # the combine once), and bf16 x bf16 products are exact in float32, so only the order of
    # the float32 sums inside the dot products differs. That changes a rounded value only next
    # to a rounding boundary, by 1 ulp; such a change in h (or SiLU's rounded output, which is
    # multiplied and rounded again) can reach the output as 1-2 ulps. In practice the CPU
    # results are bitwise equal (60 seeds checked while writing this); the bound allows 2.
    x, w13, w2, ids, weights = _inputs(
        t, k, hidden, inter, torch.bfloat16, seed=10 + t, device=DEVICE
    )
    out = fused_moe_small(x, w13, w2, ids, weights, **SMALL_TILES)
    ref = fused_moe_ref(x, w13, w2, ids, weights)
    assert out.dtype == torch.bfloat16
    err_ulps = (out.float() - ref.float()).abs() / _bf16_ulp(ref)
    assert err_ulps.max().item() <= 2.0
    assert (err_ulps > 0).float().mean().item() <= 0.05


def test_default_tiles_and_repeated_experts():
    # Default (capped) tiles: one step per loop; tokens all routed to the same experts, and one
    # token routed to one expert twice: every pair still reads its own weights.
    x, w13, w2, _, weights = _inputs(3, 3, 40, 24, torch.float32, seed=7, device=DEVICE)
    ids = torch.tensor([[5, 1, 5], [1, 5, 0], [7, 7, 7]], device=DEVICE)
    out = fused_moe_small(x, w13, w2, ids, weights)
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, ids, weights), rtol=1e-5, atol=1e-5)


def test_default_tiles():
    # The H200 sweeps' choice (fused_moe.default_tiles' docstring): below 16 tokens the gate/up
    # kernel takes a whole row of H in four warps, the down kernel one warp.
    assert fused_moe.default_tiles(1) == {
        "block_n": 4, "block_k": 2048, "block_h": 2, "block_i": 128, "num_warps": 4,
        "down_warps": 1,
    }  # fmt: skip
    assert fused_moe.default_tiles(4) == fused_moe.default_tiles(1)
    assert fused_moe.default_tiles(16) == {
        "block_n": 4, "block_k": 128, "block_h": 2, "block_i": 128, "num_warps": 1,
        "down_warps": 1,
    }  # fmt: skip
    assert fused_moe.default_tiles(32) == fused_moe.default_tiles(16)


def test_tiles_override_and_down_warps(monkeypatch):
    # KVTIER_FUSED_MOE_TILES' entries (parsed at import) replace the defaults at every T; the
    # down kernel's warps are its own argument, and neither changes the result's math.
    monkeypatch.setattr(fused_moe, "_TILES_OVERRIDE", {"num_warps": 2, "block_k": 16})
    assert fused_moe.default_tiles(1)["num_warps"] == 2
    assert fused_moe.default_tiles(1)["block_k"] == 16
    assert fused_moe.default_tiles(32)["num_warps"] == 2
    x, w13, w2, ids, weights = _inputs(3, 2, 40, 24, torch.float32, seed=5, device=DEVICE)
    tiles = {**SMALL_TILES, "num_warps": 1}
    one = fused_moe_small(x, w13, w2, ids, weights, **tiles, down_warps=1)
    two = fused_moe_small(x, w13, w2, ids, weights, **tiles, down_warps=2)
    ref = fused_moe_ref(x, w13, w2, ids, weights)
    torch.testing.assert_close(one, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, ref, rtol=1e-5, atol=1e-5)


def test_fused_experts_path_unchanged_with_switch_off(monkeypatch):
    # The switch off (KVTIER_FUSED_MOE=0): forward never calls the kernels, whatever the inputs.
    monkeypatch.setattr(fused_moe, "ENABLED", False)
    monkeypatch.setattr(fused_moe, "fused_moe_small", _fail)
    x, w13, w2, ids, weights = _inputs(3, 2, 32, 16, torch.bfloat16, seed=3)
    experts = FusedExperts(NUM_EXPERTS, 32, 16).to(torch.bfloat16)
    with torch.no_grad():
        experts.w13.copy_(w13)
        experts.w2.copy_(w2)
        out = experts(x, ids, weights)
    assert torch.equal(out, fused_moe_ref(x, w13, w2, ids, weights))
    # Switched on, CPU tensors still take the torch path (the fused path is CUDA bf16 only).
    monkeypatch.setattr(fused_moe, "ENABLED", True)
    with torch.no_grad():
        assert torch.equal(experts(x, ids, weights), out)


def _fail(*args, **kwargs):
    raise AssertionError("fused_moe_small called")


def test_use_fused_conditions(monkeypatch):
    monkeypatch.setattr(fused_moe, "ENABLED", True)
    cpu = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert not fused_moe.use_fused(cpu, 8)
    meta = torch.empty(1, 8, dtype=torch.bfloat16, device="meta")
    assert not fused_moe.use_fused(meta, 8)
    monkeypatch.setattr(fused_moe, "ENABLED", False)
    assert not fused_moe.use_fused(cpu, 8)


def test_bad_shapes_raise_naming_the_argument():
    x, w13, w2, ids, weights = _inputs(2, 2, 32, 16, torch.bfloat16, seed=2, device=DEVICE)
    cases = [
        ((x[0], w13, w2, ids, weights), "x"),
        ((x, w13[:, :, :16], w2, ids, weights), "w13"),
        ((x, w13[:, :31], w2, ids, weights), "w13"),
        ((x, w13, w2[:, :, :8], ids, weights), "w2"),
        ((x, w13, w2[:4], ids, weights), "w2"),
        ((x, w13, w2, ids[:1], weights), "topk_ids"),
        ((x, w13, w2, ids, weights[:, :1]), "topk_weights"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=rf"^fused_moe_small: {name} "):
            fused_moe_small(*args)


# ---------------------------------------------------------------------------- compiled code
_COMPILE_CHECK = SM90_HELPERS + textwrap.dedent(
    """
    from kvtier.kernels import fused as FK, fused_moe as M
    assert not FK.INTERPRETED
    H, I, K = 2048, 768, 8

    def compile_(fn, args, constexprs, num_warps):
        return compile_sm90(fn, args, constexprs, num_warps, **FK._EXACT).asm

    def gate_up(tiles):
        args = dict(X="*bf16", W_GATE="*bf16", W_UP="*bf16", IDS="*i64", HOUT="*bf16",
                    stride_xt=H, stride_we=2 * I * H, stride_wn=H, stride_wk=1, stride_ht=I)
        c = dict(HIDDEN=H, INTER=I, TOPK=K, BLOCK_N=tiles["block_n"],
                 BLOCK_K=tiles["block_k"], INTERPRET=False, PDL=True)
        return compile_(M._gate_up_kernel, args, c, tiles["num_warps"])

    def down(tiles):
        args = dict(HIN="*bf16", W2="*bf16", IDS="*i64", TW="*bf16", OUT="*bf16", stride_ht=I,
                    stride_we=H * I, stride_wn=I, stride_wk=1, stride_ot=H)
        c = dict(HIDDEN=H, INTER=I, TOPK=K, BLOCK_H=tiles["block_h"],
                 BLOCK_I=tiles["block_i"], INTERPRET=False, PDL=True)
        return compile_(M._down_kernel, args, c, tiles["down_warps"])

    # PDL at the default tiles (one warp a program): the gate/up kernel reads nothing before its
    # wait (the ids are the previous kernel's output); the down kernel issues its ids / weights
    # and first weight tile loads before it.
    for t in (1, 16):
        tiles = M.default_tiles(t)
        ptx = gate_up(tiles)["ptx"]
        assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global"), t
        ptx = down(tiles)["ptx"]
        assert ptx[:ptx.index("griddepcontrol.wait")].count("ld.global") >= 2, t
    print("ok")
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels themselves run")
def test_compiled_kernels_load_before_pdl_wait_sm90():
    run_compile_check(_COMPILE_CHECK)


# ---------------------------------------------------------------------------- CUDA
QWEN3_30B = {"num_experts": 128, "k": 8, "hidden": 2048, "inter": 768}


def _qwen3_layer(t, seed):
    s = QWEN3_30B
    x, w13, w2, ids, weights = _inputs(
        t, s["k"], s["hidden"], s["inter"], torch.bfloat16, seed, "cuda", s["num_experts"], 0.02
    )
    experts = FusedExperts(s["num_experts"], s["hidden"], s["inter"]).to("cuda", torch.bfloat16)
    with torch.no_grad():
        experts.w13.copy_(w13)
        experts.w2.copy_(w2)
    return experts, x, ids, weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 4, 16])
def test_cuda_matches_grouped_path_on_qwen3_30b_layer(t):
    experts, x, ids, weights = _qwen3_layer(t, seed=t)
    with torch.no_grad():
        experts.use_grouped_mm = True
        grouped = experts(x, ids, weights).float()
        out = fused_moe_small(x, experts.w13, experts.w2, ids, weights).float()
        exact = fused_moe_ref(
            x.float(), experts.w13.float(), experts.w2.float(), ids, weights.float()
        )
    # Both are bf16 renderings of the same float32 math with the same roundings; the fused
    # path must be as close to the float32 result as the grouped one (up to the odd ulp).
    scale = exact.abs().max().item()
    err_fused = (out - exact).abs().max().item()
    err_grouped = (grouped - exact).abs().max().item()
    assert err_fused <= 1.25 * err_grouped + 2.0**-8 * scale
    err_ulps = (out - grouped).abs() / _bf16_ulp(grouped)
    assert (err_ulps > 2).float().mean().item() < 0.01
    assert torch.equal(fused_moe_small(x, experts.w13, experts.w2, ids, weights).float(), out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture(monkeypatch):
    experts, x, ids, weights = _qwen3_layer(4, seed=0)
    s = QWEN3_30B
    x2, _, _, ids2, weights2 = _inputs(
        4, s["k"], s["hidden"], 1, torch.bfloat16, 1, "cuda", s["num_experts"]
    )
    monkeypatch.setattr(fused_moe, "ENABLED", True)
    with torch.no_grad():
        expected = fused_moe_small(x2, experts.w13, experts.w2, ids2, weights2)
        experts(x, ids, weights)  # compiles the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = experts(x, ids, weights)  # FusedExperts.forward -> the fused kernels
        x.copy_(x2)
        ids.copy_(ids2)
        weights.copy_(weights2)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, expected)
