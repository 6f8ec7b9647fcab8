"""Tool calls of the OpenAI chat API: the parser (whole texts and streams split anywhere), the
stream's events, the finished message, the chat template's inputs, request validation."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("fastapi")

from kvtier.scheduler.request import ReqOutput
from kvtier.server import chat, openai_api
from kvtier.server.errors import APIError
from kvtier.server.json_stream import CanonicalJson, JsonStreamError
from kvtier.server.protocol import ChatCompletionRequest
from kvtier.server.serving import Frontend, ModelInfo
from kvtier.server.tool_parser import IncrementalToolParser, StreamingToolParser, parse

WEATHER = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
    "</tool_call>"
)
TIME = '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>'
TEXT = "Let me check.\n" + WEATHER + "\n" + TIME


def named(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_parse_content_and_calls():
    content, calls = parse(TEXT)
    assert content == "Let me check."
    # Arguments given as an object or as a JSON string both come back as JSON text.
    assert named(calls) == [
        ("get_weather", {"city": "Paris", "unit": "C"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert calls[0].arguments == '{"city": "Paris", "unit": "C"}'
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert calls[0].id != calls[1].id
    assert calls[0].to_dict() == {
        "id": calls[0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
    }


def test_parse_without_calls_keeps_the_text_as_is():
    assert parse("  no tools here\n") == ("  no tools here\n", [])
    assert parse("") == (None, [])
    # Only calls: no content (None, as OpenAI returns it).
    content, calls = parse(WEATHER)
    assert content is None and named(calls) == [("get_weather", {"city": "Paris", "unit": "C"})]


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>not json</tool_call>",
        '<tool_call>["a list"]</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
    ],
)
def test_malformed_blocks_stay_in_the_content(block):
    content, calls = parse("a " + block + " b")
    assert calls == [] and content == "a " + block + " b"


def test_unreadable_json_never_raises():
    # An integer past Python's digit limit, nesting past the recursion limit: json.loads
    # raises ValueError / RecursionError, not JSONDecodeError. Unstreamed, the block stays
    # text; streamed, the call (announced) ends where its arguments stopped parsing.
    huge = '<tool_call>{"name": "f", "arguments": {"n": ' + "1" * 5000 + "}}</tool_call>"
    deep = '<tool_call>{"name": "f", "arguments": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"
    deep += "</tool_call>"
    for text in (huge, deep):
        assert parse(text) == (text, [])
        content, _, parser = _incremental([text[:40], text[40:]])
        assert content == "" and [c.name for c in parser.calls] == ["f"]
    assert _incremental([huge[:40], huge[40:]])[2].calls[0].arguments == '{"n": '
    with pytest.raises(JsonStreamError, match="number not readable"):
        CanonicalJson().feed("1" * 5000 + " ")
    # A forced "required" output that is JSON but not a list of calls: the text.
    assert parse("5", parser=chat.ToolPlan([], "required", None).parser()) == ("5", [])
    bad = '[{"name": 5, "parameters": {}}]'
    assert parse(bad, parser=chat.ToolPlan([], "required", None).parser()) == (bad, [])


def test_parameters_alias_and_missing_arguments():
    _, calls = parse('<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>')
    assert named(calls) == [("f", {"x": 1})]
    _, calls = parse('<tool_call>{"name": "g"}</tool_call>')
    assert named(calls) == [("g", {})]


def test_max_calls_leaves_later_blocks_in_the_content():
    content, calls = parse(TEXT, max_calls=1)
    assert named(calls) == [("get_weather", {"city": "Paris", "unit": "C"})]
    assert content == "Let me check.\n\n" + TIME


def test_unfinished_call_comes_back_as_text():
    text = 'ok <tool_call>{"name": "f", "argu'
    assert parse(text) == (text, [])


def feed_all(parser, pieces):
    """The pieces through ``parser`` in order, then its finish: (the content joined, what it
    gave besides: calls or call pieces)."""
    content, items = [], []
    for piece in pieces:
        c, found = parser.feed(piece)
        content.append(c)
        items += found
    rest, more = parser.finish()
    return "".join(content) + rest, items + more


def stream(pieces, max_calls=None):
    return feed_all(StreamingToolParser(max_calls), pieces)


@pytest.mark.parametrize("text", [TEXT, "plain <tool text", "x <tool_call>bad</tool_call> y"])
def test_any_split_of_a_stream_gives_the_whole_parse(text):
    whole_content, whole_calls = parse(text)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 7):
            joined, calls = stream([text[:i], text[i:j], text[j:]])
            assert named(calls) == named(whole_calls)
            assert (joined.strip() if whole_calls else joined) == (whole_content or "")


def test_stream_holds_back_only_a_possible_start_tag():
    parser = StreamingToolParser()
    assert parser.feed("Hello <tool") == ("Hello ", [])
    assert parser.feed("box> x <") == ("<toolbox> x ", [])
    assert parser.feed("tool_call>") == ("", [])  # inside a call: held
    content, calls = parser.feed('{"name": "f", "arguments": {}}</tool_call> bye')
    assert content == " bye" and named(calls) == [("f", {})]
    assert parser.finish() == ("", [])


# ---------------------------------------------------------------------------- the API layer
class _Tok:
    def decode(self, ids, skip_special_tokens=False):
        return f"<{ids[0]}>"


def _chunks(num=1, parse_calls=True, max_calls=None):
    fe = Frontend(None, _Tok(), None, ModelInfo("m", "m", 100, 100))
    chunks = openai_api._ChatChunks("chatcmpl-x", "m", False, fe, False, num, 1)
    if parse_calls:
        chunks.parsers = [_plan(max_calls=max_calls).stream_parser() for _ in range(num)]
    return chunks


def _assembled(deltas):
    """OpenAI stream deltas' tool calls joined as a client joins them: by index, the first
    piece's id and name, the arguments concatenated."""
    calls = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            if c["index"] not in calls:
                assert set(c) == {"index", "id", "type", "function"}, c
                calls[c["index"]] = {"id": c["id"], "name": c["function"]["name"], "args": ""}
            else:
                assert set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
            calls[c["index"]]["args"] += c["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


def _out(text, finished=False, reason="stop"):
    meta = {"finish_reason": {"type": reason}} if finished else {}
    return ReqOutput("r", [1], text, finished, meta)


def test_stream_events_carry_content_then_each_call():
    chunks = _chunks()
    pieces = ["Let me", " check.\n<tool", '_call>\n{"name": "get_weather", "arguments": {"city":']
    pieces += [' "Paris", "unit": "C"}}\n</tool_call>\n' + TIME[:30], TIME[30:]]
    events = []
    for i, piece in enumerate(pieces):
        events += chunks.on_output(0, _out(piece, finished=i == len(pieces) - 1), 0.0)
    deltas = [e["choices"][0]["delta"] for e in events]
    reasons = [e["choices"][0]["finish_reason"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": "Let me"}
    assert deltas[1] == {"content": " check.\n"}
    # get_weather is announced once its name is written, its arguments follow piece by piece;
    # get_time (arguments as a JSON string) arrives whole when its block ends.
    pieces = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [
        (p["index"], p["function"].get("name"), p["function"]["arguments"]) for p in pieces
    ] == [
        (0, "get_weather", ""),
        (0, None, '{"city": '),
        (0, None, '"Paris", "unit": "C"}'),
        (1, "get_time", '{"tz": "CET"}'),
    ]
    calls = _assembled(deltas)
    assert [(c["name"], c["args"]) for c in calls] == [
        (c.name, c.arguments) for c in parse(TEXT)[1]
    ]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    # The newline between the calls went out as content; the stream ends with tool_calls.
    assert {"content": "\n"} in deltas
    assert deltas[-1] == {} and reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}


def _incremental(pieces, max_calls=None):
    parser = IncrementalToolParser(max_calls)
    content, deltas = feed_all(parser, pieces)
    return content, [{"tool_calls": [d.to_dict()]} for d in deltas], parser


SPACED = (
    'Sure.<tool_call>\n{ "name" : "write_file" ,\n "arguments" : {"path":"a.py",\n'
    '  "content": "def f():\\n    return \\"\\u00e9\\ud83d\\ude00\\"\\n", "mode": 420,'
    ' "opts": {"force": true, "tags": [], "ratio": 1.50E1}}}\n</tool_call>\nDone.'
)


@pytest.mark.parametrize(
    "text",
    [TEXT, SPACED, WEATHER + WEATHER, "x <tool_call>bad</tool_call> y", "plain <tool text"],
)
def test_incremental_stream_joins_to_the_whole_parse(text):
    # Split anywhere, the streamed pieces join to the finished text's parse: the same content
    # and, call by call, the same name and arguments (json.dumps of the parsed arguments).
    whole_content, whole_calls = parse(text)
    for i in range(0, len(text) + 1, 3):
        for j in range(i, len(text) + 1, 11):
            content, deltas, parser = _incremental([text[:i], text[i:j], text[j:]])
            calls = _assembled(deltas)
            assert [(c["name"], c["args"]) for c in calls] == [
                (c.name, c.arguments) for c in whole_calls
            ]
            assert [(c.id, c.name, c.arguments) for c in parser.calls] == [
                (c["id"], c["name"], c["args"]) for c in calls
            ]
            assert (content.strip() if whole_calls else content) == (whole_content or "")


def test_incremental_stream_sends_arguments_as_they_are_written():
    # One character at a time: the call is announced when its name is complete, and the
    # arguments' string streams character by character, long before the block ends.
    text = SPACED
    parser = IncrementalToolParser()
    seen = []
    for n, ch in enumerate(text):
        _, deltas = parser.feed(ch)
        seen += [(n, d) for d in deltas]
    first_n, first = seen[0]
    assert (first.name, first.arguments, first.id is not None) == ("write_file", "", True)
    assert text[: first_n + 1].endswith('"arguments" : {')
    args = [(n, d.arguments) for n, d in seen[1:]]
    assert len(args) > 20  # piece by piece
    end = text.index("</tool_call>")
    assert all(n < end for n, _ in args)  # every piece before the end tag
    assert "".join(a for _, a in args) == parse(text)[1][0].arguments


def test_incremental_stream_broken_or_cut_calls():
    # Not JSON after the call was announced: it ends with the arguments sent so far, and the
    # rest of its block is not sent as content.
    content, deltas, _ = _incremental(
        ['a <tool_call>{"name": "f", "arguments": {"x": 1, ', "oops}</tool_call> b"]
    )
    assert content == "a  b"
    assert [(c["name"], c["args"]) for c in _assembled(deltas)] == [("f", '{"x": 1')]
    # Cut by the token limit inside the arguments: the call, cut short; no content.
    content, deltas, _ = _incremental(['<tool_call>{"name": "f", "arguments": {"x": "ab'])
    assert content == "" and _assembled(deltas)[0]["args"] == '{"x": "ab'
    # Cut before the name is complete: the text, as StreamingToolParser gives it back.
    text = 'ok <tool_call>{"name": "f'
    assert _incremental([text])[:2] == (text, [])
    # Another key order: the call arrives whole at the end.
    content, deltas, _ = _incremental(
        ['<tool_call>{"arguments": {"x": 1},', ' "name": "f"}</tool_call>']
    )
    assert content == "" and len(deltas) == 1
    assert _assembled(deltas) == [{"id": deltas[0]["tool_calls"][0]["id"], "name": "f",
                                   "args": '{"x": 1}'}]  # fmt: skip
    # parallel_tool_calls=false: later blocks stay content.
    content, deltas, _ = _incremental([WEATHER + " and " + WEATHER], max_calls=1)
    assert content == " and " + WEATHER and len(_assembled(deltas)) == 1


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "b": [1, 2, {"c": null}], "d": true, "e": false}',
        ' { "s" : "tab\\there \\"q\\" \\\\ \\/ \\u00e9 \\ud83d\\ude00 \\ud83d x é" } ',
        '{"n": [0, -0, 1.5, -2.25e10, 1E5, 3e-2, 12345678901234567890, -0.0, 1e400]}',
        '{"x": [NaN, Infinity, -Infinity]}',
        '[[], [[]], {}, "", {"": ""}]',
        '"\\u0001"',
    ],
)
def test_canonical_json_matches_json_dumps_in_any_split(text):
    want = json.dumps(json.loads(text), ensure_ascii=False)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 5):
            c = CanonicalJson()
            got = c.feed(text[:i]) + c.feed(text[i:j]) + c.feed(text[j:] + "}x")
            assert c.done and got == want and c.rest.endswith("}x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1,}', "expected a key, got '}'"),
        ("[1,]", "expected a value, got ']'"),
        ('{"a" 1}', "expected ':', got '1'"),
        ('{"a": tru}', "not a JSON number or literal: 'tru'"),
        ('{"a": 01}', "not a JSON number or literal: '01'"),
        ('{"a": "x\ny"}', "raw control character '\\n' in a string"),
        ('{"a": "\\x"}', "invalid escape \\x"),
        ('{"a": nan}', "not a JSON number or literal: 'nan'"),
        ('{"a": 1', "the JSON value is unfinished"),
    ],
)
def test_canonical_json_refuses_what_json_loads_refuses(text, message):
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    c = CanonicalJson()
    with pytest.raises(JsonStreamError) as err:
        c.feed(text)
        c.close()
    assert str(err.value) == message


