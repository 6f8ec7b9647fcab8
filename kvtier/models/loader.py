"""From a ``--model-path`` to a model in eval mode on its device.

``resolve_model`` finds the config (and weights and tokenizer, when there are any) of:

- ``builtin:tiny-qwen3``: shipped config + tokenizer; weights generated from the seed;
- a local directory with ``config.json`` and ``*.safetensors`` (sharded or not);
- a snapshot already in the local Hugging Face cache (looked up offline);
- a bundled name such as ``Qwen/Qwen3-30B-A3B-Instruct-2507``: the public config.json ships in
  ``kvtier/models/configs`` (file name ``org--name.json``), without weights or tokenizer, so the
  real architecture runs with ``--load-format dummy`` on machines without the checkpoint.

Nothing is ever downloaded. ``load_model`` builds the model on the meta device (no memory, no
init kernels), materialises it on the target device in the target dtype, then fills every
parameter exactly once, from safetensors or from a seeded random generator.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from kvtier.models.builtin import BUILTIN_MODELS, builtin_dir, is_builtin
from kvtier.models.config import ModelConfig
from kvtier.models.layers import RMSNorm, RotaryEmbedding
from kvtier.models.registry import get_model_class

logger = logging.getLogger(__name__)

BUNDLED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
LOAD_FORMATS = ("auto", "safetensors", "dummy")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# Dummy weights: normal(0, 1 / sqrt(fan_in)), so every GEMM keeps its input's scale (about the
# usual 0.02 at hidden size 2048-4096; larger for tiny models, whose greedy output would
# otherwise collapse into repeating one token). Projections that write into the residual
# stream are scaled down by a further sqrt(2 * layers) (as in GPT-2's init) so the residual
# grows slowly enough for bf16 activations to stay finite through 48+ layers. Norm weights are 1.
_RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", "experts.w2")


class ModelNotFoundError(FileNotFoundError):
    """The model path is neither a directory, a cached snapshot, nor a known name."""


class ModelLoadError(ValueError):
    """The model was found but cannot be loaded the way asked (e.g. no weights)."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's pieces are. ``checkpoint_dir`` is None when there are no weights (a
    builtin or bundled config), ``tokenizer_dir`` None when no tokenizer files were found."""

    name: str
    config: ModelConfig
    checkpoint_dir: Path | None
    tokenizer_dir: Path | None
    # "builtin", "directory" (a local or HF-cache directory) or "bundled" (config only).
    source: str = "directory"

    @property
    def is_builtin(self) -> bool:
        return self.source == "builtin"

    @property
    def wants_fp8(self) -> bool:
        """Whether the name or the config asks for FP8 weights."""
        return self.config.quantization == "fp8" or "fp8" in self.name.lower()


# ---------------------------------------------------------------------------- resolution
def _bundled_file(name: str) -> Path:
    return BUNDLED_CONFIG_DIR / (name.replace("/", "--") + ".json")


def bundled_model_names() -> list[str]:
    """Names with a bundled config.json, e.g. ``Qwen/Qwen3-8B`` (not builtin models)."""
    return sorted(p.stem.replace("--", "/", 1) for p in BUNDLED_CONFIG_DIR.glob("*.json"))


def _has_safetensors(d: Path) -> bool:
    return any(d.glob("*.safetensors"))


def _from_directory(name: str, d: Path, overrides: dict[str, Any] | None) -> ResolvedModel:
    if not (d / "config.json").is_file():
        raise ModelNotFoundError(f"model directory {str(d)!r} has no config.json")
    has_tokenizer = any((d / f).is_file() for f in _TOKENIZER_FILES)
    return ResolvedModel(
        name=name,
        config=ModelConfig.from_json_file(d / "config.json", overrides),
        checkpoint_dir=d if _has_safetensors(d) else None,
        tokenizer_dir=d if has_tokenizer else None,
    )


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    # Offline lookup only: returns the snapshot directory if config.json is already cached.
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_model(model_path: str, overrides: dict[str, Any] | None = None) -> ResolvedModel:
    """Find the config, weights and tokenizer of ``model_path`` (see module docstring);
    ``overrides`` (``--json-model-override-args``) replace top-level keys of its config.json."""
    if is_builtin(model_path):
        d = builtin_dir(model_path)
        return ResolvedModel(
            name=model_path,
            config=ModelConfig.from_json_file(d / "config.json", overrides),
            checkpoint_dir=None,
            tokenizer_dir=d,
            source="builtin",
        )
    path = Path(model_path).expanduser()
    if path.is_dir():
        return _from_directory(model_path, path, overrides)
    snapshot = _hf_cache_snapshot(model_path)
    if snapshot is not None:
        return _from_directory(model_path, snapshot, overrides)
    bundled = _bundled_file(model_path)
    if model_path in bundled_model_names():
        return ResolvedModel(
            name=model_path,
            config=ModelConfig.from_json_file(bundled, overrides),
            checkpoint_dir=None,
            tokenizer_dir=None,
            source="bundled",
        )
    known = [*sorted(BUILTIN_MODELS), *bundled_model_names()]
    raise ModelNotFoundError(
        f"model path {model_path!r} does not exist and is not a bundled model name "
        f"(bundled: {', '.join(known)}); no network download is attempted"
    )


# ---------------------------------------------------------------------------- dtype
def default_dtype(config: ModelConfig, device: torch.device | str) -> torch.dtype:
    """The dtype of ``--dtype auto``: bfloat16 on CUDA (float16 if the checkpoint is float16),
    float32 on the CPU (where bf16 matmuls are slow and tests want exact references)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.float16 if config.torch_dtype == "float16" else torch.bfloat16


