"""Tool calls in generated text, for the OpenAI chat API's ``tools``.

Models of the Qwen2.5 / Qwen3 family (and Hermes-style fine-tunes) call a tool by writing one
JSON object a call between tags::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``parse`` splits a finished text into its content (what lies outside the calls) and the calls;
``StreamingToolParser`` does the same over a stream of text pieces, holding back only what may
still become a call (a possible start tag, or an unfinished call), so that content reaches the
client as it is generated. A block whose body is not a JSON object with a string ``name`` is
left in the content as written: the model's text is never dropped.

``tool_choice`` "required" or a named function is served by constraining the output instead
(``forced_schema``: a JSON schema for the scheduler's structured output) to JSON that is the
calls themselves, as vLLM does: a named function's arguments object, or for "required" a list
of ``{"name", "parameters"}`` objects; ``ForcedCallParser`` reads them when the output ends.

This is SGLang's ``--tool-call-parser qwen25`` and vLLM's ``--tool-call-parser hermes`` format,
the names ``--tool-call-parser`` takes here (``server_args.TOOL_CALL_PARSERS``).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from kvtier.server.text_stream import held_prefix, run

START = "<tool_call>"
END = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: its id (``call_`` + 24 hex digits, as OpenAI's), the function's name,
    and its arguments as a JSON string (what the API returns)."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def make_call(name: str, args: dict[str, object]) -> ToolCall:
    return ToolCall(
        id="call_" + uuid.uuid4().hex[:24],
        name=name,
        arguments=json.dumps(args, ensure_ascii=False),
    )


def _call_from_body(body: str) -> ToolCall | None:
    """The call a block's body holds, or None when it is not ``{"name": str, "arguments":
    object or JSON string}`` (``parameters`` accepted for ``arguments``, as some models write)."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return make_call(obj["name"], args)


class StreamingToolParser:
    """Feed text pieces in order; each ``feed`` returns ``(content, calls)``: the content now
    known to lie outside every call, and the calls completed by this piece. ``finish`` returns
    what was held back (an unfinished call comes back as text). At most ``max_calls`` calls are
    parsed (``parallel_tool_calls=false``: 1); blocks past it stay in the content."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self._buf = ""  # held back: a partial start tag, or a call from its start tag on

    def _open(self) -> bool:
        return self.max_calls is None or len(self.calls) < self.max_calls

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        text = self._buf + piece
        self._buf = ""
        content: list[str] = []
        found: list[ToolCall] = []
        while text:
            if not self._open():
                content.append(text)
                break
            start = text.find(START)
            if start < 0:
                keep = held_prefix(text, START)
                content.append(text[: len(text) - keep])
                self._buf = text[len(text) - keep :]
                break
            end = text.find(END, start + len(START))
            if end < 0:
                content.append(text[:start])
                self._buf = text[start:]
                break
            call = _call_from_body(text[start + len(START) : end].strip())
            stop = end + len(END)
            if call is None:
                content.append(text[:stop])
            else:
                content.append(text[:start])
                found.append(call)
                self.calls.append(call)
            text = text[stop:]
        return "".join(content), found

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What was held back, as content (no call completes at the end)."""
        rest, self._buf = self._buf, ""
        return rest, []


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object"}


def forced_schema(
    tools: list[dict[str, Any]], name: str | None, max_calls: int | None
) -> dict[str, Any]:
    """The JSON schema of a forced call's output (OpenAI tool definitions): the named
    function's parameters, or (``name`` None: "required") a list of 1 to ``max_calls`` calls
    of any of the tools."""
    if name is not None:
        return next(_parameters(t) for t in tools if t["function"]["name"] == name)
    one_of = [
        {
            "type": "object",
            "properties": {"name": {"enum": [t["function"]["name"]]}, "parameters": _parameters(t)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": one_of}, "minItems": 1}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    return schema


class ForcedCallParser:
    """The calls of an output constrained by ``forced_schema``: nothing while it streams (a
    call is only known whole), the calls when it ends; text that does not parse (cut by the
    token limit) comes back as content."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self._buf: list[str] = []

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        self._buf.append(piece)
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        text = "".join(self._buf)
        self._buf = []
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        if self.name is not None:
            return ("", [make_call(self.name, value)]) if isinstance(value, dict) else (text, [])
        calls = [
            make_call(c["name"], c["parameters"])
            for c in value
            if isinstance(c, dict) and isinstance(c.get("parameters"), dict)
        ]
        return ("", calls) if calls and len(calls) == len(value) else (text, [])


def parse(
    text: str,
    max_calls: int | None = None,
    parser: StreamingToolParser | ForcedCallParser | None = None,
) -> tuple[str | None, list[ToolCall]]:
    """A finished text's content and calls (by ``parser``, default the tag format's). The
    content is what lies outside the parsed calls, stripped of surrounding whitespace when
    there are calls (the model writes newlines around them); None when nothing is left, as
    OpenAI returns it."""
    content, calls = run(parser or StreamingToolParser(max_calls), text, finished=True)
    if calls:
        content = content.strip()
    return (content or None), calls


__all__ = [
    "END",
    "START",
    "ForcedCallParser",
    "StreamingToolParser",
    "ToolCall",
    "forced_schema",
    "make_call",
    "parse",
]
