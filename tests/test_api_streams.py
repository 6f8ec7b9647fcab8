"""The Anthropic and Responses APIs' stream events from a model's text, without a server: a
reasoning model's thinking, an answer and a tool call, fed a few characters at a time, come
out as each API's blocks / items, their deltas joining to the whole parts."""

from __future__ import annotations

import json
from types import SimpleNamespace

from kvtier.scheduler.request import ReqOutput
from kvtier.server.anthropic_api import _MessageEvents
from kvtier.server.chat import ToolPlan
from kvtier.server.openai_api import ChatJob
from kvtier.server.protocol import ChatCompletionRequest, ResponsesRequest
from kvtier.server.responses_api import _ResponseEvents, _ResponseShell

TEXT = (
    "<think>\nweather first\n</think>\n\nSure.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
META = {"prompt_tokens": 30, "completion_tokens": 25, "cached_tokens": 16}


def _outputs(step: int) -> list[ReqOutput]:
    pieces = [TEXT[i : i + step] for i in range(0, len(TEXT), step)]
    outs = []
    for n, piece in enumerate(pieces):
        last = n == len(pieces) - 1
        meta = {**META, "finish_reason": {"type": "stop", "matched": 151645} if last else None}
        outs.append(ReqOutput("r", [n], piece, last, meta))
    return outs


def _setup():
    fe = SimpleNamespace(model=SimpleNamespace(name="m"))
    job = ChatJob([1] * 30, 64, ToolPlan(TOOLS, None, None), "qwen3", None)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], stream=True)
    return fe, job, chat


def test_anthropic_events():
    fe, job, chat = _setup()
    for step in (1, 3, 1000):
        events = []
        stream = _MessageEvents(fe, job, chat, "r1")
        for out in _outputs(step):
            events += stream.on_output(0, out, 0.0)
        kinds = [e["type"] for e in events]
        assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
        assert events[0]["message"]["usage"]["cache_read_input_tokens"] == 16
        starts = [e for e in events if e["type"] == "content_block_start"]
        assert [s["content_block"]["type"] for s in starts] == ["thinking", "text", "tool_use"]
        assert [s["index"] for s in starts] == [0, 1, 2]
        assert starts[2]["content_block"]["name"] == "get_weather"
        assert [e["index"] for e in events if e["type"] == "content_block_stop"] == [0, 1, 2]

        deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
        assert "".join(d["thinking"] for d in deltas if d["type"] == "thinking_delta") == (
            "weather first"
        )
        # (The newline before a call streams with the text, as in the chat API.)
        assert "".join(d["text"] for d in deltas if d["type"] == "text_delta").strip() == "Sure."
        args = "".join(d["partial_json"] for d in deltas if d["type"] == "input_json_delta")
        assert json.loads(args) == {"city": "Paris"}
        assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
        assert events[-2]["usage"]["output_tokens"] == 25


def test_responses_events():
    fe, job, chat = _setup()
    body = ResponsesRequest(input="x", stream=True)
    for step in (1, 3, 1000):
        stream = _ResponseEvents(fe, job, chat, _ResponseShell(fe, body, "r1", False))
        events = []
        for out in _outputs(step):
            events += stream.on_output(0, out, 0.0)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert [e["type"] for e in events][:2] == ["response.created", "response.in_progress"]
        assert events[-1]["type"] == "response.completed"
        added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
        assert added == ["reasoning", "message", "function_call"]

        by_kind: dict[str, str] = {}
        for e in events:
            if "delta" in e:
                by_kind[e["type"]] = by_kind.get(e["type"], "") + e["delta"]
        assert by_kind["response.reasoning_text.delta"] == "weather first"
        assert by_kind["response.output_text.delta"].strip() == "Sure."
        assert json.loads(by_kind["response.function_call_arguments.delta"]) == {"city": "Paris"}
        final = events[-1]["response"]
        assert final["status"] == "completed" and final["usage"]["input_tokens"] == 30
        assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
        assert final["output"][1]["content"][0]["text"] == by_kind["response.output_text.delta"]
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        assert done == final["output"]
