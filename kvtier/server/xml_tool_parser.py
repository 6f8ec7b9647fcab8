"""Tool calls in Qwen3-Coder's XML format (``--tool-call-parser qwen3_coder``).

Qwen3-Coder models (e.g. Qwen3-Coder-30B-A3B-Instruct, the Qwen3-MoE architecture) write a call
as tags, each parameter's value as plain text between newlines (its chat template renders
calls the same way)::

    <tool_call>
    <function=write_file>
    <parameter=path>
    a.py
    </parameter>
    <parameter=content>
    print("hi")
    </parameter>
    </function>
    </tool_call>

``XmlToolParser`` reads that from a stream of text pieces, for a streamed completion and a
finished one alike: a call is announced (``CallDelta`` with its id and name) once its
``<function=...>`` tag is complete, and its arguments, a JSON object, follow as the text comes:
``{"path": `` when a parameter opens, a string value character by character (JSON-escaped; one
newline after the opening tag and one before the closing tag are the template's, not the
value's), any other value once its parameter closes, converted by the type the tool's JSON
schema gives it (integer, number, boolean, null, object or array; text that does not convert
stays a string, as does a parameter the schema does not name). The pieces join to
``json.dumps`` of the parameters (a parameter written twice is sent twice, where the dict keeps
the last). Text outside calls is content; a block that does not begin with a function tag
stays content as written; once announced, a call stays a call, ending with the arguments sent
so far if its text stops following the format or the stream is cut.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kvtier.server.text_stream import held_prefix
from kvtier.server.tool_parser import (
    END,
    START,
    CallDelta,
    ToolCall,
    content_until_call,
    new_call_id,
)

_FUNCTION = re.compile(r"\s*<function=([^>\n]{1,256})>")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]{1,256})>")
_FUNCTION_END = re.compile(r"\s*</function>")
_PARAM_END = "</parameter>"
_NL_PARAM_END = "\n</parameter>"
_STRING_TYPES = frozenset(("string", "str", "text"))


def _param_types(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each function's parameters' JSON schemas, by function name."""
    out = {}
    for tool in tools:
        fn = tool.get("function", {})
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn.get("name")] = props if isinstance(props, dict) else {}
    return out


def _is_string(schema: Any) -> bool:
    """Whether a parameter's value is kept as text: a string type, no type (or an unknown
    parameter)."""
    if not isinstance(schema, dict) or "type" not in schema:
        return True
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return any(k in _STRING_TYPES for k in kinds)


def convert(text: str, schema: Any) -> Any:
    """A non-string parameter's value from its text, by its schema's type (JSON for numbers,
    objects, arrays; ``true`` / ``false`` in any case for a boolean; ``null``); the text itself
    where it does not parse."""
    value = text.strip()
    if value == "null":
        return None
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    if "boolean" in kinds and value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return text
    if "integer" in kinds and isinstance(parsed, float) and parsed.is_integer():
        return int(parsed)
    return parsed


