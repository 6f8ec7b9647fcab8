"""The HTTP server end to end: real ``python -m kvtier.launch_server`` subprocesses on loopback
with the built-in model on the CPU, driven by the official ``openai`` client and httpx.

Two servers start together (their model loads overlap): ``server`` (context 512, 64 KiB body
limit) for the API surface, bad input, disconnects and metrics; ``aux`` (API key, one running and
one queued request, hierarchical cache with page 4 and a 256-token GPU pool) for authentication,
queue-full, L2 hits after ``/flush_cache`` and SIGTERM. The last test kills ``server``'s scheduler
process. Leaked pages are looked for through ``GET /debug/check_integrity``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from server_utils import ServerProcess

import kvtier
from kvtier.server.middleware import GuardMiddleware, ServerState
from kvtier.tokenizer import load_tokenizer

KEY = "sk-test-key"
MODEL = "builtin:tiny-qwen3"
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def launched():
    servers = {
        "server": ServerProcess(
            "--context-length",
            "512",
            "--max-request-body-bytes",
            "65536",
            "--tool-call-parser",
            "qwen25",
            "--reasoning-parser",
            "qwen3",
        ),
        "aux": ServerProcess(
            "--max-running-requests",
            "1",
            "--max-queued-requests",
            "1",
            "--enable-hierarchical-cache",
            "--page-size",
            "4",
            "--max-total-tokens",
            "256",
            api_key=KEY,
        ),
    }
    try:
        yield servers
    finally:
        for s in servers.values():
            s.close()


@pytest.fixture(scope="module")
def server(launched) -> ServerProcess:
    return launched["server"].wait_ready()


@pytest.fixture(scope="module")
def aux(launched) -> ServerProcess:
    return launched["aux"].wait_ready()


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return server.openai()


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1500) for _ in range(n)]


def sse_events(response: httpx.Response) -> list[Any]:
    """The decoded ``data:`` payloads of an SSE response, ``[DONE]`` as a string."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def next_data(lines: Iterator[str]) -> str:
    """The next ``data:`` line. Takes the caller's line iterator: closing an httpx line
    iterator (as a discarded generator expression over it would) closes the connection."""
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended")


def stats(srv: ServerProcess) -> dict[str, Any]:
    with srv.http() as c:
        return c.get("/get_server_info").json()


def wait_idle(srv: ServerProcess, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(srv)
        if s["num_running"] == s["num_waiting"] == s["num_in_flight"] == 0:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: {s}")
        time.sleep(0.05)


def assert_integrity(srv: ServerProcess) -> None:
    with srv.http() as c:
        r = c.get("/debug/check_integrity")
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True}


# ---------------------------------------------------------------------------- API surface
def test_health_models_and_server_info(server, http):
    assert http.get("/health").json() == {"status": "ok"}
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [MODEL]
    info = http.get("/get_server_info").json()
    assert info["model_path"] == MODEL and info["context_length"] == 512
    assert info["device_total_pages"] > 0 and info["api_key"] is None


def test_version_and_health_generate(server, http):
    assert http.get("/version").json() == {"version": kvtier.__version__}
    r = http.get("/health_generate")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert_integrity(server)


