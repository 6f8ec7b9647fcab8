"""``kvtier.Engine``: the in-process Python API (same shape as ``sglang.Engine``).

with kvtier.Engine(model_path="builtin:tiny-qwen3") as llm:
    out = llm.generate("Hello", {"temperature": 0, "max_new_tokens": 16})
    print(out["text"], out["meta_info"]["cached_tokens"])
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from kvtier.async_driver import AsyncDriver
from kvtier.chat_prompt import ChatTemplateError, SegmentEncoder, chat_ids
from kvtier.models import ResolvedModel, resolve_model
from kvtier.sampling_params import SamplingParams, check_logprob_args
from kvtier.scheduler.request import GenerateResult, Req, ReqOutput
from kvtier.scheduler.scheduler import RequestError, Scheduler
from kvtier.server_args import ServerArgs, ServerArgsError
from kvtier.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[str] | None
InputIds = list[int] | list[list[int]] | None


def _check_int_ids(ids: list[Any]) -> None:
    """Raise unless every id is a Python int. Checked in C (array('q') takes ints only, and
    bools, which are ints): a Python loop over an 80K-token prompt costs milliseconds of TTFT."""
    try:
        array("q", ids)
    except (TypeError, OverflowError):
        raise RequestError("input_ids must be a list of ints or a list of such lists") from None


def _chunk(out: ReqOutput, index: int | None, start: float) -> dict[str, Any]:
    """A streamed increment in ``generate``'s shape (``index`` in a batch)."""
    part = GenerateResult()
    part.add(out)
    chunk = part.to_dict(time.perf_counter() - start)
    if index is not None:
        chunk["index"] = index
    return chunk


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def build_tokenizer(args: ServerArgs, resolved: ResolvedModel) -> Any:
    """The model's tokenizer, or None (ids only) when skipped or unavailable offline."""
    if args.skip_tokenizer_init:
        return None
    tok_dir = args.tokenizer_path or resolved.tokenizer_dir
    if tok_dir is None:
        logger.warning(
            "no tokenizer is available offline for %s: only input_ids are accepted "
            "(pass --tokenizer-path to use text)",
            args.model_path,
        )
        return None
    tokenizer = load_tokenizer(tok_dir)
    if args.chat_template is not None:
        tokenizer.chat_template = read_chat_template(args.chat_template)
    return tokenizer


def read_chat_template(value: str) -> str:
    """--chat-template: a file's text when ``value`` names a file, else the template itself
    (it must then look like Jinja: a value that is neither is a mistyped path)."""
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ServerArgsError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def build_scheduler(args: ServerArgs) -> Scheduler:
    """Load the model and build the engine loop (used in-process and by the server's
    scheduler process)."""
    from kvtier.runner.model_runner import ModelRunner

    resolved = resolve_model(args.model_path, args.model_overrides())
    tokenizer = build_tokenizer(args, resolved)
    return Scheduler(args, ModelRunner(args, resolved), tokenizer)


