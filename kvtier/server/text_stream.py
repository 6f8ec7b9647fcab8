"""What the stream parsers of generated text (tool calls, reasoning) share: each takes text
pieces in order through ``feed(piece) -> (a, b)`` and gives back what it held at the end
through ``finish() -> (a, b)``, both pairs of concatenable parts."""

from __future__ import annotations

from typing import Any, Protocol


class TextStreamParser(Protocol):
    def feed(self, piece: str) -> tuple[Any, Any]: ...

    def finish(self) -> tuple[Any, Any]: ...


def held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``: those
    characters may begin the tag and are held back until the next piece."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def run(parser: TextStreamParser, piece: str, finished: bool) -> tuple[Any, Any]:
    """``parser.feed(piece)``, and on the last piece what ``finish`` gives back joined to it."""
    a, b = parser.feed(piece)
    if finished:
        a2, b2 = parser.finish()
        a, b = a + a2, b + b2
    return a, b


__all__ = ["TextStreamParser", "held_prefix", "run"]
