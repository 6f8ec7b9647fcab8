"""Incremental JSON re-serialisation, for streaming a tool call's arguments as they are written.

``CanonicalJson`` takes the text of one JSON value in pieces and gives back, piece by piece,
the text ``json.dumps(json.loads(text), ensure_ascii=False)`` would produce (separators
``", "`` and ``": "``, no other whitespace, strings re-escaped, numbers as Python writes them),
as far as the pieces so far determine it: a string's characters as they come, a number or a
literal once it ends. So the pieces of a streamed value join to what the whole value gives,
whatever the model's spacing (the only difference: an object with a repeated key keeps every
occurrence, where ``json.loads`` keeps the last). Text past the value's end is kept in
``rest``, not read. The grammar is ``json.loads``'s (strict: no raw control characters in strings;
NaN and the infinities taken, as it takes them); anything else raises ``JsonStreamError`` where
the text stops being JSON (at the end of a bad number or literal).
"""

from __future__ import annotations

import json
import re

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
# json.loads also takes NaN and the infinities (and json.dumps writes them).
_LITERALS = frozenset(("true", "false", "null", "NaN", "Infinity", "-Infinity"))
_WHITESPACE = frozenset(" \t\n\r")
# Characters a string holds as they are, in json.loads' input and json.dumps' output alike.
_PLAIN = re.compile(r'[^"\\\x00-\x1f\ud800-\udfff]+')
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                   "t": "\t"}  # fmt: skip


class JsonStreamError(ValueError):
    """The text stopped being one JSON value. ``partial``: the canonical text the failing
    ``feed`` had produced before the error (its earlier characters were fine)."""

    partial = ""


def _dump_char(ch: str) -> str:
    return json.dumps(ch, ensure_ascii=False)[1:-1]


