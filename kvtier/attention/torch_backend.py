"""Reference attention in plain torch: one SDPA call per sequence over its gathered pages.

Runs on CPU and GPU; it is the ground truth the Triton kernels are tested against and the path
CI exercises. Not meant to be fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.attention.backend import AttentionBackend
from kvtier.runner.forward_batch import ForwardBatch


def sequence_slots(block_table_row: torch.Tensor, seq_len: int, page_size: int) -> torch.Tensor:
    """Pool slots of tokens [0, seq_len) of one sequence, from its row of the block table."""
    num_pages = (seq_len + page_size - 1) // page_size
    pages = block_table_row[:num_pages].to(torch.int64)
    offsets = torch.arange(page_size, device=pages.device)
    return (pages[:, None] * page_size + offsets[None, :]).reshape(-1)[:seq_len]


class TorchAttention(AttentionBackend):
    def attend(
        self, q: torch.Tensor, layer: int, batch: ForwardBatch, scale: float
    ) -> torch.Tensor:
        k_buf = batch.kv_pool.k_buffer(layer)
        v_buf = batch.kv_pool.v_buffer(layer)
        out = torch.empty_like(q)
        start = 0
        for i, seq_len in enumerate(batch.seq_lens_cpu):
            n = 1 if batch.is_decode else batch.extend_lens_cpu[i]
            prefix = seq_len - n
            slots = sequence_slots(batch.block_table[i], seq_len, batch.page_size)
            qi = q[start : start + n].transpose(0, 1)  # [Hq, n, D]
            ki = k_buf[slots].transpose(0, 1).to(q.dtype)  # [Hkv, L, D]
            vi = v_buf[slots].transpose(0, 1).to(q.dtype)
            # Query j sits at position prefix + j and sees keys 0..prefix + j.
            q_pos = torch.arange(prefix, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            o = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True
            )
            out[start : start + n] = o.transpose(0, 1)
            start += n
        return out
