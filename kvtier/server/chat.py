"""What the chat endpoint adds to a completion: the conversation in the form chat templates
take, how a request's tools are served (the model's own calls parsed, or its output
constrained to them), and a finished choice's message (reasoning, content, tool calls)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvtier.server.errors import APIError
from kvtier.server.forced_calls import (
    ForcedCallParser,
    IncrementalForcedCall,
    IncrementalRequiredCalls,
    forced_schema,
)
from kvtier.server.protocol import ChatCompletionRequest, ChatMessage
from kvtier.server.reasoning_parser import split
from kvtier.server.serving import Frontend
from kvtier.server.tool_parser import (
    CallParser,
    IncrementalToolParser,
    StreamingToolParser,
    parse,
)
from kvtier.server.xml_tool_parser import XmlToolParser


def template_message(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it (Hugging Face's convention): text content, an
    assistant's calls with their arguments as an object where they parse as one."""
    msg: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name is not None:
        msg["name"] = m.name
    if m.tool_call_id is not None:
        msg["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            try:
                args: Any = json.loads(call.function.arguments)
            except (ValueError, RecursionError):
                # Not JSON (or past json.loads' limits): the template gets the text.
                args = call.function.arguments
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": args},
                }
            )
        msg["tool_calls"] = calls
    return msg


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request's tools are served: the definitions shown to the model, and either
    the model's own calls parsed (``forced`` None: tool_choice "auto") or its output
    constrained to the calls (``forced``: "required", or the named function)."""

    tools: list[dict[str, Any]]
    forced: str | None
    max_calls: int | None
    # The format of the model's own calls (--tool-call-parser): qwen3_coder's XML, or the
    # JSON-in-tags of qwen25 / hermes.
    format: str = "qwen25"

    def parser(self) -> CallParser:
        """The parser of a finished text."""
        if self.forced is None:
            if self.format == "qwen3_coder":
                return XmlToolParser(self.tools, self.max_calls)
            return StreamingToolParser(self.max_calls)
        return ForcedCallParser(None if self.forced == "required" else self.forced)

    def stream_parser(self) -> CallParser:
        """The parser of a streamed completion: every call streams its arguments."""
        if self.forced is None:
            if self.format == "qwen3_coder":
                return XmlToolParser(self.tools, self.max_calls)
            return IncrementalToolParser(self.max_calls)
        if self.forced != "required":
            return IncrementalForcedCall(self.forced)
        return IncrementalRequiredCalls()

    def constraint(self) -> dict[str, str] | None:
        """The structured-output parameter of a forced call (None: the request's own)."""
        if self.forced is None:
            return None
        name = None if self.forced == "required" else self.forced
        return {"json_schema": json.dumps(forced_schema(self.tools, name, self.max_calls))}


def chat_message(
    text: str, reason: str | None, plan: ToolPlan | None, reasoning: str | None = None
) -> tuple[dict[str, Any], str | None]:
    """A finished choice's message and finish reason: with a reasoning parser (``reasoning``,
    its mode) the thinking goes to ``reasoning_content``; with tools the text's calls become
    ``tool_calls`` (the reason ``tool_calls`` when the model stopped by itself)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning is not None:
        thought, text = split(text, reasoning)
        message["content"] = text
        if thought is not None:
            message["reasoning_content"] = thought
    if plan is None:
        return message, reason
    content, calls = parse(text, parser=plan.parser())
    message["content"] = content
    if calls:
        message["tool_calls"] = [call.to_dict() for call in calls]
        if reason == "stop":
            reason = "tool_calls"
    return message, reason


def tool_plan(fe: Frontend, body: ChatCompletionRequest) -> ToolPlan | None:
    """How the request's tools are served (None: no tools, or tool_choice "none"); 400 for
    what cannot be."""
    choice = body.tool_choice
    if choice is not None and not body.tools:
        raise APIError(400, "tool_choice needs tools")
    if not body.tools or choice == "none":
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    max_calls = None if body.parallel_tool_calls else 1
    if choice is None or choice == "auto":
        if fe.tool_call_parser is None:
            raise APIError(
                400,
                "tools need a tool-call parser: start the server with --tool-call-parser "
                "qwen25 (or hermes; qwen3_coder for Qwen3-Coder's XML calls)",
            )
        return ToolPlan(tools, None, max_calls, fe.tool_call_parser)
    fields = body.structured_output_fields()
    if fields:
        raise APIError(
            400,
            "tool_choice required or a named function cannot be combined with "
            f"{', '.join(fields)} (it constrains the output itself)",
        )
    if choice == "required":
        return ToolPlan(tools, "required", max_calls)
    assert not isinstance(choice, str)
    name = choice.function.name
    if name not in [t["function"]["name"] for t in tools]:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools")
    return ToolPlan(tools, name, 1)


__all__ = ["ToolPlan", "chat_message", "template_message", "tool_plan"]
