"""Per-step state of one model forward: what the model and the attention backend read.

A ForwardBatch is built fresh for every step by the scheduler (no global state is reset between
steps). All tensors live on the model's device; the ``*_cpu`` lists mirror the ones the host
needs (grid sizes, the torch reference path) so nothing has to be copied back.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvtier.cache.kv_pool import KVPool

if TYPE_CHECKING:
    from kvtier.attention.backend import AttentionBackend


class ForwardMode(enum.Enum):
    # New tokens of one or more sequences, each possibly after a prefix whose KV is in the pool
    # (prefill, a prefill chunk, a turn after a cache hit).
    EXTEND = "extend"
    # Exactly one new token per sequence.
    DECODE = "decode"


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64, the new tokens of all sequences, concatenated
    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    out_cache_loc: torch.Tensor  # [T] int64, KV pool slot each new token's K and V go to
    seq_lens: torch.Tensor  # [B] int32, KV length of each sequence after this step
    block_table: torch.Tensor  # [B, P] int32, pages of each sequence (page 0 pads)
    logits_indices: torch.Tensor  # [N] int64, rows of the hidden states to compute logits for
    kv_pool: KVPool
    attn_backend: AttentionBackend
    seq_lens_cpu: list[int]
    # EXTEND only: new tokens per sequence, and the prefix already in the pool.
    extend_lens_cpu: list[int] = field(default_factory=list)
    prefix_lens_cpu: list[int] = field(default_factory=list)
    extend_lens: torch.Tensor | None = None  # [B] int32
    prefix_lens: torch.Tensor | None = None  # [B] int32
    extend_starts: torch.Tensor | None = None  # [B] int32, offset of each sequence's first token
    # Set by the attention backend's prepare(); owned by it.
    attn_metadata: Any = None
    # Called with a layer index before attention reads that layer of the pool, so that a
    # layer-wise load from a lower tier only has to have finished up to that layer.
    wait_layer: Callable[[int], None] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE

    @property
    def page_size(self) -> int:
        return self.kv_pool.page_size
