"""What every generation endpoint shares: tokenization, validation before anything reaches the
scheduler, submission with per-request metrics, and aborting when the client goes away."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request

from kvtier.chat_prompt import NO_TEMPLATE, ChatTemplateError, SegmentEncoder, chat_ids
from kvtier.sampling_params import SamplingParams, SamplingParamsError, check_logprob_args
from kvtier.scheduler.request import GenerateResult, ReqOutput
from kvtier.server import ipc
from kvtier.server.engine_client import EngineClient, RequestFailed, RequestStream
from kvtier.server.errors import STATUS_OF_FAILURE, APIError, ClientDisconnected
from kvtier.server.metrics import Metrics, RequestTimer

T = TypeVar("T")


@dataclass(frozen=True)
class ModelInfo:
    name: str  # as reported by the API (--served-model-name, else --model-path)
    model_path: str
    context_length: int
    vocab_size: int


class Result(GenerateResult):
    """One request's accumulated output, in the shape of ``Engine.generate``, its
    ``meta_info`` with the end-to-end latency of the last output added."""

    def add(self, out: ReqOutput, e2e: float | None = None) -> None:
        super().add(out)
        if e2e is not None:
            self.meta_info = {**self.meta_info, "e2e_latency": e2e}


def api_error(err: RequestFailed) -> APIError:
    return APIError(STATUS_OF_FAILURE.get(err.kind, 500), err.message)


class Generation:
    """A submitted group of requests: ``async for index, output, e2e_latency in gen``, with
    metrics recorded on the way. ``close()`` aborts what has not finished."""

    def __init__(self, stream: RequestStream, metrics: Metrics) -> None:
        self.stream = stream
        self.metrics = metrics
        self.timers = [RequestTimer() for _ in stream.rids]

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> tuple[int, ReqOutput, float]:
        try:
            index, out = await self.stream.__anext__()
        except RequestFailed as e:
            raise api_error(e) from None
        timer = self.timers[index]
        self.metrics.observe(timer, out)
        return index, out, timer.elapsed()

    def close(self) -> None:
        self.stream.close()

    async def collect(self) -> list[Result]:
        results = [Result() for _ in self.timers]
        async for index, out, e2e in self:
            results[index].add(out, e2e)
        return results


class Frontend:
    def __init__(
        self,
        client: EngineClient,
        tokenizer: Any,
        metrics: Metrics,
        model: ModelInfo,
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        # Chat prompts are tokenized message by message, the messages a conversation repeats
        # taken from a cache (same ids as the whole text's; see kvtier.chat_prompt).
        self.chat_encoder = SegmentEncoder(tokenizer) if tokenizer is not None else None
        self.metrics = metrics
        self.model = model
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
        self.started_at = time.time()

    # ------------------------------------------------------------------ inputs
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model.name, self.model.model_path):
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.model.name}'",
                "model_not_found",
            )

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise APIError(
                400, "this server has no tokenizer (--skip-tokenizer-init): send token ids"
            )
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """A text prompt's ids (the tokenizer's special tokens added, as its encode does); a
        prompt that repeats stretches between special tokens (a conversation rendered by the
        client) takes their ids from the chat encoder's cache."""
        self._need_tokenizer()
        assert self.chat_encoder is not None
        return self.chat_encoder.encode(text, add_special_tokens=True)

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        """``encode`` with the tokenizer's special tokens (e.g. a BOS) only if asked."""
        self._need_tokenizer()
        assert self.chat_encoder is not None
        return self.chat_encoder.encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        *,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """The conversation through the tokenizer's chat template, with the tools' definitions
        (OpenAI's objects) where given: the template decides how the model sees them.
        ``template_kwargs`` are the template's own variables (e.g. Qwen3's enable_thinking);
        the generation prompt is added and the tokenizer's own special tokens are not, unless
        asked otherwise (``/tokenize``)."""
        tok = self._need_tokenizer()
        assert self.chat_encoder is not None
        try:
            return chat_ids(
                tok,
                self.chat_encoder,
                messages,
                tools,
                template_kwargs,
                add_generation_prompt=add_generation_prompt,
                add_special_tokens=add_special_tokens,
            )
        except ChatTemplateError as e:
            message = str(e)
            if message == NO_TEMPLATE:
                message += ": use /v1/completions"
            raise APIError(400, message) from e

    def check_ids(self, ids: list[int], max_new_tokens: int | None, field_name: str) -> int:
        """Validate a prompt and its token budget; return max_new_tokens (None: what is left of
        the context)."""
        n, ctx = len(ids), self.model.context_length
        if n == 0:
            raise APIError(400, "the prompt is empty")
        if n >= ctx:
            raise APIError(400, f"the prompt has {n} tokens; the context length is {ctx}")
        self.check_vocab(ids)
        if max_new_tokens is None:
            return ctx - n
        if max_new_tokens > ctx - n:
            raise APIError(
                400,
                f"{field_name}={max_new_tokens} is too large: the prompt has {n} tokens and the "
                f"context length is {ctx}, so at most {ctx - n} new tokens fit",
            )
        return max_new_tokens

    @staticmethod
    def check_logprobs(return_logprob: bool, top_logprobs_num: int) -> None:
        try:
            check_logprob_args(return_logprob, top_logprobs_num)
        except SamplingParamsError as e:
            raise APIError(400, str(e)) from None

    def detokenize(self, ids: list[int]) -> str:
        """Token ids as text, special tokens included (echo of a prompt sent as ids)."""
        return str(self._need_tokenizer().decode(ids, skip_special_tokens=False))

    def token_strs(self, ids: list[int]) -> list[str]:
        """The tokenizer's own strings of the tokens (e.g. "Ġworld" for a byte-level BPE)."""
        return [str(t) for t in self._need_tokenizer().convert_ids_to_tokens(ids)]

    def check_vocab(self, ids: list[int]) -> None:
        """400 for a token id outside the model's vocabulary."""
        vocab = self.model.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (size {vocab})")

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens included), for logprob entries; without a
        tokenizer ``token_id:N``."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @staticmethod
    def sampling(params: dict[str, Any] | None) -> SamplingParams:
        try:
            return SamplingParams.from_dict(params)
        except SamplingParamsError as e:
            raise APIError(400, str(e)) from None

    # ------------------------------------------------------------------ running
    def submit(
        self,
        items: list[tuple[list[int], SamplingParams]],
        rids: list[str] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
    ) -> Generation:
        rids = rids or [uuid.uuid4().hex for _ in items]
        # Every request streams from the scheduler, also when the HTTP response does not: the
        # API process then sees when each token arrives (TTFT and inter-token metrics).
        reqs = [
            ipc.GenerateReq(
                rid, ids, sp.to_dict(), True, return_logprob, top_logprobs_num, logprob_start_len
            )
            for rid, (ids, sp) in zip(rids, items)
        ]
        try:
            return Generation(self.client.submit(reqs), self.metrics)
        except RequestFailed as e:
            raise api_error(e) from None


def frontend(request: Request) -> Frontend:
    """The API process's Frontend (set on the app at start-up)."""
    return request.app.state.frontend


async def _wait_disconnect(request: Request) -> None:
    # The body was read already: the next message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw``; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientDisconnected
