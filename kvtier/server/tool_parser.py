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

``IncrementalToolParser`` is what a streamed chat completion uses: a call whose body begins
``{"name": "...", "arguments": {`` (the order the Qwen chat template asks for) is announced as
soon as its name is complete and its arguments follow as they are written, re-serialised on the
way (``json_stream.CanonicalJson``), so that the pieces join to the arguments ``parse`` gives
for the same text: a long argument (a file's content) streams instead of arriving whole at the
end. Other bodies (another key order, arguments as a JSON string) arrive whole when the block
ends, as ``StreamingToolParser`` sends them. Once a call is announced it stays a call: a body
that stops being JSON after that point ends the call with the arguments sent so far (the rest
of the block is not sent), and a stream cut inside it (the token limit) leaves the call cut
short, with the finish reason ``length``, as OpenAI's stream does.

``tool_choice`` "required" or a named function is served by constraining the output instead
(``forced_calls``).

This is SGLang's ``--tool-call-parser qwen25`` and vLLM's ``--tool-call-parser hermes`` format,
the names ``--tool-call-parser`` takes here (``server_args.TOOL_CALL_PARSERS``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from kvtier.server.json_stream import CanonicalJson, JsonStreamError
from kvtier.server.text_stream import held_prefix, run

START = "<tool_call>"
END = "</tool_call>"


class CallParser(Protocol):
    """What parses a choice's calls: text pieces in (``feed``, then ``finish``), content and
    calls (or ``CallDelta`` pieces of calls) out; ``calls`` the calls completed so far."""

    calls: list[ToolCall]

    def feed(self, piece: str) -> tuple[str, list[Any]]: ...

    def finish(self) -> tuple[str, list[Any]]: ...


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


@dataclass(frozen=True)
class CallDelta:
    """A piece of a streamed call: the call's position among the choice's calls (``index``),
    text to append to its arguments, and on its first piece its id and name."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    @classmethod
    def whole(cls, index: int, call: ToolCall) -> CallDelta:
        return cls(index, call.arguments, call.id, call.name)

    def to_dict(self) -> dict[str, object]:
        """OpenAI's ``delta.tool_calls[i]``: id, type and name only on a call's first piece."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


NOT_JSON = object()


def read_json(text: str) -> Any:
    """``json.loads(text)``, or ``NOT_JSON`` where it fails: not JSON, an integer past
    Python's digit limit (ValueError), nesting past the recursion limit. Model output is
    never trusted to parse."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return NOT_JSON


def json_string(literal: str) -> str | None:
    """The value of a JSON string literal (quotes included), None when it is not one."""
    value = read_json(literal)
    return value if isinstance(value, str) else None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def make_call(name: str, args: dict[str, object]) -> ToolCall:
    return ToolCall(id=new_call_id(), name=name, arguments=json.dumps(args, ensure_ascii=False))


def _call_from_body(body: str) -> ToolCall | None:
    """The call a block's body holds, or None when it is not ``{"name": str, "arguments":
    object or JSON string}`` (``parameters`` accepted for ``arguments``, as some models write)."""
    obj = read_json(body)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = read_json(args)
    if not isinstance(args, dict):
        return None
    return make_call(obj["name"], args)


def content_until_call(text: str, content: list[str], may_open: bool) -> tuple[str | None, str]:
    """Outside a call: the text before the next start tag goes to ``content``. Returns the
    text after that tag and ""; or, where no call starts in ``text``, None and what to hold
    back for the next piece (a possible partial start tag). With ``may_open`` False (the
    calls' limit reached) all of ``text`` is content."""
    if not may_open:
        content.append(text)
        return None, ""
    start = text.find(START)
    if start < 0:
        keep = held_prefix(text, START)
        content.append(text[: len(text) - keep])
        return None, text[len(text) - keep :]
    content.append(text[:start])
    return text[start + len(START) :], ""


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
            body, self._buf = content_until_call(text, content, self._open())
            if body is None:
                break
            end = body.find(END)
            if end < 0:
                self._buf = START + body
                break
            call = _call_from_body(body[:end].strip())
            if call is None:
                content.append(START + body[: end + len(END)])
            else:
                found.append(call)
                self.calls.append(call)
            text = body[end + len(END) :]
        return "".join(content), found

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What was held back, as content (no call completes at the end)."""
        rest, self._buf = self._buf, ""
        return rest, []


# The start of a body whose arguments can stream: the name (a whole JSON string), then the
# arguments object's first character.
_HEADER = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*\{'
)
# Bodies longer than this without that start arrive whole (a name is short).
HEADER_LIMIT = 1024


class ArgumentStream:
    """A streamed call's arguments: the model's JSON text in (``feed``), its canonical pieces
    out as ``CallDelta``s of call ``index``. ``done`` once the arguments' value has ended
    (``rest``: the text after it, taken once); ``broken`` once the text stopped being JSON
    (what parsed of that piece was still sent); ``text`` all that was sent."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.broken = False
        self._json = CanonicalJson()
        self._sent: list[str] = []

    @property
    def done(self) -> bool:
        return self._json.done

    @property
    def text(self) -> str:
        return "".join(self._sent)

    def take_rest(self) -> str:
        rest, self._json.rest = self._json.rest, ""
        return rest

    def feed(self, text: str, deltas: list[CallDelta]) -> None:
        if self.broken or self._json.done:
            return
        try:
            out = self._json.feed(text)
        except JsonStreamError as e:
            out, self.broken = e.partial, True
        if out:
            self._sent.append(out)
            deltas.append(CallDelta(self.index, out))


class IncrementalToolParser:
    """``StreamingToolParser`` for a stream that sends calls as ``CallDelta`` pieces (see the
    module docstring): ``feed`` returns ``(content, deltas)``."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []  # completed calls
        self._buf = ""  # held back: a partial start tag, or a block's body not yet read
        self._in_block = False
        self._whole = False  # this block arrives whole, when it ends
        self._call: tuple[str, str] | None = None  # the announced call's id and name
        self._args: ArgumentStream | None = None  # its arguments
        self._tail = ""  # after the arguments object (or their break): a partial end tag
        self._scanned = 0  # how much of the held body was searched for the end tag

    def _open(self) -> bool:
        return self.max_calls is None or len(self.calls) < self.max_calls

    def feed(self, piece: str) -> tuple[str, list[CallDelta]]:
        text = self._buf + piece
        self._buf = ""
        content: list[str] = []
        deltas: list[CallDelta] = []
        while text:
            if not self._in_block:
                body, self._buf = content_until_call(text, content, self._open())
                if body is None:
                    break
                text = body
                self._in_block, self._whole, self._scanned = True, False, 0
            text = self._block(text, content, deltas)
        return "".join(content), deltas

    def _block(self, text: str, content: list[str], deltas: list[CallDelta]) -> str:
        """Reads ``text`` inside a block; returns what follows the block (empty while it goes
        on)."""
        if self._call is None:
            body = self._buf_body(text)
            # Only the new text can complete the end tag: scan from just before it.
            end = body.find(END, max(0, self._scanned - len(END) + 1))
            self._scanned = len(body)
            match = None if self._whole or end >= 0 else _HEADER.match(body)
            name = json_string(match.group(1)) if match is not None else None
            if name is None:
                if end >= 0:
                    self._end_whole(body[:end], content, deltas)
                    return body[end + len(END) :]
                self._whole = self._whole or match is not None or len(body) > HEADER_LIMIT
                self._buf = body
                return ""
            call_id = new_call_id()
            self._call = (call_id, name)
            self._args = ArgumentStream(len(self.calls))
            deltas.append(CallDelta(len(self.calls), "", call_id, name))
            text = body[match.end() - 1 :]  # from the arguments' "{"
        return self._stream_arguments(text, deltas)

    def _buf_body(self, text: str) -> str:
        body, self._buf = self._buf + text, ""
        return body

    def _stream_arguments(self, text: str, deltas: list[CallDelta]) -> str:
        assert self._args is not None
        # The end tag can only follow the arguments object: look for it in what comes after.
        if not (self._args.broken or self._args.done):
            self._args.feed(text, deltas)
            if not self._args.broken:  # broken: the whole piece goes to the tail below
                text = self._args.take_rest()
        if self._args.broken or self._args.done:
            # Nothing of the tail is sent (it closes the body, or the call broke): only a
            # partial end tag is kept between pieces.
            tail = self._tail + text
            end = tail.find(END)
            if end < 0:
                self._tail = tail[len(tail) - held_prefix(tail, END) :]
                return ""
            self._end_streamed(deltas)
            return tail[end + len(END) :]
        return ""

    def _end_whole(self, body: str, content: list[str], deltas: list[CallDelta]) -> None:
        call = _call_from_body(body.strip())
        if call is None:
            content.append(START + body + END)
        else:
            deltas.append(CallDelta.whole(len(self.calls), call))
            self.calls.append(call)
        self._in_block = False

    def _end_streamed(self, deltas: list[CallDelta]) -> None:
        assert self._call is not None and self._args is not None
        call_id, name = self._call
        self.calls.append(ToolCall(call_id, name, self._args.text))
        self._call, self._args, self._tail = None, None, ""
        self._in_block = False

    def finish(self) -> tuple[str, list[CallDelta]]:
        """What was held back: an unfinished block not yet announced comes back as text; an
        announced one ends as sent (cut short)."""
        rest, self._buf = self._buf, ""
        if not self._in_block:
            return rest, []
        if self._call is None:
            self._in_block = False
            return START + rest, []
        self._end_streamed([])
        return "", []


def parse(
    text: str,
    max_calls: int | None = None,
    parser: CallParser | None = None,
) -> tuple[str | None, list[ToolCall]]:
    """A finished text's content and calls (by ``parser``, default the tag format's). The
    content is what lies outside the parsed calls, stripped of surrounding whitespace when
    there are calls (the model writes newlines around them); None when nothing is left, as
    OpenAI returns it."""
    parser = parser or StreamingToolParser(max_calls)
    content, _ = run(parser, text, finished=True)
    calls = list(parser.calls)
    if calls:
        content = content.strip()
    return (content or None), calls


__all__ = [
    "END",
    "HEADER_LIMIT",
    "NOT_JSON",
    "START",
    "ArgumentStream",
    "CallDelta",
    "CallParser",
    "IncrementalToolParser",
    "StreamingToolParser",
    "ToolCall",
    "content_until_call",
    "json_string",
    "make_call",
    "new_call_id",
    "parse",
    "read_json",
]
