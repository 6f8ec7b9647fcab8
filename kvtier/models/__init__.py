"""The model layer: configs, the architecture registry, the loader and the models.

Every model class takes a ModelConfig, returns float32 logits for ``batch.logits_indices`` from
``forward(batch)``, and loads HF-named tensors with ``load_weights``. Typical use::

    resolved = resolve_model(args.model_path, args.model_overrides())
    dtype = resolve_dtype(args.dtype, resolved.config, device)
    model = load_model(resolved, args.load_format, dtype, device, args.random_seed)
"""

from kvtier.models.builtin import BUILTIN_MODELS, is_builtin
from kvtier.models.config import ModelConfig, ModelConfigError, RopeScaling
from kvtier.models.layers import WeightLoadError
from kvtier.models.loader import (
    ModelLoadError,
    ModelNotFoundError,
    ResolvedModel,
    bundled_model_names,
    default_dtype,
    init_dummy_weights,
    iter_safetensors,
    load_model,
    resolve_dtype,
    resolve_model,
)
from kvtier.models.registry import (
    UnsupportedModelError,
    get_model_class,
    supported_architectures,
)

__all__ = [
    "BUILTIN_MODELS",
    "ModelConfig",
    "ModelConfigError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ResolvedModel",
    "RopeScaling",
    "UnsupportedModelError",
    "WeightLoadError",
    "bundled_model_names",
    "default_dtype",
    "get_model_class",
    "init_dummy_weights",
    "is_builtin",
    "iter_safetensors",
    "load_model",
    "resolve_dtype",
    "resolve_model",
    "supported_architectures",
]
