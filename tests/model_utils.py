"""Test helpers: drive a model through real ForwardBatches over a paged KV pool.

``PagedRunner`` plays a tiny scheduler: it allocates pages per sequence as they grow, builds the
exact block table and slot list of each step, and runs EXTEND (prefill, possibly in chunks after
a cached prefix) and DECODE batches through the TorchAttention reference backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvtier.attention.backend import AttentionBackend
from kvtier.attention.torch_backend import TorchAttention
from kvtier.cache.kv_pool import KVPool, PageAllocator
from kvtier.models.config import ModelConfig
from kvtier.runner.forward_batch import ForwardBatch, ForwardMode


@dataclass
class Seq:
    """One sequence: its tokens so far, its pages, and how many tokens have KV in the pool."""

    tokens: list[int]
    pages: list[int] = field(default_factory=list)
    kv_len: int = 0


class PagedRunner:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        page_size: int,
        num_pages: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: AttentionBackend | None = None,
    ) -> None:
        self.model = model
        self.page_size = page_size
        self.device = torch.device(device)
        self.pool = KVPool(
            num_pages,
            page_size,
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.head_dim,
            dtype,
            self.device,
        )
        self.allocator = PageAllocator(num_pages)
        self.backend = backend or TorchAttention()

    def _grow(self, seq: Seq, new_len: int) -> None:
        need = -(-new_len // self.page_size) - len(seq.pages)
        if need > 0:
            pages = self.allocator.alloc(need)
            assert pages is not None, "test KV pool too small"
            seq.pages.extend(pages)

    def _slots(self, seq: Seq, start: int, end: int) -> list[int]:
        ps = self.page_size
        return [seq.pages[p // ps] * ps + p % ps for p in range(start, end)]

    def _block_table(self, seqs: list[Seq]) -> torch.Tensor:
        width = max(len(s.pages) for s in seqs)
        rows = [s.pages + [0] * (width - len(s.pages)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def _run(self, batch: ForwardBatch) -> torch.Tensor:
        self.backend.prepare(batch)
        with torch.inference_mode():
            return self.model(batch)

    def extend(
        self, seqs: list[Seq], counts: list[int], all_logits: bool = True
    ) -> list[torch.Tensor]:
        """Run the next ``counts[i]`` tokens of each sequence (after its cached prefix) as one
        EXTEND batch. Returns per sequence the logits of every new token (or of the last)."""
        ids, pos, loc, logit_rows, starts = [], [], [], [], []
        for seq, n in zip(seqs, counts):
            start, end = seq.kv_len, seq.kv_len + n
            assert end <= len(seq.tokens)
            self._grow(seq, end)
            starts.append(len(ids))
            rows = range(len(ids), len(ids) + n) if all_logits else [len(ids) + n - 1]
            logit_rows.extend(rows)
            ids.extend(seq.tokens[start:end])
            pos.extend(range(start, end))
            loc.extend(self._slots(seq, start, end))
        prefix = [s.kv_len for s in seqs]
        seq_lens = [p + n for p, n in zip(prefix, counts)]
        dev = self.device
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND,
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            out_cache_loc=torch.tensor(loc, dtype=torch.int64, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_table=self._block_table(seqs),
            logits_indices=torch.tensor(logit_rows, dtype=torch.int64, device=dev),
            kv_pool=self.pool,
            attn_backend=self.backend,
            seq_lens_cpu=seq_lens,
            extend_lens_cpu=list(counts),
            prefix_lens_cpu=prefix,
            extend_lens=torch.tensor(counts, dtype=torch.int32, device=dev),
            prefix_lens=torch.tensor(prefix, dtype=torch.int32, device=dev),
            extend_starts=torch.tensor(starts, dtype=torch.int32, device=dev),
        )
        logits = self._run(batch)
        for seq, n in zip(seqs, counts):
            seq.kv_len += n
        per_seq = counts if all_logits else [1] * len(seqs)
        return list(logits.split(per_seq))

    def decode(self, seqs: list[Seq]) -> torch.Tensor:
        """One DECODE step: the last token of each sequence (whose KV is not yet in the pool).
        Returns logits [B, vocab]."""
        ids, pos, loc = [], [], []
        for seq in seqs:
            assert seq.kv_len == len(seq.tokens) - 1
            self._grow(seq, seq.kv_len + 1)
            ids.append(seq.tokens[-1])
            pos.append(seq.kv_len)
            loc.extend(self._slots(seq, seq.kv_len, seq.kv_len + 1))
        seq_lens = [s.kv_len + 1 for s in seqs]
        dev = self.device
        batch = ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            out_cache_loc=torch.tensor(loc, dtype=torch.int64, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_table=self._block_table(seqs),
            logits_indices=torch.arange(len(seqs), dtype=torch.int64, device=dev),
            kv_pool=self.pool,
            attn_backend=self.backend,
            seq_lens_cpu=seq_lens,
        )
        logits = self._run(batch)
        for seq in seqs:
            seq.kv_len += 1
        return logits

    def generate_greedy(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        prefill_chunk: int | None = None,
    ) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Prefill all prompts in one batch (in chunks of ``prefill_chunk`` tokens per sequence
        when given), then decode them together greedily. Returns each prompt's prefill logits
        [len, vocab] and its ``max_new_tokens`` generated tokens."""
        seqs = [Seq(list(p)) for p in prompts]
        prefill: list[list[torch.Tensor]] = [[] for _ in seqs]
        while any(s.kv_len < len(s.tokens) for s in seqs):
            active = [i for i, s in enumerate(seqs) if s.kv_len < len(s.tokens)]
            counts = [len(seqs[i].tokens) - seqs[i].kv_len for i in active]
            if prefill_chunk is not None:
                counts = [min(c, prefill_chunk) for c in counts]
            outs = self.extend([seqs[i] for i in active], counts)
            for i, out in zip(active, outs):
                prefill[i].append(out)
        prefill_logits = [torch.cat(chunks) for chunks in prefill]
        outputs: list[list[int]] = [[] for _ in seqs]
        last = torch.stack([lg[-1] for lg in prefill_logits])
        for step in range(max_new_tokens):
            next_ids = last.argmax(dim=-1).tolist()
            for seq, out, t in zip(seqs, outputs, next_ids):
                seq.tokens.append(t)
                out.append(t)
            if step + 1 < max_new_tokens:
                last = self.decode(seqs)
        return prefill_logits, outputs
