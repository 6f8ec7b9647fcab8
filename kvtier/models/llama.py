"""Llama 3.x: pre-norm decoder, grouped-query attention, SwiGLU MLP, llama3 RoPE scaling."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvtier.models.config import ModelConfig
from kvtier.models.layers import (
    DecoderAttention,
    DenseMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    Router,
    SparseMoeBlock,
    compute_logits,
    load_hf_weights,
    normed_linear,
    stacked_router,
)
from kvtier.runner.forward_batch import ForwardBatch

# (our fused parameter, HF name fragment, shard id)
STACKED_PARAMS_MAPPING = [
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


class LlamaDecoderLayer(nn.Module):
    # Subclasses (Qwen3, Qwen3-MoE) change these two things and nothing else.
    qk_norm = False

    def make_mlp(self, config: ModelConfig, layer_id: int) -> DenseMLP | SparseMoeBlock:
        return DenseMLP(config.hidden_size, config.intermediate_size)

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(config, layer_id, qk_norm=self.qk_norm)
        self.mlp = self.make_mlp(config, layer_id)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the hidden state after
        the layer is their sum, which the next layer's input norm adds in its own kernel (one
        launch a layer fewer). The first layer gets the embeddings and ``residual`` None."""
        qkv, residual, _ = normed_linear(
            self.input_layernorm, x, residual, self.self_attn.qkv_proj.weight
        )
        attn = self.self_attn(qkv, rope, batch)
        return self.mlp.forward_norm(self.post_attention_layernorm, attn, residual)


class LlamaModel(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            self.layer_cls(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden states [T, hidden] after the last layer, before the final norm, as the
        last layer's output and its residual stream (whose sum they are; None without layers).
        """
        rope = self.rotary_emb(batch.positions)
        x, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, batch)
        return x, residual


class LlamaForCausalLM(nn.Module):
    model_cls: type[LlamaModel] = LlamaModel

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_cls(config)
        # Tied models have no lm_head module at all: the embedding is the only copy.
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [N, vocab] for rows ``batch.logits_indices``."""
        hidden, residual = self.model(batch)
        return self.logits(hidden, batch.logits_indices, residual)

    # The pieces of forward, for runners that drive the decoder layers themselves (per-layer
    # CUDA graphs): embed -> rope -> each of decoder_layers -> logits.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rotary_emb(positions)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def logits(
        self, hidden: torch.Tensor, rows: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float32 logits of ``rows`` of the final hidden states (``hidden + residual`` when a
        residual is given: see ``LlamaModel.forward``)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return compute_logits(hidden, self.model.norm, head.weight, rows, residual)

    def weight_router(self) -> Router:
        """Where each HF tensor goes (q/k/v and gate/up are fused on the way in)."""
        return stacked_router(STACKED_PARAMS_MAPPING, self.config.tie_word_embeddings)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors."""
        load_hf_weights(self, weights, self.weight_router())
