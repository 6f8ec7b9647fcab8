"""Architecture name (HF ``architectures[0]``) -> model class, imported on first use."""

from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("kvtier.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("kvtier.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("kvtier.models.qwen3_moe", "Qwen3MoeForCausalLM"),
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no implementation here."""


def supported_architectures() -> list[str]:
    """Architecture names that load, sorted."""
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The model class for an HF architecture name; UnsupportedModelError lists the known ones."""
    if architecture not in _MODELS:
        raise UnsupportedModelError(
            f"model architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(supported_architectures())}"
        )
    module, cls = _MODELS[architecture]
    return getattr(importlib.import_module(module), cls)
