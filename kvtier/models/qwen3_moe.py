"""Qwen3-MoE (e.g. Qwen3-30B-A3B): Qwen3 attention; the MLP of every ``decoder_sparse_step``-th
layer (except ``mlp_only_layers``) is a top-k routed mixture of SwiGLU experts."""

from __future__ import annotations

from kvtier.models.config import ModelConfig, ModelConfigError
from kvtier.models.layers import DenseMLP, Router, SparseMoeBlock, WeightRoute, expert_route
from kvtier.models.llama import LlamaForCausalLM, LlamaModel
from kvtier.models.qwen3 import Qwen3DecoderLayer


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def make_mlp(self, config: ModelConfig, layer_id: int) -> DenseMLP | SparseMoeBlock:
        if config.is_moe_layer(layer_id):
            return SparseMoeBlock(config)
        return DenseMLP(config.hidden_size, config.intermediate_size)


class Qwen3MoeModel(LlamaModel):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3MoeModel

    def __init__(self, config: ModelConfig) -> None:
        if not config.is_moe:
            raise ModelConfigError(f"{config.architecture} needs num_experts > 0")
        super().__init__(config)

    def weight_router(self) -> Router:
        """Per-expert or stacked expert weights go to the stacked experts; the rest as Llama."""
        stacked = super().weight_router()

        def route(name: str) -> WeightRoute | None:
            return expert_route(name) or stacked(name)

        return route
