"""The model layer against Hugging Face transformers, on the CPU in float32.

Tiny random Qwen3, Qwen3-MoE and Llama models are built with transformers, saved with
save_pretrained, loaded through resolve_model/load_model, and run through real ForwardBatches
over a paged KV pool (tests/model_utils.py). Prefill logits must match HF's to 1e-4 (relative
to the largest logit) and greedy decoding must give HF generate()'s tokens exactly.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from model_utils import PagedRunner
from safetensors.torch import save_file

from kvtier.kernels import gemv, moe_block
from kvtier.models import (
    ModelConfig,
    ModelConfigError,
    ModelLoadError,
    ModelNotFoundError,
    ResolvedModel,
    UnsupportedModelError,
    WeightLoadError,
    bundled_model_names,
    default_dtype,
    get_model_class,
    layers,
    load_model,
    resolve_model,
)
from kvtier.models.layers import FusedExperts, SparseMoeBlock, normed_linear, rope_inv_freq
from kvtier.models.loader import BUNDLED_CONFIG_DIR
from kvtier.tokenizer import builtin_tokenizer_dir, load_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 99, 3, 64, 2, 80, 41, 7, 120, 33], [9, 1, 77, 15, 100, 6]]
MAX_NEW = 8
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    # Larger than HF's 0.02 so logits are peaked and greedy choices are far from ties.
    initializer_range=0.2,
)


@dataclass
class HFCase:
    directory: Path
    hf: torch.nn.Module
    ref_logits: list[torch.Tensor]  # per prompt [len, vocab]
    ref_tokens: list[list[int]]  # per prompt, greedy generate()


def _build_hf(kind: str) -> torch.nn.Module:
    t = transformers
    if kind in ("qwen3", "qwen3_sharded"):
        return t.Qwen3ForCausalLM(t.Qwen3Config(num_hidden_layers=2, **TINY))
    if kind == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],  # one dense layer among the MoE ones
            **TINY,
        )
        return t.Qwen3MoeForCausalLM(cfg)
    if kind == "llama_rope_scaled":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # Small, so that every band of the llama3 scaling is exercised by short prompts.
            "original_max_position_embeddings": 32,
        }
        cfg = t.LlamaConfig(
            num_hidden_layers=2, rope_parameters=rope, max_position_embeddings=256, **TINY
        )
        return t.LlamaForCausalLM(cfg)
    if kind == "qwen3_yarn":
        rope = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            # Small, so that the ramp between interpolated and kept frequencies spans several
            # of the 8 frequency pairs.
            "original_max_position_embeddings": 16,
        }
        cfg = t.Qwen3Config(
            num_hidden_layers=2, rope_parameters=rope, max_position_embeddings=64, **TINY
        )
        return t.Qwen3ForCausalLM(cfg)
    if kind == "llama_tied":
        return t.LlamaForCausalLM(
            t.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **TINY)
        )
    raise AssertionError(kind)


CASES = ["qwen3", "qwen3_sharded", "qwen3_moe", "llama_rope_scaled", "qwen3_yarn", "llama_tied"]


@pytest.fixture(scope="module")
def hf_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HFCase]:
    cases: dict[str, HFCase] = {}
    for kind in CASES:
        torch.manual_seed(1234)
        hf = _build_hf(kind).eval()
        d = tmp_path_factory.mktemp(kind)
        shard = {"max_shard_size": "40KB"} if kind == "qwen3_sharded" else {}
        hf.save_pretrained(d, **shard)
        # Generate exactly MAX_NEW tokens: no early stop on a (random) eos.
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        logits, tokens = [], []
        with torch.no_grad():
            for p in PROMPTS:
                ids = torch.tensor([p])
                logits.append(hf(ids).logits[0])
                out = hf.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
                tokens.append(out[0, len(p) :].tolist())
        cases[kind] = HFCase(d, hf, logits, tokens)
    return cases


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("kind", CASES)
def test_prefill_and_greedy_match_hf(hf_cases: dict[str, HFCase], kind: str, page_size: int):
    case = hf_cases[kind]
    resolved = resolve_model(str(case.directory))
    assert resolved.checkpoint_dir == case.directory
    model = load_model(resolved, "auto", torch.float32, "cpu")
    runner = PagedRunner(model, resolved.config, page_size=page_size)
    # Both prompts in one batch; the page ids interleave as the sequences grow.
    logits, tokens = runner.generate_greedy(PROMPTS, MAX_NEW)
    for ours, ref in zip(logits, case.ref_logits):
        assert _rel_err(ours, ref) < 1e-4
    assert tokens == case.ref_tokens


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_chunked_prefill_after_cached_prefix_matches_hf(hf_cases: dict[str, HFCase], kind: str):
    case = hf_cases[kind]
    resolved = resolve_model(str(case.directory))
    model = load_model(resolved, "safetensors", torch.float32, "cpu")
    runner = PagedRunner(model, resolved.config, page_size=4)
    # Chunks of 5 tokens: later chunks attend to a prefix already in the pool, across pages.
    logits, tokens = runner.generate_greedy(PROMPTS, MAX_NEW, prefill_chunk=5)
    for ours, ref in zip(logits, case.ref_logits):
        assert _rel_err(ours, ref) < 1e-4
    assert tokens == case.ref_tokens


def test_logits_only_for_requested_rows(hf_cases: dict[str, HFCase]):
    case = hf_cases["qwen3"]
    resolved = resolve_model(str(case.directory))
    model = load_model(resolved, "auto", torch.float32, "cpu")
    runner = PagedRunner(model, resolved.config, page_size=4)
    from model_utils import Seq

    seqs = [Seq(list(p)) for p in PROMPTS]
    last = runner.extend(seqs, [len(p) for p in PROMPTS], all_logits=False)
    assert [tuple(x.shape) for x in last] == [(1, 128), (1, 128)]
    assert last[0].dtype == torch.float32
    for ours, ref in zip(last, case.ref_logits):
        assert _rel_err(ours[0], ref[-1]) < 1e-4


def test_moe_loads_stacked_expert_weights(hf_cases: dict[str, HFCase]):
    # transformers 5 holds experts stacked in memory (mlp.experts.gate_up_proj [E, 2I, H]);
    # a checkpoint written from that state dict must load too.
    case = hf_cases["qwen3_moe"]
    state = case.hf.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    config = ModelConfig.from_json_file(case.directory / "config.json")
    model = get_model_class(config.architecture)(config)
    model.load_weights(state.items())
    runner = PagedRunner(model.eval(), config, page_size=4)
    logits, tokens = runner.generate_greedy(PROMPTS, MAX_NEW)
    assert _rel_err(logits[0], case.ref_logits[0]) < 1e-4
    assert tokens == case.ref_tokens


def _moe_block(dtype: torch.dtype, device: str) -> SparseMoeBlock:
    config = ModelConfig(
        architecture="Qwen3MoeForCausalLM",
        vocab_size=32,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    )
    gen = torch.Generator().manual_seed(0)
    block = SparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return block.to(device=device, dtype=dtype)


def test_moe_grouped_mm_path_matches_loop_on_cpu():
    block = _moe_block(torch.float32, "cpu")
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        block.experts.use_grouped_mm = False
        ref = block(x)
        block.experts.use_grouped_mm = True
        out = block(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_grouped_mm_matches_loop_on_cuda():
    # Same routing for both paths (fixed ids and weights), so only GEMM rounding differs.
    experts = _moe_block(torch.bfloat16, "cuda").experts
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    ids = torch.randint(0, 8, (300, 2), device="cuda", generator=gen)
    weights = torch.rand(300, 2, device="cuda", generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        experts.use_grouped_mm = False
        ref = experts(x, ids, weights).float()
        experts.use_grouped_mm = None  # the default on CUDA in bf16: grouped
        out = experts(x, ids, weights).float()
        # No host sync on the grouped path: it captures into a CUDA graph.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = experts(x, ids, weights)
        graph.replay()
    assert _rel_err(out, ref) < 0.02
    torch.testing.assert_close(captured.float(), out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qwen3_moe_bf16_on_cuda_grouped_matches_loop():
    # The real Qwen3-30B-A3B layer shapes (2 of its 48 layers), dummy weights, bf16.
    raw = json.loads((BUNDLED_CONFIG_DIR / "Qwen--Qwen3-30B-A3B-Instruct-2507.json").read_text())
    raw["num_hidden_layers"] = 2
    config = ModelConfig.from_hf_dict(raw)
    resolved = ResolvedModel("qwen3-moe-2-layers", config, None, None, source="bundled")
    model = load_model(resolved, "dummy", torch.bfloat16, "cuda", seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 151936, (n,), generator=gen).tolist() for n in (300, 37)]
    results = []
    for grouped in (True, False):
        for m in model.modules():
            if isinstance(m, FusedExperts):
                m.use_grouped_mm = grouped
        runner = PagedRunner(model, config, 64, dtype=torch.bfloat16, device="cuda")
        results.append(runner.generate_greedy(prompts, 4)[0])
    for grouped, loop in zip(*results):
        assert torch.isfinite(grouped).all()
        # bf16 rounding differences flip near-tied top-k choices of the random router for a
        # few tokens, so compare on average rather than elementwise.
        assert (grouped - loop).abs().mean() < 0.02 * loop.abs().mean()


def _qwen3_30b_layer() -> tuple[ModelConfig, torch.nn.Module]:
    """(config, layer 0) of Qwen3-30B-A3B with one layer: real shapes, dummy weights, bf16."""
    raw = json.loads((BUNDLED_CONFIG_DIR / "Qwen--Qwen3-30B-A3B-Instruct-2507.json").read_text())
    raw["num_hidden_layers"] = 1
    config = ModelConfig.from_hf_dict(raw)
    resolved = ResolvedModel("qwen3-moe-1-layer", config, None, None, source="bundled")
    return config, load_model(resolved, "dummy", torch.bfloat16, "cuda", seed=0).decoder_layers[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 3])
def test_router_norm_in_gemv_matches_separate_kernels_on_cuda(rows: int, monkeypatch):
    # A Qwen3-30B-A3B layer (real shapes, dummy weights, bf16) at decode sizes: at one row the
    # pre-MLP norm runs in the router GEMV's prologue (gemv.use_gemv_norm), against the norm
    # kernel then the GEMV; at three rows both runs take the separate kernels. (The one-kernel
    # MoE block, which would take the one-row case, is off here: see the next test.)
    monkeypatch.setattr(moe_block, "ENABLED", False)
    config, layer = _qwen3_30b_layer()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, residual = (
        torch.randn(rows, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(2)
    )
    fused_calls = []
    real_gemv = gemv.gemv

    def counting_gemv(*args, **kwargs):
        fused_calls.append(kwargs.get("norm") is not None)
        return real_gemv(*args, **kwargs)

    monkeypatch.setattr(gemv, "gemv", counting_gemv)

    def run() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            qkv, h, _ = normed_linear(
                layer.input_layernorm, x, residual, layer.self_attn.qkv_proj.weight
            )
            out, h2 = layer.mlp.forward_norm(layer.post_attention_layernorm, x, residual)
        return qkv, h, out, h2

    fused = run()
    assert sum(fused_calls) == (1 if rows == 1 else 0)
    monkeypatch.setattr(layers, "NORM_IN_GEMV", False)
    separate = run()
    assert sum(fused_calls) == (1 if rows == 1 else 0)
    # x + residual is one rounded add either way; qkv's norm is the norm kernel in both runs.
    assert torch.equal(fused[1], separate[1]) and torch.equal(fused[3], separate[3])
    assert torch.equal(fused[0], separate[0])
    # The router's norm may add its sum of squares in another order: last bits at most, which
    # can move a near-tied expert choice, so compare the MoE output on the whole.
    assert _rel_err(fused[2].float(), separate[2].float()) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_block_kernel_matches_chain_in_the_layer_on_cuda(monkeypatch):
    # A Qwen3-30B-A3B layer (real shapes, dummy weights, bf16) at one token: the MoE half as
    # one persistent kernel (moe_block) against the chain of kernels it replaces.
    config, layer = _qwen3_30b_layer()
    gen = torch.Generator(device="cuda").manual_seed(1)
    x, residual = (
        torch.randn(1, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(2)
    )
    calls = []
    real_block = moe_block.moe_block
    monkeypatch.setattr(
        moe_block, "moe_block", lambda *a, **k: calls.append(1) or real_block(*a, **k)
    )

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return layer.mlp.forward_norm(layer.post_attention_layernorm, x, residual)

    monkeypatch.setattr(moe_block, "ENABLED", True)
    block = run()
    monkeypatch.setattr(moe_block, "ENABLED", False)
    chain = run()
    assert len(calls) == 1
    assert torch.equal(block[1], chain[1])
    assert _rel_err(block[0].float(), chain[0].float()) < 0.01


def test_yarn_rope_frequencies_and_attention_factor_match_hf(hf_cases: dict[str, HFCase]):
    hf_config = hf_cases["qwen3_yarn"].hf.config
    ref, factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    config = ModelConfig.from_hf_dict(hf_config.to_dict())
    assert config.rope_scaling is not None and config.rope_scaling.rope_type == "yarn"
    ours = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=0)
    # Interpolated, ramped and kept pairs all occur in this config.
    plain = rope_inv_freq(config.head_dim, config.rope_theta, None)
    assert (ours == plain).any() and (ours == plain / 4).any() and (ours < plain).sum() > 1
    assert config.rope_scaling.attention_scale() == pytest.approx(factor * factor)
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1.0)


def test_model_overrides_merge_into_the_config(tmp_path: Path):
    # Qwen's documented way to serve Qwen3-8B past 32K positions, on the bundled config (which
    # has rope_scaling null), and on a transformers 5 config that keeps RoPE in
    # rope_parameters (the override must land there, rope_theta kept).
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    config = resolve_model("Qwen/Qwen3-8B", {"rope_scaling": yarn}).config
    assert config.rope_scaling is not None and config.rope_scaling.rope_type == "yarn"
    assert config.rope_scaling.original_max_position_embeddings == 32768
    assert config.rope_theta == 1e6 and resolve_model("Qwen/Qwen3-8B").config.rope_scaling is None
    raw = json.loads((BUNDLED_CONFIG_DIR / "Qwen--Qwen3-8B.json").read_text())
    raw.pop("rope_scaling")
    raw["rope_parameters"] = {"rope_theta": raw.pop("rope_theta"), "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    v5 = resolve_model(str(tmp_path), {"rope_scaling": yarn, "max_position_embeddings": 131072})
    assert v5.config.rope_scaling == config.rope_scaling
    assert v5.config.rope_theta == 1e6 and v5.config.max_position_embeddings == 131072


def test_llama3_rope_frequencies_match_hf(hf_cases: dict[str, HFCase]):
    hf_config = hf_cases["llama_rope_scaled"].hf.config
    ref, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    config = ModelConfig.from_hf_dict(hf_config.to_dict())
    ours = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- loading
def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_dummy_weights_are_deterministic_from_seed():
    resolved = resolve_model("builtin:tiny-qwen3")
    a = _params(load_model(resolved, "dummy", torch.float32, "cpu", seed=7))
    b = _params(load_model(resolved, "auto", torch.float32, "cpu", seed=7))
    c = _params(load_model(resolved, "dummy", torch.float32, "cpu", seed=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert torch.equal(
        a["model.layers.0.input_layernorm.weight"], torch.ones(resolved.config.hidden_size)
    )


def test_dummy_weights_stay_finite_through_many_layers_in_bf16():
    raw = json.loads((builtin_tokenizer_dir() / "config.json").read_text())
    raw.update(num_hidden_layers=48, hidden_size=128, intermediate_size=256)
    config = ModelConfig.from_hf_dict(raw)
    resolved = ResolvedModel("deep", config, None, None, source="builtin")
    model = load_model(resolved, "dummy", torch.bfloat16, "cpu", seed=0)
    runner = PagedRunner(model, config, page_size=4, dtype=torch.bfloat16)
    logits, _ = runner.generate_greedy([PROMPTS[0]], 2)
    assert torch.isfinite(logits[0]).all()
    assert logits[0].std() > 0.1


def test_fp8_name_warns_and_loads(hf_cases: dict[str, HFCase], tmp_path: Path, caplog):
    d = tmp_path / "Tiny-Qwen3-FP8"
    shutil.copytree(hf_cases["qwen3"].directory, d)
    resolved = resolve_model(str(d))
    assert resolved.wants_fp8 and resolved.config.quantization is None
    with caplog.at_level(logging.WARNING, logger="kvtier.models.loader"):
        model = load_model(resolved, "auto", torch.float32, "cpu")
    assert "FP8 kernels are not implemented yet" in caplog.text
    assert "2x the memory" in caplog.text
    logits, _ = PagedRunner(model, resolved.config, 4).generate_greedy([PROMPTS[0]], 1)
    assert _rel_err(logits[0], hf_cases["qwen3"].ref_logits[0]) < 1e-4


def test_fp8_block_scaled_checkpoint_is_dequantized(hf_cases: dict[str, HFCase], tmp_path: Path):
    src = hf_cases["qwen3"].directory
    block = 16
    state: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for name, w in hf_cases["qwen3"].hf.state_dict().items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            rows, cols = w.shape
            tiles = w.reshape(rows // block, block, cols // block, block)
            scale = tiles.abs().amax(dim=(1, 3)) / 448.0
            full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
            q = (w / full).to(torch.float8_e4m3fn)
            state[name] = q
            state[name + "_scale_inv"] = scale
            expected[name] = q.float() * full
        else:
            state[name] = w.contiguous()
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file(state, str(tmp_path / "model.safetensors"))
    resolved = resolve_model(str(tmp_path))
    assert resolved.config.quantization == "fp8" and resolved.config.weight_block_size == (16, 16)
    model = load_model(resolved, "auto", torch.float32, "cpu")
    attn = model.model.layers[1].self_attn
    q_rows = resolved.config.q_size
    torch.testing.assert_close(
        attn.qkv_proj.weight[:q_rows], expected["model.layers.1.self_attn.q_proj.weight"]
    )
    torch.testing.assert_close(
        attn.o_proj.weight, expected["model.layers.1.self_attn.o_proj.weight"]
    )


def test_unknown_architecture_error(tmp_path: Path):
    raw = json.loads((builtin_tokenizer_dir() / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    resolved = resolve_model(str(tmp_path))
    with pytest.raises(UnsupportedModelError) as e:
        load_model(resolved, "dummy")
    assert str(e.value) == (
        "model architecture 'GPT2LMHeadModel' is not supported; supported architectures: "
        "LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM"
    )


def test_missing_path_error():
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("/nonexistent/some-model")
    assert str(e.value) == (
        "model path '/nonexistent/some-model' does not exist and is not a bundled model name "
        "(bundled: builtin:tiny-qwen3, Qwen/Qwen3-30B-A3B-Instruct-2507, "
        "Qwen/Qwen3-30B-A3B-Instruct-2507-FP8, Qwen/Qwen3-8B, meta-llama/Llama-3.1-8B-Instruct); "
        "no network download is attempted"
    )


def test_directory_without_config_error(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))


def test_bundled_config_without_weights_needs_dummy():
    resolved = resolve_model("Qwen/Qwen3-8B")
    assert resolved.checkpoint_dir is None or resolved.source == "directory"
    if resolved.source != "bundled":
        pytest.skip("a real Qwen3-8B snapshot is in the local HF cache")
    with pytest.raises(ModelLoadError) as e:
        load_model(resolved, "auto")
    assert str(e.value) == (
        "no weights for 'Qwen/Qwen3-8B' (only its config.json is bundled); "
        "pass --load-format dummy for random weights of the same architecture"
    )


def test_bundled_configs():
    names = bundled_model_names()
    assert names == [
        "Qwen/Qwen3-30B-A3B-Instruct-2507",
        "Qwen/Qwen3-30B-A3B-Instruct-2507-FP8",
        "Qwen/Qwen3-8B",
        "meta-llama/Llama-3.1-8B-Instruct",
    ]
    c = resolve_model("Qwen/Qwen3-30B-A3B-Instruct-2507").config
    assert (c.architecture, c.num_hidden_layers, c.num_kv_heads, c.head_dim) == (
        "Qwen3MoeForCausalLM",
        48,
        4,
        128,
    )
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (128, 8, 768)
    assert c.kv_bytes_per_token(torch.bfloat16) == 96 * 1024
    assert 30.0e9 < c.param_count < 31.0e9 and 3.0e9 < c.active_param_count < 3.5e9
    fp8 = resolve_model("Qwen/Qwen3-30B-A3B-Instruct-2507-FP8")
    assert fp8.wants_fp8 and fp8.config.quantization == "fp8"
    llama = resolve_model("meta-llama/Llama-3.1-8B-Instruct").config
    assert llama.rope_scaling is not None and llama.rope_scaling.rope_type == "llama3"
    assert llama.eos_token_ids == (128001, 128008, 128009)
    # Every bundled architecture builds (on the meta device: no memory) with the parameter
    # count the config predicts.
    for name in names:
        config = resolve_model(name).config
        with torch.device("meta"):
            model = get_model_class(config.architecture)(config)
        assert sum(p.numel() for p in model.parameters()) == config.param_count


def test_transformers4_and_5_config_spellings_agree():
    base = json.loads((builtin_tokenizer_dir() / "config.json").read_text())
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    v4 = {**base, "rope_theta": 5e5, "rope_scaling": {**scaling, "type": "llama3"}}
    v5 = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**scaling, "rope_type": "llama3", "rope_theta": 5e5}
    a, b = ModelConfig.from_hf_dict(v4), ModelConfig.from_hf_dict(v5)
    assert a == b and a.rope_theta == 5e5 and a.rope_scaling is not None
    moe = {**base, "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}
    assert ModelConfig.from_hf_dict(moe).num_experts == 4


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"attention_bias": True}, NotImplementedError, "attention_bias=true"),
        ({"mlp_bias": True}, NotImplementedError, "mlp_bias=true"),
        ({"num_key_value_heads": 3}, ModelConfigError, "must be a multiple of"),
        (
            {"rope_scaling": {"rope_type": "longrope", "factor": 4.0}},
            NotImplementedError,
            "longrope",
        ),
        ({"hidden_size": 0}, ModelConfigError, "hidden_size must be a positive integer"),
        ({"vocab_size": None}, ModelConfigError, "lacks required field 'vocab_size'"),
        ({"architectures": []}, ModelConfigError, "no 'architectures'"),
    ],
)
def test_config_validation(change: dict, error: type[Exception], message: str):
    raw = json.loads((builtin_tokenizer_dir() / "config.json").read_text())
    raw.update(change)
    with pytest.raises(error, match=message):
        ModelConfig.from_hf_dict(raw)


def test_weight_errors(hf_cases: dict[str, HFCase]):
    case = hf_cases["qwen3"]
    config = ModelConfig.from_json_file(case.directory)
    state = dict(case.hf.state_dict())
    model = get_model_class(config.architecture)(config)
    extra = {**state, "model.layers.0.self_attn.extra.weight": torch.zeros(1)}
    with pytest.raises(WeightLoadError) as e:
        model.load_weights(extra.items())
    assert str(e.value) == (
        "unexpected weight 'model.layers.0.self_attn.extra.weight' in the checkpoint: "
        "Qwen3ForCausalLM has no parameter 'model.layers.0.self_attn.extra.weight'"
    )
    missing = {k: v for k, v in state.items() if not k.endswith("layers.1.self_attn.v_proj.weight")}
    with pytest.raises(WeightLoadError) as e:
        model.load_weights(missing.items())
    assert str(e.value) == (
        "the checkpoint lacks weights for Qwen3ForCausalLM parameters: "
        "model.layers.1.self_attn.qkv_proj.weight (partly)"
    )
    inv_freq = {**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}
    model.load_weights(inv_freq.items())  # ignored, not an error


def test_default_dtype():
    config = resolve_model("builtin:tiny-qwen3").config
    assert default_dtype(config, "cpu") == torch.float32
    assert default_dtype(config, "cuda") == torch.bfloat16


# ---------------------------------------------------------------------------- builtin tokenizer
def test_builtin_model_and_tokenizer():
    resolved = resolve_model("builtin:tiny-qwen3")
    assert resolved.is_builtin and resolved.checkpoint_dir is None
    assert 1e6 < resolved.config.param_count < 1e7
    tok = load_tokenizer("builtin:tiny-qwen3")
    assert len(tok) == resolved.config.vocab_size
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert set(resolved.config.eos_token_ids) == {ids[0], ids[2]}
    assert tok.eos_token == "<|im_end|>"
    for text in ["Hello, world! def f(x):\n    return x * 2\n", "ünïcödé 日本語 🙂"]:
        assert tok.decode(tok.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(text)
    assert ids.count(ids[0]) == 3 and ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text
    assert (builtin_tokenizer_dir() / "tokenizer.json").stat().st_size < 1_000_000


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "llama_rope_scaled", "qwen3_yarn"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_engine_greedy_matches_hf(hf_cases: dict[str, HFCase], kind: str, page_size: int):
    """The whole engine (scheduler, batching, prefix cache; on a GPU the Triton kernels and
    decode CUDA graphs), in float32: batched greedy output equals HF generate, also when the
    prompts come back and their prefixes are served from the cache."""
    import kvtier

    case = hf_cases[kind]
    sp = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    with kvtier.Engine(
        model_path=str(case.directory),
        dtype="float32",
        page_size=page_size,
        max_total_tokens=4096,
        skip_tokenizer_init=True,
        log_level="warning",
    ) as engine:
        first = engine.generate(input_ids=PROMPTS, sampling_params=sp)
        again = engine.generate(input_ids=PROMPTS, sampling_params=sp)
        assert [o["output_ids"] for o in first] == case.ref_tokens
        assert [o["output_ids"] for o in again] == case.ref_tokens
        # Page 1: all but the last prompt token. Page 16: the 11-token prompt and its 8 answer
        # tokens completed a page, whose first 10 tokens are lent again (a tail); the 6-token
        # one with its answer did not.
        cached = sum(o["meta_info"]["cached_tokens"] for o in again)
        assert cached == (10 + 5 if page_size == 1 else 10)
        engine.check_integrity()


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_engine_logprobs_match_hf(hf_cases: dict[str, HFCase], kind: str):
    """Logprobs the engine returns (greedy and seeded sampling, with their top 4) equal HF's
    log-softmax over the same sequence, position by position."""
    import kvtier

    case = hf_cases[kind]
    with kvtier.Engine(
        model_path=str(case.directory),
        dtype="float32",
        max_total_tokens=4096,
        skip_tokenizer_init=True,
        log_level="warning",
    ) as engine:
        for sp in (
            {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True},
            {"temperature": 0.7, "seed": 3, "max_new_tokens": MAX_NEW, "ignore_eos": True},
        ):
            outs = engine.generate(
                input_ids=PROMPTS, sampling_params=sp, return_logprob=True, top_logprobs_num=4
            )
            for prompt, out in zip(PROMPTS, outs, strict=True):
                seq = torch.tensor([prompt + out["output_ids"]])
                with torch.no_grad():
                    ref = torch.log_softmax(case.hf(seq).logits[0].float(), dim=-1)
                meta = out["meta_info"]
                for i, ((lp, token, _), top) in enumerate(
                    zip(meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True)
                ):
                    row = ref[len(prompt) - 1 + i]
                    assert token == out["output_ids"][i]
                    assert abs(lp - row[token].item()) < 1e-4
                    values, ids = torch.topk(row, 4)
                    assert [t for _, t, _ in top] == ids.tolist()
                    assert max(abs(v - w) for (v, _, _), w in zip(top, values.tolist())) < 1e-4
        engine.check_integrity()


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_engine_prompt_logprobs_match_hf(hf_cases: dict[str, HFCase], kind: str):
    """Prompt logprobs (from position 0 and 3, scoring only and with generation) equal HF's
    log-softmax, in chunks of 4 tokens and after the prompts were cached: the positions they
    need are computed, not served from the cache."""
    import kvtier

    case = hf_cases[kind]
    with kvtier.Engine(
        model_path=str(case.directory),
        dtype="float32",
        page_size=2,
        chunked_prefill_size=4,
        max_total_tokens=4096,
        skip_tokenizer_init=True,
        log_level="warning",
    ) as engine:
        refs = []
        for prompt in PROMPTS:
            with torch.no_grad():
                refs.append(torch.log_softmax(case.hf(torch.tensor([prompt])).logits[0], -1))
        for start, max_new in ((0, 0), (3, 2), (0, 2)):
            sp = {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}
            outs = engine.generate(
                input_ids=PROMPTS,
                sampling_params=sp,
                return_logprob=True,
                top_logprobs_num=3,
                logprob_start_len=start,
            )
            for prompt, ref, out in zip(PROMPTS, refs, outs, strict=True):
                meta = out["meta_info"]
                assert len(out["output_ids"]) == max_new
                entries, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
                assert [t for _, t, _ in entries] == prompt[start:]
                for k, ((lp, token, _), top) in enumerate(zip(entries, tops, strict=True)):
                    pos = start + k
                    if pos == 0:
                        assert lp is None and top == []
                        continue
                    row = ref[pos - 1]
                    assert abs(lp - row[token].item()) < 1e-4
                    assert [t for _, t, _ in top] == torch.topk(row, 3).indices.tolist()
                # Prompts sent before were cached, but not up to where their logprobs start.
                assert meta["cached_tokens"] <= max(start - 1, 0)
        engine.check_integrity()