def test_tokenize_and_detokenize(http, oai):
    """vLLM's /tokenize counts what the generation APIs count: a prompt as /v1/completions
    does, a conversation (with tools) as /v1/chat/completions does; /detokenize inverts it."""
    text = "The quick brown fox jumps over the lazy dog"
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["max_model_len"] == 512 and body["token_strs"] is None
    assert body["count"] == len(body["tokens"]) > 0
    done = oai.completions.create(model=MODEL, prompt=text, max_tokens=1)
    assert done.usage.prompt_tokens == body["count"]
    tok = load_tokenizer(MODEL)
    assert body["tokens"] == tok.encode(text)
    strs = http.post("/v1/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert strs["tokens"] == body["tokens"]
    assert strs["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}
    assert http.post("/v1/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    chat = http.post("/tokenize", json={"messages": msgs, "tools": TOOLS}).json()
    answer = oai.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=1)
    assert answer.usage.prompt_tokens == chat["count"]
    # The template's text, tokenized: special tokens from the template only.
    rendered = tok.apply_chat_template(
        msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False)
    bare = http.post(
        "/tokenize", json={"messages": msgs, "tools": TOOLS, "add_generation_prompt": False}
    ).json()
    assert bare["count"] < chat["count"] and chat["tokens"][: bare["count"]] == bare["tokens"]


def test_chat_completion_stream_and_not(oai):
    messages = [{"role": "user", "content": "Tell me about caches."}]
    kw = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
    full = oai.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert full.usage.completion_tokens <= 8
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(
        oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        full.usage.completion_tokens
    )
    # the second identical request found the whole prompt but its last token in the cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == full.usage.prompt_tokens - 1

    sampled = {**kw, "temperature": 1.0, "seed": 42, "max_completion_tokens": 6}
    del sampled["max_tokens"]
    a, b = (oai.chat.completions.create(**sampled) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens <= 6


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


def test_chat_with_tools_and_a_tool_history(oai, aux):
    # A coding agent's turn: the tools, and an earlier call with its result. The builtin
    # model's template renders neither (a real model's does), so the prompt, and the greedy
    # answer, equal those of the same conversation without tools; the tiny model writes no
    # call, so the answer is content only, streamed or not.
    history = [
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
    kw = {"model": MODEL, "messages": history, "max_tokens": 6, "temperature": 0}
    plain = oai.chat.completions.create(**kw)
    with_tools = oai.chat.completions.create(**kw, tools=TOOLS, tool_choice="auto")
    assert with_tools.choices[0].message.content == plain.choices[0].message.content
    assert with_tools.choices[0].message.tool_calls is None
    assert with_tools.choices[0].finish_reason == plain.choices[0].finish_reason
    assert with_tools.usage.prompt_tokens == plain.usage.prompt_tokens
    chunks = list(oai.chat.completions.create(**kw, tools=TOOLS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        plain.choices[0].message.content
    )
    # A server started without --tool-call-parser refuses tools, naming the flag.
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser qwen25"):
        aux.openai().chat.completions.create(**kw, tools=TOOLS)


def test_reasoning_and_tool_calls_end_to_end(oai):
    # A regex makes even the tiny random model write what a reasoning model writes, thinking
    # then an answer, or a tool call: the parsers take them apart, streamed or not.
    pytest.importorskip("xgrammar")
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Think."}], "temperature": 0}
    think = {"regex": r"<think>\n[a-z]{1,6}\n</think>\n\n(yes|no)"}
    out = oai.chat.completions.create(**kw, max_tokens=48, extra_body=think)
    msg = out.choices[0].message
    assert msg.content in ("yes", "no") and re.fullmatch("[a-z]{1,6}", msg.reasoning_content)
    chunks = list(oai.chat.completions.create(**kw, max_tokens=48, extra_body=think, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == (
        msg.reasoning_content
    )
    assert "".join(d.content or "" for d in deltas) == msg.content
    whole = oai.chat.completions.create(
        **kw, max_tokens=48, extra_body={**think, "separate_reasoning": False}
    )
    assert whole.choices[0].message.content == (
        f"<think>\n{msg.reasoning_content}\n</think>\n\n{msg.content}"
    )
    call = {
        "regex": r'Sure\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
        r'\{"city": "(Paris|Rome)"\}\}\n</tool_call>'
    }
    out = oai.chat.completions.create(**kw, max_tokens=160, tools=TOOLS, extra_body=call)
    msg = out.choices[0].message
    assert msg.content == "Sure." and out.choices[0].finish_reason == "tool_calls"
    (tool_call,) = msg.tool_calls
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments)["city"] in ("Paris", "Rome")
    chunks = list(
        oai.chat.completions.create(**kw, max_tokens=160, tools=TOOLS, extra_body=call, stream=True)
    )
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas).strip() == "Sure."
    # The call streams: its id and name first, then its arguments piece by piece, which join
    # to the unstreamed call's.
    pieces = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert len(pieces) > 2 and {p.index for p in pieces} == {0}
    assert (pieces[0].function.name, pieces[0].function.arguments) == ("get_weather", "")
    assert pieces[0].id.startswith("call_") and all(p.id is None for p in pieces[1:])
    assert "".join(p.function.arguments for p in pieces) == tool_call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# ---------------------------------------------------------------------------- Anthropic API
# A forced-call tool of the Anthropic and Responses tests, and the chat API's prompt tokens of
# the conversation "Weather in Paris?", the call, its result (and a follow-up) that both APIs'
# histories must render to.
WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def chat_tokens_after_a_call(oai, call_id: str, result: str, follow_up: str | None) -> int:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": result},
    ]
    if follow_up is not None:
        messages.append({"role": "user", "content": follow_up})
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[{"type": "function", "function": WEATHER}],
        max_tokens=1,
    )
    return chat.usage.prompt_tokens


def test_anthropic_messages_match_chat_completions(server, oai):
    """The same conversation through Anthropic's Messages API (the official client) and the
    chat API: the same greedy text, the same token counts, stream and not."""
    ant = server.anthropic()
    system = "You are a terse assistant."
    user = "Tell me about hierarchical caches."
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        max_tokens=8,
        temperature=0,
    )
    kw = {
        "model": MODEL,
        "system": system,
        "messages": [{"role": "user", "content": [{"type": "text", "text": user}]}],
        "max_tokens": 8,
        # (The current anthropic client has no temperature argument; the API takes it.)
        "extra_body": {"temperature": 0},
    }
    msg = ant.messages.create(**kw)
    text = "".join(b.text for b in msg.content if b.type == "text")
    thinking = "".join(b.thinking for b in msg.content if b.type == "thinking")
    assert text == (chat.choices[0].message.content or "")
    assert thinking == (getattr(chat.choices[0].message, "reasoning_content", None) or "")
    assert msg.id.startswith("msg_") and msg.role == "assistant" and msg.model == MODEL
    assert (
        msg.stop_reason
        == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    )
    u = msg.usage
    assert u.input_tokens + u.cache_read_input_tokens == chat.usage.prompt_tokens
    assert u.cache_read_input_tokens > 0  # the chat request left the prompt in the cache
    assert u.output_tokens == chat.usage.completion_tokens
    with ant.messages.stream(**kw) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text
    # (message_start's usage, which the final message keeps, splits the prompt the same way)
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == (
        chat.usage.prompt_tokens
    )
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in msg.content]
    assert final.stop_reason == msg.stop_reason and final.usage.output_tokens == u.output_tokens
    count = ant.messages.count_tokens(
        model=MODEL, system=system, messages=kw["messages"]
    ).input_tokens
    assert count == chat.usage.prompt_tokens
    # A stop sequence taken from the greedy answer ends it there.
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = ant.messages.create(**kw, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert "".join(b.text for b in cut.content if b.type == "text") == text[: text.index(stop)]
    assert_integrity(server)


def test_anthropic_tool_use_round_trip(server, oai):
    """Tools, a forced call and a conversation carrying tool_use / tool_result blocks: the
    call comes back as a tool_use block (streamed as input_json_delta pieces that join to its
    input), and the conversation renders as the equivalent chat API one does."""
    pytest.importorskip("xgrammar")
    ant = server.anthropic()
    weather = {
        "name": WEATHER["name"],
        "description": WEATHER["description"],
        "input_schema": WEATHER["parameters"],
    }
    kw = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "max_tokens": 48,
        "extra_body": {"temperature": 0},
        "tools": [weather],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    msg = ant.messages.create(**kw)
    assert msg.stop_reason == "tool_use"
    (call,) = [b for b in msg.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input["city"] in ("Paris", "Rome")
    with ant.messages.stream(**kw) as stream:
        pieces = [
            e.delta.partial_json
            for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        final = stream.get_final_message()
    assert len(pieces) > 1 and json.loads("".join(pieces)) == call.input
    assert [b.input for b in final.content if b.type == "tool_use"] == [call.input]
    # The call and its result sent back: counted as the chat API renders the same turns.
    history = kw["messages"] + [
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C, sunny"},
                {"type": "text", "text": "Thanks. And Rome?"},
            ],
        },
    ]
    count = ant.messages.count_tokens(model=MODEL, messages=history, tools=[weather])
    assert count.input_tokens == chat_tokens_after_a_call(
        oai, "toolu_1", "18 C, sunny", "Thanks. And Rome?"
    )
    assert_integrity(server)


# ---------------------------------------------------------------------------- Responses API
def test_responses_match_chat_completions(server, oai):
    """OpenAI's Responses API (the official client) against the chat API on the same
    conversation: the same greedy text and counts, streamed and not."""
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
    )
    kw = {
        "model": MODEL,
        "instructions": "Be terse.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        "max_output_tokens": 8,
        "temperature": 0,
    }
    resp = oai.responses.create(**kw)
    assert resp.id.startswith("resp_") and resp.model == MODEL
    assert resp.output_text == (chat.choices[0].message.content or "")
    finish = chat.choices[0].finish_reason
    assert resp.status == ("incomplete" if finish == "length" else "completed")
    if finish == "length":
        assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.input_tokens_details.cached_tokens > 0
    events = list(oai.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == ("response.incomplete" if finish == "length" else "response.completed")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == resp.output_text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == resp.usage.output_tokens
    assert [i.type for i in final.output] == [i.type for i in resp.output]
    assert_integrity(server)


def test_responses_function_calls(server, oai):
    pytest.importorskip("xgrammar")
    tool = {"type": "function", **WEATHER}
    kw = {
        "model": MODEL,
        "input": "Weather in Paris?",
        "tools": [tool],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 48,
        "temperature": 0,
    }
    resp = oai.responses.create(**kw)
    (call,) = [i for i in resp.output if i.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Rome")
    events = list(oai.responses.create(**kw, stream=True))
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(pieces) > 1 and "".join(pieces) == done.arguments == call.arguments
    # The call and its output sent back as items: the same prompt as the chat API's turns.
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
    ]  # fmt: skip
    again = oai.responses.create(model=MODEL, input=history, tools=[tool], max_output_tokens=1)
    assert again.usage.input_tokens == chat_tokens_after_a_call(oai, "c1", "18 C", None)
    assert_integrity(server)


def test_responses_continue_a_kept_response(server, oai, http):
    """previous_response_id: the kept conversation (input, then output) comes before the new
    input, as the chat API would render the whole conversation (and its prefix is cached);
    GET and DELETE reach a kept response; store=false keeps none."""
    first = oai.responses.create(model=MODEL, input="Hi", max_output_tokens=6, temperature=0)
    assert first.store is True
    assert oai.responses.retrieve(first.id).output_text == first.output_text
    events = list(
        oai.responses.create(
            model=MODEL,
            input="And more?",
            previous_response_id=first.id,
            max_output_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    second = events[-1].response
    assert second.previous_response_id == first.id
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And more?"},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert second.output_text == (chat.choices[0].message.content or "")
    # The streamed response was kept too, and chains further.
    third = oai.responses.create(
        model=MODEL, input="Ok.", previous_response_id=second.id, max_output_tokens=2
    )
    assert third.usage.input_tokens > second.usage.input_tokens
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError, match="no response"):
        oai.responses.retrieve(first.id)
    r = http.post(
        "/v1/responses",
        json={"input": "x", "previous_response_id": first.id, "max_output_tokens": 2},
    )
    assert r.status_code == 404 and "is kept here" in r.json()["error"]["message"]
    unkept = oai.responses.create(model=MODEL, input="x", max_output_tokens=2, store=False)
    assert unkept.store is False
    assert http.get(f"/v1/responses/{unkept.id}").status_code == 404
    assert_integrity(server)


def test_responses_bad_requests(http):
    cases = [
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input.0.content.0: input_image content is not supported",
        ),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tool type 'web_search'"),
        ({"input": [{"type": "item_reference", "id": "m"}]}, "item_reference items"),
        ({"input": []}, "input must not be empty"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens must be at least 1"),
        ({"input": "x", "temprature": 0}, "unknown field 'temprature'"),
    ]
    for body, message in cases:
        r = http.post("/v1/responses", json=body)
        assert r.status_code == 400, (body, r.text)
        assert message in r.json()["error"]["message"], (body, r.text)


def test_anthropic_errors_have_anthropic_shape(server, http):
    import anthropic

    r = http.post("/v1/messages", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    with pytest.raises(anthropic.BadRequestError, match="image content is not supported"):
        server.anthropic().messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [image]}]
        )
    with pytest.raises(anthropic.NotFoundError, match="the model 'claude-x' does not exist"):
        server.anthropic().messages.create(
            model="claude-x", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    r = http.post("/v1/messages", json={"max_tokens": 4, "messages": []})
    assert r.json()["error"]["message"] == "messages must not be empty"


def test_forced_tool_calls(oai):
    # tool_choice "required" / a named function: the output is constrained to the calls (no
    # parser needed), so even the tiny random model calls a declared tool with valid arguments.
    pytest.importorskip("xgrammar")
    pick = {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {
                "type": "object",
                "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
                "required": ["color", "ok"],
                "additionalProperties": False,
            },
        },
    }
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Pick."}], "max_tokens": 64}
    named = {"type": "function", "function": {"name": "pick"}}
    # (The tiny model would list calls until the token limit: one call at most.)
    for choice in (named, "required"):
        out = oai.chat.completions.create(
            **kw, temperature=0, tools=[pick], tool_choice=choice, parallel_tool_calls=False
        )
        (call,) = out.choices[0].message.tool_calls
        args = json.loads(call.function.arguments)
        assert call.function.name == "pick" and call.id.startswith("call_")
        assert args["color"] in ("red", "green") and isinstance(args["ok"], bool)
        assert out.choices[0].finish_reason == "tool_calls"
        assert out.choices[0].message.content is None
        unstreamed = call.function.arguments
        chunks = list(
            oai.chat.completions.create(
                **kw, temperature=0, tools=[pick], tool_choice=choice, parallel_tool_calls=False,
                stream=True,
            )
        )  # fmt: skip
        # Streamed, the call is announced first and its arguments follow in pieces, which join
        # to the unstreamed call's (greedy: the same output).
        pieces = [d.tool_calls[0] for c in chunks if (d := c.choices[0].delta).tool_calls]
        assert len(pieces) > 2 and {p.index for p in pieces} == {0}
        assert (pieces[0].function.name, pieces[0].function.arguments) == ("pick", "")
        assert "".join(p.function.arguments for p in pieces) == unstreamed
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_structured_output_through_openai(oai):
    pytest.importorskip("xgrammar")
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
        "required": ["ok", "color"],
        "additionalProperties": False,
    }
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "JSON?"}], "max_tokens": 64}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    out = oai.chat.completions.create(**kw, temperature=0, response_format=fmt)
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"ok", "color"} and out.choices[0].finish_reason == "stop"
    # Any object: the tiny model's greedy keys run to the token limit, but inside an object.
    out = oai.chat.completions.create(**kw, temperature=0, response_format={"type": "json_object"})
    assert out.choices[0].message.content.startswith('{"')
    assert out.choices[0].finish_reason == "length"
    text = oai.completions.create(
        model=MODEL, prompt="Yes or no:", max_tokens=16, extra_body={"regex": "(yes|no)!"}
    )
    assert text.choices[0].text in ("yes!", "no!")
    # vLLM's names too.
    pick = oai.chat.completions.create(
        **kw, temperature=0, extra_body={"guided_choice": ["alpha.", "beta?"]}
    )
    assert pick.choices[0].message.content in ("alpha.", "beta?")
    with pytest.raises(openai.BadRequestError, match="regex does not compile"):
        oai.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"regex": "(a"})
    with pytest.raises(openai.BadRequestError, match=r"needs json_schema\.schema"):
        oai.chat.completions.create(**kw, response_format={"type": "json_schema"})
    with pytest.raises(
        openai.BadRequestError,
        match="give at most one structured-output field; got response_format, regex",
    ):
        oai.chat.completions.create(**kw, response_format=fmt, extra_body={"regex": "a"})


