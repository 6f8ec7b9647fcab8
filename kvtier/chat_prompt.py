"""Chat prompts to token ids: the tokenizer's chat template (``chat_ids``), then the rendered
text tokenized piece by piece, with the pieces a conversation repeats cached
(``SegmentEncoder``). Shared by the server's chat API and ``Engine.chat``.

A coding agent sends its whole conversation every turn: tens of thousands of tokens of which
only the last messages are new. Tokenizing it all again is host time before the first token
(on this project's CPU, 57-78 ms for a 23K-token prompt; ~4x that at 80K), next to a GPU hit of
a few milliseconds. A Hugging Face fast tokenizer first splits its input at its added tokens
(``<|im_start|>``, ``<|im_end|>``...) and encodes each stretch between them on its own; the
chat template puts such tokens around every message. So ``SegmentEncoder.encode`` splits the
rendered prompt at the added tokens itself, encodes each stretch (a message, mostly) once and
keeps its ids: a later prompt that repeats the stretch takes them from the cache, and the ids
of the whole prompt are those the tokenizer gives for it.

That equality holds when every added token is matched as written (no ``lstrip`` / ``rstrip``
/ ``single_word``, not normalized) and the pre-tokenizer treats each stretch alike wherever it
stands (not so for a SentencePiece-style ``Metaspace`` that prepends only to the first). The
encoder checks both when it is built (the flags, then probes that mix added tokens with
spaces, newlines, non-ASCII and the vocabulary's own words, whole against piecewise) and
otherwise encodes the whole text, as without it. The cache holds stretches of at least
``min_chars`` characters (shorter ones cost less to encode than to look up), ``max_chars``
characters in all (16M by default: with their ids as 4-byte integers, some 30-100 MB),
least recently used out first; a lock makes it safe from several threads.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import OrderedDict
from typing import Any

# Texts the probe encodes whole and piecewise; {0} / {1} are two added tokens.
_PROBE = (
    "{0}system\nYou are a helpful assistant.{1}\n{0}user\n  leading spaces\tand tabs{1}",
    "{0}{1}{0} x{1}y \n\n{0}\u00e9t\u00e9 \u4f60\u597d \U0001f600{1}  trailing  ",
    "def f(a, b):\n    return a <{0}> b{1}\n\n\n{0}assistant\n",
    " {0}\n{1} ",
)


class SegmentEncoder:
    """``encode(text)`` equals ``tokenizer.encode(text, add_special_tokens=False)``; see the
    module docstring. ``enabled`` is False where the tokenizer's splitting cannot be relied on
    (then every call encodes the whole text)."""

    def __init__(self, tokenizer: Any, min_chars: int = 256, max_chars: int = 16 << 20) -> None:
        self.tokenizer = tokenizer
        self.min_chars = min_chars
        self.max_chars = max_chars
        # Ids as int32 arrays: 4 bytes a token (a list would hold ~36).
        self._cache: OrderedDict[str, array] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._ids: dict[str, int] = {}
        self._split: re.Pattern[str] | None = None
        self._frame: tuple[list[int], list[int]] | None = None  # see _special_frame
        self.enabled = self._setup()

    def _setup(self) -> bool:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return False
        added = backend.get_added_tokens_decoder()
        for tok in added.values():
            if tok.lstrip or tok.rstrip or tok.single_word or tok.normalized:
                return False
        if len(added) < 2:
            return False
        self._ids = {tok.content: i for i, tok in added.items()}
        # Longest first: at each position the longest added token wins, as in the tokenizer.
        words = sorted(self._ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(w) for w in words) + ")")
        a, b = sorted(self._ids, key=lambda w: self._ids[w])[:2]
        probes = [p.format(a, b) for p in _PROBE] + self._vocab_probes(a, b)
        for text in probes:
            if self._piecewise(text, cache=False) != self._whole(text):
                self._split = None
                return False
        self._frame = self._special_frame(probes)
        return True

    def _special_frame(self, probes: list[str]) -> tuple[list[int], list[int]] | None:
        """The ids ``add_special_tokens=True`` puts before and after a text (a BOS, say), when
        they are the same for every probe; None otherwise."""
        frame = None
        for text in probes:
            bare = self._whole(text)
            full = list(self.tokenizer.encode(text, add_special_tokens=True))
            for start in range(len(full) - len(bare) + 1):
                if full[start : start + len(bare)] == bare:
                    break
            else:
                return None
            this = (full[:start], full[start + len(bare) :])
            if frame is None:
                frame = this
            elif this != frame:
                return None
        return frame

    def _vocab_probes(self, a: str, b: str) -> list[str]:
        """Probes made of the vocabulary's own tokens, so that a difference in how a stretch
        begins (a prefix space added to the first stretch only, say) changes the ids instead
        of vanishing into unknown tokens."""
        vocab = self.tokenizer.get_vocab()
        words = []
        for i in sorted(vocab.values())[:64]:
            word = self.tokenizer.decode([i])
            if word.strip() and word not in self._ids:
                words.append(word)
        if len(words) < 4:
            return []
        w = words
        return [
            f"{w[0]}{a}{w[1]}",
            f"{a}{w[2]} {w[3]}{b}{w[0]}\n",
            f" {w[1]}{a}  {w[2]}{b} {w[3]}",
            f"{w[3]}\n{b}\n{w[2]}{a}{w[1]}{w[0]}",
        ]

    def _whole(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """``tokenizer.encode(text, add_special_tokens=...)``'s ids."""
        if add_special_tokens:
            if not self.enabled or self._frame is None:
                return list(self.tokenizer.encode(text, add_special_tokens=True))
            before, after = self._frame
            return before + self._piecewise(text, cache=True) + after
        if not self.enabled:
            return self._whole(text)
        return self._piecewise(text, cache=True)

    def _piecewise(self, text: str, cache: bool) -> list[int]:
        assert self._split is not None
        ids: list[int] = []
        # re.split with a group: stretches at even positions, added tokens at odd ones.
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._ids[part])
            elif part:
                ids.extend(self._stretch(part) if cache else self._whole(part))
        return ids

    def _stretch(self, part: str) -> list[int] | array:
        if len(part) < self.min_chars:
            return self._whole(part)
        with self._lock:
            hit = self._cache.get(part)
            if hit is not None:
                self._cache.move_to_end(part)
                self.hits += 1
                return hit
            self.misses += 1
        ids = self._whole(part)
        if len(part) <= self.max_chars:
            with self._lock:
                if part not in self._cache:
                    self._cache[part] = array("i", ids)
                    self._chars += len(part)
                while self._chars > self.max_chars:
                    old, _ = self._cache.popitem(last=False)
                    self._chars -= len(old)
        return ids