def test_stream_cut_by_length_keeps_its_reason_and_text():
    chunks = _chunks()
    events = chunks.on_output(0, _out("a <tool_call>{", finished=True, reason="length"), 0.0)
    assert [e["choices"][0]["delta"] for e in events] == [
        {"role": "assistant", "content": "a <tool_call>{"},
        {},
    ]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_without_parsing_sends_text_unchanged():
    chunks = _chunks(parse_calls=False)
    events = chunks.on_output(0, _out(WEATHER, finished=True), 0.0)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": WEATHER}
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def _plan(forced=None, max_calls=None):
    return chat.ToolPlan(TOOLS, forced, max_calls)


def test_finished_message():
    message, reason = chat.chat_message(TEXT, "stop", _plan())
    assert reason == "tool_calls" and message["content"] == "Let me check."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    # Cut by length after a complete call: the calls, the reason kept.
    message, reason = chat.chat_message(WEATHER, "length", _plan())
    assert reason == "length" and message["content"] is None and len(message["tool_calls"]) == 1
    # Not parsing (no tools): the text as written.
    assert chat.chat_message(TEXT, "stop", None) == (
        {"role": "assistant", "content": TEXT},
        "stop",
    )
    message, reason = chat.chat_message("hi", "stop", _plan())
    assert message == {"role": "assistant", "content": "hi"} and reason == "stop"


