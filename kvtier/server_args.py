"""Every flag of the engine and the server, as one frozen dataclass.

Names, defaults and meanings follow SGLang, so launch commands and ``Engine(...)`` keyword
arguments written for it work here unchanged. The argparse parser is generated from the fields:
each field's metadata carries its help text and, where needed, its choices, aliases and flag kind.
Validation happens at construction; every error names the flag it is about.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class ServerArgsError(ValueError):
    """A flag has a value the engine cannot run with; the message names the flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


LOAD_FORMATS = ("auto", "safetensors", "dummy")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("cuda", "cpu")
WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
IO_BACKENDS = ("auto", "kernel", "direct")
MEM_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
TIERS = ("dram", "xmem", "peer")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
PREFILL_ATTENTION_BACKENDS = ("auto", "triton", "cudnn")
SCHEDULE_POLICIES = ("fcfs", "lpm")
# One format under SGLang's name and vLLM's (kvtier.server.tool_parser).
TOOL_CALL_PARSERS = ("qwen25", "hermes", "qwen3_coder")
# kvtier.server.reasoning_parser.MODES.
REASONING_PARSERS = ("qwen3", "qwen3-thinking")


@dataclass(frozen=True)
class ServerArgs:
    # --- model ---
    model_path: str = _opt(
        "builtin:tiny-qwen3",
        "HF checkpoint directory, a bundled model name (see kvtier.models.configs) or "
        "builtin:tiny-qwen3",
        aliases=("--model",),
    )
    tokenizer_path: str | None = _opt(None, "tokenizer directory (default: the model's)")
    load_format: str = _opt(
        "auto", "auto: safetensors if present; dummy: random weights", choices=LOAD_FORMATS
    )
    dtype: str = _opt(
        "auto", "weights and KV dtype (auto: bf16 on cuda, fp32 on cpu)", choices=DTYPES
    )
    device: str | None = _opt(None, "cuda or cpu (default: cuda when available)", choices=DEVICES)
    context_length: int | None = _opt(None, "max tokens per request (default: the model's)")
    json_model_override_args: str | None = _opt(
        None,
        "a JSON object whose keys replace the model config's, e.g. YaRN for Qwen3 past 32K: "
        '\'{"rope_scaling": {"rope_type": "yarn", "factor": 4.0, '
        '"original_max_position_embeddings": 32768}}\' with --context-length 131072',
    )
    skip_tokenizer_init: bool = _opt(False, "take and return token ids only")
    chat_template: str | None = _opt(
        None, "the chat template to use instead of the tokenizer's: a file, or the Jinja text"
    )
    random_seed: int = _opt(0, "seed of dummy weights and of sampling without a request seed")
    served_model_name: str | None = _opt(None, "model name reported by the API")

    # --- memory and batching ---
    page_size: int = _opt(1, "tokens per KV page")
    mem_fraction_static: float | None = _opt(
        None, "fraction of GPU memory for weights and KV pool (default 0.85)"
    )
    max_total_tokens: int | None = _opt(
        None, "size of the GPU KV pool in tokens (overrides memory)"
    )
    max_running_requests: int = _opt(256, "requests decoded at once")
    max_queued_requests: int = _opt(4096, "waiting requests before new ones are refused")
    chunked_prefill_size: int = _opt(8192, "max prompt tokens per prefill step (-1: no chunking)")
    max_prefill_tokens: int = _opt(16384, "max new tokens in one prefill batch")
    schedule_policy: str = _opt(
        "fcfs",
        "order in which waiting requests are admitted: fcfs, or lpm (longest cached prefix "
        "first, GPU and L2, arrival order among equals; as SGLang's, first come first served "
        "while more than 128 wait)",
        choices=SCHEDULE_POLICIES,
    )
    disable_radix_cache: bool = _opt(False, "do not reuse prefixes across requests")

    # --- hierarchical cache ---
    enable_hierarchical_cache: bool = _opt(False, "back the GPU prefix cache with an L2 tier")
    hicache_ratio: float = _opt(2.0, "L2 size as a multiple of the GPU KV pool")
    hicache_size: float = _opt(0, "L2 size in GB (1e9 bytes); overrides --hicache-ratio")
    hicache_write_policy: str = _opt(
        "write_through", "when L2 copies are made", choices=WRITE_POLICIES
    )
    hicache_io_backend: str = _opt(
        "auto",
        "how pages move between tiers: kernel (a Triton copy kernel) or direct (copy-engine "
        "batches); auto: direct for dram, kernel for peer, xmem and the page_first layout",
        choices=IO_BACKENDS,
    )
    hicache_mem_layout: str = _opt("layer_first", "layout of the L2 buffer", choices=MEM_LAYOUTS)
    hicache_tier: str = _opt("dram", "what backs the L2 tier", choices=TIERS)
    hicache_use_xmem: bool | None = _opt(
        None, "alias: --hicache-use-xmem = --hicache-tier xmem; --no-... = dram", kind="bool_opt"
    )
    hicache_xmem_banks: str | None = _opt(None, "comma-separated X-Mem bank ids (default: all)")
    hicache_peer_devices: str | None = _opt(
        None, "comma-separated GPU ids for the peer tier (default: every other visible GPU)"
    )

    # --- runner ---
    attention_backend: str = _opt(
        "auto", "auto: triton on cuda, torch on cpu", choices=ATTENTION_BACKENDS
    )
    prefill_attention_backend: str = _opt(
        "auto",
        "full 4096-token-aligned prefill chunks with the triton backend: cudnn "
        "(dense fused attention over gathered KV), triton (the paged kernel); auto: cudnn on "
        "Hopper or newer in bf16/fp16",
        choices=PREFILL_ATTENTION_BACKENDS,
    )
    triton_attention_num_kv_splits: int = _opt(
        64,
        "most KV splits of one sequence in the triton backend's decode attention (as SGLang's "
        "flag); the split heuristic fills the GPU up to it",
    )
    disable_cuda_graph: bool = _opt(False, "run without CUDA graphs (decode and piecewise)")
    disable_overlap_schedule: bool = _opt(
        False,
        "run each decode step to the end before scheduling the next (by default the next decode "
        "step is launched, its input the previous step's tokens on the GPU, while the host "
        "processes the previous step's results)",
    )
    cuda_graph_max_bs: int = _opt(160, "largest decode batch captured in a CUDA graph")
    piecewise_cuda_graph_max_tokens: int = _opt(
        2048, "largest extend step (new tokens) run through per-layer CUDA graphs; 0: none"
    )

    # --- server ---
    skip_server_warmup: bool = _opt(
        False,
        "start without the warm-up (short and, on CUDA, long prompts; prefill attention shapes): "
        "first requests then compile kernels. Also read by the in-process Engine on CUDA",
    )
    host: str = _opt("127.0.0.1", "HTTP bind address")
    port: int = _opt(30000, "HTTP port")
    api_key: str | None = _opt(
        None, "require 'Authorization: Bearer KEY' on every endpoint but /health"
    )
    max_request_body_bytes: int = _opt(32 * 1024 * 1024, "largest accepted HTTP request body")
    tool_call_parser: str | None = _opt(
        None,
        "answer chat requests that carry tools with OpenAI tool_calls parsed from the output: "
        "qwen25 (SGLang's name) or hermes (vLLM's), the <tool_call>{JSON}</tool_call> format of "
        "Qwen2.5 / Qwen3 models; without it such requests are refused",
        choices=TOOL_CALL_PARSERS,
    )
    reasoning_parser: str | None = _opt(
        None,
        "return a reasoning model's thinking (<think>...</think>) as reasoning_content in chat "
        "completions: qwen3 (the output opens with <think> when the model thinks) or "
        "qwen3-thinking (the template opened it: Qwen3 Thinking-2507 models)",
        choices=REASONING_PARSERS,
    )
    responses_store_size: int = _opt(
        256,
        "responses of /v1/responses kept in the API process (most recent first; 0: none) for "
        "previous_response_id and GET /v1/responses/{id}; lost on restart",
    )
    log_level: str = _opt("info", "logging level", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        self._resolve_defaults()
        self._validate()

    def model_overrides(self) -> dict[str, Any] | None:
        """``--json-model-override-args`` parsed (None when not given)."""
        if self.json_model_override_args is None:
            return None
        try:
            value = json.loads(self.json_model_override_args)
        except json.JSONDecodeError as e:
            raise ServerArgsError(f"--json-model-override-args is not valid JSON: {e}") from e
        if not isinstance(value, dict):
            raise ServerArgsError(
                f"--json-model-override-args must be a JSON object; got {type(value).__name__}"
            )
        return value

    # ------------------------------------------------------------------ resolution
    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _resolve_defaults(self) -> None:
        if self.device is None:
            import torch

            self._set("device", "cuda" if torch.cuda.is_available() else "cpu")
        if self.mem_fraction_static is None:
            self._set("mem_fraction_static", 0.85)
        if self.hicache_use_xmem is not None:
            # The seed's boolean is an exact alias; it wins over --hicache-tier only when the two
            # disagree in a way the user could not have meant both (checked in _validate).
            tier = "xmem" if self.hicache_use_xmem else "dram"
            if self.hicache_tier not in ("dram", tier):
                raise ServerArgsError(
                    f"--hicache-use-xmem={self.hicache_use_xmem} contradicts "
                    f"--hicache-tier {self.hicache_tier}"
                )
            self._set("hicache_tier", tier)
        if self.enable_hierarchical_cache:
            self._resolve_hicache_combination()

    def _resolve_hicache_combination(self) -> None:
        # SGLang pairs the IO backend with the layout: `direct` copies whole runs and cannot use
        # the token-interleaved page_first layout; `kernel` reads page_first_direct fine but SGLang
        # switches it to page_first. We follow it and say so.
        layout, backend = self.hicache_mem_layout, self.hicache_io_backend
        if backend == "direct" and layout == "page_first":
            logger.warning(
                "--hicache-io-backend direct does not support --hicache-mem-layout page_first; "
                "using page_first_direct"
            )
            self._set("hicache_mem_layout", "page_first_direct")
        elif backend == "kernel" and layout == "page_first_direct":
            logger.warning(
                "--hicache-mem-layout page_first_direct pairs with --hicache-io-backend direct; "
                "using page_first with the kernel backend"
            )
            self._set("hicache_mem_layout", "page_first")

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ServerArgsError(
                    f"{_flag(f.name)} must be one of {', '.join(choices)}; got {value!r}"
                )

        def positive(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ServerArgsError(f"{_flag(name)} must be a positive integer; got {v!r}")

        if not self.model_path:
            raise ServerArgsError("--model-path must not be empty")
        self.model_overrides()  # raises on a bad --json-model-override-args
        positive("page_size")
        positive("max_running_requests")
        positive("max_queued_requests")
        positive("max_prefill_tokens")
        positive("max_total_tokens", allow_none=True)
        positive("context_length", allow_none=True)
        positive("cuda_graph_max_bs")
        positive("triton_attention_num_kv_splits")
        if (
            not isinstance(self.piecewise_cuda_graph_max_tokens, int)
            or isinstance(self.piecewise_cuda_graph_max_tokens, bool)
            or self.piecewise_cuda_graph_max_tokens < 0
        ):
            raise ServerArgsError(
                "--piecewise-cuda-graph-max-tokens must be a non-negative integer; "
                f"got {self.piecewise_cuda_graph_max_tokens!r}"
            )
        positive("max_request_body_bytes")
        if (
            not isinstance(self.responses_store_size, int)
            or isinstance(self.responses_store_size, bool)
            or self.responses_store_size < 0
        ):
            raise ServerArgsError(
                "--responses-store-size must be a non-negative integer; "
                f"got {self.responses_store_size!r}"
            )
        if self.page_size & (self.page_size - 1):
            raise ServerArgsError(f"--page-size must be a power of two; got {self.page_size}")
        if self.chunked_prefill_size != -1 and not (
            isinstance(self.chunked_prefill_size, int) and self.chunked_prefill_size >= 1
        ):
            raise ServerArgsError(
                "--chunked-prefill-size must be a positive integer or -1 (no chunking); "
                f"got {self.chunked_prefill_size!r}"
            )
        if not 0.0 < float(self.mem_fraction_static) < 1.0:
            raise ServerArgsError(
                f"--mem-fraction-static must be in (0, 1); got {self.mem_fraction_static}"
            )
        if self.hicache_ratio <= 0:
            raise ServerArgsError(f"--hicache-ratio must be > 0; got {self.hicache_ratio}")
        if self.hicache_size < 0:
            raise ServerArgsError(f"--hicache-size must be >= 0 (GB); got {self.hicache_size}")
        if not 0 < self.port < 65536:
            raise ServerArgsError(f"--port must be in 1..65535; got {self.port}")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ServerArgsError("--device cuda was asked for but no CUDA device is visible")
        for name in ("hicache_xmem_banks", "hicache_peer_devices"):
            v = getattr(self, name)
            if v is not None:
                try:
                    ids = [int(x) for x in v.split(",") if x.strip()]
                except ValueError:
                    ids = []
                if not ids or any(i < 0 for i in ids):
                    raise ServerArgsError(
                        f"{_flag(name)} must be a comma-separated list of ids >= 0; got {v!r}"
                    )

    # ------------------------------------------------------------------ derived
    @property
    def chunk_size(self) -> int | None:
        """Prefill chunk in tokens, or None when chunking is off."""
        return None if self.chunked_prefill_size == -1 else self.chunked_prefill_size

    @staticmethod
    def parse_ids(value: str | None) -> list[int] | None:
        return None if value is None else [int(x) for x in value.split(",") if x.strip()]

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ argparse
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            meta = f.metadata
            names = [_flag(f.name), *meta.get("aliases", ())]
            kwargs: dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
            annotation = str(f.type)
            if meta.get("kind") == "bool_opt":
                kwargs["action"] = argparse.BooleanOptionalAction
                kwargs["default"] = f.default
            elif annotation.startswith("bool"):
                kwargs["action"] = "store_true"
                kwargs["default"] = f.default
            else:
                if "int" in annotation:
                    kwargs["type"] = int
                elif "float" in annotation:
                    kwargs["type"] = float
                else:
                    kwargs["type"] = str
                kwargs["default"] = f.default
                if meta.get("choices"):
                    kwargs["choices"] = meta["choices"]
            parser.add_argument(*names, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ServerArgs:
        """Build from Engine keyword arguments; an unknown keyword is an error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ServerArgsError(
                f"unknown engine argument(s): {', '.join(unknown)} "
                f"(see kvtier.ServerArgs for the accepted names)"
            )
        return cls(**kwargs)
