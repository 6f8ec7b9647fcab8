"""Anthropic's Messages API translated into a chat request (``anthropic_api.to_chat_request``)
and its answer into content blocks, without a server; the end-to-end runs with the official
client are in test_server.py."""

from __future__ import annotations

import pytest

from kvtier.server.anthropic_api import (
    CountTokensRequest,
    MessagesRequest,
    _content,
    _stop_reason,
    _usage,
    to_chat_request,
)
from kvtier.server.chat import template_message
from kvtier.server.errors import APIError


def _req(**kw) -> MessagesRequest:
    return MessagesRequest.model_validate({"max_tokens": 16, **kw})


def test_a_conversation_with_tool_use_and_results_becomes_chat_messages():
    req = _req(
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "two calls", "signature": "x"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "t2", "name": "w", "input": {"city": "Rome"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "18 C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "t2",
                        "content": [{"type": "text", "text": "21 C"}],
                        "is_error": False,
                    },
                    {"type": "text", "text": "Which is warmer?"},
                ],
            },
        ],
        tools=[{"name": "w", "description": "weather", "input_schema": {"type": "object"}}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        thinking={"type": "disabled"},
        stop_sequences=["END"],
        metadata={"user_id": "u"},
        extra_field_from_a_newer_client=1,
    )
    chat = to_chat_request(req)
    assert [template_message(m) for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "w", "arguments": {"city": "Paris"}},
                },
                {
                    "id": "t2",
                    "type": "function",
                    "function": {"name": "w", "arguments": {"city": "Rome"}},
                },
            ],
        },
        {"role": "tool", "content": "18 C", "tool_call_id": "t1"},
        {"role": "tool", "content": "21 C", "tool_call_id": "t2"},
        {"role": "user", "content": "Which is warmer?"},
    ]
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.tools is not None and chat.tools[0].function.parameters == {"type": "object"}
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    assert chat.stop == ["END"] and chat.max_tokens == 16 and chat.stream is False


def test_tool_choice_forms():
    named = to_chat_request(_req(messages=[{"role": "user", "content": "x"}],
                                 tool_choice={"type": "tool", "name": "w"}))  # fmt: skip
    assert named.tool_choice is not None and named.tool_choice.function.name == "w"
    for kind, want in (("auto", "auto"), ("none", "none")):
        got = to_chat_request(_req(messages=[{"role": "user", "content": "x"}],
                                   tool_choice={"type": kind}))  # fmt: skip
        assert got.tool_choice == want and got.parallel_tool_calls is True


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"messages": []}, "messages must not be empty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content.0: image content is not supported in a user message",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b"}]}
                ]
            },
            "messages.0.content.0: tool_use content is not supported in a user message",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "r"}]}]},
            "messages.0.content.0: a tool_result needs tool_use_id",
        ),
        (
            {"system": [{"type": "image"}], "messages": [{"role": "user", "content": "x"}]},
            "system: image content is not supported (text only)",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"name": "search", "type": "web_search_20250305"}],
            },
            "tool 'search': server tools (web_search_20250305) are not supported",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool"}},
            'tool_choice of type "tool" needs a name',
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens must be"),
    ],
)
def test_bad_requests_say_what_is_wrong(kw, message):
    with pytest.raises(APIError) as e:
        to_chat_request(_req(**kw))
    assert e.value.status == 400 and message in e.value.message
    assert e.value.anthropic_body()["error"]["type"] == "invalid_request_error"


def test_count_tokens_request_has_no_sampling():
    chat = to_chat_request(CountTokensRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}]}))  # fmt: skip
    assert chat.max_tokens is None and chat.stop is None


def test_answers_become_content_blocks_and_stop_reasons():
    message = {
        "role": "assistant",
        "content": "Sure.",
        "reasoning_content": "easy",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"a": 1}'}}
        ],
    }
    assert _content(message) == [
        {"type": "thinking", "thinking": "easy", "signature": ""},
        {"type": "text", "text": "Sure."},
        {"type": "tool_use", "id": "call_1", "name": "w", "input": {"a": 1}},
    ]
    assert _content({"role": "assistant", "content": ""}) == []
    assert _stop_reason("tool_calls", None, []) == ("tool_use", None)
    assert _stop_reason("length", None, []) == ("max_tokens", None)
    assert _stop_reason("stop", "END", ["END"]) == ("stop_sequence", "END")
    assert _stop_reason("stop", 151645, ["END"]) == ("end_turn", None)  # an EOS token id
    meta = {"prompt_tokens": 100, "cached_tokens": 64, "completion_tokens": 7}
    assert _usage(meta) == {
        "input_tokens": 36,
        "output_tokens": 7,
        "cache_read_input_tokens": 64,
        "cache_creation_input_tokens": 0,
    }
