"""Long-prefill attention on a dense attention kernel (cuDNN's, through torch) over KV gathered
from the paged pool.

Why: on an H200 cuDNN's fused attention runs a causal 8K x 8K bf16 block at ~555 TFLOP/s where
the paged Triton extend kernel reaches ~390-440 (benchmarks/bench_attention.py), and a long
prefill is mostly attention (84% of an 80K-token Qwen3-30B-A3B forward). A dense kernel cannot
read pages, so each sequence's keys and values are gathered into contiguous buffers first:
at 96 KiB of KV per token that copy is small next to the attention it feeds.

A prefill chunk of ``n`` new tokens after ``p`` cached ones is two dense calls whose results are
merged by their log-sum-exp (the same algebra as split-KV):

- **prefix**: the n queries against the p prefix keys, no mask. Under grouped-query attention
  the G query heads of a KV head are folded into the query axis ([Hkv, n * G] queries), which is
  exact without a mask and reads each KV head once;
- **diagonal**: the n queries against the n new keys, causal (square, so top-left and
  bottom-right alignment agree); K/V heads are repeated G times (a copy of n tokens only).

``attention_with_lse`` runs cuDNN on CUDA and a float32 reference elsewhere, so the gather, fold
and merge logic is tested on CPU against ``extend_attention_ref``.
"""

from __future__ import annotations

import torch

# The extend backends send an EXTEND batch here only when every sequence has at least this many
# new tokens: below it the paged kernel wins (no gather, one launch for the batch).
DEFAULT_MIN_EXTEND = 1024


def cudnn_available(device: torch.device) -> bool:
    """Whether torch can run cuDNN fused attention on ``device`` (Hopper or newer here: the only
    GPUs where it was measured)."""
    if device.type != "cuda" or not torch.backends.cudnn.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 9


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [1, H, L, D] over ``k`` / ``v`` [1, H, S, D] (equal head counts),
    top-left causal if ``causal``. Returns (out [1, H, L, D] in q's dtype, lse [H, L] float32,
    the natural-log sum of exp(scale * q.k) of each row)."""
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        out, lse = res[0], res[1]
        return out, lse.reshape(q.shape[1], q.shape[2]).float()
    scores = torch.einsum("bhld,bhsd->bhls", q.float(), k.float()) * scale
    if causal:
        rows, cols = q.shape[2], k.shape[2]
        mask = torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhls,bhsd->bhld", torch.exp(scores - lse[..., None]), v.float())
    return out.to(q.dtype), lse[0]


def _sequence_slots(block_table_row: torch.Tensor, seq_len: int, page_size: int) -> torch.Tensor:
    """Pool slots [seq_len] int64 of a sequence's tokens, in order (device ops, no sync)."""
    pages = block_table_row[: (seq_len + page_size - 1) // page_size].long()
    offs = torch.arange(page_size, device=pages.device)
    return (pages[:, None] * page_size + offs[None, :]).reshape(-1)[:seq_len]


def _repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[n, Hkv, D] -> [1, Hkv * group, n, D], each KV head repeated for its query heads."""
    n, heads, dim = x.shape
    x = x.unsqueeze(2).expand(n, heads, group, dim).reshape(n, heads * group, dim)
    return x.transpose(0, 1).unsqueeze(0)


def dense_extend_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    out: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: list[int],
    extend_lens: list[int],
    scale: float,
    *,
    page_size: int,
) -> torch.Tensor:
    """Causal attention of an EXTEND batch's queries over each sequence's prefix and new tokens,
    whose K/V are already in the pool (``k_buf`` / ``v_buf`` [slots, Hkv, D]).

    ``q`` / ``out`` [T, Hq, D] hold the sequences' new tokens back to back, in the order of the
    host lists ``prefix_lens`` / ``extend_lens``. Same contract as ``extend_attention``.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buf.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    group = num_q_heads // num_kv_heads
    start = 0
    for b, (prefix, n) in enumerate(zip(prefix_lens, extend_lens, strict=True)):
        if n == 0:
            continue
        qs = q[start : start + n]  # [n, Hq, D]
        slots = _sequence_slots(block_table[b], prefix + n, page_size)
        k_seq, v_seq = k_buf[slots], v_buf[slots]  # [S, Hkv, D] gathered copies

        # Diagonal block: K/V heads repeated to Hq (a copy of the n new tokens only).
        o_d, lse_d = attention_with_lse(
            qs.transpose(0, 1).unsqueeze(0), _repeat_heads(k_seq[prefix:], group),
            _repeat_heads(v_seq[prefix:], group), causal=True, scale=scale,
        )  # fmt: skip
        o_d = o_d[0].transpose(0, 1)  # [n, Hq, D]
        if prefix == 0:
            out[start : start + n] = o_d
            start += n
            continue

        # Prefix block: the group's query heads folded into the query axis, no mask.
        qf = qs.view(n, num_kv_heads, group, head_dim).permute(1, 0, 2, 3)
        qf = qf.reshape(1, num_kv_heads, n * group, head_dim)
        kp = k_seq[:prefix].transpose(0, 1).unsqueeze(0)  # [1, Hkv, p, D] view
        vp = v_seq[:prefix].transpose(0, 1).unsqueeze(0)
        o_p, lse_p = attention_with_lse(qf, kp, vp, causal=False, scale=scale)
        o_p = o_p[0].view(num_kv_heads, n, group, head_dim).permute(1, 0, 2, 3)
        o_p = o_p.reshape(n, num_q_heads, head_dim)
        lse_p = lse_p.view(num_kv_heads, n, group).permute(1, 0, 2).reshape(n, num_q_heads)

        # Merge: each part weighted by its share of the row's total exp mass.
        lse_d = lse_d.transpose(0, 1)  # [n, Hq]
        m = torch.maximum(lse_p, lse_d)
        w_p, w_d = torch.exp(lse_p - m), torch.exp(lse_d - m)
        total = w_p + w_d
        merged = o_p.float() * (w_p / total)[..., None] + o_d.float() * (w_d / total)[..., None]
        out[start : start + n] = merged.to(out.dtype)
        start += n
    return out


__all__ = [
    "DEFAULT_MIN_EXTEND",
    "attention_with_lse",
    "cudnn_available",
    "dense_extend_attention",
]
