"""Long-prefill attention on a dense attention kernel (cuDNN's, through torch) over KV gathered
from the paged pool.

Why: on an H200 cuDNN's fused attention runs a causal 8K x 8K bf16 block at ~555 TFLOP/s where
the paged Triton extend kernel reaches ~390-440 (benchmarks/bench_attention.py), and a long
prefill is mostly attention (84% of an 80K-token Qwen3-30B-A3B forward). A dense kernel cannot
read pages, so each sequence's keys and values are gathered into contiguous buffers first:
at 96 KiB of KV per token that copy is small next to the attention it feeds.

A prefill chunk of ``n`` new tokens after ``p`` cached ones is two dense calls whose results are
merged by their log-sum-exp (the same algebra as split-KV), one Triton kernel:

- **diagonal**: the n queries against the n new keys, causal (square, so top-left and
  bottom-right alignment agree);
- **prefix**: the n queries against the p prefix keys, no mask.

Grouped-query heads go to cuDNN as they are when it takes them (``NATIVE_GQA``, found out on the
first call); otherwise the K/V heads of the diagonal block are repeated (a copy of n tokens) and
for the prefix block the G query heads of each KV head are folded into the query axis
([Hkv, n * G] queries: exact without a mask, each KV head read once).

``attention_with_lse`` runs cuDNN on CUDA and a float32 reference elsewhere, so the gather, fold
and merge logic is tested on CPU against ``extend_attention_ref``.
"""

from __future__ import annotations

import logging

import torch

from kvtier.kernels.fused import tl, triton

logger = logging.getLogger(__name__)