class ChatTemplateError(ValueError):
    """A conversation the chat template cannot render (the message says why)."""


NO_TEMPLATE = "the model's tokenizer has no chat template"
# Template variables a request's chat_template_kwargs may not override.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "tokenize", "add_generation_prompt"})


def chat_ids(
    tokenizer: Any,
    encoder: SegmentEncoder,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    *,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = False,
) -> list[int]:
    """The conversation through the tokenizer's chat template, with the tools' definitions
    (OpenAI's objects) where given and (``add_generation_prompt``) the generation prompt,
    tokenized by ``encoder`` (the template writes every special token; ``add_special_tokens``
    adds the tokenizer's own, e.g. a BOS, as its encode would). ``template_kwargs`` are the
    template's own variables (e.g. Qwen3's enable_thinking). ChatTemplateError says what is
    wrong."""
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    clash = sorted(RESERVED_TEMPLATE_KWARGS & set(template_kwargs or {}))
    if clash:
        raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(clash)}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError(NO_TEMPLATE)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **(template_kwargs or {}),
        )
    except Exception as e:  # the template itself may reject a conversation
        raise ChatTemplateError(f"the chat template rejected the messages: {e}") from e
    return encoder.encode(text, add_special_tokens=add_special_tokens)


__all__ = [
    "NO_TEMPLATE",
    "RESERVED_TEMPLATE_KWARGS",
    "ChatTemplateError",
    "SegmentEncoder",
    "chat_ids",
]
