"""Qwen3-Coder's XML tool calls (``--tool-call-parser qwen3_coder``): parameters typed by the
tools' schemas, the stream split anywhere against the finished text, the API's pieces."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from test_tool_calls import feed_all

from kvtier.server import chat
from kvtier.server.xml_tool_parser import XmlToolParser, convert

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "content": {"type": "string"},
                    "mode": {"type": "integer"},
                    "force": {"type": "boolean"},
                    "opts": {"type": "object"},
                    "ratio": {"type": ["number", "null"]},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}},
]

CODE = "def f(a, b):\n    return a < b and \"x\\ty\" != '</param'\n"
WRITE = (
    "<tool_call>\n<function=write_file>\n<parameter=path>\nsrc/é.py\n</parameter>\n"
    f"<parameter=content>\n{CODE}\n</parameter>\n<parameter=mode>\n420\n</parameter>\n"
    '<parameter=force>\nTrue\n</parameter>\n<parameter=opts>\n{"a": [1, null]}\n</parameter>\n'
    "<parameter=ratio>\nnull\n</parameter>\n<parameter=extra>\n7\n</parameter>\n"
    "</function>\n</tool_call>"
)
LS = "<tool_call>\n<function=ls>\n</function>\n</tool_call>"
TEXT = "I'll write it.\n" + WRITE + "\n" + LS + "\nDone."
WANT_WRITE = {
    "path": "src/é.py",
    "content": CODE,
    "mode": 420,
    "force": True,
    "opts": {"a": [1, None]},
    "ratio": None,
    "extra": "7",  # not in the schema: text
}


def _parse(text, max_calls=None):
    return chat.chat_message(text, "stop", chat.ToolPlan(TOOLS, None, max_calls, "qwen3_coder"))


def test_parse_types_parameters_by_the_schema():
    message, reason = _parse(TEXT)
    assert reason == "tool_calls" and message["content"] == "I'll write it.\n\n\nDone."
    calls = [c["function"] for c in message["tool_calls"]]
    assert [c["name"] for c in calls] == ["write_file", "ls"]
    assert json.loads(calls[0]["arguments"]) == WANT_WRITE
    # json.dumps of the parameters, in the order written.
    assert calls[0]["arguments"] == json.dumps(WANT_WRITE, ensure_ascii=False)
    assert calls[1]["arguments"] == "{}"


@pytest.mark.parametrize(
    ("text", "schema", "value"),
    [
        ("12", {"type": "integer"}, 12),
        ("12.0", {"type": "integer"}, 12),
        ("1.5", {"type": "number"}, 1.5),
        ("FALSE", {"type": "boolean"}, False),
        ("[1, 2]", {"type": "array"}, [1, 2]),
        ("null", {"type": "object"}, None),
        ("twelve", {"type": "integer"}, "twelve"),
        ("{bad", {"type": "object"}, "{bad"),
    ],
)
def test_convert(text, schema, value):
    assert convert(text, schema) == value


def _stream(pieces, max_calls=None):
    parser = XmlToolParser(TOOLS, max_calls)
    content, deltas = feed_all(parser, pieces)
    calls = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id is not None and d.id.startswith("call_")
            calls[d.index] = [d.name, ""]
        else:
            assert d.id is None
        calls[d.index][1] += d.arguments
    return content, [tuple(calls[i]) for i in sorted(calls)], parser


@pytest.mark.parametrize("text", [TEXT, "a <tool_call>not a call</tool_call> b", "x <tool"])
def test_stream_split_anywhere_joins_to_the_finished_parse(text):
    message, _ = _parse(text)
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get(
        "tool_calls", [])]  # fmt: skip
    for i in range(0, len(text) + 1, 2):
        for j in range(i, len(text) + 1, 13):
            content, calls, parser = _stream([text[:i], text[i:j], text[j:]])
            assert calls == want
            assert [(c.name, c.arguments) for c in parser.calls] == want
            assert (content.strip() if want else content) == (message["content"] or "")


def test_string_parameters_stream_as_they_are_written():
    # One character at a time: the call is announced at its function tag and the code streams
    # character by character, long before its closing tag.
    parser = XmlToolParser(TOOLS)
    seen = []
    for n, ch in enumerate(WRITE):
        seen += [(n, d) for d in parser.feed(ch)[1]]
    assert seen[0][1].name == "write_file"
    assert WRITE[: seen[0][0] + 1].endswith("<function=write_file>")
    code_end = WRITE.index(CODE) + len(CODE)
    streamed = "".join(d.arguments for n, d in seen if n < code_end)
    assert json.dumps(CODE)[1:-10] in streamed


def test_malformed_cut_and_limited_calls():
    # Not a function tag: the block stays content, as written.
    content, calls, _ = _stream(['a <tool_call>\n{"name": 1}\n</tool_call> b'])
    assert (content, calls) == ('a <tool_call>\n{"name": 1}\n</tool_call> b', [])
    # Cut inside a string parameter: the call as sent, no content.
    content, calls, _ = _stream(["<tool_call>\n<function=write_file>\n<parameter=path>\nab"])
    assert (content, calls) == ("", [("write_file", '{"path": "ab')])
    # Text that stops following the format after the call was announced: it ends as sent.
    content, calls, _ = _stream(["<tool_call><function=ls>oops</function></tool_call>z"])
    assert (content, calls) == ("z", [("ls", "")])
    # parallel_tool_calls=false: the second block is content.
    content, calls, _ = _stream([LS + LS], max_calls=1)
    assert (content, calls) == (LS, [("ls", "{}")])


def test_api_stream_pieces():
    from test_tool_calls import _assembled, _chunks, _out

    chunks = _chunks()
    chunks.parsers = [chat.ToolPlan(TOOLS, None, None, "qwen3_coder").stream_parser()]
    events = []
    for i in range(0, len(TEXT), 9):
        events += chunks.on_output(0, _out(TEXT[i : i + 9], finished=i + 9 >= len(TEXT)), 0.0)
    deltas = [e["choices"][0]["delta"] for e in events]
    calls = _assembled(deltas)
    assert [(c["name"], json.loads(c["args"])) for c in calls] == [
        ("write_file", WANT_WRITE),
        ("ls", {}),
    ]
    assert len([d for d in deltas if "tool_calls" in d]) > 5
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_flag_picks_the_xml_parser():
    from kvtier.server.protocol import ChatCompletionRequest
    from kvtier.server.serving import Frontend, ModelInfo
    from kvtier.server_args import ServerArgs

    assert ServerArgs(model_path="m", tool_call_parser="qwen3_coder").tool_call_parser == (
        "qwen3_coder"
    )
    fe = Frontend(None, None, None, ModelInfo("m", "m", 100, 100), tool_call_parser="qwen3_coder")
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    )
    plan = chat.tool_plan(fe, body)
    assert plan.format == "qwen3_coder"
    assert isinstance(plan.parser(), XmlToolParser)
    assert isinstance(plan.stream_parser(), XmlToolParser)