def test_forced_calls_schema_and_parse():
    from kvtier.server.forced_calls import ForcedCallParser, forced_schema

    params = TOOLS[0]["function"]["parameters"]
    assert forced_schema(TOOLS, "get_weather", 1) == params
    schema = forced_schema(TOOLS, None, 2)
    assert schema["type"] == "array" and (schema["minItems"], schema["maxItems"]) == (1, 2)
    assert schema["items"]["anyOf"] == [
        {
            "type": "object",
            "properties": {"name": {"enum": ["get_weather"]}, "parameters": params},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
    ]
    # A named function: the output is its arguments.
    message, reason = chat.chat_message('{"city": "Oslo"}', "stop", _plan("get_weather"))
    assert message["content"] is None and reason == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", '{"city": "Oslo"}')
    ]
    # "required": a list of calls.
    text = '[{"name": "get_weather", "parameters": {"city": "Rome"}}]'
    message, reason = chat.chat_message(text, "stop", _plan("required"))
    assert message["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'
    # Cut short: the text as content, no calls.
    message, reason = chat.chat_message('{"city": "Os', "length", _plan("get_weather"))
    assert message == {"role": "assistant", "content": '{"city": "Os'} and reason == "length"
    parser = ForcedCallParser(None)
    assert parser.feed("[]") == ("", []) and parser.finish() == ("[]", [])


def test_forced_call_streams_whole_at_the_end():
    chunks = _chunks()
    chunks.parsers = [_plan("get_weather").parser()]
    events = chunks.on_output(0, _out('{"city": '), 0.0)
    events += chunks.on_output(0, _out('"Oslo"}', finished=True), 0.0)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    call = deltas[1]["tool_calls"][0]
    assert (call["index"], call["function"]["name"], call["function"]["arguments"]) == (
        0,
        "get_weather",
        '{"city": "Oslo"}',
    )
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_named_forced_call_streams_its_arguments():
    chunks = _chunks()
    chunks.parsers = [_plan("get_weather").stream_parser()]
    events = chunks.on_output(0, _out('{ "city" :'), 0.0)
    events += chunks.on_output(0, _out(' "Oslo" }', finished=True), 0.0)
    deltas = [e["choices"][0]["delta"] for e in events]
    pieces = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [(p["function"].get("name"), p["function"]["arguments"]) for p in pieces] == [
        ("get_weather", ""),
        (None, '{"city": '),
        (None, '"Oslo"}'),
    ]
    assert (
        _assembled(deltas)[0]["args"]
        == chat.chat_message('{ "city" : "Oslo" }', "stop", _plan("get_weather"))[0]["tool_calls"][
            0
        ]["function"]["arguments"]
    )
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def _stream_required(pieces):
    parser = _plan("required").stream_parser()
    content, deltas = feed_all(parser, pieces)
    return content, [{"tool_calls": [d.to_dict()]} for d in deltas], parser


def test_required_calls_stream_their_arguments():
    text = (
        '[{"name": "get_weather", "parameters": {"city": "Rome", "days": [1, 2]}}, '
        '{"name": "get_time", "parameters": {}}]'
    )
    message, _ = chat.chat_message(text, "stop", _plan("required"))
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 7):
            content, deltas, parser = _stream_required([text[:i], text[i:j], text[j:]])
            assert content == ""
            assert [(c["name"], c["args"]) for c in _assembled(deltas)] == want
            assert [(c.name, c.arguments) for c in parser.calls] == want
    # A character at a time: each call is announced before its parameters, which stream.
    _, deltas, _ = _stream_required(list(text))
    pieces = [d["tool_calls"][0] for d in deltas]
    assert [p["function"].get("name") for p in pieces if "id" in p] == ["get_weather", "get_time"]
    assert len(pieces) > 10
    # Cut by the token limit: the calls as sent; nothing as content.
    content, deltas, parser = _stream_required(['[{"name": "f", "parameters": {"x": "ab'])
    assert content == "" and [(c.name, c.arguments) for c in parser.calls] == [("f", '{"x": "ab')]
    # An output that does not begin as the list: whole at the end, as unstreamed (text).
    odd = '{"not": "a list"}' + " " * 1100
    content, deltas, _ = _stream_required([odd])
    assert (content, deltas) == (odd, [])


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def _request(**kw):
    body = {"messages": [{"role": "user", "content": "hi"}], **kw}
    return ChatCompletionRequest.model_validate(body)