# The extend backends send an EXTEND batch here only when every sequence's new-token count and
# prefix are multiples of this block (new tokens > 0). Why: torch builds one cuDNN graph per
# sequence-length pair, ~55-100 ms each on an H200 the first time a shape is seen, and keeps it;
# arbitrary lengths would pay that on most long requests and grow the cache without bound.
# Aligned shapes are few (prefixes of k blocks, chunks of 1 or 2 blocks at the default 8192-token
# chunking) and the work that matters is there: every full chunk of a long prompt. Partial
# chunks and unaligned extends take the paged Triton kernel.
DENSE_BLOCK = 4096


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
    """Attention of ``q`` [1, Hq, L, D] over ``k`` / ``v`` [1, Hkv, S, D] (Hq a multiple of
    Hkv: grouped-query heads), top-left causal if ``causal``. Returns (out [1, Hq, L, D] in q's
    dtype, lse [Hq, L] float32: the natural log of each row's sum of exp(scale * q.k)).

    cuDNN for bf16 / fp16 CUDA tensors; elsewhere a float32 reference (tests)."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        return res[0], res[1].reshape(q.shape[1], q.shape[2]).float()
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhld,bhsd->bhls", q.float(), kf) * scale
    if causal:
        rows, cols = q.shape[2], k.shape[2]
        mask = torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhls,bhsd->bhld", torch.exp(scores - lse[..., None]), vf)
    return out.to(q.dtype), lse[0]


# Whether cuDNN takes fewer K/V heads than query heads as they are. None until the first call
# finds out; False: K/V heads are repeated / query heads folded instead (see the module doc).
NATIVE_GQA: bool | None = None


def _sequence_slots(block_table_row: torch.Tensor, seq_len: int, page_size: int) -> torch.Tensor:
    """Pool slots [seq_len] int64 of a sequence's tokens, in order (device ops, no sync)."""
    pages = block_table_row[: (seq_len + page_size - 1) // page_size].long()
    offs = torch.arange(page_size, device=pages.device)
    return (pages[:, None] * page_size + offs[None, :]).reshape(-1)[:seq_len]


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """[S, H, D] -> a [1, H, S, D] view."""
    return x.transpose(0, 1).unsqueeze(0)


def _repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[n, Hkv, D] -> [1, Hkv * group, n, D], each KV head repeated for its query heads."""
    n, heads, dim = x.shape
    x = x.unsqueeze(2).expand(n, heads, group, dim).reshape(n, heads * group, dim)
    return _bhsd(x)


def _parts_native(
    qs: torch.Tensor, k_seq: torch.Tensor, v_seq: torch.Tensor, prefix: int, scale: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(out [n, Hq, D], lse [n, Hq]) of the diagonal block and, after a prefix, of the prefix
    block, with the K/V heads as they are."""
    o_d, lse_d = attention_with_lse(
        _bhsd(qs), _bhsd(k_seq[prefix:]), _bhsd(v_seq[prefix:]), causal=True, scale=scale
    )
    parts = [(o_d[0].transpose(0, 1), lse_d.t())]
    if prefix:
        o_p, lse_p = attention_with_lse(
            _bhsd(qs), _bhsd(k_seq[:prefix]), _bhsd(v_seq[:prefix]), causal=False, scale=scale
        )
        parts.append((o_p[0].transpose(0, 1), lse_p.t()))
    return parts


def _parts_folded(
    qs: torch.Tensor, k_seq: torch.Tensor, v_seq: torch.Tensor, prefix: int, scale: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``_parts_native`` with equal head counts in every call: K/V heads repeated for the
    causal diagonal block (n tokens), query heads folded into the query axis for the prefix."""
    n, num_q_heads, head_dim = qs.shape
    num_kv_heads = k_seq.shape[1]
    group = num_q_heads // num_kv_heads
    o_d, lse_d = attention_with_lse(
        _bhsd(qs), _repeat_heads(k_seq[prefix:], group), _repeat_heads(v_seq[prefix:], group),
        causal=True, scale=scale,
    )  # fmt: skip
    parts = [(o_d[0].transpose(0, 1), lse_d.t())]
    if prefix:
        qf = qs.view(n, num_kv_heads, group, head_dim).permute(1, 0, 2, 3)
        qf = qf.reshape(1, num_kv_heads, n * group, head_dim)
        o_p, lse_p = attention_with_lse(
            qf, _bhsd(k_seq[:prefix]), _bhsd(v_seq[:prefix]), causal=False, scale=scale
        )
        o_p = o_p[0].view(num_kv_heads, n, group, head_dim).permute(1, 0, 2, 3)
        lse_p = lse_p.view(num_kv_heads, n, group).permute(1, 0, 2)
        parts.append((o_p.reshape(n, num_q_heads, head_dim), lse_p.reshape(n, num_q_heads)))
    return parts


def merge_two(
    out: torch.Tensor,
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """``out`` [n, H, D] = the attention over the union of two disjoint key sets, from each
    set's output [n, H, D] and lse [n, H]: each weighted by its share of the row's exp mass.
    One Triton kernel on CUDA (any strides, last dim contiguous); float32 torch ops elsewhere.
    ``use_triton`` forces the choice (the kernel on CPU tensors needs TRITON_INTERPRET=1)."""
    if use_triton is None:
        use_triton = out.is_cuda and triton is not None
    if use_triton:
        n, heads, dim = out.shape
        for t in (out, o_a, o_b):
            if t.stride(-1) != 1:
                raise ValueError("merge_two needs the last dim contiguous")
        _merge_two_kernel[(n,)](
            out, o_a, lse_a, o_b, lse_b,
            out.stride(0), out.stride(1), o_a.stride(0), o_a.stride(1),
            lse_a.stride(0), lse_a.stride(1), o_b.stride(0), o_b.stride(1),
            lse_b.stride(0), lse_b.stride(1), heads,
            HEAD_DIM=dim, BLOCK_H=triton.next_power_of_2(heads), num_warps=4,
        )  # fmt: skip
        return out
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    merged = o_a.float() * (w_a / total)[..., None] + o_b.float() * (w_b / total)[..., None]
    out.copy_(merged)
    return out


if triton is not None:

    @triton.jit
    def _merge_two_kernel(Out, OA, LA, OB, LB,
                          s_ot, s_oh, s_at, s_ah, s_lat, s_lah, s_bt, s_bh, s_lbt, s_lbh,
                          heads, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
        # One program per token: all its heads, [BLOCK_H, HEAD_DIM] elements.
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, HEAD_DIM)
        hm = h < heads
        la = tl.load(LA + t * s_lat + h * s_lah, mask=hm, other=0.0)
        lb = tl.load(LB + t * s_lbt + h * s_lbh, mask=hm, other=0.0)
        m = tl.maximum(la, lb)
        wa = tl.exp(la - m)
        wb = tl.exp(lb - m)
        total = wa + wb
        mask = hm[:, None]
        oa = tl.load(OA + t * s_at + h[:, None] * s_ah + d[None, :], mask=mask, other=0.0)
        ob = tl.load(OB + t * s_bt + h[:, None] * s_bh + d[None, :], mask=mask, other=0.0)
        o = oa.to(tl.float32) * (wa / total)[:, None] + ob.to(tl.float32) * (wb / total)[:, None]
        tl.store(Out + t * s_ot + h[:, None] * s_oh + d[None, :], o.to(Out.dtype.element_ty),
                 mask=mask)  # fmt: skip


def _parts(
    qs: torch.Tensor, k_seq: torch.Tensor, v_seq: torch.Tensor, prefix: int, scale: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The dense calls of one sequence, native grouped heads where cuDNN takes them."""
    global NATIVE_GQA
    if qs.shape[1] == k_seq.shape[1] or NATIVE_GQA:
        return _parts_native(qs, k_seq, v_seq, prefix, scale)
    if NATIVE_GQA is None:
        try:
            parts = _parts_native(qs, k_seq, v_seq, prefix, scale)
            NATIVE_GQA = True
            return parts
        except torch.OutOfMemoryError:
            raise  # not a verdict on grouped heads
        except RuntimeError as e:
            logger.info("cuDNN attention without native GQA (%s): heads repeated", e)
            NATIVE_GQA = False
    return _parts_folded(qs, k_seq, v_seq, prefix, scale)


def prebuild(
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    chunk: int,
    max_len: int,
    scale: float,
) -> int:
    """Run the dense calls of a ``chunk``-token prefill chunk after every prefix that is a
    multiple of ``chunk`` (0, chunk, 2 chunk, ... while prefix + chunk <= ``max_len``) on
    random data, so that torch builds and caches their cuDNN graphs now (55-100 ms each the
    first time on an H200) instead of in the first long request that needs each one. The
    shapes and layouts are those ``dense_extend_attention`` makes. Returns the number of
    prefixes run."""
    gen = torch.Generator(device=device).manual_seed(0)
    qs = torch.randn(chunk, num_q_heads, head_dim, generator=gen, device=device).to(dtype)
    total = max_len - max_len % chunk
    k_all = torch.randn(total, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    v_all = torch.randn(total, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    count = 0
    for prefix in range(0, total - chunk + 1, chunk):
        # Contiguous [S, Hkv, D] like the gathered copies of the real path.
        _parts(qs, k_all[: prefix + chunk], v_all[: prefix + chunk], prefix, scale)
        count += 1
    return count


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
    num_q_heads = q.shape[1]
    num_kv_heads = k_buf.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    start = 0
    for b, (prefix, n) in enumerate(zip(prefix_lens, extend_lens, strict=True)):
        if n == 0:
            continue
        qs = q[start : start + n]  # [n, Hq, D]
        slots = _sequence_slots(block_table[b], prefix + n, page_size)
        k_seq, v_seq = k_buf[slots], v_buf[slots]  # [S, Hkv, D] gathered copies
        parts = _parts(qs, k_seq, v_seq, prefix, scale)
        dst = out[start : start + n]
        if len(parts) == 1:
            dst.copy_(parts[0][0])
        else:
            (o_d, lse_d), (o_p, lse_p) = parts
            merge_two(dst, o_p, lse_p, o_d, lse_d)
        start += n
    return out


__all__ = [
    "DENSE_BLOCK",
    "attention_with_lse",
    "cudnn_available",
    "dense_extend_attention",
    "merge_two",
    "prebuild",
]
