"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

One choice per request (``n=1``). Without ``max_tokens`` a chat completion may run to the end of
the context (OpenAI's semantics); a text completion defaults to 16 tokens (OpenAI's default).
``logprobs`` (chat: with ``top_logprobs``; completions: the number of alternatives) report the
output tokens' logprobs under the model's raw distribution, each token's text decoded alone;
prompt logprobs (``echo``) are not supported.
``usage.prompt_tokens_details`` carries ``cached_tokens`` and, as an extension,
``cached_tokens_by_tier``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kvtier.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from kvtier.scheduler.request import ReqOutput
from kvtier.server.errors import APIError
from kvtier.server.protocol import ChatCompletionRequest, CompletionRequest, OpenAISamplingFields
from kvtier.server.serving import Frontend, Generation, Result, unless_disconnected
from kvtier.server.streaming import sse_response

router = APIRouter()


def _frontend(request: Request) -> Frontend:
    return request.app.state.frontend


def _check_unsupported(body: OpenAISamplingFields, extra: dict[str, Any]) -> None:
    if body.n != 1:
        raise APIError(
            400, f"n must be 1 (this server returns one choice per request); got {body.n}"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (only 0)")
    for name, value in extra.items():
        if value:
            raise APIError(400, f"{name} is not supported")


def _max_tokens(value: int | None, name: str) -> int | None:
    if value is not None and value < 1:
        raise APIError(400, f"{name} must be at least 1; got {value}")
    return value


def _sampling(fe: Frontend, body: OpenAISamplingFields, max_new_tokens: int) -> SamplingParams:
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "stop": body.stop or [],
        "stop_token_ids": body.stop_token_ids or [],
        "seed": body.seed,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
    }
    for name in ("temperature", "top_p", "top_k"):
        if getattr(body, name) is not None:
            params[name] = getattr(body, name)
    return fe.sampling(params)


def _usage(meta: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = meta.get("prompt_tokens", 0), meta.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": meta.get("cached_tokens", 0),
            "cached_tokens_by_tier": meta.get("cached_tokens_by_tier", {}),
        },
    }


def _finish(meta: dict[str, Any]) -> tuple[str | None, Any]:
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
        "top_logprobs": [{fe.token_text(t): lp for lp, t, _ in top} for top in tops],
        "text_offset": offsets,
    }


class _Chunks:
    """Stream events of one OpenAI choice; subclasses say how a piece of text is wrapped and
    how logprobs are (sent with the next event that has text, or with the last one)."""

    object_name = ""

    def __init__(
        self, rid: str, model: str, include_usage: bool, fe: Frontend, logprobs: bool = False
    ) -> None:
        self.id = rid
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.fe = fe
        self.logprobs = logprobs
        self.meta: dict[str, Any] = {}
        self.started = False
        # Logprobs of tokens not yet sent (their text may be held back), and the legacy
        # format's text offset of the next token.
        self.pending: tuple[list[list[Any]], list[list[list[Any]]]] = ([], [])
        self.text_offset = 0

    def _format_logprobs(
        self, tokens: list[list[Any]], tops: list[list[list[Any]]]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        logprobs = None
        if self.logprobs:
            tokens, tops = self.pending
            logprobs = self._format_logprobs(tokens, tops)
            self.pending = ([], [])
        c: dict[str, Any] = {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "logprobs": logprobs, **choice}],
        }
        if self.include_usage:
            c["usage"] = None
        return c

    def _piece(self, text: str, first: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _end(self) -> dict[str, Any]:
        raise NotImplementedError

    def on_output(self, index: int, out: ReqOutput, e2e: float) -> list[dict[str, Any]]:
        events = []
        entries = out.logprob_entries()
        if entries is not None:
            self.pending[0].extend(entries[0])
            self.pending[1].extend(entries[1])
        if out.new_text or not self.started:
            events.append(self._chunk(self._piece(out.new_text, not self.started)))
            self.started = True
        if out.finished:
            self.meta = out.meta_info
            reason, matched = _finish(out.meta_info)
            events.append(
                self._chunk({**self._end(), "finish_reason": reason, "matched_stop": matched})
            )
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
                "usage": _usage(self.meta),
            }
        ]


class _ChatChunks(_Chunks):
    object_name = "chat.completion.chunk"

    def _piece(self, text: str, first: bool) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"delta": delta, "finish_reason": None}

    def _end(self) -> dict[str, Any]:
        return {"delta": {}}

    def _format_logprobs(
        self, tokens: list[list[Any]], tops: list[list[list[Any]]]
    ) -> dict[str, Any]:
        return _chat_logprobs(self.fe, tokens, tops)


