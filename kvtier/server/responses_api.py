"""OpenAI's Responses API (``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``), for
clients written for it (the ``openai`` client's ``responses``, agent SDKs), as vLLM serves it.

A request is translated into a chat completion request and runs the chat API's path (prompt,
prefix cache, tool parsing, reasoning parser, structured output, sampling):

- ``instructions`` become the system message; ``input`` is a string (one user message) or a
  list of items: messages (``role`` and a string or ``input_text`` / ``output_text`` parts),
  ``function_call`` items (the calls of an assistant turn) and ``function_call_output`` items
  (their results, as tool messages); ``reasoning`` items of earlier turns are dropped (chat
  templates drop earlier reasoning). Images, files and item references are refused (400).
- ``tools`` of type ``function`` (``name``, ``description``, ``parameters``) and
  ``tool_choice`` (``auto``, ``none``, ``required``, ``{"type": "function", "name"}``) as in
  the chat API (``auto`` needs ``--tool-call-parser``); other tool types are refused.
- ``text.format`` (``json_schema``, ``json_object``) as ``response_format``;
  ``max_output_tokens``, ``temperature``, ``top_p``, ``parallel_tool_calls``;
  ``reasoning.effort`` reaches the chat template as ``reasoning_effort``.
- ``previous_response_id``: the most recent responses (``--responses-store-size``, 256 by
  default) are kept in the API process with their conversations, and a request that names
  one continues it (its ``input`` after that response's conversation and output; the
  ``instructions`` are the request's own, as OpenAI's). ``store: false`` keeps a response out;
  ``GET`` / ``DELETE /v1/responses/{id}`` read or drop a kept one. An unknown or dropped id
  is a 404; nothing survives a restart. ``conversation`` and ``background`` are refused.

The answer's ``output``: a ``reasoning`` item (with ``--reasoning-parser``), a ``message`` with
its ``output_text``, and a ``function_call`` item a call; ``status`` ``incomplete`` (reason
``max_output_tokens``) when the token limit cut it. Streamed: the API's events
(``response.created``, ``response.output_item.added``, ``response.output_text.delta``,
``response.function_call_arguments.delta``, ..., ``response.completed``), each with its
``sequence_number``; a call's arguments stream as the model writes them.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kvtier.scheduler.request import ReqOutput
from kvtier.server.chat import chat_message
from kvtier.server.errors import APIError
from kvtier.server.openai_api import (
    ChatJob,
    chat_stream_chunks,
    check_unsupported,
    collect,
    finish_of,
    start_chat,
)
from kvtier.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    JSONSchemaFormat,
    MessageToolCall,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    ResponsesRequest,
    Tool,
)
from kvtier.server.serving import Frontend, frontend
from kvtier.server.streaming import named_sse, sse_response

router = APIRouter()


def _parts_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of text parts")
    out = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise APIError(400, f"{where}.{k}: {kind} content is not supported (text only)")
        out.append(str(part.get("text", "")))
    return "".join(out)


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items (a string is one user message)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    return list(body.input)


def _messages(instructions: str | None, items: list[dict[str, Any]]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    if instructions:
        out.append(ChatMessage(role="system", content=instructions))
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}: unknown role {role!r}")
            text = _parts_text(item.get("content", ""), f"{where}.content")
            out.append(ChatMessage(role=role, content=text))
        elif kind == "function_call":
            call = MessageToolCall(
                id=str(item.get("call_id") or item.get("id") or ""),
                function=FunctionCall(
                    name=str(item.get("name", "")), arguments=str(item.get("arguments", "{}"))
                ),
            )
            if not call.id or not call.function.name:
                raise APIError(400, f"{where}: a function_call needs call_id and name")
            last = out[-1] if out else None
            # A turn's calls belong on its assistant message (the chat templates' form).
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                out.append(ChatMessage(role="assistant", content="", tool_calls=[call]))
        elif kind == "function_call_output":
            if not item.get("call_id"):
                raise APIError(400, f"{where}: a function_call_output needs call_id")
            result = _parts_text(item.get("output", ""), f"{where}.output")
            out.append(ChatMessage(role="tool", content=result, tool_call_id=item["call_id"]))
        elif kind == "reasoning":
            continue  # earlier reasoning: chat templates drop it
        else:
            raise APIError(400, f"{where}: {kind} items are not supported")
    if not out:
        raise APIError(400, "input must not be empty")
    return out


def _tools(body: ResponsesRequest) -> list[Tool] | None:
    if not body.tools:
        return None
    tools = []
    for i, t in enumerate(body.tools):
        if t.get("type") != "function":
            raise APIError(400, f"tools.{i}: tool type {t.get('type')!r} is not supported")
        if not t.get("name"):
            raise APIError(400, f"tools.{i}: a function tool needs a name")
        fn = FunctionDefinition(
            name=t["name"],
            description=t.get("description"),
            parameters=t.get("parameters") or {"type": "object", "properties": {}},
            strict=t.get("strict"),
        )
        tools.append(Tool(type="function", function=fn))
    return tools


def _tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or isinstance(choice, str):
        if choice not in (None, "auto", "none", "required"):
            raise APIError(400, f"tool_choice {choice!r} is not one of auto, none, required")
        return choice
    if choice.get("type") == "function" and choice.get("name"):
        return NamedToolChoice(type="function", function=NamedFunction(name=choice["name"]))
    raise APIError(400, f"tool_choice {choice!r} is not supported")


def _response_format(text: dict[str, Any] | None) -> ResponseFormat | None:
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.get("type") == "json_schema":
        schema = JSONSchemaFormat.model_validate(
            {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        )
        return ResponseFormat(type="json_schema", json_schema=schema)
    raise APIError(400, f"text.format type {fmt.get('type')!r} is not supported")


def to_chat_request(
    body: ResponsesRequest, history: list[dict[str, Any]] | None = None
) -> ChatCompletionRequest:
    """The chat completion request that runs a Responses request, after ``history`` (the
    conversation of the response it continues, as input items)."""
    check_unsupported(
        {
            "conversation": body.conversation is not None,
            "background": bool(body.background),
            "max_tool_calls": body.max_tool_calls is not None,
            "top_logprobs": bool(body.top_logprobs),
            "prompt": body.prompt is not None,
        }
    )
    if body.max_output_tokens is not None and body.max_output_tokens < 1:
        raise APIError(400, f"max_output_tokens must be at least 1; got {body.max_output_tokens}")
    effort = (body.reasoning or {}).get("effort")
    return ChatCompletionRequest(
        model=body.model,
        messages=_messages(body.instructions, [*(history or []), *input_items(body)]),
        tools=_tools(body),
        tool_choice=_tool_choice(body.tool_choice),
        parallel_tool_calls=body.parallel_tool_calls,
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stream=body.stream,
        response_format=_response_format(body.text),
        reasoning_effort=effort,
    )


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(meta: dict[str, Any]) -> dict[str, Any]:
    prompt, out = int(meta.get("prompt_tokens", 0)), int(meta.get("completion_tokens", 0))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(meta.get("cached_tokens", 0))},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + out,
    }


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": "completed",
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [_text_part(text)],
    }


def _call_item(item_id: str, call_id: str, name: str, args: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": args,
        "status": status,
    }


def _output(message: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        items.append(_reasoning_item(_item_id("rs"), message["reasoning_content"]))
    if message.get("content"):
        items.append(_message_item(_item_id("msg"), message["content"]))
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        items.append(
            _call_item(_item_id("fc"), call["id"], fn["name"], fn["arguments"], "completed")
        )
    return items


class _ResponseShell:
    """The response object's fields other than its output, status and usage."""

    def __init__(self, fe: Frontend, body: ResponsesRequest, rid: str, stored: bool) -> None:
        self.fields: dict[str, Any] = {
            "id": "resp_" + rid,
            "object": "response",
            "created_at": int(time.time()),
            "model": fe.model.name,
            "instructions": body.instructions,
            "tools": body.tools or [],
            "tool_choice": body.tool_choice or "auto",
            "parallel_tool_calls": body.parallel_tool_calls,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id,
            "reasoning": body.reasoning,
            "text": body.text or {"format": {"type": "text"}},
            "truncation": body.truncation or "disabled",
            "metadata": body.metadata or {},
            "store": stored,
            "error": None,
        }

    def build(
        self, output: list[dict[str, Any]], reason: str | None, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        if reason is None:
            status, details = "in_progress", None
        elif reason == "length":
            status, details = "incomplete", {"reason": "max_output_tokens"}
        else:
            status, details = "completed", None
        return {
            **self.fields,
            "status": status,
            "incomplete_details": details,
            "output": output,
            "usage": usage,
        }


class _ResponseEvents:
    """The Responses API's stream events of one request, from the chat API's chunks: an output
    item is opened when its kind (reasoning, message, a call) starts and closed, with its
    ``done`` events, when another starts or the response ends."""

    def __init__(
        self, fe: Frontend, job: ChatJob, chat: ChatCompletionRequest, shell: _ResponseShell
    ) -> None:
        self.chunks = chat_stream_chunks(fe, chat, job, shell.fields["id"], 1)
        self.shell = shell
        # Called with the finished response (to keep it).
        self.on_done: Callable[[dict[str, Any]], None] | None = None
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being written
        self.text = ""  # the open item's text or arguments so far

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def _start(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._finish()
        self.open, self.text = item, ""
        n = len(self.output)
        events.append(self._event("response.output_item.added", output_index=n, item=item))
        if item["type"] == "message":
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=n,
                    content_index=0,
                    part=_text_part(""),
                )
            )
        return events

    def _add(self, delta: str) -> dict[str, Any]:
        assert self.open is not None
        self.text += delta
        kind = {
            "message": "response.output_text.delta",
            "reasoning": "response.reasoning_text.delta",
            "function_call": "response.function_call_arguments.delta",
        }[self.open["type"]]
        where: dict[str, Any] = {"item_id": self.open["id"], "output_index": len(self.output)}
        if self.open["type"] != "function_call":
            where["content_index"] = 0
        return self._event(kind, **where, delta=delta)

    def _finish(self) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        n = len(self.output)
        events = []
        where = {"item_id": item["id"], "output_index": n}
        if item["type"] == "message":
            done = _message_item(item["id"], self.text)
            events.append(
                self._event("response.output_text.done", **where, content_index=0, text=self.text)
            )
            events.append(
                self._event(
                    "response.content_part.done",
                    **where,
                    content_index=0,
                    part=_text_part(self.text),
                )
            )
        elif item["type"] == "reasoning":
            done = _reasoning_item(item["id"], self.text)
            events.append(
                self._event(
                    "response.reasoning_text.done", **where, content_index=0, text=self.text
                )
            )
        else:
            done = _call_item(item["id"], item["call_id"], item["name"], self.text, "completed")
            events.append(
                self._event("response.function_call_arguments.done", **where, arguments=self.text)
            )
        self.output.append(done)
        events.append(self._event("response.output_item.done", output_index=n, item=done))
        return events

    def on_output(self, index: int, out: ReqOutput, e2e: float) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.seq == 0:
            shell = self.shell.build([], None, None)
            events.append(self._event("response.created", response=shell))
            events.append(self._event("response.in_progress", response=shell))
        for chunk in self.chunks.on_output(index, out, e2e):
            choice = chunk["choices"][0]
            delta = choice.get("delta", {})
            if delta.get("reasoning_content"):
                if self.open is None or self.open["type"] != "reasoning":
                    events += self._start(_reasoning_item(_item_id("rs"), ""))
                events.append(self._add(delta["reasoning_content"]))
            if delta.get("content"):
                if self.open is None or self.open["type"] != "message":
                    events += self._start(_message_item(_item_id("msg"), "", "in_progress"))
                events.append(self._add(delta["content"]))
            for call in delta.get("tool_calls") or []:
                fn = call.get("function", {})
                if call.get("id") is not None:
                    item = _call_item(_item_id("fc"), call["id"], fn["name"], "", "in_progress")
                    events += self._start(item)
                if fn.get("arguments"):
                    events.append(self._add(fn["arguments"]))
            if choice.get("finish_reason") is not None:
                events += self._finish()
                reason, _ = finish_of(out.meta_info)
                final = self.shell.build(self.output, reason, _usage(out.meta_info))
                kind = "response.incomplete" if reason == "length" else "response.completed"
                events.append(self._event(kind, response=final))
                if self.on_done is not None:
                    self.on_done(final)
        return events

    def on_end(self) -> list[dict[str, Any]]:
        return []


