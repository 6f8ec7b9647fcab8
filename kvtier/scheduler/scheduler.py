"""The engine loop: admission, batching, chunked prefill, decode, retraction, stopping.

One ``step()`` runs one forward pass: an extend batch when a request has more than one token to
run (new prompts, prompt chunks, re-admitted requests), otherwise a decode batch of every running
request. The scheduler holds no model state; it owns the page allocator, the request-to-page
table and the prefix cache, and asks the model runner to run a ForwardBatch.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.cache.controller import LoadError
from kvtier.cache.kv_pool import PageAllocator, ReqToPageTable, to_device_async
from kvtier.cache.radix_cache import IntegrityError, MatchResult, RadixCache
from kvtier.runner.forward_batch import ForwardMode
from kvtier.runner.model_runner import ModelRunner
from kvtier.runner.sampler import History, sample, token_logprobs
from kvtier.sampling_params import SamplingParams, check_logprob_args
from kvtier.scheduler.batch import ScheduleBatch
from kvtier.scheduler.detokenizer import Detokenizer, find_stop_string, stop_prefix_overlap
from kvtier.scheduler.grammar import GrammarError, Grammars
from kvtier.scheduler.request import FinishReason, Req, ReqOutput
from kvtier.server_args import ServerArgs, ServerArgsError

logger = logging.getLogger(__name__)

# --schedule-policy lpm orders at most this many waiting requests (SGLang's limit as well).
LPM_MAX_WAITING = 128

# Share of a running request's remaining max_new_tokens that admission keeps free for it, so
# that new prompts do not take the pages running requests are about to decode into.
NEW_TOKEN_RESERVE_RATIO = 0.3


class RequestError(ValueError):
    """A request the engine cannot serve; the message says why (HTTP 400)."""


class QueueFullError(RuntimeError):
    """More requests wait than --max-queued-requests allows (HTTP 429)."""


@dataclass
class _InFlight:
    """A launched step: its batch, the requests that sample, and their tokens (on the device,
    and the host copy that lands when ``done`` has passed; ``done`` None: already there)."""

    batch: ScheduleBatch
    sampled: list[Req]
    ids: torch.Tensor | None
    host_ids: torch.Tensor | None
    done: torch.cuda.Event | None
    # Requests (indices into sampled) that want logprobs, and theirs on the host (landed with
    # the ids): each one's token logprob [N], top values [N, K] and top ids [N, K].
    logprob_rows: list[int] | None = None
    host_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Prompt logprobs: (request, first position, count) spans, and their values as above.
    prompt_spans: list[tuple[Req, int, int]] | None = None
    host_prompt_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


# Prompt tokens a step runs for a request that collects prompt logprobs (see _chunk_for).
PROMPT_LOGPROB_CHUNK = 1024


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a device tensor, enqueued without waiting."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class Scheduler:
    def __init__(self, args: ServerArgs, runner: ModelRunner, tokenizer: Any = None) -> None:
        self.args = args
        self.runner = runner
        self.page_size = args.page_size
        pool = runner.kv_pool
        self.allocator = PageAllocator(pool.num_pages)
        self.context_length = runner.context_length
        self.table = ReqToPageTable(
            args.max_running_requests, runner.max_pages_per_req, pool.device
        )
        self.cache = self._build_cache()
        self.use_cache = not args.disable_radix_cache
        self.eos_ids = set(runner.eos_token_ids)
        self.detok = Detokenizer(tokenizer)
        self.tokenizer = tokenizer
        self._grammars: Grammars | None = None  # built with the first constrained request
        # Constrained requests whose matcher the compile thread is building (not yet queued).
        self._compiling: list[tuple[Req, futures.Future[Any]]] = []
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.generator = torch.Generator(device=pool.device).manual_seed(args.random_seed)
        self.counters: dict[str, int] = {
            "requests_finished": 0,
            "requests_aborted": 0,
            "prompt_tokens": 0,
            "generation_tokens": 0,
            "cached_tokens": 0,
            "retractions": 0,
            "forward_steps": 0,
            # Decode steps launched while the previous one was still running (overlap).
            "decode_steps_ahead": 0,
            "load_failures_recovered": 0,
            # Prefix tokens served by copying the head of a cached page (see _admit), and the
            # slots of such pages that came from L2 but were not used.
            "tail_tokens_copied": 0,
            "l2_tail_tokens_unused": 0,
        }
        self.cached_tokens_by_tier: dict[str, int] = {}
        self._outputs: list[ReqOutput] = []
        self.overlap = not args.disable_overlap_schedule
        self._inflight: _InFlight | None = None  # a launched decode step not yet processed

    def _build_cache(self) -> RadixCache:
        args, pool = self.args, self.runner.kv_pool
        if not args.enable_hierarchical_cache:
            return RadixCache(self.page_size, self.allocator)
        if args.disable_radix_cache:
            raise ServerArgsError(
                "--enable-hierarchical-cache needs the radix cache; drop --disable-radix-cache"
            )
        from kvtier.cache.controller import CacheController
        from kvtier.cache.hiradix_cache import HiRadixCache
        from kvtier.tiers import TierSpec, create_tier, l2_num_pages

        def spec(pages: int) -> TierSpec:
            return TierSpec(
                pages,
                self.page_size,
                pool.num_layers,
                pool.num_kv_heads,
                pool.head_dim,
                pool.dtype,
                args.hicache_mem_layout,
            )

        pages = l2_num_pages(args, self.allocator.capacity, spec(1).page_bytes)
        tier = create_tier(args, spec(pages), pool.device)
        logger.info("L2 tier: %s", tier.describe())
        controller = CacheController(pool, tier, args.hicache_io_backend)
        return HiRadixCache(
            self.page_size,
            self.allocator,
            PageAllocator(pages + 1),
            controller,
            args.hicache_write_policy,
        )

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, req: Req) -> None:
        n = len(req.input_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= self.context_length:
            raise RequestError(
                f"the prompt has {n} tokens; the context length is {self.context_length}"
            )
        capacity = self.allocator.capacity * self.page_size
        if n + 1 > capacity:
            raise RequestError(
                f"the prompt has {n} tokens; the KV pool holds {capacity} (see --max-total-tokens)"
            )
        vocab = self.runner.vocab_size
        # min/max run in C; the loop that names the bad id runs only on the error path.
        if min(req.input_ids) < 0 or max(req.input_ids) >= vocab:
            bad = next(t for t in req.input_ids if not 0 <= t < vocab)
            raise RequestError(f"token id {bad} is outside the vocabulary (size {vocab})")
        check_logprob_args(req.return_logprob, req.top_logprobs_num)
        bias = req.sampling.logit_bias
        if bias and max(bias) >= vocab:
            raise RequestError(
                f"logit_bias token id {max(bias)} is outside the vocabulary (size {vocab})"
            )
        queued = len(self.waiting) + len(self._compiling)
        if queued >= self.args.max_queued_requests:
            raise QueueFullError(
                f"{queued} requests are waiting (--max-queued-requests); retry later"
            )
        if req.sampling.seed is not None:
            req.generator = torch.Generator(device=self.runner.device).manual_seed(
                req.sampling.seed
            )
        if req.sampling.constrained:
            try:
                self._grammars_for_requests().check(req.sampling)
            except GrammarError as e:
                raise RequestError(str(e)) from None
        s = req.logprob_start_len
        if s != -1 and (not req.return_logprob or not 0 <= s < n):
            raise RequestError(
                f"logprob_start_len must be -1 (no prompt logprobs) or in [0, {n}) (the prompt "
                f"has {n} tokens), with return_logprob; got {s}"
            )
        if req.sampling.max_new_tokens == 0 and s == -1:
            req.finish = FinishReason("length")
            self._emit(req)
            return
        if req.sampling.constrained:
            # Matched against the vocabulary on the compile thread; queued when ready.
            assert self._grammars is not None
            self._compiling.append((req, self._grammars.submit(req.sampling)))
            return
        self.waiting.append(req)

    def _grammars_for_requests(self) -> Grammars:
        """The structured-output compiler (built with the first constrained request unless
        the warm-up built it); RequestError when there can be none. Raises GrammarError's
        message as a RequestError."""
        try:
            if self._grammars is None:
                self._grammars = Grammars(
                    self.tokenizer, self.runner.vocab_size, sorted(self.eos_ids)
                )
            return self._grammars
        except GrammarError as e:
            raise RequestError(str(e)) from None

    def _take_compiled(self) -> None:
        """Queue the constrained requests whose matcher is ready (a constraint that failed to
        compile finishes its request with the reason). With nothing else to run, waits a
        little for one instead of spinning."""
        if not self._compiling:
            return
        if not (self.waiting or self.running or self._inflight):
            futures.wait([f for _, f in self._compiling], 0.05, futures.FIRST_COMPLETED)
        pending = []
        for req, future in self._compiling:
            if not future.done():
                pending.append((req, future))
                continue
            try:
                req.grammar = future.result()
            except GrammarError as e:
                self._finish(req, FinishReason("abort", message=str(e)))
                continue
            self.waiting.append(req)
        self._compiling = pending

    def abort_request(self, rid: str) -> bool:
        for req, future in self._compiling:
            if req.rid == rid:
                self._compiling.remove((req, future))
                future.cancel()
                self._finish(req, FinishReason("abort", message="aborted"))
                return True
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                self._finish(req, FinishReason("abort", message="aborted"))
                return True
        for req in self.running:
            if req.rid == rid:
                self._finish(req, FinishReason("abort", message="aborted"))
                self.running.remove(req)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight or self._compiling)

    def step(self) -> list[ReqOutput]:
        """Run one forward pass (if there is work) and return what it produced.

        Overlap scheduling: a decode step is left running on the device; the next call
        launches the step after it (when ``_schedule_ahead`` can) before taking the first one's
        results, so the host's work per step (sampling results, stop checks, detokenizing,
        scheduling, the next step's inputs) overlaps the device's."""
        self.cache.poll()
        self._take_compiled()
        prev, self._inflight = self._inflight, None
        if prev is not None:
            ahead = self._schedule_ahead(prev)
            if ahead is not None:
                self._inflight = self._launch(*ahead)
                self.counters["decode_steps_ahead"] += 1
            self._process(prev)
            if ahead is not None:
                return self._take_outputs()
        batch = self._schedule_extend() or self._schedule_decode()
        if batch is not None:
            self._run(batch)
        return self._take_outputs()

    def _take_outputs(self) -> list[ReqOutput]:
        outputs, self._outputs = self._outputs, []
        return outputs

    # ------------------------------------------------------------------ scheduling
    def _alloc(self, n: int) -> list[int] | None:
        pages = self.allocator.alloc(n)
        if pages is None and self.use_cache:
            self.cache.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n)
        if pages is None and self.use_cache and not self.cache.transfers_idle:
            # Transfers in flight (backups above all) pin pages; once they land, those pages
            # can be evicted.
            self.cache.wait_transfers()
            self.cache.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n)
        return pages

    def _pages_for(self, req: Req, num_new: int) -> int:
        """Pages ``req`` must get so that tokens [0, kv_len + num_new) have slots."""
        need = (req.kv_len + num_new + self.page_size - 1) // self.page_size
        return max(0, need - len(req.pages))

    def _grow(self, req: Req, num_new: int) -> bool:
        n = self._pages_for(req, num_new)
        if n == 0:
            return True
        pages = self._alloc(n)
        if pages is None:
            return False
        assert req.row is not None
        self.table.set_pages(req.row, len(req.pages), pages)
        req.pages.extend(pages)
        return True

    def _reserved_pages(self) -> int:
        tokens = 0
        for r in self.running:
            tokens += int((r.sampling.max_new_tokens - len(r.output_ids)) * NEW_TOKEN_RESERVE_RATIO)
        return (tokens + self.page_size - 1) // self.page_size

    def _available_pages(self) -> int:
        free = self.allocator.num_free
        return free + (self.cache.evictable_pages if self.use_cache else 0)

    @staticmethod
    def _chunk_for(req: Req, chunk: int) -> int:
        """The most prompt tokens ``req`` runs in one step: the chunk size, and while it
        collects prompt logprobs PROMPT_LOGPROB_CHUNK (each of those positions gets a float32
        logits row: 1024 rows of a 152K vocabulary are 0.6 GB)."""
        return min(chunk, PROMPT_LOGPROB_CHUNK) if req.wants_prompt_logprobs else chunk

    def _order_waiting(self) -> None:
        """--schedule-policy lpm: the waiting requests with the longest cached prefix (on the
        GPU or in L2) first, arrival order among equals (a stable sort), so that prefixes
        still cached are used before more admissions evict them. Each match is a walk of the
        request's tokens: past LPM_MAX_WAITING waiting requests, first come first served."""
        if not self.use_cache or not 1 < len(self.waiting) <= LPM_MAX_WAITING:
            return

        def cached(req: Req) -> int:
            match = self.cache.match_prefix(req.tokens[: len(req.tokens) - 1])
            return match.device_len + match.host_len

        self.waiting = deque(sorted(self.waiting, key=lambda r: -cached(r)))

    def _schedule_extend(self) -> ScheduleBatch | None:
        chunk = self.args.chunk_size or 1 << 62
        budget = self.args.max_prefill_tokens
        reqs: list[Req] = []
        num_new: list[int] = []
        # Requests part-way through a chunked prefill continue first.
        for req in list(self.running):
            if req.pending <= 1 or budget <= 0 or req not in self.running:
                continue
            n = min(req.pending, self._chunk_for(req, chunk), budget)
            if not self._grow_or_retract(req, n, reqs, num_new):
                continue
            reqs.append(req)
            num_new.append(n)
            budget -= n
        # Ordering walks every waiting prompt: only when an admission is possible at all
        # (room for a request and a page beyond the running requests' reserve).
        if (
            self.args.schedule_policy == "lpm"
            and budget > 0
            and len(self.running) < self.args.max_running_requests
            and self._available_pages() > self._reserved_pages()
        ):
            self._order_waiting()
        while self.waiting and budget > 0:
            if len(self.running) >= self.args.max_running_requests:
                break
            req = self.waiting[0]
            n = self._admit(req, min(self._chunk_for(req, chunk), budget))
            if n == 0:
                break
            self.waiting.popleft()
            self.running.append(req)
            reqs.append(req)
            num_new.append(n)
            budget -= n
        if not reqs:
            return None
        return ScheduleBatch(ForwardMode.EXTEND, reqs, num_new)

    def _admit(self, req: Req, max_new: int) -> int:
        """Give ``req`` its cached prefix and pages for its first step; return how many tokens
        that step runs (0: not admitted, nothing changed).

        Past the whole cached pages, a cached page whose first tokens continue the prompt (a
        "tail": e.g. the last page of a prompt sent again) lends those tokens' KV: its first
        ``r`` slots are copied into the request's first own page during the next step, so only
        the rest is computed (one token for a prompt cached whole) instead of up to a page.
        A tail only in L2 is loaded with the rest of the L2 continuation."""
        ps = self.page_size
        loaded = 0
        match = None
        tail = None
        row = self.table.alloc_row()
        if row is None:
            return 0
        if req.wants_prompt_logprobs:
            req.reset_prompt_logprobs()
        if self.use_cache:
            # The last token is always run, so its logits exist to sample from; positions whose
            # logits give prompt logprobs are run too.
            limit = len(req.tokens) - 1
            if req.wants_prompt_logprobs:
                limit = min(limit, req.prompt_logits_from)
            prompt = req.tokens[:limit]
            match = self.cache.match_prefix(prompt)
            self.cache.lock(match.last_device_node)
            tail = self.cache.match_tail(match, prompt)
            if tail is not None and tail.node.device_pages is not None and not match.host_pages:
                self.cache.lock(tail.node)
                self.cache.unlock(match.last_device_node)
                match = MatchResult(
                    match.device_pages + tail.node.device_pages, tail.node, [], None, ps
                )
            elif tail is not None and tail.node.device_pages is None:
                assert tail.node.host_pages is not None
                match = MatchResult(
                    match.device_pages, match.last_device_node,
                    match.host_pages + tail.node.host_pages, tail.node, ps,
                )  # fmt: skip
            else:
                tail = None
            # Room for the L2 continuation and the first step must exist before any load is
            # queued: a load for a request that is then not admitted is wasted work.
            full = match.device_len + match.host_len - (ps if tail else 0)
            start = full + (tail.length if tail else 0)
            n = min(len(req.tokens) - start, max_new)
            need = len(match.host_pages) + (start + n + ps - 1) // ps - full // ps
            if self._available_pages() < need + self._reserved_pages():
                self.cache.unlock(match.last_device_node)
                self.table.free_row(row)
                return 0
            if match.host_pages:
                extended, loaded = self.cache.load_back(match)
                self.cache.lock(extended.last_device_node)
                self.cache.unlock(match.last_device_node)
                match = extended
        prefix_pages = match.device_pages if match else []
        tail_page = None
        if tail is not None and match is not None and match.last_device_node is tail.node:
            tail_page = prefix_pages[-1]
            prefix_pages = prefix_pages[:-1]
        else:
            tail = None  # its L2 load was skipped: the tokens are computed
        prefix_len = len(prefix_pages) * ps
        start = prefix_len + (tail.length if tail else 0)
        n = min(len(req.tokens) - start, max_new)
        need = (start + n + ps - 1) // ps - len(prefix_pages)
        pages = None
        if self._available_pages() >= need + self._reserved_pages():
            pages = self._alloc(need)
        if pages is None:
            # Only reached without an L2 load (the room was checked before queueing one).
            self.table.free_row(row)
            if match:
                self.cache.unlock(match.last_device_node)
            return 0
        req.row = row
        req.pages = list(prefix_pages) + pages
        self.table.set_pages(row, 0, req.pages)
        req.cached_len = prefix_len
        req.kv_len = start
        req.last_node = match.last_device_node if match else None
        if tail is not None:
            assert tail_page is not None
            # The tail page stays locked (it is req.last_node) until the copy has run.
            req.tail_copy = (tail_page, pages[0], tail.length)
            self.counters["tail_tokens_copied"] += tail.length
            if loaded:
                # Its whole page was loaded from L2; the rest of it is not served.
                loaded -= ps - tail.length
                self.counters["l2_tail_tokens_unused"] += ps - tail.length
        if not req.admitted:
            req.admitted = True
            req.cached_tokens = start
            by_tier = {"device": start - loaded, self.l2_name: loaded}
            req.cached_tokens_by_tier = {k: v for k, v in by_tier.items() if v}
            self.counters["prompt_tokens"] += len(req.input_ids)
            self.counters["cached_tokens"] += start
            for tier, t in req.cached_tokens_by_tier.items():
                self.cached_tokens_by_tier[tier] = self.cached_tokens_by_tier.get(tier, 0) + t
        return n

    def _schedule_decode(self) -> ScheduleBatch | None:
        reqs = [r for r in self.running if r.pending == 1]
        if not reqs:
            return None
        scheduled: list[Req] = []
        num_new: list[int] = []
        # Oldest first; when pages run out, the newest running request goes back to waiting.
        for req in reqs:
            if req not in self.running:  # retracted while making room for an older one
                continue
            if not self._grow_or_retract(req, 1, scheduled, num_new):
                continue
            scheduled.append(req)
            num_new.append(1)
        if not scheduled:
            return None
        return ScheduleBatch(ForwardMode.DECODE, scheduled, num_new)

    def _grow_or_retract(self, req: Req, n: int, scheduled: list[Req], num_new: list[int]) -> bool:
        """Give ``req`` pages for ``n`` more tokens, retracting the newest other running requests
        (and dropping them from the step being built) until that succeeds. When ``req`` alone
        does not fit in the pool, it is finished with an error instead (False)."""
        while not self._grow(req, n):
            victim = next((r for r in reversed(self.running) if r is not req), None)
            if victim is None:
                self.running.remove(req)
                capacity = self.allocator.capacity * self.page_size
                self._finish(
                    req,
                    FinishReason(
                        "abort",
                        message=f"out of KV memory: the request needs more than the "
                        f"{capacity} tokens of the KV pool (see --max-total-tokens)",
                    ),
                )
                return False
            self._retract(victim)
            if victim in scheduled:
                i = scheduled.index(victim)
                del scheduled[i], num_new[i]
        return True

    def _retract(self, req: Req) -> None:
        """Send a running request back to the queue; its KV is cached in the tree if possible and
        recomputed (or matched again) on re-admission."""
        logger.debug("retracting %s at %d tokens", req.rid, len(req.tokens))
        self._release(req)
        self.running.remove(req)
        req.num_retractions += 1
        self.counters["retractions"] += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ running a step
    def _launch(
        self, batch: ScheduleBatch, input_ids: torch.Tensor | None = None
    ) -> _InFlight | None:
        """Enqueue the step's forward pass and sampling on the device; nothing waits for them.
        None when a tier load failed (the step is not run; see _recover_failed_load)."""
        try:
            wait_layer = self.cache.start_loads()
        except LoadError as e:
            self._recover_failed_load(e)
            return None
        pool = self.runner.kv_pool
        # One new token a request and nothing to wait for (a prompt whose prefix is all on the
        # GPU): the step is a decode step as far as the model is concerned. The batch keeps its
        # mode for the bookkeeping (the prompt goes into the tree when it is processed).
        as_decode = (
            batch.mode is ForwardMode.EXTEND
            and wait_layer is None
            and all(n == 1 for n in batch.num_new)
            and not batch.has_prompt_logprobs
        )
        fb = batch.to_forward_batch(
            pool, self.table, self.runner.attn_backend, input_ids, as_decode=as_decode
        )
        fb.wait_layer = self._with_tail_copies(batch, wait_layer)
        logits = self.runner.forward(fb)
        sampled = [r for i, r in enumerate(batch.reqs) if batch.samples(i)]
        self.counters["forward_steps"] += 1
        _, sample_rows, spans = batch.logit_plan
        prompt = self._prompt_logprobs(batch, logits, spans) if spans else None
        if spans:
            logits = logits[
                to_device_async(torch.tensor(sample_rows, dtype=torch.int64), logits.device)
            ]
        if not sampled:
            step = _InFlight(batch, sampled, None, None, None)
            if self._attach_prompt_logprobs(step, prompt):
                # Device-to-host copies in flight: _process waits for them.
                step.done = torch.cuda.Event()
                step.done.record()
            return step
        # Histories only when some request is penalized (most steps have none).
        histories = None
        if any(r.sampling.penalized for r in sampled):
            histories = [self._history(r) for r in sampled]
        # Structured output: constrained rows masked to what their grammar allows (a copy:
        # logprobs stay the raw logits').
        constrained = [i for i, r in enumerate(sampled) if r.grammar is not None]
        sample_logits = logits
        if constrained:
            assert self._grammars is not None
            matchers = [sampled[i].grammar for i in constrained]
            sample_logits = self._grammars.mask(logits, constrained, matchers)
        ids = sample(
            sample_logits,
            [r.sampling for r in sampled],
            [r.generator for r in sampled],
            self.generator,
            histories,
        )
        rows = [i for i, r in enumerate(sampled) if r.return_logprob] or None
        logprobs = None
        if rows is not None:
            index = to_device_async(torch.tensor(rows, dtype=torch.int64), logits.device)
            top_n = max(sampled[i].top_logprobs_num for i in rows)
            logprobs = token_logprobs(logits[index], ids[index], top_n)
        if ids.device.type != "cuda":
            step = _InFlight(batch, sampled, ids, ids, None, rows, logprobs)
            self._attach_prompt_logprobs(step, prompt)
            return step
        # To pinned memory without waiting; the event marks when the copies have landed.
        host = _to_host(ids)
        host_logprobs = None
        if logprobs is not None:
            host_logprobs = (_to_host(logprobs[0]), _to_host(logprobs[1]), _to_host(logprobs[2]))
        step = _InFlight(batch, sampled, ids, host, None, rows, host_logprobs)
        self._attach_prompt_logprobs(step, prompt)
        step.done = torch.cuda.Event()
        step.done.record()
        return step

    def _prompt_logprobs(
        self, batch: ScheduleBatch, logits: torch.Tensor, spans: list[tuple[int, int, int, int]]
    ) -> tuple[list[tuple[Req, int, int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The step's prompt logprobs on the device: each span's positions' logits against the
        prompt tokens that follow them."""
        rows: list[int] = []
        targets: list[int] = []
        out: list[tuple[Req, int, int]] = []
        for i, first, count, row in spans:
            req = batch.reqs[i]
            rows.extend(range(row, row + count))
            targets.extend(req.input_ids[first + 1 : first + 1 + count])
            out.append((req, first, count))
        device = logits.device
        index = to_device_async(torch.tensor(rows, dtype=torch.int64), device)
        tokens = to_device_async(torch.tensor(targets, dtype=torch.int64), device)
        top_n = max(req.top_logprobs_num for req, _, _ in out)
        return out, token_logprobs(logits[index], tokens, top_n)

    @staticmethod
    def _attach_prompt_logprobs(
        step: _InFlight,
        prompt: tuple[list[tuple[Req, int, int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
        | None,
    ) -> bool:
        """Put the step's prompt logprobs on it (copies to the host enqueued when they are on
        the GPU: then True, and the step needs a ``done`` event recorded after this call)."""
        if prompt is None:
            return False
        spans, values = prompt
        step.prompt_spans = spans
        on_device = values[0].device.type == "cuda"
        if on_device:
            values = (_to_host(values[0]), _to_host(values[1]), _to_host(values[2]))
        step.host_prompt_logprobs = values
        return on_device

    def _history(self, req: Req) -> History | None:
        """What a penalized request's sampling needs (None for the others). Its output so far:
        with overlap scheduling, a step launched ahead does not see the token of the step
        still in flight, so penalized requests are never scheduled ahead."""
        sp = req.sampling
        if not sp.penalized:
            return None
        banned: tuple[int, ...] = ()
        if len(req.output_ids) < sp.min_new_tokens:
            eos = () if sp.ignore_eos else tuple(sorted(self.eos_ids))
            banned = eos + tuple(sp.stop_token_ids)
        return History(req.input_ids, req.output_ids, banned)

    def _process(self, step: _InFlight) -> None:
        """Take a launched step's results: advance the cursors, cache prefixes, append the
        sampled tokens (which may finish requests). Requests that finished or were aborted
        while the step was in flight (overlap scheduling) are skipped: their token is dropped."""
        if step.done is not None:
            step.done.synchronize()
        next_ids = step.host_ids.tolist() if step.host_ids is not None else []
        batch = step.batch
        if step.prompt_spans is not None and step.host_prompt_logprobs is not None:
            chosen, top_values, top_ids = (t.tolist() for t in step.host_prompt_logprobs)
            k = 0
            for req, _, count in step.prompt_spans:
                n = req.top_logprobs_num
                for j in range(k, k + count):
                    req.input_logprobs.append(chosen[j])
                    req.input_top_logprobs.append(
                        list(zip(top_ids[j][:n], top_values[j][:n], strict=True))
                    )
                k += count
        for req, n in zip(batch.reqs, batch.num_new):
            if not req.finished:
                req.kv_len += n
        if batch.mode is ForwardMode.EXTEND and self.use_cache:
            for req in batch.reqs:
                if not req.finished:
                    self._cache_prefix(req)
        logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if step.logprob_rows is not None and step.host_logprobs is not None:
            chosen, top_values, top_ids = (t.tolist() for t in step.host_logprobs)
            for j, i in enumerate(step.logprob_rows):
                n = step.sampled[i].top_logprobs_num
                top = list(zip(top_ids[j][:n], top_values[j][:n], strict=True))
                logprobs[i] = (chosen[j], top)
        for i, (req, token) in enumerate(zip(step.sampled, next_ids)):
            if req.finished:
                continue
            if req.sampling.max_new_tokens == 0:
                # Run only for its prompt logprobs: nothing is generated.
                self.running.remove(req)
                self._finish(req, FinishReason("length"))
            else:
                self._append_token(req, token, logprobs.get(i))

    def _run(self, batch: ScheduleBatch) -> None:
        """Launch a step and, unless it is a decode step that overlap scheduling leaves in
        flight, take its results now."""
        step = self._launch(batch)
        if step is None:
            return
        if self.overlap and batch.mode is ForwardMode.DECODE:
            self._inflight = step
        else:
            self._process(step)

    def _schedule_ahead(self, prev: _InFlight) -> tuple[ScheduleBatch, torch.Tensor] | None:
        """The next decode step and its input ids, scheduled while ``prev`` (a decode step) is
        still running, or None when it cannot be: ``prev``'s requests, each one position
        further, its input the token ``prev`` samples for it (on the device). Only in the
        steady state: nobody waiting for admission and every running request in ``prev``.
        A request that ``prev``'s token stops by length is left out; one that a stop token or
        string stops is only known once ``prev`` is processed, and its step ahead is then
        dropped. No retraction: when a request lacks a page, None."""
        reqs = prev.batch.reqs
        if (
            prev.batch.mode is not ForwardMode.DECODE
            or prev.ids is None
            or self.waiting
            or len(reqs) != len(self.running)
            or len(prev.sampled) != len(reqs)
        ):
            return None
        keep: list[int] = []
        for i, req in enumerate(reqs):
            if (
                req.finished
                or req.tail_copy is not None
                or req.sampling.penalized
                or req.grammar is not None
            ):
                return None
            if (
                len(req.output_ids) + 1 < req.sampling.max_new_tokens
                and len(req.tokens) + 1 < self.context_length
            ):
                keep.append(i)
        if not keep:
            return None
        for i in keep:
            if not self._grow(reqs[i], 2):
                return None
        ids = prev.ids
        if len(keep) < len(reqs):
            ids = ids[to_device_async(torch.tensor(keep, dtype=torch.int64), ids.device)]
        batch = ScheduleBatch(ForwardMode.DECODE, [reqs[i] for i in keep], [1] * len(keep), ahead=1)
        return batch, ids

    def _with_tail_copies(
        self, batch: ScheduleBatch, wait_layer: Callable[[int], None] | None
    ) -> Callable[[int], None] | None:
        """``wait_layer`` extended with the batch's pending tail copies (see ``_admit``): each
        layer's slots are copied after that layer's load (if any) has landed and before its
        attention reads them; every runner calls the hook per layer of an EXTEND step. With no
        load in flight (a GPU hit) every layer is copied now, in one go, and no hook is left:
        the step then runs as one without tiers (per-layer graphs back to back, the KV write
        inside the q/k kernel)."""
        copies = [r.tail_copy for r in batch.reqs if r.tail_copy is not None]
        if not copies:
            return wait_layer
        for req in batch.reqs:
            req.tail_copy = None
        ps = self.page_size
        src = [page * ps + j for page, _, n in copies for j in range(n)]
        dst = [page * ps + j for _, page, n in copies for j in range(n)]
        pool = self.runner.kv_pool
        src_t = torch.tensor(src, dtype=torch.int64).to(pool.device, non_blocking=True)
        dst_t = torch.tensor(dst, dtype=torch.int64).to(pool.device, non_blocking=True)
        if wait_layer is None:
            pool.copy_slots_all_layers(src_t, dst_t)
            return None
        if batch.mode is ForwardMode.DECODE:
            # A request whose admission step was skipped (a failed load of another request's
            # prefix) runs its last prompt token as a decode step, and a decode CUDA graph
            # waits only once, for the last layer: copy every layer now, after all loads.
            wait_layer(pool.num_layers - 1)
            pool.copy_slots_all_layers(src_t, dst_t)
            return wait_layer

        def hook(layer: int) -> None:
            wait_layer(layer)
            pool.copy_slots(layer, src_t, dst_t)

        return hook

    def _recover_failed_load(self, error: LoadError) -> None:
        """A load from L2 failed before this step's forward: every running request that holds
        one of the pages it was to fill goes back to the queue (its prefix will be recomputed),
        the nodes holding them leave both tiers, and the step is skipped; the other requests
        keep their state and run next step."""
        bad = set(error.device_pages)
        affected = [
            r
            for r in self.running
            if not bad.isdisjoint(r.pages) or (r.tail_copy is not None and r.tail_copy[0] in bad)
        ]
        for req in affected:
            self._unadmit(req)
        self.cache.drop_nodes_holding(bad)  # type: ignore[attr-defined]
        self.counters["load_failures_recovered"] += 1
        logger.warning("%s; recomputing %d request(s)", error, len(affected))

    def _unadmit(self, req: Req) -> None:
        """Undo an admission whose cached prefix turned out unusable: release the request's
        pages and lock without caching anything, and queue it to be admitted afresh."""
        self.allocator.free(req.pages[req.cached_len // self.page_size :])
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        if req.row is not None:
            self.table.free_row(req.row)
        req.pages, req.last_node, req.row = [], None, None
        req.kv_len = req.cached_len = 0
        req.tail_copy = None
        if req.admitted and not req.output_ids:
            # Its cache report is made again at re-admission.
            self.counters["prompt_tokens"] -= len(req.input_ids)
            self.counters["cached_tokens"] -= req.cached_tokens
            for tier, t in req.cached_tokens_by_tier.items():
                self.cached_tokens_by_tier[tier] -= t
            req.admitted = False
            req.cached_tokens, req.cached_tokens_by_tier = 0, {}
        self.running.remove(req)
        self.waiting.appendleft(req)

    def _append_token(
        self, req: Req, token: int, logprob: tuple[float, list[tuple[int, float]]] | None = None
    ) -> None:
        req.tokens.append(token)
        req.output_ids.append(token)
        if logprob is not None:
            req.output_logprobs.append(logprob[0])
            req.output_top_logprobs.append(logprob[1])
        self.counters["generation_tokens"] += 1
        if req.grammar is not None and not req.grammar.accept_token(token):
            # The mask allowed only tokens the grammar accepts: a refusal is a bug, reported
            # on the request rather than by stopping the server.
            self.running.remove(req)
            message = f"structured output: the grammar refused token {token}"
            logger.error("request %s: %s", req.rid, message)
            self._finish(req, FinishReason("abort", message=message))
            return
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        searched_from = len(req.output_text)
        self.detok.update(req)
        finish = self._check_stop(req, token, searched_from)
        if finish is not None:
            self.running.remove(req)
            self._finish(req, finish)
        elif req.stream:
            self._emit(req)

    def _check_stop(self, req: Req, token: int, searched_from: int) -> FinishReason | None:
        sp = req.sampling
        if token in sp.stop_token_ids:
            return FinishReason("stop", matched=token)
        if not sp.ignore_eos and token in self.eos_ids:
            return FinishReason("stop", matched=token)
        if req.grammar is not None and req.grammar.is_terminated():
            return FinishReason("stop", matched=token)
        if sp.stop:
            hit = find_stop_string(req, searched_from)
            if hit is not None:
                stop, pos = hit
                if not sp.no_stop_trim:
                    req.output_text = req.output_text[:pos]
                return FinishReason("stop", matched=stop)
        if len(req.output_ids) >= sp.max_new_tokens:
            return FinishReason("length")
        if len(req.tokens) >= self.context_length:
            return FinishReason("length", message="reached the context length")
        return None

    # ------------------------------------------------------------------ pages and the tree
    def _cache_prefix(self, req: Req) -> None:
        """Hand the page-aligned part of ``req``'s computed KV to the tree (so that concurrent and
        later requests share it) and move the request's lock down to it."""
        ps = self.page_size
        aligned = req.kv_len - req.kv_len % ps
        if aligned <= req.cached_len:
            return
        res = self.cache.insert(req.tokens[:aligned], req.pages[: aligned // ps])
        first = req.cached_len // ps
        for i in range(first, aligned // ps):
            if req.pages[i] != res.pages[i]:
                # Another request put the same tokens in the tree first: use its page.
                self.allocator.free([req.pages[i]])
                req.pages[i] = res.pages[i]
                assert req.row is not None
                self.table.set_pages(req.row, i, [res.pages[i]])
        self.cache.lock(res.last_node)
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        req.last_node = res.last_node
        req.cached_len = aligned

    def _release(self, req: Req) -> None:
        """Give back everything a request holds: its KV goes to the tree, its own pages that the
        tree did not take are freed, its lock and table row are released."""
        ps = self.page_size
        if self.use_cache:
            aligned = req.kv_len - req.kv_len % ps
            if aligned > req.cached_len:
                self._cache_prefix(req)
            own = req.pages[req.cached_len // ps :]
            if req.last_node is not None:
                self.cache.unlock(req.last_node)
        else:
            own = req.pages
        self.allocator.free(own)
        if req.row is not None:
            self.table.free_row(req.row)
        req.pages = []
        req.last_node = None
        req.row = None
        req.kv_len = req.cached_len = 0
        req.tail_copy = None

    def _finish(self, req: Req, reason: FinishReason) -> None:
        req.finish = reason
        if req.pages or req.row is not None:
            self._release(req)
        self.detok.update(req)
        self.detok.forget(req.rid)
        key = "requests_aborted" if reason.type == "abort" else "requests_finished"
        self.counters[key] += 1
        self._emit(req)

    def _emit(self, req: Req) -> None:
        text_end = len(req.output_text)
        if not req.finished:
            # Hold back a tail that may be the start of a stop string: if the string completes,
            # it is trimmed from the output and must not have been sent.
            text_end -= stop_prefix_overlap(req.output_text, req.sampling.stop)
        sent = req.sent_ids_len
        new_ids = req.output_ids[sent:]
        new_text = req.output_text[req.sent_text_len : max(text_end, req.sent_text_len)]
        req.sent_ids_len = len(req.output_ids)
        req.sent_text_len = max(text_end, req.sent_text_len)
        out = ReqOutput(req.rid, new_ids, new_text, req.finished, req.meta_info())
        if req.return_logprob:
            out.new_logprobs = req.output_logprobs[sent:]
            out.new_top_logprobs = req.output_top_logprobs[sent:]
        if (
            req.logprob_start_len >= 0
            and not req.input_logprobs_sent
            and not req.wants_prompt_logprobs
        ):
            req.input_logprobs_sent = True
            ids = req.input_ids[req.logprob_start_len :]
            out.input_token_logprobs = [
                [lp, t, None] for lp, t in zip(req.input_logprobs, ids, strict=True)
            ]
            out.input_top_logprobs = [
                [[lp, t, None] for t, lp in top] for top in req.input_top_logprobs
            ]
        self._outputs.append(out)

    # ------------------------------------------------------------------ maintenance
    def warm_up(self) -> None:
        """Run a short prompt, then a new turn that extends its cached prefix, each with a few
        decode steps, so that the first real requests do not pay for kernel compilation (Triton
        compiles each kernel variant on first use; on an H200 the first request to extend a
        cached prefix in a fresh server took 1.4 s), then clear the cache and the counters: the
        server starts as if nothing had run. Skipped, with a log line, when the context or the
        pool is too small for it.

        On CUDA also the long-prompt paths: a prompt of two full prefill chunks and a quarter
        (the dense-attention chunks, then a partial chunk after a long prefix on the paged
        kernel) and a turn extending it, where the pool and context allow; and the cuDNN
        graphs of full chunks after every chunk-multiple prefix up to the context length or
        the pool's size, whichever is smaller (an H200 TTFT run's first 10K-token prompt took
        1.49 s without these, 0.30 s with them).

        With a hierarchical cache each prompt's turn runs once more after the GPU copies were
        dropped, so that the load path (the tier's IO kernels, the extend that waits on each
        layer's load) is built too: on an H200 a fresh server's first L2 hit of a 21K-token
        prefix took 332 ms, against about 45 ms of copying. With xgrammar installed and a
        tokenizer, the structured-output compiler is built here too."""
        ps = self.page_size
        capacity = self.allocator.capacity * ps
        n = min(2 * ps + 3, self.context_length - 16, capacity // 4)
        if n < 8:
            logger.info(
                "warm-up skipped: context %d / pool %d tokens", self.context_length, capacity
            )
            return
        t0 = time.perf_counter()
        self._warm_turns(n, "warm-up")
        chunk = self.args.chunk_size
        if self.runner.device.type == "cuda" and chunk:
            long_n = 2 * chunk + chunk // 4 + 3
            if long_n + 64 <= min(self.context_length, capacity // 2):
                self._warm_turns(long_n, "warm-up-long")
            cfg = self.runner.model_config
            prebuild = getattr(self.runner.attn_backend, "prebuild_dense", None)
            if prebuild is not None:
                try:
                    graphs = prebuild(
                        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                        self.runner.dtype, self.runner.device, chunk,
                        min(self.context_length, capacity),
                    )  # fmt: skip
                    logger.info("warm-up: %d dense-attention prefill shapes built", graphs)
                except RuntimeError as e:  # includes out of memory: only a head start is lost
                    logger.warning("warm-up: dense-attention shapes not built (%s)", e)
        from_l2 = self.cached_tokens_by_tier.get(self.l2_name, 0)
        if self.args.enable_hierarchical_cache:
            logger.info("warm-up: %d tokens served from L2", from_l2)
        if self.tokenizer is not None:
            # The grammar compiler's vocabulary index (about a second for a 150K vocabulary),
            # so that the first structured-output request does not stall every running one.
            try:
                self._grammars_for_requests()
            except RequestError as e:
                logger.info("warm-up: no structured output (%s)", e)
        self.flush_cache()  # waits for the warm-up's backups, then empties both tiers
        self.counters = dict.fromkeys(self.counters, 0)
        self.cached_tokens_by_tier = {}
        self.cache.reset_stats()
        logger.info("warm-up took %.1f s", time.perf_counter() - t0)

    def _warm_turns(self, n: int, tag: str) -> None:
        """A prompt of ``n`` tokens, then a second turn that extends it by 5, 4 tokens out each;
        with a hierarchical cache, the second turn again with its prefix in L2 only."""
        vocab = self.runner.vocab_size
        prompt = [1 + (7 * i) % (vocab - 1) for i in range(n)]
        sampling = SamplingParams.from_dict({"max_new_tokens": 4, "temperature": 0})
        turns = [prompt, prompt + prompt[:5]]
        if self.args.enable_hierarchical_cache:
            turns.append(None)  # the GPU copies dropped first
        for i, ids in enumerate(turns):
            if ids is None:
                self.cache.flush_device()  # waits for the backups of the turns before
                ids = turns[1]
            self.add_request(Req(rid=f"{tag}-{i}", input_ids=ids, sampling=sampling))
            while self.has_work():
                self.step()

    def flush_cache(self, tier: str | None = None) -> bool:
        """``tier`` None or "all": drop every cached prefix, refused (False) while requests are
        queued or running. "device": drop the GPU copy of every unlocked prefix that has an L2
        copy, so that the next requests are served from L2."""
        if tier == "device":
            self.cache.flush_device()
            return True
        if tier not in (None, "all"):
            raise ValueError(f"unknown cache tier {tier!r}; use 'device' or 'all'")
        if self.waiting or self.running or self._compiling:
            return False
        if self._inflight is not None:
            # A step ahead whose requests all stopped meanwhile: nothing of it is kept.
            self._process(self._inflight)
            self._inflight = None
        self.cache.reset()
        return True

    @property
    def l2_name(self) -> str:
        return self.args.hicache_tier if self.args.enable_hierarchical_cache else "l2"

    def close(self) -> None:
        if self._grammars is not None:
            self._grammars.close()
        self.cache.close()

    def check_integrity(self) -> None:
        """Every GPU page is free, in the tree, or owned by one running request; exactly once."""
        tree_pages = self.cache.check_integrity()
        owned: list[int] = []
        for req in self.running:
            owned.extend(req.pages[req.cached_len // self.page_size :])
            if req.row is None:
                raise IntegrityError(f"running request {req.rid} has no table row")
            if self.use_cache and req.cached_len and req.last_node is None:
                raise IntegrityError(f"request {req.rid} shares pages without a lock")
        for req in [*self.waiting, *(r for r, _ in self._compiling)]:
            if req.pages or req.row is not None:
                raise IntegrityError(f"waiting request {req.rid} holds pages")
        if self._inflight is not None:
            # The step in flight is the only one not processed: its tokens sit at kv_len onward.
            step = self._inflight.batch
            for req, n in zip(step.reqs, step.num_new):
                if req.finished:
                    continue
                if req not in self.running:
                    raise IntegrityError(f"request {req.rid} of the step in flight is not running")
                if len(req.pages) * self.page_size < req.kv_len + n:
                    raise IntegrityError(
                        f"request {req.rid} of the step in flight has no slot for position "
                        f"{req.kv_len + n - 1}"
                    )
        free = self.allocator.free_pages()
        everything = tree_pages + owned + free
        expected = set(range(1, self.allocator.num_pages))
        if len(everything) != len(set(everything)):
            seen: set[int] = set()
            dup = next(p for p in everything if p in seen or seen.add(p))  # type: ignore[func-returns-value]
            raise IntegrityError(f"page {dup} is owned twice")
        if set(everything) != expected:
            missing = sorted(expected - set(everything))[:10]
            raise IntegrityError(f"pages leaked (neither free, cached nor owned): {missing}")
        rows_used = self.table.max_rows - self.table.num_free_rows
        if rows_used != len(self.running):
            raise IntegrityError(f"{rows_used} table rows in use for {len(self.running)} requests")
        if not self.running and self.cache.transfers_idle and self.cache.protected_pages:
            raise IntegrityError("tree pages locked with no request running")

    def stats(self) -> dict[str, Any]:
        pool = self.runner.kv_pool
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting) + len(self._compiling),
            "page_size": self.page_size,
            "device_total_pages": self.allocator.capacity,
            "device_free_pages": self.allocator.num_free,
            "device_cached_pages": self.cache.device_pages_in_tree,
            "device_evictable_pages": self.cache.evictable_pages,
            "device_total_tokens": self.allocator.capacity * self.page_size,
            "device_used_tokens": (self.allocator.capacity - self.allocator.num_free)
            * self.page_size,
            "kv_bytes_per_token": pool.token_bytes,
            "cached_tokens_by_tier": dict(self.cached_tokens_by_tier),
            **self.counters,
            **self.cache.stats(),
        }

    def drain(self) -> Iterable[ReqOutput]:
        """Step until every request finished; yields outputs as they come."""
        while self.has_work():
            yield from self.step()
