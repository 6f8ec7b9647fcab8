"""Incremental detokenization and stop-string matching."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtier.scheduler.request import Req

# Decoding re-reads this many tokens before the new ones so that merges across the boundary
# (byte-level BPE pieces of one character) come out right.
_CONTEXT_TOKENS = 6


class Detokenizer:
    """Turns each request's new output ids into new text.

    Keeps, per request, an offset into the output ids; decodes a short window before it together
    with the new ids and keeps only the text after the window's own decoding. A trailing
    replacement character means an incomplete UTF-8 sequence: the text is held back until the
    next token completes it.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._read_offset: dict[str, int] = {}
        self._decode: Callable[[list[int], bool], str] = lambda ids, skip: tokenizer.decode(
            ids, skip_special_tokens=skip
        )
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            # A fast tokenizer without space clean-up decodes exactly as its Rust backend does;
            # calling the backend directly skips ~3/4 of the per-call cost, paid twice per
            # request per decode step in the scheduler's loop.
            self._decode = lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)

    def update(self, req: Req) -> None:
        """Append the text of ``req``'s not yet decoded output ids to ``req.output_text``."""
        if self.tokenizer is None:
            return
        ids = req.output_ids
        read = self._read_offset.get(req.rid, 0)
        if read >= len(ids):
            return
        start = max(0, read - _CONTEXT_TOKENS)
        skip = req.sampling.skip_special_tokens
        before = self._decode(ids[start:read], skip)
        full = self._decode(ids[start:], skip)
        if full.endswith("\ufffd") and not req.finished:
            return
        req.output_text += full[len(before) :]
        self._read_offset[req.rid] = len(ids)

    def forget(self, rid: str) -> None:
        self._read_offset.pop(rid, None)


def find_stop_string(req: Req, searched_from: int) -> tuple[str, int] | None:
    """The first stop string in ``req.output_text`` that ends after ``searched_from``, and the
    index where it starts."""
    text = req.output_text
    best: tuple[str, int] | None = None
    for stop in req.sampling.stop:
        pos = text.find(stop, max(0, searched_from - len(stop) + 1))
        if pos != -1 and (best is None or pos < best[1]):
            best = (stop, pos)
    return best


def stop_prefix_overlap(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
