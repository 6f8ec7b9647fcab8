"""Reasoning in generated text, for ``--reasoning-parser``: Qwen3-style models think between
``<think>`` and ``</think>`` before they answer; the chat API returns the thinking as
``reasoning_content`` and the rest as ``content`` (SGLang's and vLLM's field).

Two modes, as the model's chat template decides where thinking starts:

- ``qwen3``: the output opens with ``<think>`` when the model thinks (hybrid Qwen3 models, whose
  template lets them think or not); an output that does not open with it is all content.
- ``qwen3-thinking``: the template already wrote ``<think>`` into the prompt (the Thinking-2507
  models), so the output starts inside the thinking; ``</think>`` ends it.

An output that never closes its thinking (cut by the token limit) is all reasoning. The
streaming parser holds back only what may still be one of the tags.
"""

from __future__ import annotations

from kvtier.server.text_stream import held_prefix, run

START = "<think>"
END = "</think>"
# The names --reasoning-parser accepts (server_args.REASONING_PARSERS, kept equal by a test).
MODES = ("qwen3", "qwen3-thinking")


class ReasoningParser:
    """Feed text pieces in order; ``feed`` returns ``(reasoning, content)`` now known;
    ``finish`` what was held back. Whitespace around the thinking (the newlines the model
    writes inside the tags and after ``</think>``) is dropped."""

    def __init__(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"reasoning parser must be one of {', '.join(MODES)}; got {mode!r}")
        # "start": the output's opening not yet known; "think_start": just after <think>;
        # "think"; "answer_start": just after </think>; "answer". Leading whitespace is
        # dropped in the *_start states.
        self._state = "think_start" if mode == "qwen3-thinking" else "start"
        self._buf = ""
        self.thought = self._state == "think_start"  # whether the output has a thinking part

    def feed(self, piece: str) -> tuple[str, str]:
        text = self._buf + piece
        self._buf = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            if self._state == "start":
                stripped = text.lstrip()
                if stripped.startswith(START):
                    self._state = "think_start"
                    self.thought = True
                    text = stripped[len(START) :]
                elif START.startswith(stripped):  # still maybe the opening tag
                    self._buf = text
                    break
                else:
                    self._state = "answer"
            elif self._state in ("think_start", "answer_start"):
                text = text.lstrip()
                if text:
                    self._state = "think" if self._state == "think_start" else "answer"
            elif self._state == "think":
                end = text.find(END)
                if end < 0:
                    # Held: a possible closing tag, and trailing whitespace (it may be the
                    # newline before the tag).
                    keep = held_prefix(text, END)
                    body = text[: len(text) - keep]
                    keep += len(body) - len(body.rstrip())
                    reasoning.append(text[: len(text) - keep])
                    self._buf = text[len(text) - keep :]
                    break
                reasoning.append(text[:end].rstrip())
                text = text[end + len(END) :]
                self._state = "answer_start"
            else:
                content.append(text)
                break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        rest, self._buf = self._buf, ""
        if self._state in ("think", "think_start"):
            return rest.rstrip(), ""
        return "", rest


def split(text: str, mode: str) -> tuple[str | None, str]:
    """A finished text's (reasoning, content); reasoning None when the model did not think."""
    parser = ReasoningParser(mode)
    reasoning, content = run(parser, text, finished=True)
    return (reasoning if parser.thought else None), content


__all__ = ["END", "MODES", "START", "ReasoningParser", "split"]