def test_completions_all_prompt_forms_agree(oai, http):
    prompt = "The hierarchical cache"
    token_ids = http.post("/generate", json={"text": prompt, "sampling_params": GREEDY}).json()
    want = token_ids["text"]
    kw = {"model": MODEL, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    for p in (prompt, [prompt]):
        out = oai.completions.create(prompt=p, **kw)
        assert out.choices[0].text == want
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 6
    streamed = list(oai.completions.create(prompt=prompt, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == want
    stop = want.strip()[1:3]
    stopped = oai.completions.create(prompt=prompt, stop=[stop], **kw).choices[0]
    assert stopped.text == want[: want.index(stop)] and stopped.finish_reason == "stop"
    kept = oai.completions.create(
        prompt=prompt,
        stop=[stop],
        **{**kw, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}},
    ).choices[0]
    assert kept.text == want[: want.index(stop) + len(stop)]
    ids_prompt = ids(12, seed=1)
    by_ids = oai.completions.create(prompt=ids_prompt, **kw)
    native = http.post("/generate", json={"input_ids": ids_prompt, "sampling_params": GREEDY})
    assert by_ids.choices[0].text == native.json()["text"]


def test_generate_native_single_batch_and_stream(server, http):
    p = ids(20, seed=2)
    one = http.post("/generate", json={"input_ids": p, "sampling_params": GREEDY}).json()
    assert set(one) == {"text", "output_ids", "meta_info"}
    meta = one["meta_info"]
    assert len(one["output_ids"]) == meta["completion_tokens"] == 6
    assert meta["prompt_tokens"] == 20 and meta["finish_reason"] == {"type": "length"}
    assert "cached_tokens_by_tier" in meta and meta["e2e_latency"] > 0

    q = ids(15, seed=3)
    batch = http.post("/generate", json={"input_ids": [p, q], "sampling_params": GREEDY}).json()
    assert isinstance(batch, list) and batch[0]["output_ids"] == one["output_ids"]
    assert batch[0]["meta_info"]["cached_tokens_by_tier"] == {"device": 19}

    with http.stream(
        "POST", "/generate", json={"input_ids": p, "sampling_params": GREEDY, "stream": True}
    ) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    # SGLang's cumulative streaming: each event holds everything so far
    assert [len(e["output_ids"]) for e in events[:-1]] == [1, 2, 3, 4, 5, 6]
    assert events[-2]["output_ids"] == one["output_ids"] and events[-2]["text"] == one["text"]
    assert events[-2]["meta_info"]["finish_reason"] == {"type": "length"}

    with http.stream(
        "POST",
        "/generate",
        json={"text": ["a b c", "d e"], "sampling_params": GREEDY, "stream": True},
    ) as r:
        events = sse_events(r)[:-1]
    assert {e["index"] for e in events} == {0, 1}
    assert_integrity(server)


def test_logprobs_chat_completions_and_native_agree(server, http, oai):
    # The same greedy continuation through the three APIs: the same tokens and logprobs, top
    # alternatives most likely first with the chosen token first (greedy); streamed events
    # carry their own tokens' logprobs.
    p = ids(16, seed=51)
    native = http.post(
        "/generate",
        json={
            "input_ids": p,
            "sampling_params": GREEDY,
            "return_logprob": True,
            "top_logprobs_num": 3,
        },
    ).json()
    meta = native["meta_info"]
    tokens = meta["output_token_logprobs"]
    assert [t for _, t, _ in tokens] == native["output_ids"]
    assert all(text is None for _, _, text in tokens)
    assert all(top[0][:2] == tok[:2] for tok, top in zip(tokens, meta["output_top_logprobs"]))

    with_text = http.post(
        "/generate",
        json={
            "input_ids": p,
            "sampling_params": GREEDY,
            "return_logprob": True,
            "top_logprobs_num": 3,
            "return_text_in_logprobs": True,
        },
    ).json()["meta_info"]
    texts = [text for _, _, text in with_text["output_token_logprobs"]]
    assert "".join(texts) == native["text"]
    assert all(isinstance(e[2], str) for top in with_text["output_top_logprobs"] for e in top)

    kw = {"model": MODEL, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    comp = oai.completions.create(prompt=p, logprobs=3, **kw).choices[0]
    assert comp.text == native["text"]
    lp = comp.logprobs
    pairs = zip(lp.token_logprobs, tokens, strict=True)
    assert all(abs(v - w) < 1e-5 for v, (w, _, _) in pairs)
    assert len(lp.tokens) == len(lp.top_logprobs) == 6 and lp.text_offset[0] == 0
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    streamed = list(oai.completions.create(prompt=p, logprobs=3, stream=True, **kw))
    tokens_streamed = [t for c in streamed for t in (c.choices[0].logprobs or {}).tokens or []]
    assert tokens_streamed == lp.tokens

    messages = [{"role": "user", "content": "Which tier holds the prefix?"}]
    chat_kw = {"model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0}
    chat = oai.chat.completions.create(**chat_kw, logprobs=True, top_logprobs=2).choices[0]
    content = chat.logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].token == c.token for c in content)
    assert all(c.bytes == list(c.token.encode("utf-8")) for c in content)
    assert "".join(c.token for c in content) == chat.message.content
    chunks = list(oai.chat.completions.create(**chat_kw, logprobs=True, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in
                c.choices[0].logprobs.content]  # fmt: skip
    assert [e.token for e in streamed] == [c.token for c in content]
    # (the second request finds the prompt cached: float32 rounding of another order)
    assert all(abs(e.logprob - c.logprob) < 1e-5 for e, c in zip(streamed, content, strict=True))
    plain = oai.chat.completions.create(**chat_kw).choices[0]
    assert plain.logprobs is None
    assert_integrity(server)


def test_echo_scores_the_prompt(server, http, oai):
    # lm-eval style loglikelihood: echo, logprobs, max_tokens 0. The prompt's tokens come
    # back with their logprobs (the first None), equal to the native API's.
    prompt = "The hierarchical cache keeps prefixes"
    kw = {"model": MODEL, "temperature": 0, "echo": True, "logprobs": 2}
    out = oai.completions.create(prompt=prompt, max_tokens=0, **kw).choices[0]
    assert out.text == prompt and out.finish_reason == "length"
    lp = out.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:]) and len(lp.top_logprobs[1]) == 2
    assert "".join(lp.tokens) == prompt
    native = http.post(
        "/generate",
        json={
            "text": prompt,
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
        },
    ).json()
    entries = native["meta_info"]["input_token_logprobs"]
    assert len(entries) == len(lp.tokens)
    assert all(abs(a - e[0]) < 1e-5 for a, e in zip(lp.token_logprobs[1:], entries[1:]))
    # With generation: the prompt's entries, then the completion's; streamed the same way.
    gen = oai.completions.create(
        prompt=prompt, max_tokens=4, extra_body={"ignore_eos": True}, **kw
    ).choices[0]
    assert gen.text.startswith(prompt) and len(gen.logprobs.tokens) == len(lp.tokens) + 4
    streamed = list(
        oai.completions.create(
            prompt=prompt, max_tokens=4, stream=True, extra_body={"ignore_eos": True}, **kw
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == gen.text
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == gen.logprobs.tokens
    plain = oai.completions.create(prompt=prompt, max_tokens=0, model=MODEL, echo=True)
    assert plain.choices[0].text == prompt and plain.choices[0].logprobs is None
    assert_integrity(server)


def test_logit_bias_through_openai(server, http, oai):
    # OpenAI's logit_bias (token ids as strings): +100 makes greedy pick that token each time,
    # as the native API's sampling_params do.
    p = ids(9, seed=71)
    sp = {**GREEDY, "max_new_tokens": 3, "logit_bias": {"777": 100}}
    native = http.post("/generate", json={"input_ids": p, "sampling_params": sp}).json()
    assert native["output_ids"] == [777, 777, 777]
    kw = {"model": MODEL, "max_tokens": 3, "temperature": 0, "extra_body": {"ignore_eos": True}}
    out = oai.completions.create(prompt=p, logit_bias={"777": 100}, **kw)
    assert out.choices[0].text == native["text"]
    assert_integrity(server)


def test_several_prompts_and_n_choices(server, http, oai):
    # Completions: a list of prompts, n choices each (choice i * n + j: prompt i, choice j);
    # greedy choices of a prompt agree with each other and with the prompt sent alone. Seeded
    # sampling: choice j uses seed + j, so the choices differ and repeat run to run.
    p, q = ids(10, seed=8), ids(13, seed=9)
    kw = {"model": MODEL, "max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    alone = [oai.completions.create(prompt=x, **kw).choices[0].text for x in (p, q)]
    out = oai.completions.create(prompt=[p, q], n=2, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert out.usage.prompt_tokens == 23 and out.usage.completion_tokens == 20
    streamed = list(oai.completions.create(prompt=[p, q], n=2, stream=True, **kw))
    texts = ["", "", "", ""]
    for c in streamed:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [c.text for c in out.choices]

    messages = [{"role": "user", "content": "Name a cache tier."}]
    sampled = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 6,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    a = oai.chat.completions.create(**sampled, n=3, seed=11)
    b = oai.chat.completions.create(**sampled, n=3, seed=11)
    texts_a = [c.message.content for c in a.choices]
    assert texts_a == [c.message.content for c in b.choices]
    assert len(set(texts_a)) > 1
    one = oai.chat.completions.create(**sampled, seed=12)  # choice 1's seed, alone
    assert one.choices[0].message.content == texts_a[1]
    # The prompt counted once, every choice's 6 tokens.
    assert a.usage.prompt_tokens == one.usage.prompt_tokens
    assert a.usage.completion_tokens == 18
    chunks = list(oai.chat.completions.create(**sampled, n=3, seed=11, stream=True))
    streamed_texts = ["", "", ""]
    for c in chunks:
        if c.choices:
            streamed_texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert streamed_texts == texts_a
    assert_integrity(server)


def test_32_concurrent_clients_match_requests_sent_alone(server):
    oai = server.openai()
    prompts = [f"Request number {i} asks about KV tiers" for i in range(8)]
    kw = {"model": MODEL, "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    alone = [oai.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    assert len(set(alone)) > 1  # the comparison means something only if outputs differ

    def one(i: int) -> str:
        p = prompts[i % len(prompts)]
        if i % 2:
            return oai.completions.create(prompt=p, **kw).choices[0].text
        return "".join(
            c.choices[0].text for c in oai.completions.create(prompt=p, stream=True, **kw)
        )

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    assert got == [alone[i % len(prompts)] for i in range(32)]
    wait_idle(server)
    assert_integrity(server)


def test_openai_fields_without_effect_are_accepted(oai):
    """Fields that OpenAI clients send and this server has nothing to do with (storage, tags,
    the service tier, a cache key, a verbosity hint) or passes to the template
    (reasoning_effort) leave the answer as it is."""
    kw = {"model": MODEL, "messages": MSG, "max_tokens": 6, "temperature": 0}
    plain = oai.chat.completions.create(**kw)
    extra = oai.chat.completions.create(
        **kw,
        store=False,
        metadata={"task": "test"},
        service_tier="auto",
        prompt_cache_key="agent-1",
        user="u1",
        reasoning_effort="low",
        extra_body={"safety_identifier": "s1", "verbosity": "low", "modalities": ["text"]},
    )
    assert extra.choices[0].message.content == plain.choices[0].message.content
    assert extra.usage.prompt_tokens == plain.usage.prompt_tokens


def test_multi_turn_chat_reports_cached_tokens(oai):
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is a radix tree? Explain in detail."},
    ]
    kw = {"model": MODEL, "max_tokens": 4, "temperature": 0}
    first = oai.chat.completions.create(messages=messages, **kw)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And a hierarchical cache?"},
    ]
    second = oai.chat.completions.create(messages=messages, **kw)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1 > 0


# ---------------------------------------------------------------------------- bad input
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (name, method, path, body (str: raw bytes), status, message substring)
    ("malformed json", "POST", CHAT, '{"messages": [', 400, "not valid JSON"),
    ("body not an object", "POST", CHAT, "[1, 2]", 400, "must be a JSON object"),
    ("messages missing", "POST", CHAT, {"max_tokens": 3}, 400, "messages: Field required"),
    ("messages wrong type", "POST", CHAT, {"messages": "hi"}, 400, "messages: Input should be"),
    (
        "unknown field",
        "POST",
        CHAT,
        {"messages": MSG, "temprature": 0},
        400,
        "unknown field 'temprature'",
    ),
    ("unknown model", "POST", CHAT, {"messages": MSG, "model": "gpt-9"}, 404, "'gpt-9' does not"),
    (
        "audio output",
        "POST",
        CHAT,
        {"messages": MSG, "modalities": ["text", "audio"], "audio": {"voice": "alloy"}},
        400,
        "audio is not supported",
    ),
    (
        "deprecated functions",
        "POST",
        CHAT,
        {"messages": MSG, "functions": [{"name": "f"}]},
        400,
        "functions (deprecated; use tools) is not supported",
    ),
    ("empty messages", "POST", CHAT, {"messages": []}, 400, "messages must not be empty"),
    ("empty prompt", "POST", "/v1/completions", {"prompt": ""}, 400, "the prompt is empty"),
    (
        "prompt over the context",
        "POST",
        "/v1/completions",
        {"prompt": [7] * 600},
        400,
        "the prompt has 600 tokens; the context length is 512",
    ),
    (
        "negative max_tokens",
        "POST",
        CHAT,
        {"messages": MSG, "max_tokens": -5},
        400,
        "max_tokens must be at least 1; got -5",
    ),
    (
        "huge max_tokens",
        "POST",
        CHAT,
        {"messages": MSG, "max_tokens": 100000},
        400,
        "max_tokens=100000 is too large",
    ),
    (
        "max_tokens not an integer",
        "POST",
        CHAT,
        {"messages": MSG, "max_tokens": "lots"},
        400,
        "max_tokens: Input should be a valid integer",
    ),
    (
        "negative temperature",
        "POST",
        CHAT,
        {"messages": MSG, "temperature": -1},
        400,
        "temperature must be in [0, 100]; got -1",
    ),
    ("top_p zero", "POST", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p must be"),
    ("n above 64", "POST", CHAT, {"messages": MSG, "n": 65}, 400, "n must be in [1, 64]; got 65"),
    ("n of 0", "POST", "/v1/completions", {"prompt": "a", "n": 0}, 400, "n must be in [1, 64]"),
    (
        "stop of the wrong type",
        "POST",
        CHAT,
        {"messages": MSG, "stop": 5},
        400,
        "stop: must be a string or a list of strings; got 5",
    ),
    (
        "image content",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        400,
        "messages.0.content: must be a string or a list of",
    ),
    (
        "penalty out of range",
        "POST",
        CHAT,
        {"messages": MSG, "frequency_penalty": 3},
        400,
        "frequency_penalty must be in [-2, 2]; got 3.0",
    ),
    (
        "min_tokens over max_tokens",
        "POST",
        "/v1/completions",
        {"prompt": "a", "max_tokens": 4, "min_tokens": 5},
        400,
        "min_new_tokens must be in [0, max_new_tokens=4]; got 5",
    ),
    (
        "top_logprobs without logprobs",
        "POST",
        CHAT,
        {"messages": MSG, "top_logprobs": 3},
        400,
        "top_logprobs needs logprobs=true",
    ),
    (
        "top_logprobs over 20",
        "POST",
        CHAT,
        {"messages": MSG, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs must be in [0, 20]; got 21",
    ),
    (
        "completion logprobs over 20",
        "POST",
        "/v1/completions",
        {"prompt": "a", "logprobs": 21},
        400,
        "logprobs must be in [0, 20]; got 21",
    ),
    (
        "logprob_start_len past the prompt",
        "POST",
        "/generate",
        {"input_ids": [5, 6, 7], "return_logprob": True, "logprob_start_len": 3},
        400,
        "logprob_start_len must be -1 (no prompt logprobs) or in [0, 3) (the prompt has 3 tokens)",
    ),
    (
        "unknown abort id field",
        "POST",
        "/abort_request",
        {"id": "x"},
        400,
        "rid: Field required",
    ),
    (
        "native top_logprobs_num without return_logprob",
        "POST",
        "/generate",
        {"text": "a", "top_logprobs_num": 2},
        400,
        "top_logprobs_num needs return_logprob",
    ),
    (
        "too many choices",
        "POST",
        "/v1/completions",
        {"prompt": ["a", "b"], "n": 40},
        400,
        "2 prompts x n=40 is 80 choices; at most 64 a request",
    ),
    (
        "an empty prompt among several",
        "POST",
        "/v1/completions",
        {"prompt": [[5, 6], []]},
        400,
        "the prompt is empty",
    ),
    (
        "token id outside the vocabulary",
        "POST",
        "/generate",
        {"input_ids": [1, 999999]},
        400,
        "token id 999999 is outside the vocabulary",
    ),
    (
        "text and input_ids",
        "POST",
        "/generate",
        {"text": "a", "input_ids": [1]},
        400,
        "give exactly one of text and input_ids",
    ),
    (
        "unknown sampling parameter",
        "POST",
        "/generate",
        {"text": "a", "sampling_params": {"temprature": 0}},
        400,
        "unknown sampling parameter(s): temprature",
    ),
    (
        "max_new_tokens over the context",
        "POST",
        "/generate",
        {"text": "a", "sampling_params": {"max_new_tokens": 5000}},
        400,
        "max_new_tokens=5000 is too large",
    ),
    (
        "tokenize prompt and messages",
        "POST",
        "/tokenize",
        {"prompt": "a", "messages": MSG},
        400,
        "give exactly one of prompt and messages",
    ),
    (
        "tokenize a prompt with a chat field",
        "POST",
        "/v1/tokenize",
        {"prompt": "a", "add_generation_prompt": False},
        400,
        "only a messages request takes add_generation_prompt",
    ),
    ("tokenize no messages", "POST", "/tokenize", {"messages": []}, 400, "must not be empty"),
    (
        "tokenize another model",
        "POST",
        "/tokenize",
        {"model": "gpt-4", "prompt": "a"},
        404,
        "the model 'gpt-4' does not exist",
    ),
    (
        "detokenize outside the vocabulary",
        "POST",
        "/detokenize",
        {"tokens": [1, 999999]},
        400,
        "token id 999999 is outside the vocabulary",
    ),
    ("oversized body", "POST", "/v1/completions", {"prompt": "x" * 70000}, 413, "65536 bytes"),
    ("unknown endpoint", "GET", "/v2/nothing", None, 404, "no such endpoint"),
    ("wrong method", "GET", CHAT, None, 405, "method GET is not allowed"),
    ("bad flush tier", "POST", "/flush_cache", {"tier": "l3"}, 400, "tier: Input should be"),
    (
        "device flush without L2",
        "POST",
        "/flush_cache",
        {"tier": "device"},
        400,
        "needs --enable-hierarchical-cache",
    ),
]


@pytest.mark.parametrize(
    "method,path,body,status,message",
    [b[1:] for b in BAD_REQUESTS],
    ids=[b[0] for b in BAD_REQUESTS],
)
def test_bad_input_gets_a_clear_4xx(http, method, path, body, status, message):
    if isinstance(body, str):
        r = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.request(method, path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"]
    assert err["type"] and err["code"]


def test_server_survives_bad_input(server, http, oai):
    with pytest.raises(openai.BadRequestError, match="temperature must be in"):
        oai.chat.completions.create(model=MODEL, messages=MSG, temperature=-3)
    assert http.get("/health").status_code == 200
    out = http.post("/generate", json={"text": "still alive", "sampling_params": GREEDY})
    assert out.status_code == 200 and len(out.json()["output_ids"]) == 6
    wait_idle(server)
    assert_integrity(server)


# ---------------------------------------------------------------------------- disconnects
def test_client_disconnect_aborts_and_frees_pages(server, http):
    before = stats(server)["requests_aborted"]
    body = {
        "input_ids": ids(30, seed=4),
        "sampling_params": {**GREEDY, "max_new_tokens": 400},
        "stream": True,
    }
    with http.stream("POST", "/generate", json=body) as r:
        lines = r.iter_lines()
        next_data(lines)
        next_data(lines)
        # leaving the block closes the connection mid-stream
    # and a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout), server.http(timeout=1.0) as impatient:
        impatient.post(
            "/generate",
            json={
                "input_ids": ids(30, seed=5),
                "sampling_params": {**GREEDY, "max_new_tokens": 400},
            },
        )
    s = wait_idle(server)
    assert s["requests_aborted"] == before + 2
    assert s["device_free_pages"] + s["device_cached_pages"] == s["device_total_pages"]
    assert_integrity(server)


def test_abort_request_by_id_ends_its_stream(server, http):
    # POST /abort_request stops a request another connection is streaming: that stream ends
    # with finish reason "abort" (not hanging), its pages are freed; an unknown id is a 404.
    before = stats(server)["requests_aborted"]
    body = {
        "input_ids": ids(25, seed=61),
        "sampling_params": {**GREEDY, "max_new_tokens": 400},
        "stream": True,
        "rid": "to-abort",
    }
    with http.stream("POST", "/generate", json=body) as r:
        lines = r.iter_lines()
        next_data(lines)
        with server.http() as other:
            assert other.post("/abort_request", json={"rid": "to-abort"}).json() == {
                "success": True
            }
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "abort", "message": "aborted"}
    assert len(events[-1]["output_ids"]) < 400
    r = http.post("/abort_request", json={"rid": "to-abort"})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "no request with id 'to-abort' is in flight"
    s = wait_idle(server)
    assert s["requests_aborted"] == before + 1
    assert_integrity(server)


# ---------------------------------------------------------------------------- metrics
def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_parse_and_move(http):
    before = metric_values(http.get("/metrics").text)
    p = ids(24, seed=6)
    http.post("/generate", json={"input_ids": p, "sampling_params": GREEDY})
    http.post("/generate", json={"input_ids": p, "sampling_params": GREEDY})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = metric_values(r.text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("kvtier:requests_total", finish_reason="length") == 2
    assert delta("kvtier:generation_tokens_total") == 12
    assert delta("kvtier:prompt_tokens_total") == 48
    assert delta("kvtier:cached_tokens_total", tier="device") == 23
    assert delta("kvtier:time_to_first_token_seconds_count") == 2
    assert delta("kvtier:inter_token_latency_seconds_count") == 10
    assert delta("kvtier:e2e_request_latency_seconds_count") == 2
    assert delta("kvtier:forward_steps_total") > 0
    # Overlap scheduling: each request's decode steps for tokens 3..6 go ahead of the previous
    # step's results (the first decode step, for token 2, follows the prefill's).
    assert delta("kvtier:decode_steps_ahead_total") == 8
    assert 0 < after[("kvtier:cache_hit_rate", ())] <= 1
    assert after[("kvtier:gpu_pool_total_tokens", ())] > 0
    assert ("kvtier:l2_total_tokens", ()) not in after  # no L2 on this server
    assert after[("kvtier:http_errors_total", (("status", "400"),))] > 0


# ---------------------------------------------------------------------------- aux server
def test_api_key_required_except_health(aux):
    with httpx.Client(base_url=aux.url, trust_env=False) as c:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401
            assert "invalid or missing API key" in r.json()["error"]["message"]
        r = c.post("/generate", json={"text": "x"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=aux.url + "/v1", api_key="wrong", max_retries=0).models.list()
    out = aux.openai().completions.create(model=MODEL, prompt="hello", max_tokens=3)
    assert out.usage.completion_tokens <= 3
    # Anthropic's clients send the key as x-api-key; a wrong one gets Anthropic's error shape.
    with httpx.Client(base_url=aux.url, trust_env=False) as c:
        body = {"messages": [{"role": "user", "content": "x"}]}
        r = c.post("/v1/messages/count_tokens", json=body, headers={"x-api-key": "nope"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    got = aux.anthropic().messages.create(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hello"}]
    )
    assert got.usage.output_tokens <= 3


def test_queue_full_is_429_then_recovers(aux):
    long = {"sampling_params": {**GREEDY, "max_new_tokens": 300}}

    async def scenario() -> httpx.Response:
        async with aux.ahttp() as a, aux.ahttp() as b, aux.ahttp() as c:
            body = {"input_ids": ids(10, 7), **long, "stream": True}
            async with a.stream("POST", "/generate", json=body) as running:
                lines = running.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        break  # one running request now (--max-running-requests 1)
                queued = asyncio.create_task(
                    b.post("/generate", json={"input_ids": ids(10, 8), **long})
                )
                while (await c.get("/get_server_info")).json()["num_waiting"] != 1:
                    await asyncio.sleep(0.02)
                r = await c.post(
                    "/generate", json={"input_ids": ids(10, 9), "sampling_params": GREEDY}
                )
                queued.cancel()  # the client goes away: the queued request is aborted
                await asyncio.gather(queued, return_exceptions=True)
            return r

    r = asyncio.run(scenario())
    assert r.status_code == 429, r.text
    assert "requests are waiting (--max-queued-requests)" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "rate_limit_error"
    wait_idle(aux)
    assert_integrity(aux)
    with aux.http() as c:
        ok = c.post("/generate", json={"text": "again", "sampling_params": GREEDY})
    assert ok.status_code == 200


def test_flush_device_then_identical_request_hits_l2(aux):
    p = {"input_ids": ids(40, seed=11), "sampling_params": GREEDY}
    with aux.http() as c:
        first = c.post("/generate", json=p).json()
        r = c.post("/flush_cache", json={"tier": "device"})
        assert r.status_code == 200 and r.json()["success"] is True
        before = metric_values(c.get("/metrics").text)
        second = c.post("/generate", json=p).json()
        assert second["output_ids"] == first["output_ids"]
        # 40 tokens fill 10 pages of 4: all but the last come from L2, 3 of them through the
        # last page's head (a tail copy).
        assert second["meta_info"]["cached_tokens_by_tier"] == {"dram": 39}
        metrics = metric_values(c.get("/metrics").text)
        tail = ("kvtier:tail_tokens_copied_total", ())
        assert metrics[tail] - before.get(tail, 0.0) == 3
        assert metrics[("kvtier:l2_total_tokens", ())] > 0
        assert metrics[("kvtier:loaded_bytes_total", ())] > 0
        assert metrics[("kvtier:cached_tokens_total", (("tier", "dram"),))] > 0
    assert_integrity(aux)


def test_flush_all_refused_while_busy(aux):
    body = {
        "input_ids": ids(12, seed=12),
        "sampling_params": {**GREEDY, "max_new_tokens": 200},
        "stream": True,
    }
    with aux.http() as c:
        with c.stream("POST", "/generate", json=body) as r:
            lines = r.iter_lines()
            next_data(lines)
            busy = c.post("/flush_cache")
            assert busy.status_code == 400
            assert "requests are running or waiting" in busy.json()["error"]["message"]
        wait_idle(aux)
        done = c.post("/flush_cache")
        assert done.status_code == 200 and done.json()["success"] is True
        s = c.get("/get_server_info").json()
        assert s["device_free_pages"] == s["device_total_pages"] and s["l2_used_tokens"] == 0


# ---------------------------------------------------------------------------- shutdown (last)
def test_sigterm_aborts_in_flight_and_exits_0(aux):
    events: list[Any] = []
    first = threading.Event()

    def stream() -> None:
        body = {
            "input_ids": ids(10, 10),
            "sampling_params": {**GREEDY, "max_new_tokens": 400},
            "stream": True,
        }
        with aux.http() as c, c.stream("POST", "/generate", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert first.wait(30)
    start = time.monotonic()
    aux.proc.send_signal(signal.SIGTERM)
    assert aux.proc.wait(15) == 0, aux.log()
    assert time.monotonic() - start < 10
    t.join(5)
    assert not t.is_alive()
    assert events[-1] == "[DONE]"
    assert "shutting down" in json.loads(events[-2])["error"]["message"]
    assert "Traceback" not in aux.log()


def test_dead_scheduler_gives_503_not_hangs(server):
    pid = stats(server)["scheduler_pid"]
    os.kill(pid, signal.SIGKILL)
    with server.http(timeout=10.0) as c:
        deadline = time.monotonic() + 5
        while c.get("/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "scheduler process exited" in c.get("/health").json()["error"]["message"]
        r = c.post("/generate", json={"text": "anyone?", "sampling_params": GREEDY})
        assert r.status_code == 503
        assert "scheduler process exited" in r.json()["error"]["message"]
        assert c.get("/metrics").status_code == 200  # request-level metrics are still served
        r = c.get("/health_generate")
        assert r.status_code == 503
        assert "scheduler process exited" in r.json()["error"]["message"]
    assert server.terminate() == 0


# ---------------------------------------------------------------------------- in-process
def test_guard_middleware_draining_and_chunked_body():
    """What the subprocess tests cannot time reliably: 503 once draining, and 413 for a body
    without Content-Length that grows past the limit while it is read."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"n": len(await request.body())}

    state = ServerState()
    app.add_middleware(GuardMiddleware, state=state, api_key=None, max_body_bytes=100)
    with TestClient(app) as c:
        assert c.post("/echo", content=b"x" * 50).json() == {"n": 50}
        r = c.post("/echo", content=iter([b"x" * 60, b"x" * 60]))
        assert r.status_code == 413 and "limit of 100 bytes" in r.json()["error"]["message"]
        state.draining = True
        r = c.post("/echo", content=b"x")
        assert r.status_code == 503 and r.json()["error"]["message"] == (
            "the server is shutting down"
        )
