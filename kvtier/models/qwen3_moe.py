"""Qwen3-MoE (e.g. Qwen3-30B-A3B): Qwen3 attention; the MLP of every ``decoder_sparse_step``-th
layer (except ``mlp_only_layers``) is a top-k routed mixture of SwiGLU experts."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvtier.models.config import ModelConfig, ModelConfigError
from kvtier.models.layers import (
    DecoderAttention,
    DenseMLP,
    RMSNorm,
    RotaryEmbedding,
    SparseMoeBlock,
    WeightRoute,
    compute_logits,
    expert_route,
    load_hf_weights,
    stacked_router,
)
from kvtier.runner.forward_batch import ForwardBatch

# (our fused parameter, HF name fragment, shard id). Expert weights go through expert_route
# first, so "gate_proj" here only ever meets dense-MLP layers.
STACKED_PARAMS_MAPPING = [
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(config, layer_id, qk_norm=True)
        self.mlp: nn.Module = (
            SparseMoeBlock(config)
            if config.is_moe_layer(layer_id)
            else DenseMLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3MoeModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] after the last layer, before the final norm."""
        rope = self.rotary_emb(batch.positions)
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = layer(x, rope, batch)
        return x


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.is_moe:
            raise ModelConfigError(f"{config.architecture} needs num_experts > 0")
        self.config = config
        self.model = Qwen3MoeModel(config)
        # Tied models have no lm_head module at all: the embedding is the only copy.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [N, vocab] for rows ``batch.logits_indices``."""
        hidden = self.model(batch)
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return compute_logits(hidden, self.model.norm, head.weight, batch.logits_indices)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors: per-expert or stacked expert weights, q/k/v and gate/up fused
        on the way in."""
        stacked = stacked_router(STACKED_PARAMS_MAPPING, self.config.tie_word_embeddings)

        def route(name: str) -> WeightRoute | None:
            return expert_route(name) or stacked(name)

        load_hf_weights(self, weights, route)
