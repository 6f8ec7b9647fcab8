"""Qwen3 (dense): the Llama decoder with a per-head RMSNorm on q and k before RoPE."""

from __future__ import annotations

from kvtier.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen3DecoderLayer(LlamaDecoderLayer):
    qk_norm = True


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