def _frontend(parser="qwen25"):
    return Frontend(None, None, None, ModelInfo("m", "m", 100, 100), tool_call_parser=parser)


def test_tool_plans():
    fe = _frontend()
    plan = chat.tool_plan(fe, _request(tools=TOOLS))
    assert plan == chat.ToolPlan(TOOLS, None, None) and plan.constraint() is None
    assert chat.tool_plan(fe, _request(tools=TOOLS, tool_choice="auto")) == plan
    single = chat.tool_plan(fe, _request(tools=TOOLS, parallel_tool_calls=False))
    assert single.max_calls == 1
    # "none": the model is not shown the tools, nothing is parsed.
    assert chat.tool_plan(fe, _request(tools=TOOLS, tool_choice="none")) is None
    assert chat.tool_plan(fe, _request()) is None
    # Forced calls need no parser: the output is constrained to them.
    named = {"type": "function", "function": {"name": "get_weather"}}
    plan = chat.tool_plan(_frontend(None), _request(tools=TOOLS, tool_choice=named))
    assert plan.forced == "get_weather"
    assert json.loads(plan.constraint()["json_schema"]) == TOOLS[0]["function"]["parameters"]
    plan = chat.tool_plan(_frontend(None), _request(tools=TOOLS, tool_choice="required"))
    assert json.loads(plan.constraint()["json_schema"])["type"] == "array"


