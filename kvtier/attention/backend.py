"""The attention backend interface.

The model's attention layers call ``backend.forward(q, k, v, layer, batch, scale)``. A backend
stores the new tokens' K and V in the pool at ``batch.out_cache_loc``, waits (if asked) for that
layer's KV to have arrived from a lower tier, and attends every new query to its sequence's
cached prefix and to the new tokens before it (causal). ``prepare`` runs once per step, before
the model, to build whatever per-step metadata the kernels need; CUDA-graph capture calls the
``*_graph`` hooks instead, so that metadata lives in static buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvtier.runner.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    def prepare(self, batch: ForwardBatch) -> None:  # noqa: B027 - optional hook
        """Per-step metadata; default: none."""

    def forward(
        self,
        q: torch.Tensor,  # [T, num_q_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        layer: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:  # [T, num_q_heads, head_dim]
        if batch.wait_layer is not None:
            batch.wait_layer(layer)
        batch.kv_pool.write(layer, batch.out_cache_loc, k, v)
        return self.attend(q, layer, batch, scale)

    def kv_store_target(
        self, layer: int, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Where the model may store the new tokens' K/V itself, from the kernel that makes k
        (then it calls ``attend`` instead of ``forward``): (k buffer, v buffer, slots), or
        None when ``forward`` must do it. None while a lower-tier load is pending: the store
        then stays after the layer's wait, where ``forward`` puts it."""
        if batch.wait_layer is not None:
            return None
        return batch.kv_pool.k_buffer(layer), batch.kv_pool.v_buffer(layer), batch.out_cache_loc

    @abstractmethod
    def attend(
        self, q: torch.Tensor, layer: int, batch: ForwardBatch, scale: float
    ) -> torch.Tensor:
        """Attention of the new queries over the pool (their own K/V already stored)."""
