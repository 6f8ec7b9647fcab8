"""The persistent MoE-block kernel (kvtier/kernels/moe_block.py) against the chain it replaces.

On CPU the kernel runs in Triton's interpreter, phase by phase (three launches, no barriers),
with fewer programs than items so that every phase's loop goes round the programs, on shapes that
are not powers of two. On a GPU the one-launch form (grid-wide barriers) must give the bits of the
three-launch form, inside a CUDA graph too, replayed many times (the barrier counters reset), and
match the chain of kernels the model takes without it; the model's MoE layer is checked with the
kernel on and off.
"""

from __future__ import annotations

import os

import pytest
import torch
from compile_utils import SM90_HELPERS, run_compile_check

from kvtier.kernels import fused, fused_moe, gemv, moe_block
from kvtier.kernels.moe_block import moe_block as run_block
from kvtier.kernels.moe_block import moe_block_ref

pytestmark = pytest.mark.skipif(moe_block.triton is None, reason="needs Triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL_TILES = {"block_r": 2, "block_n": 4, "block_h": 8, "block_i": 8, "num_warps": 2}


def _inputs(hidden, experts, inter, dtype, seed, device=DEVICE):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(shape, generator=gen, device=device) * s).to(dtype)

    return {
        "x": randn(1, hidden),
        "residual": randn(1, hidden),
        "norm_weight": (1 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(dtype),
        "eps": 1e-6,
        "router_weight": randn(experts, hidden, s=hidden**-0.5),
        "w13": randn(experts, 2 * inter, hidden, s=hidden**-0.5),
        "w2": randn(experts, hidden, inter, s=inter**-0.5),
    }


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    a = v.float().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def _chain(args, top_k):
    """The kernels the model runs without moe_block: gemv with the norm prologue, moe_route,
    fused_moe_small."""
    h, normed = torch.empty_like(args["x"]), torch.empty_like(args["x"])
    prologue = gemv.NormPrologue(args["norm_weight"], args["eps"], args["residual"], h, normed)
    logits = gemv.gemv(args["x"], args["router_weight"], norm=prologue)
    weights, ids = fused.moe_route(logits, top_k, True, out_dtype=args["x"].dtype)
    return fused_moe.fused_moe_small(normed, args["w13"], args["w2"], ids, weights), h


@pytest.mark.parametrize(("hidden", "experts", "inter", "k"), [(40, 8, 24, 3), (64, 12, 16, 4)])
def test_float32_matches_reference(hidden, experts, inter, k):
    args = _inputs(hidden, experts, inter, torch.float32, seed=hidden)
    out, h = run_block(**args, top_k=k, renormalize=True, num_programs=3, **SMALL_TILES)
    ref_out, ref_h = moe_block_ref(**args, top_k=k, renormalize=True)
    assert torch.equal(h, ref_h)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_bf16_matches_reference_within_ulps(renormalize):
    args = _inputs(40, 8, 24, torch.bfloat16, seed=3 + renormalize)
    out, h = run_block(**args, top_k=3, renormalize=renormalize, num_programs=5, **SMALL_TILES)
    ref_out, ref_h = moe_block_ref(**args, top_k=3, renormalize=renormalize)
    assert torch.equal(h, ref_h)
    # As fused_moe's bound: only the order of float32 sums inside dot products differs.
    err = (out.float() - ref_out.float()).abs() / _bf16_ulp(ref_out)
    assert err.max().item() <= 2.0


def test_same_as_chain_of_kernels_in_interpreter():
    # The kernels the model runs without moe_block: gemv with the norm prologue, moe_route,
    # fused_moe_small. The same roundings, so on the CPU the same bits.
    args = _inputs(48, 8, 16, torch.bfloat16, seed=7)
    out, h = run_block(**args, top_k=2, renormalize=True, num_programs=4, **SMALL_TILES)
    chain, chain_h = _chain(args, 2)
    assert torch.equal(h, chain_h)
    assert torch.equal(out, chain)


def test_bad_arguments_are_named():
    args = _inputs(40, 8, 24, torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="moe_block: x must hold one token, got shape"):
        run_block(**{**args, "x": args["x"].expand(2, -1)}, top_k=2, renormalize=True)
    with pytest.raises(ValueError, match=r"moe_block: residual must be \(1, 40\)"):
        run_block(**{**args, "residual": args["residual"][:, :8]}, top_k=2, renormalize=True)
    with pytest.raises(ValueError, match=r"moe_block: router_weight must be \[E, H\]"):
        run_block(**{**args, "router_weight": args["router_weight"][:4]}, top_k=2,
                  renormalize=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"moe_block: top_k must be in \[1, 8\], got 9"):
        run_block(**args, top_k=9, renormalize=True)
    with pytest.raises(ValueError, match="moe_block: num_programs must be >= 1, got 0"):
        run_block(**args, top_k=2, renormalize=True, num_programs=0)
    with pytest.raises(ValueError, match=r"moe_block: unknown tiles \['block_q'\]"):
        run_block(**args, top_k=2, renormalize=True, block_q=4)


def test_use_moe_block_only_for_one_bf16_token_on_cuda(monkeypatch):
    if "KVTIER_MOE_BLOCK" not in os.environ:
        assert not moe_block.ENABLED  # off unless KVTIER_MOE_BLOCK=1 (slower: run 17)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(moe_block, "ENABLED", True)
    assert not moe_block.use_moe_block(x, 8, 2)  # CPU
    if torch.cuda.is_available():
        assert moe_block.use_moe_block(x.cuda(), 8, 2)
        assert not moe_block.use_moe_block(x.cuda().expand(2, -1), 8, 2)
        assert not moe_block.use_moe_block(x.cuda().float(), 8, 2)
        monkeypatch.setattr(moe_block, "ENABLED", False)
        assert not moe_block.use_moe_block(x.cuda(), 8, 2)


def test_barrier_compiles_to_one_release_add_and_an_acquire_per_program():
    # The grid barrier as compiled for sm_90: thread 0 of each program counts it in with one
    # release atomic, polls with volatile loads, then one acquire load; what the program
    # computed before is published by the CTA barrier ahead of the release.
    run_compile_check(
        SM90_HELPERS
        + """
import re
from kvtier.kernels import fused, moe_block as mb
ptrs = ["ATT", "RES", "NW", "RW", "W13", "W2", "OUT", "RES_OUT", "HACT"]
args = {n: "*bf16" for n in ptrs}
args.update(LOGITS="*fp32", SYNC="*i32", n_f="fp32", inv_n="fp32", eps="fp32", num_experts=128,
            stride_re=2048, stride_we=1536 * 2048, stride_wn=2048, stride_w2e=2048 * 768,
            stride_w2n=768, stride_w2k=1)
consts = dict(HIDDEN=2048, INTER=768, TOPK=8, RENORMALIZE=True, BLOCK_HID=2048, BLOCK_E=128,
              BLOCK_R=1, BLOCK_N=4, BLOCK_H=8, BLOCK_I=128, PHASE=0, SPIN_LIMIT=1 << 20,
              INTERPRET=False, PDL=True)
k = compile_sm90(mb._moe_block_kernel, args, consts, num_warps=8, **fused._EXACT)
ptx = k.asm["ptx"]
release = re.findall(r"@%p\\d+ (?:atom|red)\\.global\\.gpu\\.release\\.add", ptx)
acquire = re.findall(r"@%p\\d+ ld\\.global\\.gpu\\.acquire", ptx)
assert len(release) == 2 and len(acquire) == 2, (release, acquire)
assert len(re.findall(r"ld\\.volatile\\.global", ptx)) >= 2
assert spill_bytes(k) <= 64, spill_bytes(k)
print("ok")
"""
    )


# ---------------------------------------------------------------------------- CUDA
@CUDA
@pytest.mark.parametrize("tiles", [{}, {"programs_per_sm": 2, "num_warps": 4}])
def test_one_launch_equals_three_and_chain_at_model_shapes(tiles):
    args = _inputs(2048, 128, 768, torch.bfloat16, seed=11)
    device = args["x"].device
    errors = moe_block.sync_errors(device)
    one, h1 = run_block(**args, top_k=8, renormalize=True, **tiles)
    three, h3 = run_block(**args, top_k=8, renormalize=True, phased=True, **tiles)
    assert torch.equal(one, three) and torch.equal(h1, h3)
    chain, chain_h = _chain(args, 8)
    assert torch.equal(h1, chain_h)
    # The router's logits are one dot product here and split-K partials in gemv: a last-bit
    # difference can move an output by an ulp or two, or (never seen) swap a near-tied expert.
    err = (one.float() - chain.float()).abs() / _bf16_ulp(chain)
    assert err.max().item() <= 2.0, err.max().item()
    assert moe_block.sync_errors(device) == errors


@CUDA
def test_graph_replays_chain_layers_and_resets_barriers():
    layers = [_inputs(2048, 128, 768, torch.bfloat16, seed=20 + i) for i in range(3)]
    device = layers[0]["x"].device
    errors = moe_block.sync_errors(device)

    def step():
        x, r = layers[0]["x"], layers[0]["residual"]
        for layer in layers:
            weights = {k: v for k, v in layer.items() if k not in ("x", "residual")}
            x, r = run_block(x, r, **weights, top_k=8, renormalize=True)
        return x, r

    eager = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    assert moe_block.sync_errors(device) == errors