def resolve_dtype(
    dtype: str | torch.dtype, config: ModelConfig, device: torch.device | str
) -> torch.dtype:
    """``--dtype`` ("auto", "bfloat16", "float16", "float32" or a torch dtype) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return default_dtype(config, device)
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in names:
        raise ValueError(f"dtype must be auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]


# ---------------------------------------------------------------------------- weights
def _weight_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [checkpoint_dir / f for f in sorted(set(weight_map.values()))]
    return sorted(checkpoint_dir.glob("*.safetensors"))


def _dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None
) -> torch.Tensor:
    # FP8 checkpoints store w_fp8 and scale_inv with w = w_fp8 * scale_inv, one scale per
    # [block_rows, block_cols] tile (or one per tensor when there are no blocks).
    w = weight.float()
    s = scale_inv.float()
    if s.numel() > 1:
        if block is None:
            raise ModelLoadError("block-scaled FP8 weights but no weight_block_size in config")
        rows, cols = w.shape[-2:]
        s = s.repeat_interleave(block[0], dim=-2)[..., :rows, :]
        s = s.repeat_interleave(block[1], dim=-1)[..., :cols]
    return w * s


def iter_safetensors(
    checkpoint_dir: str | Path,
    config: ModelConfig | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, by HF name.

    FP8 weights with a ``*.weight_scale_inv`` sibling come out dequantized to float32 (on
    ``device``, where the multiply is cheap); their scales and any static activation scales
    (``*.input_scale``, only meaningful to FP8 kernels) are not yielded.
    """
    checkpoint_dir = Path(checkpoint_dir)
    files = _weight_files(checkpoint_dir)
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {str(checkpoint_dir)!r}")
    block = config.weight_block_size if config is not None else None
    location: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a dict
                location[key] = f
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118
                if key.endswith((".weight_scale_inv", ".input_scale")):
                    continue
                tensor = st.get_tensor(key)
                scale_key = key + "_scale_inv"
                if scale_key in location:
                    with safe_open(str(location[scale_key]), framework="pt") as sst:
                        scale = sst.get_tensor(scale_key)
                    tensor = _dequantize_fp8(tensor.to(device), scale.to(device), block)
                yield key, tensor


def _param_seed(seed: int, name: str) -> int:
    # Per-parameter seeds make each tensor independent of construction order and of the
    # other parameters' sizes.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter in place, on its device, deterministically from ``seed``."""
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", 1)
    for name, param in model.named_parameters():
        if id(param) in norm_params:
            param.fill_(1.0)
            continue
        gen = torch.Generator(device=param.device)
        gen.manual_seed(_param_seed(seed, name))
        std = 1.0 / math.sqrt(param.shape[-1])
        if name.endswith(_RESIDUAL_OUTPUTS):
            std /= math.sqrt(2 * num_layers)
        param.normal_(0.0, std, generator=gen)


# ---------------------------------------------------------------------------- load
def load_model(
    resolved: ResolvedModel,
    load_format: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> nn.Module:
    """Build ``resolved``'s architecture in ``dtype`` on ``device`` and fill its weights.

    ``load_format``: "auto" (safetensors when the checkpoint has them, seeded random weights
    for builtin models, an error otherwise), "safetensors", or "dummy" (random weights of the
    real architecture from ``seed``). Returns the model in eval mode without gradients.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"load_format must be one of {', '.join(LOAD_FORMATS)}")
    config = resolved.config
    cls = get_model_class(config.architecture)
    if load_format == "auto":
        load_format = "dummy" if resolved.is_builtin else "safetensors"
    if load_format == "safetensors" and resolved.checkpoint_dir is None:
        where = {
            "builtin": "a builtin model: its weights are generated from the seed",
            "bundled": "only its config.json is bundled",
        }.get(resolved.source, "the directory has no *.safetensors files")
        raise ModelLoadError(
            f"no weights for {resolved.name!r} ({where}); "
            "pass --load-format dummy for random weights of the same architecture"
        )
    if resolved.wants_fp8:
        logger.warning(
            "%s asks for FP8 weights, but FP8 kernels are not implemented yet: loading the "
            "weights in %s (FP8 checkpoints are dequantized at load), which takes 2x the "
            "memory of FP8 weights",
            resolved.name,
            str(dtype).removeprefix("torch."),
        )
    device = torch.device(device)
    # Build on the meta device: no memory is allocated and no init kernels run, which matters
    # for a 30B-parameter model; to_empty() then allocates each parameter once on the device.
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            # Now, not lazily at the first forward, which may be a CUDA-graph capture.
            module.inv_freq = module.inv_freq.to(device)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        assert resolved.checkpoint_dir is not None
        model.load_weights(iter_safetensors(resolved.checkpoint_dir, config, device))
    model.requires_grad_(False)
    return model.eval()
