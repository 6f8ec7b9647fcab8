"""Programmatic dependent launch (kvtier.kernels.fused.pdl_options / pdl_wait).

On CPU: when it applies. On a Hopper GPU: a decode layer's chain of kernels (norm, GEMVs, q/k
norm + RoPE + KV store, split-KV decode attention, router, fused MoE) captured in one CUDA graph
with PDL gives bitwise the results of the same chain without it, replay after replay: a kernel
that read its input before the previous kernel finished (a misplaced wait) would not.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.kernels import fused

pytestmark = pytest.mark.skipif(fused.triton is None, reason="needs Triton")


def test_pdl_options_off_the_gpu(monkeypatch):
    assert fused.pdl_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(fused, "PDL_ENABLED", False)
    assert fused.pdl_options(torch.device("cuda", 0)) == {"PDL": False}


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_pdl_options_on_hopper(monkeypatch):
    if not _hopper():
        pytest.skip("needs an sm_90+ GPU")
    monkeypatch.setattr(fused, "PDL_ENABLED", True)
    assert fused.pdl_options(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}


# Qwen3-30B-A3B's layer shapes (random weights), a 300-token context in 16-token pages.
H, HQ, HKV, D, E, K, INTER, PAGE, CTX, LAYERS = 2048, 32, 4, 128, 128, 8, 768, 16, 300, 4


def _weights(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    return [
        {
            "norm1": 1 + rnd(H, scale=0.1),
            "qkv": rnd((HQ + 2 * HKV) * D, H),
            "qn": 1 + rnd(D, scale=0.1),
            "kn": 1 + rnd(D, scale=0.1),
            "o": rnd(H, HQ * D),
            "norm2": 1 + rnd(H, scale=0.1),
            "router": rnd(E, H, scale=0.2),
            "w13": rnd(E, 2 * INTER, H),
            "w2": rnd(E, H, INTER),
        }
        for _ in range(LAYERS)
    ]


def _decode_step(state, layers):
    """One token through LAYERS decoder layers with the kernels the decode graphs run."""
    from kvtier.kernels import attention, gemv
    from kvtier.kernels.fused_moe import fused_moe_small

    x, residual = state["x"], state["residual"]
    for i, w in enumerate(layers):
        h, residual = fused.fused_add_rms_norm(x, residual, w["norm1"], 1e-6)
        qkv = gemv.gemv(h, w["qkv"])
        k_cache, v_cache = state["k"][i], state["v"][i]
        q = fused.qk_norm_rope_store(
            qkv, w["qn"], w["kn"], state["pos"], state["inv_freq"], HQ, HKV, D, 1e-6, True,
            k_cache, v_cache, state["loc"],
        )  # fmt: skip
        out = torch.empty(1, HQ, D, dtype=torch.bfloat16, device="cuda")
        attention.decode_attention(
            q, k_cache, v_cache, out, state["table"], state["seq_lens"], D**-0.5, 8,
            page_size=PAGE, mid_o=state["mid_o"], mid_lse=state["mid_lse"],
        )  # fmt: skip
        attn = gemv.gemv(out.view(1, HQ * D), w["o"])
        h2, residual = fused.fused_add_rms_norm(attn, residual, w["norm2"], 1e-6)
        logits = gemv.gemv(h2, w["router"])
        weights, ids = fused.moe_route(logits, K, True)
        x = fused_moe_small(h2, w["w13"], w["w2"], ids, weights)
    return x + residual


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages = -(-CTX // PAGE)
    slots = (pages + 1) * PAGE
    mid_o, mid_lse = _attention_scratch()
    return {
        "x": (torch.randn(1, H, generator=g, device="cuda")).to(torch.bfloat16),
        "residual": (torch.randn(1, H, generator=g, device="cuda")).to(torch.bfloat16),
        "k": [
            torch.randn(slots, HKV, D, generator=g, device="cuda").to(torch.bfloat16)
            for _ in range(LAYERS)
        ],
        "v": [
            torch.randn(slots, HKV, D, generator=g, device="cuda").to(torch.bfloat16)
            for _ in range(LAYERS)
        ],
        # Pages 1..pages (page 0 unused), the new token at position CTX - 1.
        "table": torch.arange(1, pages + 1, dtype=torch.int32, device="cuda").view(1, -1),
        "seq_lens": torch.tensor([CTX], dtype=torch.int32, device="cuda"),
        "pos": torch.tensor([CTX - 1], dtype=torch.int64, device="cuda"),
        "loc": torch.tensor([PAGE + CTX - 1], dtype=torch.int64, device="cuda"),
        "inv_freq": 1.0 / (1e6 ** (torch.arange(0, D, 2, device="cuda").float() / D)),
        "mid_o": mid_o,
        "mid_lse": mid_lse,
    }


def _attention_scratch():
    from kvtier.kernels.attention import decode_scratch

    return decode_scratch(1, HQ, 8, D, "cuda")


@pytest.mark.gpu
def test_decode_layer_chain_in_a_graph_is_bitwise_the_same_with_pdl(monkeypatch):
    if not _hopper():
        pytest.skip("needs an sm_90+ GPU")
    from kvtier.kernels import gemv

    layers = _weights(0)
    with torch.inference_mode():
        monkeypatch.setattr(fused, "PDL_ENABLED", False)
        plain = _state(1)
        expected = _decode_step(plain, layers)
        monkeypatch.setattr(fused, "PDL_ENABLED", True)
        state = _state(1)
        assert torch.equal(_decode_step(state, layers), expected)  # eager, with PDL
        gemv.reserve_scratch("cuda", 1, E, H)  # the router's split-K (the eager runs made it)
        state = _state(1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _decode_step(state, layers)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _decode_step(state, layers)
        for _ in range(20):
            captured.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, expected)
        # The step's K/V rows landed in the caches as without PDL.
        for i in range(LAYERS):
            assert torch.equal(state["k"][i], plain["k"][i])
            assert torch.equal(state["v"][i], plain["v"][i])
