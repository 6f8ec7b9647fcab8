"""The model's shape, read from a Hugging Face ``config.json``.

One frozen dataclass serves every architecture; fields a model does not use keep their neutral
defaults (a dense model has ``num_experts == 0``). Both the transformers 4 spelling of a config
(``rope_theta`` + ``rope_scaling``, ``torch_dtype``, ``num_experts``) and the transformers 5 one
(``rope_parameters``, ``dtype``, ``num_local_experts``) are accepted. Everything is checked at
construction, and a feature the models do not implement (biases, sliding windows, an unknown RoPE
scaling) is refused there, so a model is never silently built wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class ModelConfigError(ValueError):
    """A config.json the models cannot be built from; the message names the field."""


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``llama3`` stretches low frequencies by ``factor`` and blends the
    band between ``low_freq_factor`` and ``high_freq_factor``; ``linear`` divides positions;
    ``yarn`` (YaRN, e.g. Qwen3 past its 32K positions) interpolates the frequencies that turn
    fewer than ``beta_slow`` times over ``original_max_position_embeddings``, keeps those turning
    more than ``beta_fast`` times, ramps between, and scales attention logits by
    ``attention_scale()``."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # YaRN's factor on cos / sin (None: from factor, mscale and mscale_all_dim, as HF infers it).
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def attention_scale(self) -> float:
        """The factor q . k is multiplied by: YaRN scales cos and sin, i.e. q and k after RoPE,
        each by its attention factor; 1 for the other types."""
        if self.rope_type != "yarn":
            return 1.0
        factor = self.attention_factor
        if factor is None:

            def mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            if self.mscale and self.mscale_all_dim:
                factor = mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
            else:
                factor = mscale(self.factor)
        return factor * factor


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (see module docstring)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    model_type: str = ""
    hidden_act: str = "silu"
    # Mixture of experts (0 experts: a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # The checkpoint's dtype as written in the config ("bfloat16", ...), None when absent.
    torch_dtype: str | None = None
    # Quantisation method of the checkpoint ("fp8"), None for plain weights.
    quantization: str | None = None
    # FP8 block size [rows, cols] of the weight scales, when the checkpoint has block scales.
    weight_block_size: tuple[int, int] | None = None
    # The untouched config.json, for anything a model needs that is not a field above.
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from the dict of an HF ``config.json``."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelConfigError("config.json has no 'architectures' entry")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise NotImplementedError(
                    f"config.json sets {key}=true; biases in attention/MLP projections are not "
                    "implemented"
                )
        if cfg.get("use_sliding_window"):
            raise NotImplementedError("config.json sets use_sliding_window=true; not implemented")

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise ModelConfigError(f"config.json lacks required field {key!r}")
            return cfg[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        theta, scaling = _parse_rope(cfg)
        quant = cfg.get("quantization_config") or None
        quant_method = quant.get("quant_method") if quant else None
        block = quant.get("weight_block_size") if quant else None
        num_experts = cfg.get("num_experts", cfg.get("num_local_experts")) or 0
        return cls(
            architecture=str(archs[0]),
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(need("intermediate_size")),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
            model_type=str(cfg.get("model_type", "")),
            hidden_act=str(cfg.get("hidden_act", "silu")),
            num_experts=int(num_experts),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
            torch_dtype=cfg.get("torch_dtype", cfg.get("dtype")),
            quantization=str(quant_method) if quant_method else None,
            weight_block_size=tuple(block) if block else None,
            hf_config=dict(cfg),
        )

    @classmethod
    def from_json_file(
        cls, path: str | Path, overrides: dict[str, Any] | None = None
    ) -> ModelConfig:
        """Build from a ``config.json`` file (or a directory holding one), with ``overrides``
        (``--json-model-override-args``) merged over its top-level keys first."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(apply_overrides(cfg, overrides or {}))

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
            "decoder_sparse_step",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelConfigError(f"{name} must be a positive integer; got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim must be even for RoPE; got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ModelConfigError(f"rms_norm_eps must be > 0; got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ModelConfigError(f"rope_theta must be > 0; got {self.rope_theta}")
        if self.hidden_act != "silu":
            raise NotImplementedError(
                f"hidden_act {self.hidden_act!r} is not implemented (only 'silu')"
            )
        if self.rope_scaling is not None:
            if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
                raise NotImplementedError(
                    f"rope scaling type {self.rope_scaling.rope_type!r} is not implemented "
                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
                )
            if not self.rope_scaling.factor > 0:
                raise ModelConfigError(
                    f"rope scaling factor must be > 0; got {self.rope_scaling.factor}"
                )
            if (
                self.rope_scaling.rope_type == "llama3"
                and self.rope_scaling.high_freq_factor <= self.rope_scaling.low_freq_factor
            ):
                raise ModelConfigError(
                    "llama3 rope scaling needs high_freq_factor > low_freq_factor"
                )
        if self.num_experts < 0:
            raise ModelConfigError(f"num_experts must be >= 0; got {self.num_experts}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ModelConfigError(
                    f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}); "
                    f"got {self.num_experts_per_tok}"
                )
            if self.moe_intermediate_size < 1:
                raise ModelConfigError(
                    f"moe_intermediate_size must be a positive integer when num_experts > 0; "
                    f"got {self.moe_intermediate_size}"
                )
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ModelConfigError(
                f"mlp_only_layers {bad} are outside 0..{self.num_hidden_layers - 1}"
            )
        if self.quantization not in (None, "fp8"):
            raise NotImplementedError(
                f"quantization method {self.quantization!r} is not supported (only fp8, which "
                "is loaded as bf16)"
            )

    # ------------------------------------------------------------------ derived
    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def q_size(self) -> int:
        """Width of all query heads together."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of all key (or value) heads together."""
        return self.num_key_value_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether decoder layer ``layer_id`` has a sparse MoE block (else a dense MLP)."""
        return (
            self.is_moe
            and layer_id not in self.mlp_only_layers
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V of one token over all layers, stored in ``dtype``."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize

    def _layer_params(self, active: bool) -> int:
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.architecture.startswith("Qwen3"):
            attn += 2 * self.head_dim  # q_norm and k_norm weights
        total = 0
        for i in range(self.num_hidden_layers):
            if self.is_moe_layer(i):
                experts = self.num_experts_per_tok if active else self.num_experts
                mlp = experts * 3 * h * self.moe_intermediate_size + h * self.num_experts
            else:
                mlp = 3 * h * self.intermediate_size
            total += attn + mlp + 2 * h
        return total

    @property
    def param_count(self) -> int:
        """Rough number of parameters (embeddings, LM head unless tied, all layers)."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self._layer_params(active=False) + self.hidden_size

    @property
    def active_param_count(self) -> int:
        """Parameters a token touches (only the top-k experts of each MoE layer): what decode
        reads from memory per step, apart from the embedding row."""
        head = self.vocab_size * self.hidden_size
        return head + self._layer_params(active=True) + self.hidden_size


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``overrides``' top-level keys replacing its own (nested objects whole, as in
    SGLang's --json-model-override-args). A ``rope_scaling`` override of a transformers 5
    config, which keeps RoPE under ``rope_parameters``, goes into that object (over its keys,
    ``rope_theta`` kept): ``rope_parameters`` would otherwise win over it."""
    merged = {**cfg, **overrides}
    scaling = overrides.get("rope_scaling")
    params = cfg.get("rope_parameters")
    if (
        isinstance(scaling, dict)
        and isinstance(params, dict)
        and "rope_parameters" not in overrides
    ):
        merged["rope_parameters"] = {**params, **scaling}
    return merged


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes {"rope_theta", "rope_type", ...} under rope_parameters; older configs
    # have rope_theta at the top and the scaling dict (keyed "type" or "rope_type") apart.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    orig = merged.get("original_max_position_embeddings") or cfg.get("max_position_embeddings")
    kwargs: dict[str, Any] = {"rope_type": str(rope_type)}
    if merged.get("factor") is not None:
        kwargs["factor"] = float(merged["factor"])
    for key in (
        "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
        "mscale", "mscale_all_dim",
    ):  # fmt: skip
        if merged.get(key) is not None:
            kwargs[key] = float(merged[key])
    if merged.get("truncate") is not None:
        kwargs["truncate"] = bool(merged["truncate"])
    if orig is not None:
        kwargs["original_max_position_embeddings"] = int(orig)
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not implemented")
    return float(theta), RopeScaling(**kwargs)
