"""Models that ship with the package: a config, a tokenizer, and no weights.

``builtin:tiny-qwen3`` is a Qwen3 of ~3M parameters whose weights are generated from the seed at
load time (the ``dummy`` load format), with a small byte-level BPE tokenizer and a ChatML chat
template. It lets the whole engine (tokenizer, scheduler, cache tiers, server) run anywhere, fast;
its output is gibberish.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "builtin:"
_BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"

# builtin name -> directory with config.json, tokenizer.json, tokenizer_config.json
BUILTIN_MODELS: dict[str, Path] = {"builtin:tiny-qwen3": _BUILTIN_DIR}


def is_builtin(name: str) -> bool:
    """Whether ``name`` uses the builtin: scheme (known or not)."""
    return name.startswith(BUILTIN_PREFIX)


def builtin_dir(name: str) -> Path:
    """The data directory of a builtin model; ValueError naming the known ones otherwise."""
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"unknown builtin model {name!r}; builtin models: {', '.join(sorted(BUILTIN_MODELS))}"
        )
    return BUILTIN_MODELS[name]
