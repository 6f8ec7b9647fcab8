"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
and vLLM's ``/tokenize`` / ``/detokenize`` (also under ``/v1``).

``n`` choices per prompt, and for ``/v1/completions`` a list of prompts (choice ``i * n + j`` is
prompt i's j-th), at most 64 in all; with a ``seed`` choice j samples with seed + j. Without
``max_tokens`` a chat completion may run to the end of the context (OpenAI's semantics); a text
completion defaults to 16 tokens (OpenAI's default).
``logprobs`` (chat: with ``top_logprobs``; completions: the number of alternatives) report the
output tokens' logprobs under the model's raw distribution, each token's text decoded alone;
``echo`` puts the prompt before each completion, with ``logprobs`` the prompt tokens' too (the
first one's None), and allows ``max_tokens=0`` (score the prompt only).
With ``--reasoning-parser`` a reasoning model's thinking comes back as ``reasoning_content``
(streamed as such deltas), unless the request sets ``separate_reasoning: false``;
``chat_template_kwargs`` reach the chat template (e.g. ``{"enable_thinking": false}``).
With ``tools`` (and ``--tool-call-parser``) a chat completion's calls come back as OpenAI's
``tool_calls`` (finish reason ``tool_calls``), parsed out of the text by ``tool_parser``; streamed,
content goes out as it is generated, a call's id and name as soon as its name is written and its
arguments as they are (``tool_parser.IncrementalToolParser``).
``tool_choice`` "auto" (the default with tools) parses what the model writes; "none" does not
show it the tools; "required" and a named function constrain the output to JSON of the calls
(structured output, no parser needed; streamed, these calls' arguments stream too).
``usage`` counts each prompt once (its first choice's prompt and cached tokens) and every
choice's completion tokens; ``usage.prompt_tokens_details`` carries ``cached_tokens`` and, as an
extension, ``cached_tokens_by_tier``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kvtier.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from kvtier.scheduler.request import ReqOutput
from kvtier.server import text_stream
from kvtier.server.chat import ToolPlan, chat_message, template_message, tool_plan
from kvtier.server.errors import APIError
from kvtier.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAISamplingFields,
    TokenizeRequest,
)
from kvtier.server.reasoning_parser import ReasoningParser
from kvtier.server.serving import Frontend, Generation, Result, frontend, unless_disconnected
from kvtier.server.streaming import sse_response
from kvtier.server.tool_parser import (
    CallDelta,
    CallParser,
    ToolCall,
)

router = APIRouter()


# The most choices (n x prompts) one request may ask for.
MAX_CHOICES = 64


def check_unsupported(extra: dict[str, Any]) -> None:
    """400 naming the first field that is set (truthy) and not supported."""
    for name, value in extra.items():
        if value:
            raise APIError(400, f"{name} is not supported")


def _max_tokens(value: int | None, name: str) -> int | None:
    if value is not None and value < 1:
        raise APIError(400, f"{name} must be at least 1; got {value}")
    return value


def _sampling(
    fe: Frontend,
    body: OpenAISamplingFields,
    max_new_tokens: int,
    choice: int,
    constraint: dict[str, str] | None = None,
) -> SamplingParams:
    """SGLang's sampling parameters of a request's choice; ``constraint`` (a forced tool
    call's schema) replaces the request's own structured-output fields."""
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "stop": body.stop or [],
        "stop_token_ids": body.stop_token_ids or [],
        # Choice j of a prompt samples with seed + j: n choices of one seed still differ.
        "seed": None if body.seed is None else body.seed + choice,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        "repetition_penalty": body.repetition_penalty,
        "min_p": body.min_p,
        "min_new_tokens": body.min_tokens,
        "logit_bias": body.logit_bias,
        "no_stop_trim": body.include_stop_str_in_output,
    }
    for name in ("temperature", "top_p", "top_k"):
        if getattr(body, name) is not None:
            params[name] = getattr(body, name)
    params.update(constraint if constraint is not None else _constraint(body))
    return fe.sampling(params)


# Characters with a meaning in a regular expression: escaped in guided_choice's strings.
_REGEX_SPECIAL = frozenset("\\.^$|?*+()[]{}/")


def _regex_literal(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def _constraint(body: OpenAISamplingFields) -> dict[str, str]:
    """SGLang's sampling parameter (json_schema, regex or ebnf) for the request's
    structured-output field: OpenAI's response_format, SGLang's regex / ebnf, vLLM's
    guided_json / guided_regex / guided_choice / guided_grammar. At most one."""
    given: list[tuple[str, str, str]] = []  # (request field, parameter, value)
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", "json_schema", json.dumps({"type": "object"})))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema")
        given.append(("response_format", "json_schema", json.dumps(fmt.json_schema.schema_)))
    if body.guided_json is not None:
        schema = body.guided_json
        given.append(
            (
                "guided_json",
                "json_schema",
                schema if isinstance(schema, str) else json.dumps(schema),
            )
        )
    if body.guided_choice is not None:
        if not body.guided_choice:
            raise APIError(400, "guided_choice must list at least one string")
        alternatives = "|".join(_regex_literal(c) for c in body.guided_choice)
        given.append(("guided_choice", "regex", f"({alternatives})"))
    for field_name, param in (
        ("regex", "regex"),
        ("guided_regex", "regex"),
        ("ebnf", "ebnf"),
        ("guided_grammar", "ebnf"),
    ):
        value = getattr(body, field_name)
        if value is not None:
            given.append((field_name, param, value))
    if len(given) > 1:
        names = ", ".join(field_name for field_name, _, _ in given)
        raise APIError(400, f"give at most one structured-output field; got {names}")
    return {param: value for _, param, value in given}


def _usage(metas: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Each prompt once (its first choice's prompt and cached tokens), every choice's
    completion tokens."""
    firsts = metas[::n]
    prompt = sum(m.get("prompt_tokens", 0) for m in firsts)
    completion = sum(m.get("completion_tokens", 0) for m in metas)
    by_tier: dict[str, int] = {}
    for m in firsts:
        for tier, tokens in m.get("cached_tokens_by_tier", {}).items():
            by_tier[tier] = by_tier.get(tier, 0) + tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": sum(m.get("cached_tokens", 0) for m in firsts),
            "cached_tokens_by_tier": by_tier,
        },
    }


def finish_of(meta: dict[str, Any]) -> tuple[str | None, Any]:
    """A finished request's reason ("stop", "length", "abort") and what it matched."""
    reason = meta.get("finish_reason")
    if not reason:
        return None, None
    return reason.get("type"), reason.get("matched")


def _chat_logprobs(
    fe: Frontend, tokens: list[list[Any]], tops: list[list[list[Any]]]
) -> dict[str, Any]:
    """The chat format: per token its text, logprob, UTF-8 bytes and top alternatives."""

    def entry(logprob: float, token_id: int) -> dict[str, Any]:
        text = fe.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for (logprob, token_id, _), top in zip(tokens, tops, strict=True):
        item = entry(logprob, token_id)
        item["top_logprobs"] = [entry(lp, t) for lp, t, _ in top]
        content.append(item)
    return {"content": content}


def _text_logprobs(
    fe: Frontend, tokens: list[list[Any]], tops: list[list[list[Any]]], offset: int
) -> dict[str, Any]:
    """The legacy completions format; ``text_offset`` counts from ``offset`` over the tokens'
    texts (each token decoded alone)."""
    texts = [fe.token_text(t) for _, t, _ in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [lp for lp, _, _ in tokens],
        # The sequence's first token (echo) has no logprob and no alternatives: None.
        "top_logprobs": [
            None if lp is None else {fe.token_text(t): v for v, t, _ in top}
            for (lp, _, _), top in zip(tokens, tops, strict=True)
        ],
        "text_offset": offsets,
    }


class _ChoiceState:
    """Where one choice's stream stands: whether its first event went out, the logprobs of
    tokens not yet sent (their text may be held back), the legacy format's text offset of its
    next token, and its last meta_info."""

    def __init__(self) -> None:
        self.started = False
        self.pending: tuple[list[list[Any]], list[list[list[Any]]]] = ([], [])
        self.text_offset = 0
        self.meta: dict[str, Any] = {}
        self.num_calls = 0


class _Chunks:
    """Stream events of the choices of one request; subclasses say how a piece of text is
    wrapped and how logprobs are (sent with the choice's next event that has text, or with
    its last one)."""

    object_name = ""

    def __init__(
        self,
        rid: str,
        model: str,
        include_usage: bool,
        fe: Frontend,
        logprobs: bool,
        num_choices: int,
        n: int,
    ) -> None:
        self.id = rid
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.fe = fe
        self.logprobs = logprobs
        self.n = n
        self.states = [_ChoiceState() for _ in range(num_choices)]

    def _format_logprobs(
        self, state: _ChoiceState, tokens: list[list[Any]], tops: list[list[list[Any]]]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk(self, index: int, choice: dict[str, Any]) -> dict[str, Any]:
        state = self.states[index]
        logprobs = None
        if self.logprobs:
            tokens, tops = state.pending
            logprobs = self._format_logprobs(state, tokens, tops)
            state.pending = ([], [])
        c: dict[str, Any] = {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "logprobs": logprobs, **choice}],
        }
        if self.include_usage:
            c["usage"] = None
        return c

    def _piece(self, index: int, text: str, first: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _end(self) -> dict[str, Any]:
        raise NotImplementedError

    def _split(
        self, index: int, text: str, finished: bool
    ) -> tuple[str, str, list[ToolCall | CallDelta]]:
        """The reasoning and the text to send now, and the tool calls or pieces of calls to
        send (no reasoning and no calls unless the chat API parses them)."""
        return "", text, []

    def _reasoning_piece(self, index: int, text: str, first: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _call_piece(self, index: int, delta: CallDelta) -> dict[str, Any]:
        raise NotImplementedError

    def on_output(self, index: int, out: ReqOutput, e2e: float) -> list[dict[str, Any]]:
        state = self.states[index]
        events = []
        if self.logprobs and out.input_token_logprobs is not None:
            state.pending[0].extend(out.input_token_logprobs)
            state.pending[1].extend(out.input_top_logprobs or [])
        entries = out.logprob_entries()
        if entries is not None:
            state.pending[0].extend(entries[0])
            state.pending[1].extend(entries[1])
        reasoning, text, calls = self._split(index, out.new_text, out.finished)
        if reasoning:
            events.append(
                self._chunk(index, self._reasoning_piece(index, reasoning, not state.started))
            )
            state.started = True
        if text or not state.started:
            piece = self._piece(index, text, not state.started)
            events.append(self._chunk(index, piece))
            state.started = True
        for call in calls:
            # Whole calls (forced ones) are numbered here; streamed pieces carry their index.
            delta = call if isinstance(call, CallDelta) else CallDelta.whole(state.num_calls, call)
            events.append(self._chunk(index, self._call_piece(index, delta)))
            state.num_calls = max(state.num_calls, delta.index + 1)
        if out.finished:
            state.meta = out.meta_info
            reason, matched = finish_of(out.meta_info)
            if state.num_calls and reason == "stop":
                reason = "tool_calls"
            end = {**self._end(), "finish_reason": reason, "matched_stop": matched}
            events.append(self._chunk(index, end))
        return events

    def on_end(self) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [
            {
                "id": self.id,
                "object": self.object_name,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": _usage([st.meta for st in self.states], self.n),
            }
        ]


class _ChatChunks(_Chunks):
    object_name = "chat.completion.chunk"

    # One parser a choice when the request's tool calls are parsed, and when its reasoning is.
    parsers: list[CallParser] | None = None
    reasoning: list[ReasoningParser] | None = None

    def _split(
        self, index: int, text: str, finished: bool
    ) -> tuple[str, str, list[ToolCall | CallDelta]]:
        thinking = ""
        if self.reasoning is not None:
            thinking, text = text_stream.run(self.reasoning[index], text, finished)
        calls: list[ToolCall | CallDelta] = []
        if self.parsers is not None:
            text, calls = text_stream.run(self.parsers[index], text, finished)
        return thinking, text, calls

    def _reasoning_piece(self, index: int, text: str, first: bool) -> dict[str, Any]:
        delta = (
            {"role": "assistant", "reasoning_content": text}
            if first
            else {"reasoning_content": text}
        )
        return {"delta": delta, "finish_reason": None}

    def _call_piece(self, index: int, delta: CallDelta) -> dict[str, Any]:
        # A call's first piece carries its id and name, later ones more of its arguments
        # (clients concatenate them); a whole call is one piece.
        return {"delta": {"tool_calls": [delta.to_dict()]}, "finish_reason": None}

    def _piece(self, index: int, text: str, first: bool) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"delta": delta, "finish_reason": None}

    def _end(self) -> dict[str, Any]:
        return {"delta": {}}

    def _format_logprobs(
        self, state: _ChoiceState, tokens: list[list[Any]], tops: list[list[list[Any]]]
    ) -> dict[str, Any]:
        return _chat_logprobs(self.fe, tokens, tops)


class _TextChunks(_Chunks):
    object_name = "text_completion"

    # echo: each prompt's text, sent before its choices' first tokens.
    echo: list[str] | None = None

    def _piece(self, index: int, text: str, first: bool) -> dict[str, Any]:
        if first and self.echo is not None:
            text = self.echo[index // self.n] + text
        return {"text": text, "finish_reason": None}

    def _end(self) -> dict[str, Any]:
        return {"text": ""}

    def _format_logprobs(
        self, state: _ChoiceState, tokens: list[list[Any]], tops: list[list[list[Any]]]
    ) -> dict[str, Any]:
        # Offsets continue over the choice's token texts sent in earlier events.
        formatted = _text_logprobs(self.fe, tokens, tops, state.text_offset)
        state.text_offset += sum(len(t) for t in formatted["tokens"])
        return formatted


def _submit(
    fe: Frontend,
    body: OpenAISamplingFields,
    prompts: list[tuple[list[int], int]],
    logprobs: bool,
    top_logprobs: int,
    logprob_start_len: int = -1,
    constraint: dict[str, str] | None = None,
) -> tuple[Generation, str, int]:
    """Submit ``n`` choices of each (prompt ids, max new tokens); returns the generation, the
    response id's suffix and the number of choices."""
    n = body.n
    if not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"n must be in [1, {MAX_CHOICES}]; got {n}")
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(
            400,
            f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; at most "
            f"{MAX_CHOICES} a request",
        )
    items = [
        (ids, _sampling(fe, body, max_new, j, constraint))
        for ids, max_new in prompts
        for j in range(n)
    ]
    rid = body.rid or uuid.uuid4().hex
    rids = [rid] if len(items) == 1 else [f"{rid}-{i}" for i in range(len(items))]
    return fe.submit(items, rids, logprobs, top_logprobs, logprob_start_len), rid, len(items)


def _response(
    rid: str,
    object_name: str,
    fe: Frontend,
    choices: list[dict[str, Any]],
    results: list[Result],
    n: int,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": object_name,
        "created": int(time.time()),
        "model": fe.model.name,
        "choices": choices,
        "usage": _usage([r.meta_info for r in results], n),
    }


async def collect(request: Request, gen: Generation) -> list[Result]:
    try:
        return await unless_disconnected(request, gen.collect())
    finally:
        gen.close()


@dataclasses.dataclass(frozen=True)
class ChatJob:
    """A chat request made ready to run: its prompt ids and token budget, how its tools are
    served, whether its reasoning is parsed out, its output constraint."""

    ids: list[int]
    max_new: int
    plan: ToolPlan | None
    reasoning: str | None
    constraint: dict[str, str] | None


def prepare_chat(fe: Frontend, body: ChatCompletionRequest) -> ChatJob:
    """Validate a chat request and render its prompt (also the Anthropic API's path)."""
    fe.check_model(body.model)
    check_unsupported(body.unsupported_fields())
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]; got {top}")
    plan = tool_plan(fe, body)
    messages = [template_message(m) for m in body.messages]
    template_kwargs = body.chat_template_kwargs
    if body.reasoning_effort is not None:
        template_kwargs = {"reasoning_effort": body.reasoning_effort, **(template_kwargs or {})}
    ids = fe.encode_chat(messages, plan.tools if plan is not None else None, template_kwargs)
    # The thinking of a reasoning model, when the server parses it and the request wants it
    # apart (SGLang's separate_reasoning).
    reasoning = fe.reasoning_parser if body.separate_reasoning else None
    if body.max_completion_tokens is not None:
        limit = _max_tokens(body.max_completion_tokens, "max_completion_tokens")
        max_new = fe.check_ids(ids, limit, "max_completion_tokens")
    else:
        max_new = fe.check_ids(ids, _max_tokens(body.max_tokens, "max_tokens"), "max_tokens")
    constraint = plan.constraint() if plan is not None else None
    return ChatJob(ids, max_new, plan, reasoning, constraint)


def start_chat(fe: Frontend, body: ChatCompletionRequest) -> tuple[ChatJob, Generation, str, int]:
    """Prepare a chat request and submit its choices: (job, generation, response id suffix,
    number of choices)."""
    job = prepare_chat(fe, body)
    top = body.top_logprobs or 0
    gen, rid, num = _submit(
        fe, body, [(job.ids, job.max_new)], body.logprobs, top, constraint=job.constraint
    )
    return job, gen, rid, num


def chat_stream_chunks(
    fe: Frontend, body: ChatCompletionRequest, job: ChatJob, rid: str, num: int
) -> _ChatChunks:
    """The OpenAI chunk formatter of a streamed chat request (parsers set up)."""
    usage = bool(body.stream_options and body.stream_options.include_usage)
    chunks = _ChatChunks("chatcmpl-" + rid, fe.model.name, usage, fe, body.logprobs, num, body.n)
    if job.plan is not None:
        chunks.parsers = [job.plan.stream_parser() for _ in range(num)]
    if job.reasoning is not None:
        chunks.reasoning = [ReasoningParser(job.reasoning) for _ in range(num)]
    return chunks


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    fe = frontend(request)
    job, gen, rid, num = start_chat(fe, body)
    if body.stream:
        return await sse_response(request, gen, chat_stream_chunks(fe, body, job, rid, num))
    results = await collect(request, gen)
    choices = []
    for index, res in enumerate(results):
        reason, matched = finish_of(res.meta_info)
        logprobs = None
        if body.logprobs:
            logprobs = _chat_logprobs(fe, res.token_logprobs or [], res.top_logprobs or [])
        message, reason = chat_message(res.text, reason, job.plan, job.reasoning)
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": reason,
                "matched_stop": matched,
            }
        )
    return _response("chatcmpl-" + rid, "chat.completion", fe, choices, results, body.n)


def _prompt_ids(
    fe: Frontend, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[list[int]]:
    """The request's prompts as token ids: one text, one list of ids, or a list of either."""
    if isinstance(prompt, str):
        return [fe.encode(prompt)]
    if not prompt:
        raise APIError(400, "the prompt is empty")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    return [fe.encode(p) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]


def _echo_texts(
    fe: Frontend, prompt: str | list[str] | list[int] | list[list[int]], ids: list[list[int]]
) -> list[str]:
    """Each prompt as echoed: as sent when text, decoded when token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [fe.detokenize(ids[0])]
    return [p if isinstance(p, str) else fe.detokenize(i) for p, i in zip(prompt, ids, strict=True)]


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    fe = frontend(request)
    fe.check_model(body.model)
    check_unsupported({"suffix": body.suffix, "best_of": body.best_of not in (None, 1)})
    want = body.logprobs is not None
    top = body.logprobs or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]; got {top}")
    if body.echo and body.max_tokens == 0:
        limit: int | None = 0  # score the prompt only
    else:
        limit = _max_tokens(body.max_tokens, "max_tokens")
    prompt_ids = _prompt_ids(fe, body.prompt)
    prompts = [(ids, fe.check_ids(ids, limit, "max_tokens")) for ids in prompt_ids]
    echo = _echo_texts(fe, body.prompt, prompt_ids) if body.echo else None
    start = 0 if body.echo and want else -1
    gen, rid, num = _submit(fe, body, prompts, want, top, start)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _TextChunks("cmpl-" + rid, fe.model.name, usage, fe, want, num, body.n)
        chunks.echo = echo
        return await sse_response(request, gen, chunks)
    results = await collect(request, gen)
    choices = []
    for index, res in enumerate(results):
        reason, matched = finish_of(res.meta_info)
        logprobs = None
        if want:
            tokens = (res.input_token_logprobs or []) + (res.token_logprobs or [])
            tops = (res.input_top_logprobs or []) + (res.top_logprobs or [])
            logprobs = _text_logprobs(fe, tokens, tops, 0)
        choices.append(
            {
                "index": index,
                "text": (echo[index // body.n] if echo else "") + res.text,
                "logprobs": logprobs,
                "finish_reason": reason,
                "matched_stop": matched,
            }
        )
    return _response("cmpl-" + rid, "text_completion", fe, choices, results, body.n)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    fe = frontend(request)
    return {
        "object": "list",
        "data": [
            {
                "id": fe.model.name,
                "object": "model",
                "created": int(fe.started_at),
                "owned_by": "kvtier",
                "root": fe.model.model_path,
                "max_model_len": fe.model.context_length,
            }
        ],
    }


# Fields of /tokenize that only a chat (``messages``) request takes.
_CHAT_ONLY = ("tools", "chat_template_kwargs", "add_generation_prompt")


@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """vLLM's (and SGLang's) tokenizer endpoint: a prompt's ids, or a conversation's as the
    chat API renders it, with the context length to compare against; nothing runs on the
    model. Any length is counted (a prompt over the context length too)."""
    fe = frontend(request)
    fe.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages")
    if body.prompt is not None:
        chat_only = [f for f in _CHAT_ONLY if f in body.model_fields_set]
        if chat_only:
            raise APIError(400, f"only a messages request takes {', '.join(chat_only)}")
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = fe.encode_text(body.prompt, special)
    else:
        assert body.messages is not None
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        ids = fe.encode_chat(
            [template_message(m) for m in body.messages],
            tools,
            body.chat_template_kwargs,
            add_generation_prompt=body.add_generation_prompt,
            add_special_tokens=bool(body.add_special_tokens),
        )
    return {
        "count": len(ids),
        "max_model_len": fe.model.context_length,
        "tokens": ids,
        "token_strs": fe.token_strs(ids) if body.return_token_strs else None,
    }


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    """Token ids as text, special tokens included (vLLM's ``/detokenize``); 400 for an id
    outside the vocabulary."""
    fe = frontend(request)
    fe.check_model(body.model)
    fe.check_vocab(body.tokens)
    return {"prompt": fe.detokenize(body.tokens)}