class Engine:
    def __init__(self, **kwargs: Any) -> None:
        self.server_args = args = ServerArgs.from_kwargs(**kwargs)
        setup_logging(args.log_level)
        self.scheduler = build_scheduler(args)
        # As the server does: compile and build the GPU kernels' shapes before the first request
        # (on CPU nothing is compiled, and tests build many engines).
        if self.scheduler.runner.device.type == "cuda" and not args.skip_server_warmup:
            self.scheduler.warm_up()
        self.tokenizer = self.scheduler.detok.tokenizer
        self._chat_encoder: SegmentEncoder | None = None  # built by the first chat call
        self._closed = False
        self._driver = AsyncDriver(self.scheduler)

    # ------------------------------------------------------------------ generation
    def _make_reqs(
        self,
        prompt: Prompt,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None,
        input_ids: InputIds,
        stream: bool,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
    ) -> tuple[list[Req], bool]:
        if (prompt is None) == (input_ids is None):
            raise RequestError("give exactly one of prompt and input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt)
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: pass input_ids instead of text")
            if not all(isinstance(p, str) for p in prompts):
                raise RequestError("prompt must be a string or a list of strings")
            encoder = self._encoder()
            ids_list = [encoder.encode(p, add_special_tokens=True) for p in prompts]
        else:
            assert input_ids is not None
            single = not input_ids or isinstance(input_ids[0], int)
            ids_list = [list(input_ids)] if single else [list(x) for x in input_ids]  # type: ignore[arg-type]
            for ids in ids_list:
                _check_int_ids(ids)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(ids_list):
                raise RequestError(
                    f"{len(sampling_params)} sampling_params for {len(ids_list)} prompts"
                )
            params = [SamplingParams.from_dict(p) for p in sampling_params]
        else:
            params = [SamplingParams.from_dict(sampling_params) for _ in ids_list]
        check_logprob_args(return_logprob, top_logprobs_num)
        reqs = [
            Req(
                rid=uuid.uuid4().hex,
                input_ids=ids,
                sampling=sp,
                stream=stream,
                return_logprob=return_logprob,
                top_logprobs_num=top_logprobs_num,
                logprob_start_len=logprob_start_len,
            )
            for ids, sp in zip(ids_list, params)
        ]
        return reqs, single

    def _submit(self, reqs: list[Req]) -> None:
        added: list[Req] = []
        try:
            for req in reqs:
                self.scheduler.add_request(req)
                added.append(req)
        except Exception:
            for req in added:
                self.scheduler.abort_request(req.rid)
            self.scheduler.step()  # let the aborts flush out
            raise

    def generate(
        self,
        prompt: Prompt = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: InputIds = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt (a dict back) or a batch (a list back).

        With ``stream=True`` returns an iterator of incremental outputs: each holds the new
        ``text`` and ``output_ids`` since the previous one (and ``index`` for batches); the last
        one of each request carries ``meta_info["finish_reason"]``.

        ``return_logprob``: ``meta_info`` also holds ``output_token_logprobs``, a ``[logprob,
        token id, None]`` per output token (under the model's distribution: the raw logits,
        before temperature, top-k or top-p), and ``output_top_logprobs``, per output token
        the ``top_logprobs_num`` (at most 20) most likely tokens in that shape, most likely
        first. Streamed outputs hold those of their new tokens. ``logprob_start_len`` >= 0
        (with return_logprob) adds the prompt's from that token on, ``input_token_logprobs``
        (None for the sequence's first token) and ``input_top_logprobs``, in the first output;
        those positions are computed, not served from the prefix cache. With
        ``max_new_tokens`` 0 the request then only scores its prompt.
        """
        self._check_open()
        reqs, single = self._make_reqs(
            prompt,
            sampling_params,
            input_ids,
            stream,
            return_logprob,
            top_logprobs_num,
            logprob_start_len,
        )
        with self._driver.lock:
            self._check_no_async()
            self._submit(reqs)
        if stream:
            return self._stream(reqs, single)
        results = {r.rid: GenerateResult() for r in reqs}
        start = time.perf_counter()
        pending = set(results)
        while pending:
            for out in self._step():
                res = results.get(out.rid)
                if res is None:
                    continue
                res.add(out)
                if out.finished:
                    pending.discard(out.rid)
        dicts = [results[r.rid].to_dict(time.perf_counter() - start) for r in reqs]
        return dicts[0] if single else dicts

    def _encoder(self) -> SegmentEncoder:
        """The tokenizer behind the repeated-stretch cache (built on first use: tests build
        many engines that never tokenize)."""
        if self._chat_encoder is None:
            self._chat_encoder = SegmentEncoder(self.tokenizer)
        return self._chat_encoder

    def _chat_ids(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        tools: list[dict[str, Any]] | None,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> list[int] | list[list[int]]:
        """One conversation's ids, or a list of conversations' (``chat``'s rule)."""
        if self.tokenizer is None:
            raise RequestError("this engine has no tokenizer: chat needs one (--tokenizer-path)")
        encoder = self._encoder()
        if not isinstance(messages, list):
            raise RequestError("messages must be a list of message dicts, or a list of those")
        batch = bool(messages) and all(isinstance(m, list) for m in messages)
        convs = messages if batch else [messages]
        try:
            ids = [chat_ids(self.tokenizer, encoder, c, tools, chat_template_kwargs) for c in convs]
        except ChatTemplateError as e:
            raise RequestError(str(e)) from e
        return ids if batch else ids[0]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        stream: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """``generate`` for a conversation (a list of ``{"role", "content"}`` dicts, as
        vLLM's ``LLM.chat`` takes) or a list of conversations: rendered by the tokenizer's chat
        template with the generation prompt (and ``tools``, OpenAI's definitions, and the
        template's own ``chat_template_kwargs``), tokenized with the messages a conversation
        repeats taken from a cache (``kvtier.chat_prompt``). Returns what ``generate`` does;
        the text is the model's, tool calls included as written. RequestError says why a
        conversation cannot be rendered."""
        ids = self._chat_ids(messages, tools, chat_template_kwargs)
        return self.generate(input_ids=ids, sampling_params=sampling_params, stream=stream)

    async def async_chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        stream: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """``chat`` for asyncio code (as ``async_generate``)."""
        ids = self._chat_ids(messages, tools, chat_template_kwargs)
        return await self.async_generate(
            input_ids=ids, sampling_params=sampling_params, stream=stream
        )

    def _stream(self, reqs: list[Req], single: bool) -> Iterator[dict[str, Any]]:
        index = {r.rid: i for i, r in enumerate(reqs)}
        start = time.perf_counter()
        pending = set(index)
        try:
            while pending:
                for out in self._step():
                    if out.rid not in index:
                        continue
                    if out.finished:
                        pending.discard(out.rid)
                    yield _chunk(out, None if single else index[out.rid], start)
        finally:
            # A consumer that stops early aborts what it no longer reads.
            with self._driver.lock:
                for rid in pending:
                    self.scheduler.abort_request(rid)
                if pending:
                    self.scheduler.step()

    # ------------------------------------------------------------------ asyncio
    async def async_generate(
        self,
        prompt: Prompt = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: InputIds = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """``generate`` for asyncio code (as ``sglang.Engine.async_generate``): any number of
        calls may be in flight at once, from any event loop; they are batched together by one
        driver thread. With ``stream=True`` returns an async iterator of the increments.
        Cancelling the call (or leaving the iterator) aborts its requests. While such calls
        are in flight the synchronous methods that step the engine raise RuntimeError."""
        self._check_open()
        reqs, single = self._make_reqs(
            prompt,
            sampling_params,
            input_ids,
            stream,
            return_logprob,
            top_logprobs_num,
            logprob_start_len,
        )
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        self._driver.submit(reqs, outputs)
        if stream:
            return self._astream(reqs, single, outputs)
        results = {r.rid: GenerateResult() for r in reqs}
        pending = set(results)
        start = time.perf_counter()
        try:
            while pending:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                results[out.rid].add(out)
                if out.finished:
                    pending.discard(out.rid)
        finally:
            self._driver.abort(sorted(pending))
        dicts = [results[r.rid].to_dict(time.perf_counter() - start) for r in reqs]
        return dicts[0] if single else dicts

    async def _astream(
        self, reqs: list[Req], single: bool, outputs: asyncio.Queue[Any]
    ) -> AsyncIterator[dict[str, Any]]:
        index = {r.rid: i for i, r in enumerate(reqs)}
        pending = set(index)
        start = time.perf_counter()
        try:
            while pending:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    pending.discard(out.rid)
                yield _chunk(out, None if single else index[out.rid], start)
        finally:
            self._driver.abort(sorted(pending))

    def _step(self) -> list[Any]:
        """One scheduler step for a synchronous caller (see AsyncDriver's invariants)."""
        with self._driver.lock:
            return self.scheduler.step()

    def _check_no_async(self) -> None:
        if self._driver.busy:
            raise RuntimeError(
                "async_generate requests are in flight: await them before calling the "
                "synchronous methods"
            )

    # ------------------------------------------------------------------ control
    def flush_cache(self, tier: str | None = None) -> bool:
        """Drop cached prefixes: every tier (``tier`` None or "all"; False, nothing done, while
        requests are in flight) or only the GPU copies of prefixes that have an L2 copy
        (``tier="device"``), so that the next requests are served from L2."""
        self._check_open()
        with self._driver.lock:
            return self.scheduler.flush_cache(tier)

    def get_stats(self) -> dict[str, Any]:
        with self._driver.lock:
            return self.scheduler.stats()

    def check_integrity(self) -> None:
        with self._driver.lock:
            self.scheduler.check_integrity()

    def get_server_info(self) -> dict[str, Any]:
        import dataclasses

        return {**dataclasses.asdict(self.server_args), **self.get_stats()}

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._driver.close()
        with self._driver.lock:
            for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                self.scheduler.abort_request(req.rid)
            self.scheduler.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine was shut down")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
