"""Calls forced by ``tool_choice``: "required" or a named function.

Such a request is served by constraining the output (``forced_schema``: a JSON schema for the
scheduler's structured output) to JSON that is the calls themselves, as vLLM does: a named
function's arguments object, or for "required" a list of ``{"name", "parameters"}`` objects.
No tool-call parser is needed. ``ForcedCallParser`` reads the calls when the output ends;
streamed, ``IncrementalForcedCall`` and ``IncrementalRequiredCalls`` send each call as it is
written (announced with its name, its arguments re-serialised piece by piece, as
``tool_parser.IncrementalToolParser`` sends the model's own calls).
"""

from __future__ import annotations

import re
from typing import Any

from kvtier.server.tool_parser import (
    HEADER_LIMIT,
    NOT_JSON,
    ArgumentStream,
    CallDelta,
    ToolCall,
    json_string,
    make_call,
    new_call_id,
    read_json,
)


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
        self.calls: list[ToolCall] = []  # set when the output ends
        self._buf: list[str] = []

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        self._buf.append(piece)
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, self.calls = self._read("".join(self._buf))
        self._buf = []
        return content, list(self.calls)

    def _read(self, text: str) -> tuple[str, list[ToolCall]]:
        value = read_json(text)
        if value is NOT_JSON:
            return text, []
        if self.name is not None:
            return ("", [make_call(self.name, value)]) if isinstance(value, dict) else (text, [])
        if not isinstance(value, list):
            return text, []
        calls = [
            make_call(c["name"], c["parameters"])
            for c in value
            if isinstance(c, dict)
            and isinstance(c.get("name"), str)
            and isinstance(c.get("parameters"), dict)
        ]
        return ("", calls) if calls and len(calls) == len(value) else (text, [])


class IncrementalForcedCall:
    """The stream parser of a call forced by name (``tool_choice`` naming a function): the
    whole output is the call's arguments (constrained to the function's parameters), so the
    call is announced with the first piece and its arguments follow as they are written,
    re-serialised as ``IncrementalToolParser`` does. Output that stops being JSON (cut by the
    token limit) ends the call as sent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[ToolCall] = []
        self._id = new_call_id()
        self._args = ArgumentStream(0)
        self._announced = False

    def feed(self, piece: str) -> tuple[str, list[CallDelta]]:
        deltas = []
        if not self._announced:
            self._announced = True
            deltas.append(CallDelta(0, "", self._id, self.name))
        self._args.feed(piece, deltas)
        return "", deltas

    def finish(self) -> tuple[str, list[CallDelta]]:
        self.calls.append(ToolCall(self._id, self.name, self._args.text))
        return "", []


# The start of a forced "required" call (an element of the constrained list): the name, then
# the parameters object's first character; ``[`` before the first element, ``,`` before later.
_ELEMENT = re.compile(
    r'\s*[\[,]\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:\s*\{'
)
_ELEMENT_END = re.compile(r"\s*\}\s*(?=[,\]])")


class IncrementalRequiredCalls:
    """The stream parser of ``tool_choice: "required"``: the output is a JSON list of
    ``{"name", "parameters"}`` objects (``forced_schema``, in that key order), each announced
    once its name is written, its parameters streamed as its arguments (re-serialised as
    ``IncrementalToolParser`` does). Output that stops being that list (cut by the token
    limit) ends the calls as sent; nothing is sent as content. A first element that does not
    begin as expected makes the whole output wait for its end and go through
    ``ForcedCallParser``, as unstreamed."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._buf = ""  # text not yet read: before a call's parameters, or after them
        self._call: tuple[str, str] | None = None
        self._args: ArgumentStream | None = None
        self._broken = False
        self._whole: ForcedCallParser | None = None

    def feed(self, piece: str) -> tuple[str, list[CallDelta]]:
        if self._whole is not None:
            return self._whole.feed(piece)
        deltas: list[CallDelta] = []
        text = self._buf + piece
        self._buf = ""
        while text and not self._broken:
            if self._call is None:
                match = _ELEMENT.match(text)
                name = json_string(match.group(1)) if match is not None else None
                if name is None:
                    if not self.calls and len(text) > HEADER_LIMIT:
                        self._whole = ForcedCallParser(None)
                        return self._whole.feed(text)
                    self._buf = text
                    break
                call_id = new_call_id()
                self._call, self._args = (call_id, name), ArgumentStream(len(self.calls))
                deltas.append(CallDelta(len(self.calls), "", call_id, name))
                text = text[match.end() - 1 :]
            text = self._parameters(text, deltas)
        return "", deltas

    def _parameters(self, text: str, deltas: list[CallDelta]) -> str:
        """Reads a call's parameters, then the end of its object; returns what follows it."""
        assert self._call is not None and self._args is not None
        if not self._args.done:
            self._args.feed(text, deltas)
            self._broken = self._args.broken
            if self._broken or not self._args.done:
                return ""
            text = self._args.take_rest()
        text = self._buf + text
        self._buf = ""
        end = _ELEMENT_END.match(text)
        if end is None:
            # Still a prefix of the element's end ("}" then "," or "]"), or not the list.
            self._broken = text.strip() not in ("", "}")
            self._buf = text
            return ""
        self._end_call()
        return text[end.end() :]

    def _end_call(self) -> None:
        assert self._call is not None and self._args is not None
        call_id, name = self._call
        self.calls.append(ToolCall(call_id, name, self._args.text))
        self._call, self._args = None, None

    def finish(self) -> tuple[str, list[CallDelta]]:
        if self._whole is not None:
            content, calls = self._whole.finish()
            self.calls = list(calls)
            return content, [CallDelta.whole(i, c) for i, c in enumerate(calls)]
        if self._call is not None:
            self._end_call()
        self._buf = ""
        return "", []


__all__ = [
    "ForcedCallParser",
    "IncrementalForcedCall",
    "IncrementalRequiredCalls",
    "forced_schema",
]
