"""A scheduled step (which requests, how many tokens each) and its ForwardBatch."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvtier.attention.backend import AttentionBackend
from kvtier.cache.kv_pool import KVPool, ReqToPageTable, to_device_async
from kvtier.runner.forward_batch import ForwardBatch, ForwardMode
from kvtier.scheduler.request import Req

# Requests running at most this many tokens in a step get their positions and KV slots computed
# with plain integers; longer extends with tensor ops.
_PY_SLOTS_MAX = 64


def _as_tensors(positions: list[int], locs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(positions, dtype=torch.int64), torch.tensor(locs, dtype=torch.int64)


@dataclass
class ScheduleBatch:
    mode: ForwardMode
    reqs: list[Req]
    num_new: list[int]  # tokens each request runs this step, from its kv_len cursor
    # Decode steps scheduled while the previous step is in flight (overlap scheduling): the
    # requests' cursors do not count that step yet, so this step runs position kv_len + ahead,
    # and its input tokens are the previous step's samples, still on the device.
    ahead: int = 0

    def samples(self, i: int) -> bool:
        """Whether request ``i`` reaches the end of its tokens this step (and so samples)."""
        req = self.reqs[i]
        return req.kv_len + self.num_new[i] == len(req.tokens)

    def prompt_logprob_positions(self, i: int) -> range:
        """The positions of request ``i`` this step whose logits give prompt logprobs (each
        position j the logprob of prompt token j + 1); empty for most requests."""
        req = self.reqs[i]
        if self.mode is not ForwardMode.EXTEND or not req.wants_prompt_logprobs:
            return range(0)
        start = req.kv_len
        lo = max(start, req.prompt_logits_from)
        hi = min(start + self.num_new[i], len(req.input_ids) - 1)
        return range(lo, max(lo, hi))

    @functools.cached_property
    def logit_plan(self) -> tuple[list[int], list[int], list[tuple[int, int, int, int]]]:
        """Which rows of the step's tokens get logits: ``(rows, sample_rows, spans)``. ``rows``
        index the step's tokens (the model's logits_indices); ``sample_rows`` index ``rows``,
        one for each request that samples, in batch order; ``spans`` are ``(request index,
        first position, count, first index into rows)`` of the prompt-logprob positions.
        Computed once, for the launch (the cursors move when the step is processed)."""
        if self.mode is ForwardMode.DECODE:
            # Every request of a decode step runs its last token and samples from it.
            rows = list(range(len(self.reqs)))
            return rows, rows, []
        rows = []
        sample_rows: list[int] = []
        spans: list[tuple[int, int, int, int]] = []
        offset = 0
        for i, (req, n) in enumerate(zip(self.reqs, self.num_new)):
            start = req.kv_len + self.ahead
            positions = self.prompt_logprob_positions(i)
            if positions:
                spans.append((i, positions.start, len(positions), len(rows)))
                rows.extend(offset + p - start for p in positions)
            offset += n
            if self.samples(i):
                sample_rows.append(len(rows))
                rows.append(offset - 1)
        return rows, sample_rows, spans

    @property
    def has_prompt_logprobs(self) -> bool:
        return bool(self.logit_plan[2])

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def to_forward_batch(
        self,
        kv_pool: KVPool,
        table: ReqToPageTable,
        attn_backend: AttentionBackend,
        input_ids: torch.Tensor | None = None,
        as_decode: bool = False,
    ) -> ForwardBatch:
        """The step's device-side batch. ``input_ids`` (a step with ``ahead``): the tokens on
        the device, one per request, in place of ``req.tokens``. ``as_decode``: an EXTEND step
        of one token a request (e.g. a prompt found whole in the cache) runs as a DECODE batch
        (the decode CUDA graph: one launch instead of one a layer)."""
        if self.ahead and (input_ids is None or self.mode is not ForwardMode.DECODE):
            raise ValueError("a step scheduled ahead is a decode step with device input ids")
        if as_decode and any(n != 1 for n in self.num_new):
            raise ValueError("only a step of one token a request runs as a decode batch")
        mode = ForwardMode.DECODE if as_decode else self.mode
        ps = kv_pool.page_size
        device = kv_pool.device
        ids: list[int] = []
        positions: list[int] = []
        locs: list[int] = []
        long_parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions, slots)
        seq_lens: list[int] = []
        prefix_lens: list[int] = []
        logits_indices = self.logit_plan[0]
        for req, n in zip(self.reqs, self.num_new):
            start = req.kv_len + self.ahead
            # Placeholders when the ids come from the device (keeps the one-copy layout).
            ids.extend(req.tokens[start : start + n] if input_ids is None else [0] * n)
            if n <= _PY_SLOTS_MAX:
                # Decode and short extends: plain integers (a decode step of 128 sequences
                # would otherwise make ~5 small tensors per sequence on the host).
                pages = req.pages
                for p in range(start, start + n):
                    positions.append(p)
                    locs.append(pages[p // ps] * ps + p % ps)
            else:
                if positions:
                    long_parts.append(_as_tensors(positions, locs))
                    positions, locs = [], []
                pos = torch.arange(start, start + n, dtype=torch.int64)
                first_page = start // ps
                pages_t = torch.tensor(
                    req.pages[first_page : (start + n - 1) // ps + 1], dtype=torch.int64
                )
                long_parts.append((pos, pages_t[pos // ps - first_page] * ps + pos % ps))
            seq_lens.append(start + n)
            prefix_lens.append(start)
        if long_parts:
            if positions:
                long_parts.append(_as_tensors(positions, locs))
            pos_t = torch.cat([p for p, _ in long_parts])
            loc_t = torch.cat([loc for _, loc in long_parts])
        else:
            pos_t, loc_t = _as_tensors(positions, locs)

        # One host-to-device copy for every per-step index (each copy from pageable memory
        # costs the host tens of microseconds); the fields are views of it.
        t, b, nl = len(ids), len(self.reqs), len(logits_indices)
        host = torch.cat(
            (
                torch.tensor(ids, dtype=torch.int64),
                pos_t,
                loc_t,
                torch.tensor(
                    logits_indices + [r.row for r in self.reqs] + seq_lens, dtype=torch.int64
                ),
            )
        )
        dev = to_device_async(host, device)
        o = 3 * t
        rows = dev[o + nl : o + nl + b]
        max_pages = (max(seq_lens) + ps - 1) // ps
        fb = ForwardBatch(
            mode=mode,
            input_ids=dev[:t] if input_ids is None else input_ids,
            positions=dev[t : 2 * t],
            out_cache_loc=dev[2 * t : o],
            seq_lens=dev[o + nl + b :].to(torch.int32),
            block_table=table.table[rows, :max_pages],
            logits_indices=dev[o : o + nl],
            kv_pool=kv_pool,
            attn_backend=attn_backend,
            seq_lens_cpu=seq_lens,
        )
        if mode is ForwardMode.EXTEND:
            starts = [0]
            for n in self.num_new[:-1]:
                starts.append(starts[-1] + n)
            fb.extend_lens_cpu = list(self.num_new)
            fb.prefix_lens_cpu = prefix_lens
            fb.extend_lens = torch.tensor(self.num_new, dtype=torch.int32).to(device)
            fb.prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32).to(device)
            fb.extend_starts = torch.tensor(starts, dtype=torch.int32).to(device)
        return fb
