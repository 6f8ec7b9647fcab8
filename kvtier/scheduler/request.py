"""A request as the scheduler tracks it: token cursors, pages, and what it reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.cache.radix_cache import TreeNode
from kvtier.sampling_params import SamplingParams


@dataclass
class FinishReason:
    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        if self.matched is not None:
            d["matched"] = self.matched
        if self.message is not None:
            d["message"] = self.message
        return d


@dataclass(eq=False)
class Req:
    """One generation request.

    Cursors over ``tokens`` (the prompt followed by the generated tokens):
      - ``[0, cached_len)`` lie in pages held by the prefix tree, locked through ``last_node``;
      - ``[0, kv_len)`` have their KV in the pool, in ``pages`` (``cached_len <= kv_len``), or
        (``tail_copy`` pending) get it from a tree page early in the next step;
      - ``[kv_len, len(tokens))`` still need a forward pass: more than one token means an
        extend step (prefill, or a chunk of it), exactly one means a decode step.
    A request owns ``pages[cached_len // page_size:]``; the ones before belong to the tree.
    Retraction (out of pages) sets the cursors back to zero; the tokens are kept.
    """

    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    stream: bool = False
    tokens: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    kv_len: int = 0
    cached_len: int = 0
    pages: list[int] = field(default_factory=list)
    last_node: TreeNode | None = None
    row: int | None = None  # row in the request-to-page table while running
    # (tree page, own page, tokens): KV of the first tokens of a cached page that continues the
    # prefix, to be copied into the request's first own page by its next step, layer by layer
    # before attention (see Scheduler._admit). Only between admission and that step.
    tail_copy: tuple[int, int, int] | None = None
    # Reported: prompt tokens whose KV came from a cache at first admission, by tier.
    cached_tokens: int = 0
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    admitted: bool = False
    finish: FinishReason | None = None
    generator: torch.Generator | None = None
    # Structured output: the xgrammar matcher that follows the output tokens (see grammar.py).
    grammar: Any = None
    # Detokenized output so far and how much of it was already returned.
    output_text: str = ""
    sent_text_len: int = 0
    sent_ids_len: int = 0
    # Logprobs of each output token (return_logprob), and of the top_logprobs_num most likely
    # tokens at each position as (token id, logprob): aligned with output_ids.
    return_logprob: bool = False
    top_logprobs_num: int = 0
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Prompt logprobs (logprob_start_len >= 0, with return_logprob): one entry a prompt token
    # from that position on, None for the sequence's first token, with top alternatives; sent
    # once, with the request's first output. Positions whose logits they need are computed, not
    # taken from the prefix cache (see prompt_logits_from).
    logprob_start_len: int = -1
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    input_logprobs_sent: bool = False
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    num_retractions: int = 0

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.input_ids)

    @property
    def pending(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self.tokens) - self.kv_len

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt logprobs are asked for and not all collected yet."""
        s = self.logprob_start_len
        return s >= 0 and len(self.input_logprobs) < len(self.input_ids) - s

    @property
    def prompt_logits_from(self) -> int:
        """The first position whose logits the prompt logprobs need (position j gives token
        j + 1's logprob)."""
        return max(self.logprob_start_len - 1, 0)

    def reset_prompt_logprobs(self) -> None:
        """Start collecting prompt logprobs afresh (at each admission until complete): the
        sequence's first token has none."""
        self.input_logprobs, self.input_top_logprobs = [], []
        if self.logprob_start_len == 0:
            self.input_logprobs.append(None)
            self.input_top_logprobs.append([])

    def meta_info(self) -> dict[str, Any]:
        return {
            "id": self.rid,
            "prompt_tokens": len(self.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "cached_tokens_by_tier": dict(self.cached_tokens_by_tier),
            "finish_reason": self.finish.to_dict() if self.finish else None,
        }


@dataclass
class ReqOutput:
    """What one step produced for one request: the new tokens and text since the last output."""

    rid: str
    new_ids: list[int]
    new_text: str
    finished: bool
    meta_info: dict[str, Any]
    # With return_logprob: the new tokens' logprobs and top alternatives (see Req).
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    # With prompt logprobs, on the request's first output: SGLang's input_token_logprobs and
    # input_top_logprobs.
    input_token_logprobs: list[list[Any]] | None = None
    input_top_logprobs: list[list[list[Any]]] | None = None

    def logprob_entries(self) -> tuple[list[list[Any]], list[list[list[Any]]]] | None:
        """SGLang's ``meta_info`` shapes of the new tokens' logprobs: ``[logprob, token id,
        None]`` per token, and per token a list of those for its top alternatives; None
        without return_logprob."""
        if self.new_logprobs is None:
            return None
        tokens = [[lp, t, None] for lp, t in zip(self.new_logprobs, self.new_ids, strict=True)]
        tops = [[[lp, t, None] for t, lp in top] for top in self.new_top_logprobs or []]
        return tokens, tops


@dataclass
class GenerateResult:
    """One request's outputs accumulated: ``to_dict`` is what ``Engine.generate`` and the
    native ``/generate`` return for it (with return_logprob, ``meta_info`` also carries
    ``output_token_logprobs`` and ``output_top_logprobs`` in SGLang's shapes)."""

    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    meta_info: dict[str, Any] = field(default_factory=dict)
    token_logprobs: list[list[Any]] | None = None
    top_logprobs: list[list[list[Any]]] | None = None
    input_token_logprobs: list[list[Any]] | None = None
    input_top_logprobs: list[list[list[Any]]] | None = None

    def add(self, out: ReqOutput) -> None:
        self.text += out.new_text
        self.output_ids.extend(out.new_ids)
        self.meta_info = out.meta_info
        if out.input_token_logprobs is not None:
            self.input_token_logprobs = out.input_token_logprobs
            self.input_top_logprobs = out.input_top_logprobs
        entries = out.logprob_entries()
        if entries is not None:
            if self.token_logprobs is None or self.top_logprobs is None:
                self.token_logprobs, self.top_logprobs = [], []
            self.token_logprobs.extend(entries[0])
            self.top_logprobs.extend(entries[1])

    def to_dict(self, e2e_latency: float | None = None) -> dict[str, Any]:
        meta = dict(self.meta_info)
        if e2e_latency is not None:
            meta["e2e_latency"] = e2e_latency
        if self.token_logprobs is not None:
            meta["output_token_logprobs"] = list(self.token_logprobs)
            meta["output_top_logprobs"] = list(self.top_logprobs or [])
        if self.input_token_logprobs is not None:
            meta["input_token_logprobs"] = list(self.input_token_logprobs)
            meta["input_top_logprobs"] = list(self.input_top_logprobs or [])
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}
