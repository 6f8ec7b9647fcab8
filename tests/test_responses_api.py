"""OpenAI's Responses API translated into a chat request (``responses_api.to_chat_request``)
and its answer into output items, without a server; the end-to-end runs with the official
client are in test_server.py."""

from __future__ import annotations

import pytest

from kvtier.server.chat import template_message
from kvtier.server.errors import APIError
from kvtier.server.responses_api import ResponsesRequest, ResponseStore, _output, to_chat_request


def test_items_become_chat_messages():
    req = ResponsesRequest.model_validate(
        {
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "Paris "}, {"type": "input_text", "text": "and Rome?"}]},  # noqa: E501
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"c": "P"}'},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"c": "R"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "18"},
                {"type": "function_call_output", "call_id": "c2", "output": [
                    {"type": "input_text", "text": "21"}]},
            ],
            "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "reasoning": {"effort": "low"},
            "max_output_tokens": 32,
            "store": True,
            "metadata": {"k": "v"},
        }
    )  # fmt: skip
    chat = to_chat_request(req)
    assert [template_message(m) for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "w", "arguments": {"c": "P"}},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "w", "arguments": {"c": "R"}},
                },
            ],
        },
        {"role": "tool", "content": "18", "tool_call_id": "c1"},
        {"role": "tool", "content": "21", "tool_call_id": "c2"},
    ]
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.max_tokens == 32 and chat.reasoning_effort == "low"
    assert chat.response_format is not None and chat.response_format.type == "json_schema"
    assert chat.response_format.json_schema.schema_ == {"type": "object"}


def test_a_call_without_a_preceding_assistant_message_gets_one():
    chat = to_chat_request(ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "x"},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
    ]}))  # fmt: skip
    last = template_message(chat.messages[-1])
    assert last["role"] == "assistant" and last["content"] == ""
    assert [c["id"] for c in last["tool_calls"]] == ["c1"]


def test_output_items():
    items = _output(
        {
            "role": "assistant",
            "content": "Sure.",
            "reasoning_content": "easy",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
            ],
        }
    )
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call"]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "easy"}]
    assert items[1]["content"][0]["text"] == "Sure." and items[1]["id"].startswith("msg_")
    assert (items[2]["call_id"], items[2]["name"], items[2]["arguments"]) == ("call_1", "w", "{}")
    assert _output({"role": "assistant", "content": ""}) == []


def test_the_store_keeps_the_most_recent_with_their_conversations():
    store = ResponseStore(2)
    for n in range(3):
        out = [
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": str(n)}],
            }
        ]
        store.put({"id": f"resp_{n}", "output": out}, [{"role": "user", "content": f"q{n}"}])
    assert len(store) == 2
    with pytest.raises(APIError, match="no response 'resp_0' is kept here") as e:
        store.get("resp_0")
    assert e.value.status == 404
    conversation, response = store.get("resp_2")
    assert conversation == [{"role": "user", "content": "q2"}, *response["output"]]
    store.delete("resp_2")
    assert len(store) == 1
    # The conversation continues as chat messages (the output as the assistant's turn).
    chat = to_chat_request(ResponsesRequest(input="next"), store.get("resp_1")[0])
    assert [template_message(m) for m in chat.messages] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "next"},
    ]
    nothing = ResponseStore(0)
    nothing.put({"id": "resp_9", "output": []}, [])
    assert len(nothing) == 0