class ResponseStore:
    """The most recent responses, at most ``capacity`` (the oldest dropped first): each with
    its conversation as input items (its history, its input, then its output), which a later
    request's previous_response_id continues."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = OrderedDict()

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        if self.capacity == 0:
            return
        self._items[response["id"]] = ([*conversation, *response["output"]], response)
        self._items.move_to_end(response["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(conversation, response); 404 for an id not kept."""
        entry = self._items.get(response_id)
        if entry is None:
            raise APIError(
                404,
                f"no response {response_id!r} is kept here (the most recent "
                f"{self.capacity}, --responses-store-size; none survive a restart)",
                "response_not_found",
            )
        return entry

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._items[response_id]

    def __len__(self) -> int:
        return len(self._items)


def response_store(request: Request) -> ResponseStore:
    """The API process's store (made on first use; handlers run on one event loop)."""
    state = request.app.state
    store = getattr(state, "response_store", None)
    if store is None:
        args = getattr(state, "server_args", None)
        store = ResponseStore(args.responses_store_size if args is not None else 0)
        state.response_store = store
    return store


@router.post("/v1/responses", response_model=None)
async def responses(body: ResponsesRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    fe = frontend(request)
    store = response_store(request)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        if store.capacity == 0:
            raise APIError(
                400,
                "previous_response_id needs kept responses: this server keeps none "
                "(--responses-store-size 0)",
            )
        history = store.get(body.previous_response_id)[0]
    chat = to_chat_request(body, history)
    job, gen, rid, _ = start_chat(fe, chat)
    keep = body.store is not False and store.capacity > 0
    shell = _ResponseShell(fe, body, rid, keep)
    conversation = [*history, *input_items(body)]

    def done(response: dict[str, Any]) -> None:
        if keep:
            store.put(response, conversation)

    if body.stream:
        events = _ResponseEvents(fe, job, chat, shell)
        events.on_done = done
        return await sse_response(request, gen, events, frame=named_sse, done=None)
    (res,) = await collect(request, gen)
    reason, _ = finish_of(res.meta_info)
    message, reason = chat_message(res.text, reason, job.plan, job.reasoning)
    response = shell.build(_output(message), reason, _usage(res.meta_info))
    done(response)
    return response


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict[str, Any]:
    return response_store(request).get(response_id)[1]


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    response_store(request).delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


__all__ = ["ResponseStore", "ResponsesRequest", "router", "to_chat_request"]