class _TextChunks(_Chunks):
    object_name = "text_completion"

    def _piece(self, text: str, first: bool) -> dict[str, Any]:
        return {"text": text, "finish_reason": None}

    def _end(self) -> dict[str, Any]:
        return {"text": ""}

    def _format_logprobs(
        self, tokens: list[list[Any]], tops: list[list[list[Any]]]
    ) -> dict[str, Any]:
        # Offsets continue over the token texts already sent in earlier events.
        formatted = _text_logprobs(self.fe, tokens, tops, self.text_offset)
        self.text_offset += sum(len(t) for t in formatted["tokens"])
        return formatted


def _submit_one(
    fe: Frontend,
    ids: list[int],
    sp: SamplingParams,
    rid: str | None,
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> tuple[Generation, str]:
    rid = rid or uuid.uuid4().hex
    return fe.submit([(ids, sp)], [rid], logprobs, top_logprobs), rid


async def _collect_one(request: Request, gen: Generation) -> Result:
    try:
        [result] = await unless_disconnected(request, gen.collect())
    finally:
        gen.close()
    return result


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    fe = _frontend(request)
    fe.check_model(body.model)
    _check_unsupported(body, {})
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]; got {top}")
    ids = fe.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    if body.max_completion_tokens is not None:
        limit = _max_tokens(body.max_completion_tokens, "max_completion_tokens")
        max_new = fe.check_ids(ids, limit, "max_completion_tokens")
    else:
        max_new = fe.check_ids(ids, _max_tokens(body.max_tokens, "max_tokens"), "max_tokens")
    gen, rid = _submit_one(fe, ids, _sampling(fe, body, max_new), body.rid, body.logprobs, top)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _ChatChunks("chatcmpl-" + rid, fe.model.name, usage, fe, body.logprobs)
        return await sse_response(request, gen, chunks)
    res = await _collect_one(request, gen)
    reason, matched = _finish(res.meta_info)
    logprobs = None
    if body.logprobs:
        logprobs = _chat_logprobs(fe, res.token_logprobs or [], res.top_logprobs or [])
    return {
        "id": "chatcmpl-" + rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": fe.model.name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": res.text},
                "logprobs": logprobs,
                "finish_reason": reason,
                "matched_stop": matched,
            }
        ],
        "usage": _usage(res.meta_info),
    }


def _prompt_ids(fe: Frontend, prompt: str | list[str] | list[int] | list[list[int]]) -> list[int]:
    if isinstance(prompt, str):
        return fe.encode(prompt)
    if not prompt:
        raise APIError(400, "the prompt is empty")
    if len(prompt) > 1 and not isinstance(prompt[0], int):
        raise APIError(
            400,
            f"only one prompt per request is supported; got {len(prompt)} (send them separately)",
        )
    first = prompt[0]
    if isinstance(first, int):
        return list(prompt)  # type: ignore[arg-type]
    if isinstance(first, str):
        return fe.encode(first)
    return list(first)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    fe = _frontend(request)
    fe.check_model(body.model)
    _check_unsupported(
        body,
        {
            "echo": body.echo,
            "suffix": body.suffix,
            "best_of": body.best_of not in (None, 1),
        },
    )
    want = body.logprobs is not None
    top = body.logprobs or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]; got {top}")
    ids = _prompt_ids(fe, body.prompt)
    max_new = fe.check_ids(ids, _max_tokens(body.max_tokens, "max_tokens"), "max_tokens")
    gen, rid = _submit_one(fe, ids, _sampling(fe, body, max_new), body.rid, want, top)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _TextChunks("cmpl-" + rid, fe.model.name, usage, fe, want)
        return await sse_response(request, gen, chunks)
    res = await _collect_one(request, gen)
    reason, matched = _finish(res.meta_info)
    logprobs = None
    if want:
        logprobs = _text_logprobs(fe, res.token_logprobs or [], res.top_logprobs or [], 0)
    return {
        "id": "cmpl-" + rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": fe.model.name,
        "choices": [
            {
                "index": 0,
                "text": res.text,
                "logprobs": logprobs,
                "finish_reason": reason,
                "matched_stop": matched,
            }
        ],
        "usage": _usage(res.meta_info),
    }


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    fe = _frontend(request)
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
