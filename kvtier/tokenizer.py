"""Tokenizers: Hugging Face fast tokenizers read from local files only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kvtier.models.builtin import builtin_dir, is_builtin

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_BUILTIN = "builtin:tiny-qwen3"


class TokenizerNotFoundError(FileNotFoundError):
    """No tokenizer files for the given path or model name."""


def builtin_tokenizer_dir(name: str = DEFAULT_BUILTIN) -> Path:
    """Directory of a builtin model's tokenizer.json / tokenizer_config.json."""
    return builtin_dir(name)


def tokenizer_dir_for(path_or_name: str | Path) -> Path:
    """Where the tokenizer of a builtin name, a directory, or a resolvable model name lives."""
    s = str(path_or_name)
    if is_builtin(s):
        return builtin_dir(s)
    if Path(s).expanduser().is_dir():
        return Path(s).expanduser()
    from kvtier.models.loader import resolve_model

    resolved = resolve_model(s)
    if resolved.tokenizer_dir is None:
        raise TokenizerNotFoundError(
            f"no tokenizer files for {s!r} (bundled names ship only a config.json); pass "
            "--tokenizer-path DIR or --skip-tokenizer-init"
        )
    return resolved.tokenizer_dir


def load_tokenizer(path_or_dir: str | Path) -> PreTrainedTokenizerBase:
    """A fast tokenizer (``AutoTokenizer``, local files only: never a network call) for a
    builtin name (``builtin:tiny-qwen3``), a directory, or a model name resolve_model knows."""
    from transformers import AutoTokenizer

    d = tokenizer_dir_for(path_or_dir)
    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except OSError as e:
        raise TokenizerNotFoundError(f"cannot load a tokenizer from {str(d)!r}: {e}") from e