class XmlToolParser:
    """Feed text pieces in order; ``feed`` returns ``(content, deltas)``, ``finish`` what was
    held back. ``calls`` holds the completed calls (arguments as sent). At most ``max_calls``
    calls; later blocks stay content."""

    def __init__(self, tools: list[dict[str, Any]], max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self._types = _param_types(tools)
        self._buf = ""  # text not yet read
        self._state = "outside"  # outside | function | params | value | after | broken
        self._call: tuple[str, str] | None = None
        self._sent: list[str] = []
        self._num_params = 0  # parameters opened in the current call
        self._schema: Any = None  # the open parameter's schema
        self._string = False  # the open parameter's value streams as a JSON string
        self._value_started = False  # past the newline after the parameter's opening tag
        # Each state reads text; it returns the rest, or None to wait for more.
        self._steps = {
            "outside": self._outside,
            "function": self._function,
            "params": self._params,
            "value": self._value,
            "after": self._after,
            "broken": self._after,  # nothing more is sent: only the end tag is looked for
        }

    def _open(self) -> bool:
        return self.max_calls is None or len(self.calls) < self.max_calls

    def feed(self, piece: str) -> tuple[str, list[CallDelta]]:
        text = self._buf + piece
        self._buf = ""
        content: list[str] = []
        deltas: list[CallDelta] = []
        while text:
            rest = self._steps[self._state](text, content, deltas)
            if rest is None:  # waiting for more text
                break
            text = rest
        return "".join(content), deltas

    # -------------------------------------------------------------------------- the states
    def _outside(self, text: str, content: list[str], deltas: list[CallDelta]) -> str | None:
        body, self._buf = content_until_call(text, content, self._open())
        if body is not None:
            self._state = "function"
        return body

    def _function(self, text: str, content: list[str], deltas: list[CallDelta]) -> str | None:
        match = _FUNCTION.match(text)
        if match is None:
            stripped = text.lstrip()
            if ("<function=".startswith(stripped) or stripped.startswith("<function=")) and (
                len(text) <= 300 and END not in text
            ):
                self._buf = text  # the tag may still complete
                return None
            # Not a call: the block as written, once it ends.
            end = text.find(END)
            if end < 0:
                self._buf = text
                return None
            content.append(START + text[: end + len(END)])
            self._state = "outside"
            return text[end + len(END) :]
        name = match.group(1).strip()
        call_id = new_call_id()
        self._call, self._sent, self._num_params = (call_id, name), [], 0
        deltas.append(CallDelta(len(self.calls), "", call_id, name))
        self._state = "params"
        return text[match.end() :]

    def _send(self, out: str, deltas: list[CallDelta]) -> None:
        if out:
            self._sent.append(out)
            deltas.append(CallDelta(len(self.calls), out))

    def _params(self, text: str, content: list[str], deltas: list[CallDelta]) -> str | None:
        match = _PARAMETER.match(text)
        if match is not None:
            key = match.group(1).strip()
            assert self._call is not None
            self._schema = self._types.get(self._call[1], {}).get(key)
            self._string = _is_string(self._schema)
            opening = "{" if self._num_params == 0 else ", "
            self._send(opening + json.dumps(key, ensure_ascii=False) + ": ", deltas)
            self._num_params += 1
            if self._string:
                self._send('"', deltas)
            self._value_started = False
            self._state = "value"
            return text[match.end() :]
        match = _FUNCTION_END.match(text)
        if match is not None:
            self._send("}" if self._num_params else "{}", deltas)
            self._state = "after"
            return text[match.end() :]
        stripped = text.lstrip()
        if any(tag.startswith(stripped) for tag in ("<parameter=", "</function>")) or (
            stripped.startswith("<parameter=") and ">" not in stripped and len(stripped) < 300
        ):
            self._buf = text
            return None
        self._state = "broken"
        return text

    def _value(self, text: str, content: list[str], deltas: list[CallDelta]) -> str | None:
        if not self._value_started:
            if text.startswith("\n"):
                text = text[1:]
            self._value_started = True
        end = text.find(_PARAM_END)
        if end < 0:
            if not self._string:
                self._buf = text
                return None
            # Held back: what may begin the closing tag (with the newline before it).
            keep = max(held_prefix(text, _NL_PARAM_END), held_prefix(text, _PARAM_END))
            self._send(json.dumps(text[: len(text) - keep], ensure_ascii=False)[1:-1], deltas)
            self._buf = text[len(text) - keep :]
            return None
        value = text[:end]
        if value.endswith("\n"):
            value = value[:-1]
        if self._string:
            self._send(json.dumps(value, ensure_ascii=False)[1:-1] + '"', deltas)
        else:
            self._send(json.dumps(convert(value, self._schema), ensure_ascii=False), deltas)
        self._state = "params"
        return text[end + len(_PARAM_END) :]

    def _after(self, text: str, content: list[str], deltas: list[CallDelta]) -> str | None:
        # Between </function> and </tool_call>: nothing of it is sent.
        end = text.find(END)
        if end < 0:
            self._buf = text[len(text) - held_prefix(text, END) :]
            return None
        self._end_call()
        return text[end + len(END) :]

    def _end_call(self) -> None:
        assert self._call is not None
        call_id, name = self._call
        self.calls.append(ToolCall(call_id, name, "".join(self._sent)))
        self._call, self._sent = None, []
        self._state = "outside"

    def finish(self) -> tuple[str, list[CallDelta]]:
        """What was held back: an unannounced block comes back as text; an announced call
        ends as sent."""
        rest, self._buf = self._buf, ""
        if self._state == "outside":
            return rest, []
        if self._state == "function":
            self._state = "outside"
            return START + rest, []
        self._end_call()
        return "", []


__all__ = ["XmlToolParser", "convert"]
