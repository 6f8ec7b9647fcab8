"""A scheduled step (which requests, how many tokens each) and its ForwardBatch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.attention.backend import AttentionBackend
from kvtier.cache.kv_pool import KVPool, ReqToPageTable
from kvtier.runner.forward_batch import ForwardBatch, ForwardMode
from kvtier.scheduler.request import Req


@dataclass
class ScheduleBatch:
    mode: ForwardMode
    reqs: list[Req]
    num_new: list[int]  # tokens each request runs this step, from its kv_len cursor

    def samples(self, i: int) -> bool:
        """Whether request ``i`` reaches the end of its tokens this step (and so samples)."""
        req = self.reqs[i]
        return req.kv_len + self.num_new[i] == len(req.tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def to_forward_batch(
        self, kv_pool: KVPool, table: ReqToPageTable, attn_backend: AttentionBackend
    ) -> ForwardBatch:
        ps = kv_pool.page_size
        device = kv_pool.device
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        locs: list[torch.Tensor] = []
        seq_lens: list[int] = []
        prefix_lens: list[int] = []
        logits_indices: list[int] = []
        offset = 0
        for i, (req, n) in enumerate(zip(self.reqs, self.num_new)):
            start = req.kv_len
            ids.extend(req.tokens[start : start + n])
            pos = torch.arange(start, start + n, dtype=torch.int64)
            first_page = start // ps
            pages = torch.tensor(
                req.pages[first_page : (start + n - 1) // ps + 1], dtype=torch.int64
            )
            locs.append(pages[pos // ps - first_page] * ps + pos % ps)
            positions.append(pos)
            seq_lens.append(start + n)
            prefix_lens.append(start)
            offset += n
            if self.samples(i):
                logits_indices.append(offset - 1)

        max_pages = (max(seq_lens) + ps - 1) // ps
        rows = torch.tensor([r.row for r in self.reqs], dtype=torch.int64, device=device)
        fb = ForwardBatch(
            mode=self.mode,
            input_ids=torch.tensor(ids, dtype=torch.int64).to(device),
            positions=torch.cat(positions).to(device),
            out_cache_loc=torch.cat(locs).to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
            block_table=table.table[rows, :max_pages],
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64).to(device),
            kv_pool=kv_pool,
            attn_backend=attn_backend,
            seq_lens_cpu=seq_lens,
        )
        if self.mode is ForwardMode.EXTEND:
            starts = [0]
            for n in self.num_new[:-1]:
                starts.append(starts[-1] + n)
            fb.extend_lens_cpu = list(self.num_new)
            fb.prefix_lens_cpu = prefix_lens
            fb.extend_lens = torch.tensor(self.num_new, dtype=torch.int32).to(device)
            fb.prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32).to(device)
            fb.extend_starts = torch.tensor(starts, dtype=torch.int32).to(device)
        return fb