class CanonicalJson:
    """Feed one JSON value's text in pieces; ``feed`` returns the canonical text those pieces
    complete (see the module docstring). ``done`` once the value has ended; ``rest`` holds the
    text after it."""

    def __init__(self) -> None:
        # Open containers, innermost last: "{" or "[", with how many members each has so far.
        self._stack: list[list[str | int]] = []
        # What comes next: "value", "key" (after a comma in an object), "key_or_end" (after
        # "{"), "value_or_end" (after "["), "colon", "comma_or_end".
        self._expect = "value"
        self._token = ""  # a number or literal being read
        self._in_string = False
        self._is_key = False
        self._escape: str | None = None  # after a backslash: "" or "u" plus hex digits
        self._high: str | None = None  # a high surrogate waiting for its low half
        self.done = False
        self.rest = ""

    def feed(self, text: str) -> str:
        out: list[str] = []
        i, n = 0, len(text)
        try:
            while i < n:
                if self.done:
                    self.rest += text[i:]
                    break
                if self._in_string and self._escape is None:
                    # A run of plain characters inside a string: json.dumps writes them as
                    # they are (ensure_ascii=False escapes only quotes, backslashes and
                    # control characters).
                    run = _PLAIN.match(text, i)
                    if run is not None:
                        self._flush_high(out)
                        out.append(run.group())
                        i = run.end()
                        continue
                self._char(text[i], out)
                i += 1
        except JsonStreamError as e:
            e.partial = "".join(out)
            raise
        return "".join(out)

    def close(self) -> str:
        """The end of the text: a top-level number ends here. JsonStreamError if the value is
        unfinished."""
        out: list[str] = []
        if not self.done and self._token and not self._stack:
            self._end_token(out)
        if not self.done:
            raise JsonStreamError("the JSON value is unfinished")
        return "".join(out)

    # ------------------------------------------------------------------------ the automaton
    def _char(self, ch: str, out: list[str]) -> None:
        if self._in_string:
            self._string_char(ch, out)
            return
        if self._token:
            if ch in _NUMBER_CHARS or ch.isalpha():
                self._token += ch
                return
            self._end_token(out)
            if self.done:
                self.rest += ch
                return
        if ch in _WHITESPACE:
            return
        expect = self._expect
        if expect in ("value", "value_or_end"):
            if ch == "]" and expect == "value_or_end":
                self._close("[", out)
            else:
                self._value_start(ch, out)
        elif expect in ("key", "key_or_end"):
            if ch == '"':
                self._member_separator(out)
                self._in_string, self._is_key = True, True
                out.append('"')
            elif ch == "}" and expect == "key_or_end":
                self._close("{", out)
            else:
                raise JsonStreamError(f"expected a key, got {ch!r}")
        elif expect == "colon":
            if ch != ":":
                raise JsonStreamError(f"expected ':', got {ch!r}")
            out.append(": ")
            self._expect = "value"
        else:  # comma_or_end
            top = self._stack[-1][0]
            if ch == ",":
                self._expect = "key" if top == "{" else "value"
            elif ch == ("}" if top == "{" else "]"):
                self._close(str(top), out)
            else:
                raise JsonStreamError(f"expected ',' or the container's end, got {ch!r}")

    def _member_separator(self, out: list[str]) -> None:
        """ ", " before a container's second and later members; counts the member."""
        if self._stack:
            top = self._stack[-1]
            if top[1]:
                out.append(", ")
            top[1] = int(top[1]) + 1

    def _value_start(self, ch: str, out: list[str]) -> None:
        in_object = bool(self._stack) and self._stack[-1][0] == "{"
        if not in_object:
            self._member_separator(out)
        if ch == "{" or ch == "[":
            self._stack.append([ch, 0])
            self._expect = "key_or_end" if ch == "{" else "value_or_end"
            out.append(ch)
        elif ch == '"':
            self._in_string, self._is_key = True, False
            out.append('"')
        elif ch in "-0123456789" or ch in "tfnNI":
            self._token = ch
        else:
            raise JsonStreamError(f"expected a value, got {ch!r}")

    def _end_token(self, out: list[str]) -> None:
        token, self._token = self._token, ""
        if token in _LITERALS:
            out.append(token)
        elif _NUMBER.fullmatch(token):
            try:
                value = json.loads(token)
            except ValueError as e:  # an integer past Python's digit limit
                raise JsonStreamError(f"number not readable: {e}") from None
            out.append(json.dumps(value))
        else:
            raise JsonStreamError(f"not a JSON number or literal: {token!r}")
        self._value_end()

    def _close(self, kind: str, out: list[str]) -> None:
        self._stack.pop()
        out.append("}" if kind == "{" else "]")
        self._value_end()

    def _value_end(self) -> None:
        if self._stack:
            self._expect = "comma_or_end"
        else:
            self.done = True

    def _string_char(self, ch: str, out: list[str]) -> None:
        if self._escape is not None:
            self._escape_char(ch, out)
        elif ch == "\\":
            self._escape = ""
        elif ch == '"':
            self._flush_high(out)
            self._in_string = False
            out.append('"')
            if self._is_key:
                self._expect = "colon"
            else:
                self._value_end()
        elif ch < " ":
            raise JsonStreamError(f"raw control character {ch!r} in a string")
        else:
            self._decoded(ch, out)

    def _escape_char(self, ch: str, out: list[str]) -> None:
        esc = self._escape or ""
        if not esc:
            if ch == "u":
                self._escape = "u"
            elif ch in _SIMPLE_ESCAPES:
                self._escape = None
                self._decoded(_SIMPLE_ESCAPES[ch], out)
            else:
                raise JsonStreamError(f"invalid escape \\{ch}")
            return
        if ch not in "0123456789abcdefABCDEF":
            raise JsonStreamError(f"invalid \\u escape: \\{esc}{ch}")
        esc += ch
        if len(esc) < 5:
            self._escape = esc
            return
        self._escape = None
        code = int(esc[1:], 16)
        if 0xDC00 <= code <= 0xDFFF and self._high is not None:
            high, self._high = self._high, None
            pair = 0x10000 + ((ord(high) - 0xD800) << 10) + (code - 0xDC00)
            out.append(_dump_char(chr(pair)))
        else:
            self._decoded(chr(code), out)

    def _decoded(self, ch: str, out: list[str]) -> None:
        """One character of a string's value (escapes undone); a high surrogate waits for
        the next one (json.loads joins a \\u pair into one character)."""
        self._flush_high(out)
        if 0xD800 <= ord(ch) <= 0xDBFF:
            self._high = ch
        else:
            out.append(_dump_char(ch))

    def _flush_high(self, out: list[str]) -> None:
        if self._high is not None:
            out.append(_dump_char(self._high))
            self._high = None


__all__ = ["CanonicalJson", "JsonStreamError"]