NAMED_F = {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize(
    ("kw", "parser", "message"),
    [
        ({"tools": TOOLS}, None, "tools need a tool-call parser: start the server with "
         "--tool-call-parser qwen25 (or hermes; qwen3_coder for Qwen3-Coder's XML calls)"),
        ({"tools": TOOLS, "tool_choice": NAMED_F}, "qwen25",
         "tool_choice names the function 'f', which is not in tools"),
        ({"tools": TOOLS, "tool_choice": "required", "regex": "a"}, "qwen25",
         "tool_choice required or a named function cannot be combined with regex (it "
         "constrains the output itself)"),
        ({"tool_choice": "auto"}, "qwen25", "tool_choice needs tools"),
    ],
)  # fmt: skip
def test_tool_requests_refused_with_the_reason(kw, parser, message):
    with pytest.raises(APIError) as err:
        chat.tool_plan(_frontend(parser), _request(**kw))
    assert err.value.status == 400 and err.value.message == message


def test_template_messages_carry_calls_and_results():
    body = _request(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        ]
    )
    msgs = [chat.template_message(m) for m in body.messages]
    assert msgs[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    assert msgs[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}
    # Arguments that are not JSON, or past json.loads' limits, reach the template as text.
    for text in ("not json", '{"n": ' + "1" * 5000 + "}", "[" * 5000 + "]" * 5000):
        body.messages[1].tool_calls[0].function.arguments = text
        assert chat.template_message(body.messages[1])["tool_calls"][0]["function"] == {
            "name": "get_weather",
            "arguments": text,
        }


def test_encode_chat_renders_the_tools_with_the_template():
    from kvtier.models.builtin import builtin_dir
    from kvtier.tokenizer import load_tokenizer

    tok = load_tokenizer(builtin_dir("builtin:tiny-qwen3"))
    tok.chat_template = (
        "{%- for t in tools or [] %}[tool {{ t.function.name }}]{%- endfor %}"
        "{%- for m in messages %}{{ m.role }}: {{ m.content }};{%- endfor %}"
    )
    fe = Frontend(None, tok, None, ModelInfo("m", "m", 100, 100), tool_call_parser="qwen25")
    ids = fe.encode_chat([{"role": "user", "content": "hi"}], TOOLS)
    assert tok.decode(ids) == "[tool get_weather]user: hi;"
    assert tok.decode(fe.encode_chat([{"role": "user", "content": "hi"}])) == "user: hi;"


def test_bad_tool_definitions_are_refused_by_name():
    with pytest.raises(ValueError, match=r"tools\.0\.type"):
        _request(tools=[{"type": "retrieval", "function": {"name": "f"}}])
    with pytest.raises(ValueError, match="tool_choice"):
        _request(tools=TOOLS, tool_choice="sometimes")


# ---------------------------------------------------------------------------- structured fields
def test_structured_output_fields_map_to_one_sampling_parameter():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    cases = [
        ({"response_format": fmt}, {"json_schema": json.dumps(schema)}),
        ({"response_format": {"type": "json_object"}}, {"json_schema": '{"type": "object"}'}),
        ({"response_format": {"type": "text"}}, {}),
        ({"guided_json": schema}, {"json_schema": json.dumps(schema)}),
        ({"guided_json": '{"type": "string"}'}, {"json_schema": '{"type": "string"}'}),
        ({"regex": "a+"}, {"regex": "a+"}),
        ({"guided_regex": "b+"}, {"regex": "b+"}),
        ({"guided_choice": ["yes", "n.o (x)"]}, {"regex": r"(yes|n\.o \(x\))"}),
        ({"ebnf": 'root ::= "a"'}, {"ebnf": 'root ::= "a"'}),
        ({"guided_grammar": 'root ::= "b"'}, {"ebnf": 'root ::= "b"'}),
        ({}, {}),
    ]
    for kw, want in cases:
        assert openai_api._constraint(_request(**kw)) == want, kw
    with pytest.raises(
        APIError, match=r"^give at most one structured-output field; got guided_json, guided_regex$"
    ):
        openai_api._constraint(_request(guided_json=schema, guided_regex="a"))
    with pytest.raises(APIError, match=r"^guided_choice must list at least one string$"):
        openai_api._constraint(_request(guided_choice=[]))
    with pytest.raises(APIError, match=r"^response_format json_schema needs json_schema\.schema$"):
        openai_api._constraint(_request(response_format={"type": "json_schema"}))
