"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``), so that
clients written for it (the ``anthropic`` SDK, which the tests drive; coding agents built on
it take the address as ``ANTHROPIC_BASE_URL``) run on this server, as vLLM and llama.cpp offer.

A request is translated into a chat completion request and runs the chat API's path (the same
prompt, prefix cache, tool parsing, reasoning parser and sampling); the answer comes back as
Anthropic's content blocks:

- ``system`` (a string or text blocks) becomes the system message; a user turn's
  ``tool_result`` blocks become tool messages (before the turn's text), an assistant turn's
  ``tool_use`` blocks its tool calls; ``thinking`` blocks of earlier turns are dropped (chat
  templates drop earlier reasoning); image and document blocks are refused (400).
- ``tools`` (``name``, ``description``, ``input_schema``) become function tools;
  ``tool_choice`` ``auto`` / ``any`` / ``tool`` / ``none`` map to OpenAI's ``auto`` /
  ``required`` / the named function / ``none`` (``disable_parallel_tool_use``: one call);
  ``auto`` needs ``--tool-call-parser``, as in the chat API.
- ``thinking`` (``enabled`` / ``disabled``) sets the chat template's ``enable_thinking`` (Qwen3);
  with ``--reasoning-parser`` the model's thinking comes back as a ``thinking`` block.
- ``stop_sequences``, ``temperature``, ``top_p``, ``top_k`` as sampling parameters.
- stop reasons: ``end_turn``, ``max_tokens``, ``stop_sequence`` (with the sequence),
  ``tool_use``. ``usage.input_tokens`` counts the prompt tokens not read from the prefix cache,
  ``cache_read_input_tokens`` those that were (Anthropic's split).

Streamed (``stream: true``): Anthropic's named events (``message_start``,
``content_block_start`` / ``_delta`` / ``_stop`` with ``text_delta``, ``thinking_delta`` and
``input_json_delta``, ``message_delta``, ``message_stop``), tool inputs as the model writes
them. Errors have Anthropic's shape (``errors.ANTHROPIC_PREFIX``). Fields this server does
not use (``metadata``, ``cache_control``, ``service_tier``, ...) are ignored, as
Anthropic-compatible servers do, since clients add new ones often.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from kvtier.scheduler.request import ReqOutput
from kvtier.server.chat import chat_message, template_message
from kvtier.server.errors import APIError
from kvtier.server.openai_api import (
    ChatJob,
    chat_stream_chunks,
    collect,
    finish_of,
    start_chat,
)
from kvtier.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    MessageToolCall,
    NamedFunction,
    NamedToolChoice,
    Tool,
)
from kvtier.server.serving import Frontend, frontend
from kvtier.server.streaming import named_sse, sse_response

router = APIRouter()


class _Lenient(BaseModel):
    # Anthropic's clients send fields this server has no use for (and add new ones): ignored.
    model_config = ConfigDict(extra="ignore")


class ContentBlock(_Lenient):
    type: str
    text: str | None = None
    # tool_use
    id: str | None = None
    name: str | None = None
    input: Any = None
    # tool_result
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = None
    is_error: bool | None = None
    # thinking
    thinking: str | None = None


class AnthropicMessage(_Lenient):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class AnthropicTool(_Lenient):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" (or absent) for a client's own tools


class AnthropicToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(_Lenient):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class MessagesRequest(_Lenient):
    model: str | None = None
    max_tokens: int
    messages: list[AnthropicMessage]
    system: str | list[ContentBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None


class CountTokensRequest(_Lenient):
    model: str | None = None
    messages: list[AnthropicMessage]
    system: str | list[ContentBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None


def _text_of(content: str | list[ContentBlock] | None, where: str) -> str:
    """The text of a string or of text blocks (other blocks refused, naming ``where``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if block.type != "text":
            raise APIError(400, f"{where}: {block.type} content is not supported (text only)")
        parts.append(block.text or "")
    return "".join(parts)


def _chat_messages(body: MessagesRequest | CountTokensRequest) -> list[ChatMessage]:
    """The conversation as chat messages (see the module docstring)."""
    out: list[ChatMessage] = []
    if body.system is not None:
        out.append(ChatMessage(role="system", content=_text_of(body.system, "system")))
    if not body.messages:
        raise APIError(400, "messages must not be empty")
    for i, m in enumerate(body.messages):
        blocks = (
            [ContentBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        )
        texts: list[str] = []
        calls: list[MessageToolCall] = []
        for j, block in enumerate(blocks):
            where = f"messages.{i}.content.{j}"
            if block.type == "text":
                texts.append(block.text or "")
            elif block.type == "tool_result" and m.role == "user":
                if not block.tool_use_id:
                    raise APIError(400, f"{where}: a tool_result needs tool_use_id")
                result = _text_of(block.content, where)
                out.append(ChatMessage(role="tool", content=result, tool_call_id=block.tool_use_id))
            elif block.type == "tool_use" and m.role == "assistant":
                if not block.id or not block.name:
                    raise APIError(400, f"{where}: a tool_use needs id and name")
                arguments = json.dumps(block.input if block.input is not None else {})
                calls.append(
                    MessageToolCall(
                        id=block.id, function=FunctionCall(name=block.name, arguments=arguments)
                    )
                )
            elif block.type in ("thinking", "redacted_thinking") and m.role == "assistant":
                continue  # earlier reasoning: chat templates drop it
            else:
                raise APIError(
                    400, f"{where}: {block.type} content is not supported in a {m.role} message"
                )
        text = "".join(texts)
        if m.role == "assistant":
            out.append(ChatMessage(role="assistant", content=text, tool_calls=calls or None))
        elif text or isinstance(m.content, str):
            out.append(ChatMessage(role="user", content=text))
    return out


def _tools(body: MessagesRequest | CountTokensRequest) -> list[Tool] | None:
    if not body.tools:
        return None
    tools = []
    for t in body.tools:
        if t.type not in (None, "custom"):
            raise APIError(400, f"tool {t.name!r}: server tools ({t.type}) are not supported")
        params = t.input_schema or {"type": "object", "properties": {}}
        tools.append(
            Tool(
                type="function",
                function=FunctionDefinition(
                    name=t.name, description=t.description, parameters=params
                ),
            )
        )
    return tools


def _tool_choice(choice: AnthropicToolChoice | None) -> Any:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, 'tool_choice of type "tool" needs a name')
        return NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def to_chat_request(body: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    """The chat completion request that runs an Anthropic request."""
    choice = body.tool_choice
    kwargs: dict[str, Any] = {
        "model": body.model,
        "messages": _chat_messages(body),
        "tools": _tools(body),
        "tool_choice": _tool_choice(choice),
        "parallel_tool_calls": not (choice is not None and choice.disable_parallel_tool_use),
    }
    if body.thinking is not None:
        kwargs["chat_template_kwargs"] = {"enable_thinking": body.thinking.type != "disabled"}
    if isinstance(body, MessagesRequest):
        if body.max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1; got {body.max_tokens}")
        kwargs.update(
            max_tokens=body.max_tokens,
            stop=body.stop_sequences or None,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stream=body.stream,
        )
    return ChatCompletionRequest(**kwargs)


def _stop_reason(reason: str | None, matched: Any, stops: list[str]) -> tuple[str, str | None]:
    """Anthropic's stop_reason (and stop_sequence) for a chat finish reason."""
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    if isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return "end_turn", None


def _usage(meta: dict[str, Any]) -> dict[str, int]:
    cached = int(meta.get("cached_tokens", 0))
    return {
        "input_tokens": int(meta.get("prompt_tokens", 0)) - cached,
        "output_tokens": int(meta.get("completion_tokens", 0)),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _content(message: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        blocks.append(
            {"type": "thinking", "thinking": message["reasoning_content"], "signature": ""}
        )
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        blocks.append(
            {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": _input(fn)}
        )
    return blocks


def _input(fn: dict[str, Any]) -> Any:
    try:
        return json.loads(fn["arguments"])
    except (ValueError, RecursionError):
        return {}


class _MessageEvents:
    """Anthropic's stream events of one request, from the chat API's chunks: a content block
    is opened when its kind (thinking, text, a tool call) starts and closed when another
    starts or the message ends."""

    def __init__(self, fe: Frontend, job: ChatJob, body: ChatCompletionRequest, rid: str):
        self.chunks = chat_stream_chunks(fe, body, job, rid, 1)
        self.stops = list(body.stop) if isinstance(body.stop, list) else []
        self.id = "msg_" + rid
        self.model = fe.model.name
        self.block: tuple[str, int] | None = None  # (kind, tool call index) of the open block
        self.index = -1
        self.started = False

    def _open(self, kind: str, call: int, start: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.index += 1
        self.block = (kind, call)
        events.append({"type": "content_block_start", "index": self.index, "content_block": start})
        return events

    def _close(self) -> list[dict[str, Any]]:
        if self.block is None:
            return []
        self.block = None
        return [{"type": "content_block_stop", "index": self.index}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def on_output(self, index: int, out: ReqOutput, e2e: float) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if not self.started:
            self.started = True
            message = {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                # The prompt's split into cache reads and the rest is known from the first
                # output on (the prefill has run).
                "usage": {**_usage(out.meta_info), "output_tokens": 0},
            }
            events.append({"type": "message_start", "message": message})
        for chunk in self.chunks.on_output(index, out, e2e):
            choice = chunk["choices"][0]
            delta = choice.get("delta", {})
            if delta.get("reasoning_content"):
                if self.block is None or self.block[0] != "thinking":
                    start = {"type": "thinking", "thinking": "", "signature": ""}
                    events += self._open("thinking", -1, start)
                events.append(
                    self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]})
                )
            if delta.get("content"):
                if self.block is None or self.block[0] != "text":
                    events += self._open("text", -1, {"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": delta["content"]}))
            for call in delta.get("tool_calls") or []:
                fn = call.get("function", {})
                if call.get("id") is not None:
                    start = {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": {}}
                    events += self._open("tool", call["index"], start)
                if fn.get("arguments"):
                    events.append(
                        self._delta({"type": "input_json_delta", "partial_json": fn["arguments"]})
                    )
            if choice.get("finish_reason") is not None:
                events += self._close()
                reason, matched = finish_of(out.meta_info)
                if choice["finish_reason"] == "tool_calls":
                    reason = "tool_calls"
                stop_reason, sequence = _stop_reason(reason, matched, self.stops)
                events.append(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": sequence},
                        "usage": _usage(out.meta_info),
                    }
                )
                events.append({"type": "message_stop"})
        return events

    def on_end(self) -> list[dict[str, Any]]:
        return []


@router.post("/v1/messages", response_model=None)
async def messages(body: MessagesRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    fe = frontend(request)
    chat = to_chat_request(body)
    job, gen, rid, _ = start_chat(fe, chat)
    stops = body.stop_sequences or []
    if body.stream:
        events = _MessageEvents(fe, job, chat, rid)
        return await sse_response(request, gen, events, frame=named_sse, done=None)
    (res,) = await collect(request, gen)
    reason, matched = finish_of(res.meta_info)
    message, reason = chat_message(res.text, reason, job.plan, job.reasoning)
    stop_reason, sequence = _stop_reason(reason, matched, stops)
    return {
        "id": "msg_" + rid,
        "type": "message",
        "role": "assistant",
        "model": fe.model.name,
        "content": _content(message),
        "stop_reason": stop_reason,
        "stop_sequence": sequence,
        "usage": _usage(res.meta_info),
    }


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    """The prompt tokens of a Messages request with this conversation (and tools, unless
    tool_choice is none), whatever its length."""
    fe = frontend(request)
    chat = to_chat_request(body)
    fe.check_model(chat.model)
    tools = None
    if chat.tools and chat.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in chat.tools]
    messages = [template_message(m) for m in chat.messages]
    ids = fe.encode_chat(messages, tools, chat.chat_template_kwargs)
    return {"input_tokens": len(ids)}


__all__ = ["MessagesRequest", "router", "to_chat_request"]
