"""Triton attention over the paged KV pool: extend (prefill with a cached prefix) and decode.

Layout (see ``kvtier.cache.kv_pool``): ``k_buf`` / ``v_buf`` are one layer of the pool,
``[num_slots, num_kv_heads, head_dim]``; token ``i`` of sequence ``b`` lives at slot
``block_table[b, i // page_size] * page_size + i % page_size``. The new tokens' K/V are already in
the pool when these kernels run, so a sequence's keys are always exactly ``0 .. seq_len - 1``.

Semantics (same as ``TorchAttention``): query ``j`` of a sequence with prefix ``p`` sits at
position ``p + j`` and attends to keys ``0 .. p + j``. GQA: query head ``h`` reads kv head
``h // (num_q_heads // num_kv_heads)``.

Both kernels accumulate in fp32 with an online softmax (in base 2: ``scale * log2(e)`` is folded
into the scores so that ``exp2`` can be used). fp32 inputs use IEEE dots (the fp32 path exists for
tests, where exactness matters more than speed); bf16/fp16 use the tensor cores.

Decode is split-KV ("flash decoding"): stage 1 runs one program per (sequence, kv head, split),
handling every query head of the kv head's group so that K/V is read once per group, and writes
a partial output plus its log-sum-exp; stage 2 merges the splits (in one fixed pairwise order).
The split count is a launch argument and each sequence's split length is derived from its
``seq_len`` on the device, so a launch never needs a host sync and can be captured in a CUDA
graph (grid and scratch depend only on the batch size and split count the caller gives). With
programmatic dependent launch and several splits, stage 1 loads its split's first key block
before it waits for the previous kernel (which writes only q and the newest key's K/V): at
batch 1 a split is often one block, so its whole KV read then overlaps that kernel's tail.
A merge in stage 1 by the last-arriving program (arrival counters, no stage-2 launch) was tried
and removed: on an H200 (2026-12-01, 4K context, 32 q / 4 kv heads, us a layer) it took 29.9
against stage 2's 10.2 at batch 1 (64 splits; 9.5 with the prefetch), and was level at batch
32 (82.7 against 81.4) and 128 (257.2 against 257.0).

Extend has the same split-KV form for short extends after long prefixes (a prompt served from
the cache), where the one-pass grid (query blocks x q heads x sequences) would leave most SMs
idle while each program walks the whole prefix: stage 1 runs one program per (query block, GQA
head block, split, sequence) over a tile of queries x q heads of one kv head (K/V read once per
head block), stage 2 merges per query the splits it sees. ``choose_extend_kv_splits`` decides.
At GQA the same packed tiles also run extends that need no split (``packed_one_pass``): one
launch over all the keys, its float32 results cast into the output.

Pure-torch references (``extend_attention_ref`` / ``decode_attention_ref``) with the same
arguments live at the end of this module.

Measured on one H200 (bf16, 32 q / 4 kv heads, head_dim 128; benchmarks/bench_attention.py):
decode at a 4K context reads KV at 0.76 / 2.3 / 3.2 / 3.9 / 4.3 TB/s for batch 1 / 8 / 32 / 64
/ 128 (batch 1 is latency-bound: ~11 us a layer, with the stage-2 kernel and no prefetch);
extend of 16K new tokens ran at ~440 TFLOP/s with no prefix (torch's flash SDPA on contiguous
K/V: ~575-665) and ~465 after a 64K prefix in the per-head one-pass kernel; the packed one pass
runs 1K-8K new tokens at 455-507 TFLOP/s after 8K-80K prefixes and 8K with none at 476 (cuDNN's
dense kernel, which full prefill chunks take: 575-650).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from kvtier.kernels import fused

_pdl_wait = fused.pdl_wait

_LOG2E = 1.4426950408889634
# Finite "minus infinity" for the running max: a row that has seen only masked scores keeps
# m = -1e30, and exp2(-inf - m) = 0, exp2(m - m) = 1, so no NaN ever appears (with a true -inf
# start, -inf - -inf = NaN for such rows).
_NEG_BIG = tl.constexpr(-1.0e30)


# --------------------------------------------------------------------------------------------
# Device code. Kept out of the formatter: one argument per line would triple the length of
# these signatures and calls without making them any clearer.
# --------------------------------------------------------------------------------------------
# fmt: off


@triton.jit
def _page_slots(bt_row, n, pos, kv_len, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr):
    """Pool slots (int64) of key positions ``pos = n + arange(BLOCK_N)`` of one sequence.

    ``n`` is a multiple of BLOCK_N. When a page holds at least BLOCK_N tokens (both are powers of
    two), the whole block lies in one page: one scalar page-id load and contiguous slots, which
    keeps the K/V loads fully coalesced. Otherwise each key looks its page up (page gather).
    Positions past ``kv_len`` (only when MASKED) map to the reserved page 0, a valid address
    (and a block wholly past it reads no block-table entry).
    """
    if PAGE_SIZE >= BLOCK_N:
        if MASKED:
            page = tl.load(bt_row + n // PAGE_SIZE, mask=n < kv_len, other=0).to(tl.int64)
        else:
            page = tl.load(bt_row + n // PAGE_SIZE).to(tl.int64)
        slots = page * PAGE_SIZE + (pos % PAGE_SIZE)
    else:
        if MASKED:
            page = tl.load(bt_row + pos // PAGE_SIZE, mask=pos < kv_len, other=0)
        else:
            page = tl.load(bt_row + pos // PAGE_SIZE)
        slots = page.to(tl.int64) * PAGE_SIZE + (pos % PAGE_SIZE)
    return slots


@triton.jit
def _decode_split_len(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """Keys per split of one sequence: ceil(seq_len / num_splits) rounded up to BLOCK_N.

    Stage 1 and stage 2 must agree on it. Never 0 (seq_len 0 gives BLOCK_N) so that stage 2 can
    divide by it.
    """
    per_split = tl.cdiv(seq_len, num_splits)
    return tl.maximum(tl.cdiv(per_split, BLOCK_N) * BLOCK_N, BLOCK_N)


@triton.jit
def _attn_scores(l_i, m_i, q, k, pos, q_pos, qk_scale, MASKED: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """Softmax half of an online-softmax step over one key block (k: its [BLOCK_N, HEAD_DIM]
    keys at positions ``pos``): returns (p, alpha, l, m) with the row max and sum updated.
    MASKED applies the causal mask (key pos <= q_pos of the row). Every step of every kernel
    goes through this and ``_attn_update``, so that all paths do the same math in the same
    order (decode's prefetched first block is bitwise the in-loop step)."""
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC)
    if MASKED:
        qk = tl.where(pos[None, :] <= q_pos[:, None], qk, float("-inf"))
    # Scale inside the max and the exponent (qk_scale > 0, so max commutes with it): one FMA
    # per score instead of a multiply and a subtract; the softmax ALU work is what competes
    # with the tensor cores in a compute-bound prefill.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def _attn_update(acc, p, alpha, q, v, DOT_PREC: tl.constexpr):
    """Value half of the step: the rescaled accumulator plus p @ v (v zero where p is)."""
    return tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PREC)


@triton.jit
def _attn_block(acc, l_i, m_i, q, K, V, slots, kv_head, n, q_pos, kv_len, qk_scale,
                stride_kt, stride_kh, stride_vt, stride_vh,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over keys [n, n + BLOCK_N) (n a multiple of BLOCK_N), whose pool
    slots are ``slots`` (``_page_slots``).

    MASKED=False is the bulk of the work (keys every query row sees, all < kv_len): no masks at
    all. MASKED=True: causal mask (key pos <= q_pos of the row) on the scores, and bounds masks
    (pos < kv_len) on the loads; V must be zeroed there, since 0 * garbage can be NaN.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    pos = n + tl.arange(0, BLOCK_N)
    k_ptrs = K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :]
    v_ptrs = V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :]
    if MASKED:
        kv_mask = (pos < kv_len)[:, None]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
    p, alpha, l_i, m_new = _attn_scores(l_i, m_i, q, k, pos, q_pos, qk_scale, MASKED, DOT_PREC)
    if MASKED:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = _attn_update(acc, p, alpha, q, v, DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _plain_step(acc, l_i, m_i, q, K, V, bt_row, kv_head, n, q_pos, kv_len, qk_scale,
                stride_kt, stride_kh, stride_vt, stride_vh,
                HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """``_attn_loop``'s step without CARRY over keys [n, n + BLOCK_N): its pages looked up in
    the step, then the step taken."""
    slots = _page_slots(bt_row, n, n + tl.arange(0, BLOCK_N), kv_len, PAGE_SIZE, BLOCK_N, MASKED)
    return _attn_block(acc, l_i, m_i, q, K, V, slots, kv_head, n, q_pos, kv_len, qk_scale,
                       stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK_N, MASKED,
                       DOT_PREC)


@triton.jit
def _carry_step(acc, l_i, m_i, q, K, V, bt_row, kv_head, n, slots, q_pos, kv_len, qk_scale,
                stride_kt, stride_kh, stride_vt, stride_vh,
                HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """``_attn_loop``'s CARRY step over keys [n, n + BLOCK_N), whose pool slots ``slots`` were
    looked up a step before: looks up the next block's (returned last), then takes the step."""
    nxt = n + BLOCK_N
    slots_next = _page_slots(bt_row, nxt, nxt + tl.arange(0, BLOCK_N), kv_len, PAGE_SIZE,
                             BLOCK_N, True)
    acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, K, V, slots, kv_head, n, q_pos, kv_len,
                                qk_scale, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM,
                                BLOCK_N, MASKED, DOT_PREC)
    return acc, l_i, m_i, slots_next


@triton.jit
def _attn_loop(acc, l_i, m_i, q, K, V, bt_row, kv_head, start, end, q_pos, kv_len, qk_scale,
               stride_kt, stride_kh, stride_vt, stride_vh,
               HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
               CARRY: tl.constexpr):
    """Accumulate key blocks [start, end), start a multiple of BLOCK_N.

    CARRY: each step looks up the *next* block's pool slots (the block-table load) and carries
    them to the next step, so a step's K/V addresses never wait on a load of the same step.
    Why: Triton's software pipeliner gives a load whose address comes from another load of the
    same iteration a stage of its own, and at num_stages 3 that left K and V one shared-memory
    buffer each: the next block's copy was issued only after this block's products and waited
    for at the top of the next step, its latency exposed (sm_90 TTGIR, Triton 3.6: one
    [1, BLOCK_N, D] buffer, ``async_wait num = 0``). Carried, K and V get num_stages - 1
    buffers (twice the shared memory: fewer programs a SM, which a launch of many long
    programs, decode with one split, needs more). The lookups are masked at ``kv_len`` as a
    MASKED step's are (positions past it get page 0's slots, a valid address): a "next" block
    past ``end`` is looked up and never used. An empty range skips the lookup too (its latency
    would otherwise hold up the loop's prologue). Not CARRY: the lookup inside the step.
    Either way the same blocks in the same order: the same result, bit for bit.

    The compiled kernel needs a `for` loop (only scf.for is software-pipelined: num_stages, K/V
    through cp.async). Triton's interpreter cannot take device scalars as `range` bounds under
    NumPy 2.x (it calls int() on a 1-element array), so there the same body runs in a `while`.
    """
    if CARRY:
        if start < end:
            slots = _page_slots(bt_row, start, start + tl.arange(0, BLOCK_N), kv_len, PAGE_SIZE,
                                BLOCK_N, True)
            if INTERPRET:
                n = start
                while n < end:
                    acc, l_i, m_i, slots = _carry_step(acc, l_i, m_i, q, K, V, bt_row, kv_head,
                                                       n, slots, q_pos, kv_len, qk_scale,
                                                       stride_kt, stride_kh, stride_vt,
                                                       stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N,
                                                       MASKED, DOT_PREC)
                    n += BLOCK_N
            else:
                for n in range(start, end, BLOCK_N):
                    acc, l_i, m_i, slots = _carry_step(acc, l_i, m_i, q, K, V, bt_row, kv_head,
                                                       n, slots, q_pos, kv_len, qk_scale,
                                                       stride_kt, stride_kh, stride_vt,
                                                       stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N,
                                                       MASKED, DOT_PREC)
    elif INTERPRET:
        n = start
        while n < end:
            acc, l_i, m_i = _plain_step(acc, l_i, m_i, q, K, V, bt_row, kv_head, n, q_pos,
                                        kv_len, qk_scale, stride_kt, stride_kh, stride_vt,
                                        stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N, MASKED,
                                        DOT_PREC)
            n += BLOCK_N
    else:
        for n in range(start, end, BLOCK_N):
            acc, l_i, m_i = _plain_step(acc, l_i, m_i, q, K, V, bt_row, kv_head, n, q_pos,
                                        kv_len, qk_scale, stride_kt, stride_kh, stride_vt,
                                        stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N, MASKED,
                                        DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _extend_kernel(Q, K, V, Out, BlockTable, SeqLens, ExtendLens, ExtendStarts, PrefixLens,
                   qk_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_ot, stride_oh, stride_bt,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                   INTERPRET: tl.constexpr, CARRY: tl.constexpr = True,
                   PDL: tl.constexpr = False):
    """Grid: (query blocks of the longest extend, q heads, sequences).

    Query blocks are visited last-first: under a causal mask the last block of a sequence has
    the most keys, so starting the heavy programs first evens out the tail of the launch.
    Axis 0 varies fastest, so programs running together share (sequence, head) and their K/V
    reads hit L2.
    """
    _pdl_wait(PDL)
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)

    ext_len = tl.load(ExtendLens + seq)
    m0 = m_block * BLOCK_M
    if m0 >= ext_len:
        return
    seq_len = tl.load(SeqLens + seq)
    prefix = tl.load(PrefixLens + seq)
    q_start = tl.load(ExtendStarts + seq).to(tl.int64)
    kv_head = head // GROUP
    bt_row = BlockTable + seq.to(tl.int64) * stride_bt

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < ext_len
    tok = q_start + offs_m  # int64: token * stride can pass 2**31 in long prefills
    q = tl.load(Q + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys below prefix + m0 are visible to every row of this block (and all < seq_len): the
    # unmasked phase covers the whole key blocks among them. The band from there up to this
    # block's last query is masked; key blocks past it are skipped (causal block skipping).
    full_end = ((prefix + m0) // BLOCK_N) * BLOCK_N
    band_end = tl.minimum(seq_len, prefix + m0 + BLOCK_M)
    acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, K, V, bt_row, kv_head, 0, full_end, q_pos,
                               seq_len, qk_scale, stride_kt, stride_kh, stride_vt, stride_vh,
                               HEAD_DIM, PAGE_SIZE, BLOCK_N, False, DOT_PREC, INTERPRET, CARRY)
    acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, K, V, bt_row, kv_head, full_end, band_end,
                               q_pos, seq_len, qk_scale, stride_kt, stride_kh, stride_vt,
                               stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N, True, DOT_PREC, INTERPRET,
                               CARRY)

    # Every valid row saw at least key 0, so l_i > 0 there; padded rows are not stored.
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _extend_split_stage1_kernel(Q, K, V, MidO, MidLse, BlockTable, SeqLens, ExtendLens,
                                ExtendStarts, PrefixLens, qk_scale, num_splits, head_blocks,
                                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                stride_mt, stride_mh, stride_ms, stride_lt, stride_lh, stride_bt,
                                GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                                BLOCKS_PER_GROUP: tl.constexpr, BLOCK_Q: tl.constexpr,
                                HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                                BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                                INTERPRET: tl.constexpr, CARRY: tl.constexpr = True,
                                PDL: tl.constexpr = False, REVERSE: tl.constexpr = False):
    """Grid: (query blocks of the longest extend, splits x head blocks, sequences).

    One program = BLOCK_Q queries x BLOCK_G q heads of one kv head's group (a head block; a
    group wider than BLOCK_G takes several) over one split of the sequence's keys. Tile row
    r is query r // BLOCK_G, head r % BLOCK_G: the K/V tile, loaded once, serves all of them,
    so the prefix is read once per head block rather than once per q head.

    Splits are cut from the whole key range 0 .. seq_len - 1 exactly as in decode
    (``_decode_split_len``, from the device seq_len), so the grid depends only on host ints.
    A split writes, per valid row, its normalised partial output to MidO and its log2-sum-exp
    to MidLse (rows indexed by token, as in q). Stage 2 reads split s for query j only when
    s * split_len <= prefix + j: exactly the splits holding a key that query sees, each of
    which this kernel ran and wrote with l > 0 for that row. A split past the block's last
    query returns at once and writes nothing.

    REVERSE (the packed one pass, one split): query blocks go last-first, as in
    ``_extend_kernel`` (under the causal mask the last block has the most keys; starting the
    heavy programs first evens out the launch's tail).

    The partials stay float32 even with one split: at 256-row tiles in 8 warps (255 registers
    a thread, sm_90, Triton 3.6) a bf16 store in this epilogue made ptxas spill 288-392 bytes
    a thread, and the kernel ran ~15% slower on an H200 than with the float32 store (4 bytes of
    spill) and a separate cast.
    """
    _pdl_wait(PDL)
    if REVERSE:
        m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        m_block = tl.program_id(0)
    split = tl.program_id(1) // head_blocks
    hblk = tl.program_id(1) % head_blocks
    seq = tl.program_id(2)

    ext_len = tl.load(ExtendLens + seq)
    m0 = m_block * BLOCK_Q
    if m0 >= ext_len:
        return
    seq_len = tl.load(SeqLens + seq)
    prefix = tl.load(PrefixLens + seq)
    split_len = _decode_split_len(seq_len, num_splits, BLOCK_N)
    start = split * split_len
    # Keys past the block's last query are masked for all its rows (causal block skipping).
    band_end = tl.minimum(seq_len, prefix + m0 + BLOCK_Q)
    if start >= band_end:
        return
    end = tl.minimum(start + split_len, band_end)
    # [start, mid): whole key blocks below prefix + m0, which every row sees: no masks. mid is a
    # multiple of BLOCK_N (if it is `end`, then end <= prefix + m0 < seq_len, so end is the
    # split's aligned boundary). [mid, end): the causal band, masked; a last partial block
    # only covers keys past every row's query or past seq_len, and never the next split's.
    mid = tl.minimum(tl.maximum(((prefix + m0) // BLOCK_N) * BLOCK_N, start), end)

    q_start = tl.load(ExtendStarts + seq).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_Q * BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = m0 + offs_r // BLOCK_G
    # Head block hblk: kv head hblk // BLOCKS_PER_GROUP, group members g (padded past GROUP
    # when GROUP is not a power of two: those rows are masked out).
    kv_head = hblk // BLOCKS_PER_GROUP
    g = (hblk % BLOCKS_PER_GROUP) * BLOCK_G + offs_r % BLOCK_G
    heads = kv_head * GROUP + g
    r_mask = (offs_m < ext_len) & (g < GROUP)
    tok = q_start + offs_m  # int64: token * stride can pass 2**31
    q = tl.load(Q + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_mask[:, None], other=0.0)
    q_pos = prefix + offs_m
    bt_row = BlockTable + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_Q * BLOCK_G], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, K, V, bt_row, kv_head, start, mid, q_pos,
                               seq_len, qk_scale, stride_kt, stride_kh, stride_vt, stride_vh,
                               HEAD_DIM, PAGE_SIZE, BLOCK_N, False, DOT_PREC, INTERPRET, CARRY)
    acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, K, V, bt_row, kv_head, mid, end, q_pos,
                               seq_len, qk_scale, stride_kt, stride_kh, stride_vt, stride_vh,
                               HEAD_DIM, PAGE_SIZE, BLOCK_N, True, DOT_PREC, INTERPRET, CARRY)

    # A row whose query precedes this split saw no key (l = 0): stage 2 never reads it, but
    # keep its scratch finite all the same.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), _NEG_BIG)
    tl.store(MidO + tok[:, None] * stride_mt + heads[:, None] * stride_mh + split * stride_ms
             + offs_d[None, :], out, mask=r_mask[:, None])
    tl.store(MidLse + tok * stride_lt + heads * stride_lh + split, lse, mask=r_mask)


@triton.jit
def _merge_splits(acc, l_i, m_i, MidO, MidLse, tok, head, s0, used, m_mask,
                  stride_mt, stride_mh, stride_ms, stride_lt, stride_lh, HEAD_DIM: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """Fold splits s0 .. s0 + BLOCK_S - 1 into the running (acc, l, m) of each row, the splits
    a row reads (s < used) only: one rescale per chunk, and the chunk's loads all in flight at
    once (a split at a time made a 1-token extend over 64K keys wait ~70 us a layer here)."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = s0 + tl.arange(0, BLOCK_S)
    valid = m_mask[:, None] & (offs_s[None, :] < used[:, None])
    lse = tl.load(MidLse + tok[:, None] * stride_lt + head * stride_lh + offs_s[None, :],
                  mask=valid, other=_NEG_BIG)
    m_new = tl.maximum(m_i, tl.max(lse, axis=1))
    alpha = tl.exp2(m_i - m_new)
    w = tl.where(valid, tl.exp2(lse - m_new[:, None]), 0.0)
    o = tl.load(MidO + tok[:, None, None] * stride_mt + head * stride_mh
                + offs_s[None, :, None] * stride_ms + offs_d[None, None, :],
                mask=valid[:, :, None], other=0.0)
    acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], axis=1)
    return acc, l_i * alpha + tl.sum(w, axis=1), m_new


@triton.jit
def _extend_split_stage2_kernel(Out, MidO, MidLse, SeqLens, ExtendLens, ExtendStarts,
                                PrefixLens, num_splits,
                                stride_ot, stride_oh, stride_mt, stride_mh, stride_ms,
                                stride_lt, stride_lh,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
                                BLOCK_S: tl.constexpr = 1, PDL: tl.constexpr = False):
    """Grid: (query blocks of the longest extend, q heads, sequences). Merge, per query, the
    splits holding a key it sees (s * split_len <= its position; see stage 1) by their LSE,
    online over chunks of BLOCK_S splits, so that one [BLOCK_M, BLOCK_S, HEAD_DIM] tile of
    partial outputs is live. The loop stops at the block's last used split, so a split count
    fixed for a longer context (a captured graph) costs little here for a shorter one."""
    _pdl_wait(PDL)
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    ext_len = tl.load(ExtendLens + seq)
    m0 = m_block * BLOCK_M
    if m0 >= ext_len:
        return
    seq_len = tl.load(SeqLens + seq)
    prefix = tl.load(PrefixLens + seq)
    q_start = tl.load(ExtendStarts + seq).to(tl.int64)
    split_len = _decode_split_len(seq_len, num_splits, BLOCK_N)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < ext_len
    tok = q_start + offs_m
    # <= num_splits, since split_len >= cdiv(seq_len, num_splits) and prefix + j < seq_len.
    used = (prefix + offs_m) // split_len + 1
    block_used = (prefix + tl.minimum(m0 + BLOCK_M, ext_len) - 1) // split_len + 1
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # A device-scalar bound: `while` in the interpreter, as in _attn_loop.
    if INTERPRET:
        s = 0
        while s < block_used:
            acc, l_i, m_i = _merge_splits(acc, l_i, m_i, MidO, MidLse, tok, head, s, used,
                                          m_mask, stride_mt, stride_mh, stride_ms, stride_lt,
                                          stride_lh, HEAD_DIM, BLOCK_S)
            s += BLOCK_S
    else:
        for s in range(0, block_used, BLOCK_S):
            acc, l_i, m_i = _merge_splits(acc, l_i, m_i, MidO, MidLse, tok, head, s, used,
                                          m_mask, stride_mt, stride_mh, stride_ms, stride_lt,
                                          stride_lh, HEAD_DIM, BLOCK_S)
    # Every valid row read at least split 0 (its key 0), so l_i > 0 there.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _decode_prefetch(K, V, bt_row, kv_head, start, end, seq_len,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The loads of a split's first key block [start, start + BLOCK_N) that may precede the PDL
    wait: its K and V rows at positions below min(end, seq_len - 1) (zero elsewhere), and the
    pool slot of key seq_len - 1 (meaningful only where the block holds that key). They read
    the block table and keys that no kernel of the step writes (``decode_attention``'s
    precondition). The page-id loads are masked: an empty split's block may lie past the table.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    pos = start + tl.arange(0, BLOCK_N)
    last = seq_len - 1
    if PAGE_SIZE >= BLOCK_N:
        # The block lies in one page (as in _page_slots): so does key seq_len - 1 if it holds it.
        page = tl.load(bt_row + start // PAGE_SIZE, mask=start < end, other=0).to(tl.int64)
        slots = page * PAGE_SIZE + (pos % PAGE_SIZE)
        last_page = page
    else:
        page = tl.load(bt_row + pos // PAGE_SIZE, mask=pos < end, other=0)
        slots = page.to(tl.int64) * PAGE_SIZE + (pos % PAGE_SIZE)
        holds_last = (last >= start) & (last < start + BLOCK_N)
        last_page = tl.load(bt_row + last // PAGE_SIZE, mask=holds_last, other=0).to(tl.int64)
    old = (pos < tl.minimum(end, last))[:, None]
    k = tl.load(K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=old,
                other=0.0)
    v = tl.load(V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=old,
                other=0.0)
    return k, v, last_page * PAGE_SIZE + last % PAGE_SIZE


@triton.jit
def _decode_first_block(acc, l_i, m_i, q, k, v, K, V, last_slot, kv_head, start, seq_len, q_pos,
                        qk_scale, stride_kt, stride_kh, stride_vt, stride_vh,
                        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """After the PDL wait: put key seq_len - 1 (the previous kernel's write) into the block
    ``_decode_prefetch`` loaded, where the block holds it (one masked row load of K and one of
    V), then take the block's step. Always the masked step: on a whole block its mask keeps
    every key, so the values and the math are those of the unmasked step, bit for bit; on the
    split's last partial block it is the step the loop would take."""
    offs_d = tl.arange(0, HEAD_DIM)
    pos = start + tl.arange(0, BLOCK_N)
    last = seq_len - 1
    is_last = (pos == last)[:, None]
    # Whether the block holds the key, as a [HEAD_DIM] mask built from vectors: Triton's
    # interpreter mishandles a scalar mask (or scalar & vector) on a vector load.
    last_d = tl.full([HEAD_DIM], 0, dtype=tl.int32) + last
    row_mask = (last_d >= start) & (last_d < start + BLOCK_N)
    k_last = tl.load(K + last_slot * stride_kt + kv_head * stride_kh + offs_d, mask=row_mask,
                     other=0.0)
    v_last = tl.load(V + last_slot * stride_vt + kv_head * stride_vh + offs_d, mask=row_mask,
                     other=0.0)
    k = tl.where(is_last, k_last[None, :], k)
    v = tl.where(is_last, v_last[None, :], v)
    p, alpha, l_i, m_i = _attn_scores(l_i, m_i, q, k, pos, q_pos, qk_scale, True, DOT_PREC)
    acc = _attn_update(acc, p, alpha, q, v, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _halves(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows [0, ROWS / 2) and [ROWS / 2, ROWS) of x [ROWS, COLS] (ROWS a power of two >= 2)."""
    return tl.split(tl.permute(tl.reshape(x, [2, ROWS // 2, COLS]), [1, 2, 0]))


@triton.jit
def _weighted_split_sum(o, w, BLOCK_S: tl.constexpr, COLS: tl.constexpr):
    """sum_s o[s, :] * w[s] of o [BLOCK_S, COLS] and w [BLOCK_S], in one fixed order of
    operations: products of row s + BLOCK_S / 2 fused (one rounding) onto those of row s, then
    halves added pairwise down to one row. A fixed order, independent of the tile's register
    layout (which sets ``tl.sum``'s order and which Triton chooses per kernel): the order the
    stage-2 merge was measured with. BLOCK_S a power of two."""
    if BLOCK_S == 1:
        x = tl.reshape(o * w[:, None], [COLS])
    else:
        o_lo, o_hi = _halves(o, BLOCK_S, COLS)
        w_lo, w_hi = _halves(w[:, None], BLOCK_S, 1)
        # An explicit fma: left to the compiler, which product it fused would depend on the
        # code around it.
        x = tl.fma(o_hi, w_hi, o_lo * w_lo)
        for i in tl.static_range(1, BLOCK_S.bit_length() - 1):
            lo, hi = _halves(x, BLOCK_S >> i, COLS)
            x = lo + hi
        x = tl.reshape(x, [COLS])
    return x


@triton.jit
def _decode_merge_head(MidO, MidLse, seq, head, used, stride_mb, stride_mh, stride_ms,
                       stride_lb, stride_lh, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """Output ([HEAD_DIM] fp32) of one q head of one sequence: the partial outputs of its first
    ``used`` splits weighted by their LSE; 0 when ``used`` is 0 (an empty sequence). Splits
    past ``used`` were empty in stage 1 and hold stale (or poisoned) scratch: never read. Its
    sums have one fixed order whatever the layout (``_weighted_split_sum``)."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < used
    lse = tl.load(MidLse + seq * stride_lb + head * stride_lh + offs_s, mask=s_mask,
                  other=_NEG_BIG)
    m = tl.max(lse, 0)  # exact in any order
    w = tl.where(s_mask, tl.exp2(lse - m), 0.0)
    o = tl.load(MidO + seq * stride_mb + head * stride_mh + offs_s[:, None] * stride_ms
                + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    ones = tl.full([BLOCK_S, 1], 1.0, dtype=tl.float32)
    denom = tl.sum(_weighted_split_sum(ones, w, BLOCK_S, 1), 0)
    # denom is 0 only when the sequence is empty: zeros, not NaN.
    return _weighted_split_sum(o, w, BLOCK_S, HEAD_DIM) / tl.where(denom > 0, denom, 1.0)


@triton.jit
def _decode_stage1_kernel(Q, K, V, Out, MidO, MidLse, BlockTable, SeqLens, qk_scale, num_splits,
                          stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_ob, stride_oh, stride_mb, stride_mh, stride_ms,
                          stride_lb, stride_lh, stride_bt,
                          GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                          PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                          SINGLE_SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
                          DOT_PREC: tl.constexpr,
                          INTERPRET: tl.constexpr, CARRY: tl.constexpr = True,
                          PDL: tl.constexpr = False):
    """Grid: (sequences, kv heads, splits). One program = every q head of one kv head's group
    (rows of a [BLOCK_H, HEAD_DIM] tile, padded to BLOCK_H >= 16 for the dot) over one split,
    so each K/V tile is read once per group, not once per q head.

    With a single split the normalised result goes straight to Out and stage 2 is skipped;
    otherwise the split's normalised partial output goes to MidO and its log2-sum-exp to MidLse.
    An empty split (short sequence) writes nothing: only the sequence's first
    cdiv(seq_len, split_len) splits ("used") are ever read.

    PREFETCH: the first key block's loads (``_decode_prefetch``) go before the PDL wait, so
    their latency overlaps the previous kernel's tail; after the wait q and key seq_len - 1
    are loaded and the block's step taken (``_decode_first_block``), then the rest of the split
    as without PREFETCH. The same math in the same order: bitwise the same result.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq64 = seq.to(tl.int64)
    bt_row = BlockTable + seq64 * stride_bt

    if not PREFETCH:
        _pdl_wait(PDL)
    # With PREFETCH, before the wait: SeqLens (and BlockTable) are written before the step's
    # first kernel, never by the one just before this.
    seq_len = tl.load(SeqLens + seq)
    split_len = _decode_split_len(seq_len, num_splits, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if PREFETCH:
        k_first, v_first, last_slot = _decode_prefetch(K, V, bt_row, kv_head, start, end,
                                                       seq_len, stride_kt, stride_kh, stride_vt,
                                                       stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N)
        _pdl_wait(PDL)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_mask = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    # Nested, not `and`: SINGLE_SPLIT is a constexpr, so the branch vanishes at compile time.
    if not SINGLE_SPLIT:  # noqa: SIM102
        if start >= end:
            return

    q = tl.load(Q + seq64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_H], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    # Whole key blocks of the split need no masks; only the last, partial block does. There a
    # decode query sits after every key, so the causal test pos <= end - 1 is the bounds mask.
    full_end = start + ((end - start) // BLOCK_N) * BLOCK_N
    q_pos = tl.full([BLOCK_H], 0, dtype=tl.int32) + (end - 1)
    if PREFETCH:
        # The first block, then the loops from the second one: the blocks in the same order.
        acc, l_i, m_i = _decode_first_block(acc, l_i, m_i, q, k_first, v_first, K, V, last_slot,
                                            kv_head, start, seq_len, q_pos, qk_scale, stride_kt,
                                            stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK_N,
                                            DOT_PREC)
        second = start + BLOCK_N
        acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, K, V, bt_row, kv_head, second, full_end,
                                   q_pos, end, qk_scale, stride_kt, stride_kh, stride_vt,
                                   stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N, False, DOT_PREC,
                                   INTERPRET, CARRY)
        acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, K, V, bt_row, kv_head,
                                   tl.maximum(full_end, second), end, q_pos, end, qk_scale,
                                   stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM,
                                   PAGE_SIZE, BLOCK_N, True, DOT_PREC, INTERPRET, CARRY)
    else:
        acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, K, V, bt_row, kv_head, start, full_end,
                                   q_pos, end, qk_scale, stride_kt, stride_kh, stride_vt,
                                   stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N, False, DOT_PREC,
                                   INTERPRET, CARRY)
        acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, K, V, bt_row, kv_head, full_end, end,
                                   q_pos, end, qk_scale, stride_kt, stride_kh, stride_vt,
                                   stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N, True, DOT_PREC,
                                   INTERPRET, CARRY)

    # l_i is 0 only for an empty sequence (single-split path): write zeros, not NaN.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        tl.store(Out + seq64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=h_mask[:, None])
    else:
        tl.store(MidO + seq64 * stride_mb + heads[:, None] * stride_mh + split * stride_ms
                 + offs_d[None, :], out, mask=h_mask[:, None])
        tl.store(MidLse + seq64 * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i),
                 mask=h_mask)


@triton.jit
def _decode_stage2_kernel(Out, MidO, MidLse, SeqLens, num_splits,
                          stride_ob, stride_oh, stride_mb, stride_mh, stride_ms,
                          stride_lb, stride_lh,
                          HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
                          PDL: tl.constexpr = False):
    """Grid: (sequences, q heads). Merge the used splits' partial outputs by their LSE, in a
    fixed pairwise order (``_weighted_split_sum``).

    The sequence's length (written before the step's first kernel, as stage 1's precondition
    has it) is read before the PDL wait: after it, the partials' loads are the only round trip
    to memory before the store."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(SeqLens + seq)
    split_len = _decode_split_len(seq_len, num_splits, BLOCK_N)
    used = tl.cdiv(seq_len, split_len)
    _pdl_wait(PDL)
    out = _decode_merge_head(MidO, MidLse, seq, head, used, stride_mb, stride_mh, stride_ms,
                             stride_lb, stride_lh, HEAD_DIM, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(Out + seq * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty))


# fmt: on


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

# In Triton's interpreter (TRITON_INTERPRET=1, the CPU test path) triton.jit returns a Python
# function, not a JITFunction; small blocks keep the interpreter's per-program cost down.
INTERPRETED: bool = not isinstance(_extend_kernel, JITFunction)

# Whether decode stage 1 issues its first key block's loads before its PDL wait. None: when the
# launch uses PDL (only then is there a previous kernel to overlap) and has several splits (see
# ``decode_attention``). True / False force one code path (tests compare their bits; without
# PDL both are correct).
DECODE_PREFETCH: bool | None = None
# Whether the key loops look up the next block's pages a step ahead (``_attn_loop``'s CARRY).
# None: where it was measured faster (H200, 2026-12-02, benchmarks/bench_attention.py --carry
# both; docs/benchmarks.md run 12): split-KV extend (64 new tokens after a 32K / 80K prefix:
# 97.7 / 218.0 us against 158.8 / 310.3), one-pass extend with the short-extend tiles (484.6
# against 712.8 us after 32K), decode with several splits (batch 1 at 32K: 25.9-27.4 against
# 29.1-29.4 us). Not the one-pass extend's large tiles (16K new tokens: 5.40 against 4.91 ms)
# nor decode with one split (batch 128 at 4K: 302.8 against 251.4 us): a long launch of many
# programs needs the programs a SM that the second buffer's shared memory costs. True / False
# force it everywhere (A/B runs; tests compare the bits); KVTIER_CARRY_SLOTS=0 / 1 at import.
_CARRY_ENV = os.environ.get("KVTIER_CARRY_SLOTS")
CARRY_SLOTS: bool | None = None if _CARRY_ENV is None else _CARRY_ENV != "0"


def _carry(default: bool) -> bool:
    return default if CARRY_SLOTS is None else CARRY_SLOTS


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@functools.cache
def _num_sms_cached(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (132, an H200's count, off CUDA: it only shapes tiles)."""
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms_cached(index)


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _check_common(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, out: torch.Tensor, page_size: int
) -> tuple[int, int, int]:
    """Validate shapes and layouts; return (num_q_heads, num_kv_heads, head_dim)."""
    if q.dim() != 3 or k_buf.dim() != 3 or v_buf.shape != k_buf.shape:
        raise ValueError(
            f"expected q [T, Hq, D] and k/v [slots, Hkv, D]; got {tuple(q.shape)}, "
            f"{tuple(k_buf.shape)}, {tuple(v_buf.shape)}"
        )
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buf.shape[1]
    if k_buf.shape[2] != head_dim or out.shape != q.shape:
        raise ValueError(f"head_dim / out shape mismatch: {tuple(k_buf.shape)}, {tuple(out.shape)}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if not _is_pow2(head_dim) or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a power of two in 16..256; got {head_dim}")
    if not _is_pow2(page_size):
        raise ValueError(f"page_size must be a power of two; got {page_size}")
    for name, t in (("q", q), ("k_buf", k_buf), ("v_buf", v_buf), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    return num_q_heads, num_kv_heads, head_dim


def _check_scale(scale: float) -> None:
    # The kernels fold the scale into the running max, which needs it positive.
    if not scale > 0:
        raise ValueError(f"softmax scale must be > 0; got {scale}")


def _dot_precision(dtype: torch.dtype) -> str:
    # tf32 would cost fp32 runs ~1e-3 relative error; fp32 only serves tests, so pay for ieee.
    return "ieee" if dtype == torch.float32 else "tf32"


# Query rows of the one-pass extend's tile for the shortest extends (up to that many tokens).
_SHORT_EXTEND_ROWS = 64


def default_extend_config(
    head_dim: int,
    dtype: torch.dtype,
    max_extend_len: int,
    *,
    num_q_heads: int = 32,
    batch_size: int = 1,
    num_sms: int = 132,
) -> KernelConfig:
    """Tiles for the extend kernel.

    Measured on an H200 (bf16, Qwen3-30B-A3B geometry, page 64; benchmarks/bench_attention.py
    --sweep): for 16K new tokens, 256x64 tiles with 8 warps and a 3-deep pipeline ran fastest
    (442 TFLOP/s with no prefix, 467 after a 64K prefix) ahead of 128x64 with 4 warps (427 /
    433); for 2K new tokens the 256-row tiles leave too few programs to fill 132 SMs and
    128x64 / 64x64 won. So: 256 rows only when that still gives ~8 programs per SM, else 128,
    and 64 for short extends whose 128-row tiles would be mostly padding. fp32 (tests only) and
    head_dim 256 take small tiles to fit registers and shared memory.
    """
    if INTERPRETED:
        return KernelConfig(16, 16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(64, 32, 4 if head_dim <= 64 else 8, 2)
    if max_extend_len <= _SHORT_EXTEND_ROWS:
        return KernelConfig(_SHORT_EXTEND_ROWS, 64, 4, 3)
    if triton.cdiv(max_extend_len, 256) * num_q_heads * batch_size >= 8 * num_sms:
        return KernelConfig(256, 64, 8, 3)
    return KernelConfig(128, 64, 4, 3)


# Tile rows (queries x q heads) from which the split kernel takes 256-row tiles; see
# ``default_extend_split_config``.
_TALL_SPLIT_ROWS = 2048


def default_extend_split_config(
    head_dim: int, dtype: torch.dtype, max_extend_len: int = 0, group: int = 8
) -> KernelConfig:
    """Tiles for the packed extend kernel (split-KV stage 1, and the one-pass extend at GQA;
    see ``packed_one_pass``). Here ``block_m`` counts tile *rows*: queries x q heads of one kv
    head's group (``extend_split_tiles`` turns it into the two factors).

    bf16 / fp16, head_dim <= 128: 256 rows (32 queries x 8 heads at GQA 8), 64 keys, 8 warps, 3
    stages once the extend has ``_TALL_SPLIT_ROWS`` rows (``max_extend_len`` x ``group``), else
    128 rows. Measured on an H200 (2026-12-02, 32 q / 4 kv heads, page 64, after 8K / 32K / 80K
    prefixes; ``bench_attention.py --mode short-extend --extend-splits 1 2 4 --split-tiles ...``,
    us a layer at the split count ``choose_extend_kv_splits`` takes with these tiles): 256 new
    tokens 90.2 / 289.4 / 687.9 at 256 rows against 98.3 / 337.8 / 807.6 at 128; 512 tokens
    166.8 / 563.5 / 1364.9 against 193.3 / 666.7 / 1629.2; 128 tokens the other way, 86.0 /
    287.1 / 687.3 against 54.2 / 174.6 / 412.6 (a 256-row grid that short has too few
    programs). One split (the packed one-pass) at 256 rows against the per-head one-pass kernel:
    1024 tokens 324.8 / 1111.3 / 2961.5 against 352.1 / 1237.2 / 3184.8, 2048 tokens 704.2 /
    2386.8 / 5640.2 against 757.7 / 2648.0 / 6656.6, 4096 tokens 1669.2 / 4986.0 / 11468.3
    against 1745.5 / 5576.1 / 13290.0. Four stages were level or slower. A 256-row tile's fp32
    accumulator is 128 KB (128 registers a thread at 8 warps); 3 stages of bf16 K and V tiles
    take 96 KB of shared memory, plus 64 KB for Q. fp32 (tests only) and head_dim 256 take 64
    rows x 32 keys to fit registers and shared memory.
    """
    if INTERPRETED:
        return KernelConfig(16, 16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(64, 32, 4 if head_dim <= 64 else 8, 2)
    if max_extend_len * group >= _TALL_SPLIT_ROWS:
        return KernelConfig(256, 64, 8, 3)
    return KernelConfig(128, 64, 8, 3)


# The packed one-pass extend (``packed_one_pass``) unless KVTIER_PACKED_EXTEND=0 at import (A/B
# runs: the per-head one-pass kernel everywhere). Tests set it.
PACKED_EXTEND: bool = os.environ.get("KVTIER_PACKED_EXTEND", "1") != "0"


# The packed one pass visits query blocks last-first (KVTIER_PACKED_REVERSE=0: in order; for
# A/B runs, read at each launch).
PACKED_REVERSE: bool = os.environ.get("KVTIER_PACKED_REVERSE", "1") != "0"


def packed_one_pass(num_q_heads: int, num_kv_heads: int) -> bool:
    """Whether a one-split extend with default tiles runs the packed kernel (split-KV stage 1
    with a single split, its float32 results cast into the output) rather than the per-head
    one-pass kernel: at GQA (a power-of-two group of 2 or more q heads a kv head) its tiles
    hold a kv head's q heads together, so each K/V tile load serves the whole group. On an
    H200 (2026-12-02, 32 q / 4 kv heads, bf16, page 64, 256-row tiles; us a layer against the
    per-head kernel's 128x64 tiles, ``bench_attention.py --mode short-extend``): 1024 new
    tokens after 8K / 40K / 80K 320.5 / 1340.1 / 2754.6 against 353.6 / 1495.1 / 3139.1; 2048
    tokens 662.6 / 2856.9 / 5574.5 against 752.1 / 3144.9 / 6280.4; 4096 tokens 1422.3 /
    5630.7 / 11378.1 against 1664.5 / 6439.5 / 13788.0; 8192 tokens 3443.0 / 11947.0 /
    23136.6 against 3899.7 / 13558.7 / 26077.1 (9-18% faster); with no prefix, 8192 tokens
    1.16 against 1.35 ms. ``PACKED_EXTEND`` off: never."""
    group = num_q_heads // max(1, num_kv_heads)
    return PACKED_EXTEND and group >= 2 and _is_pow2(group)


def extend_split_tiles(group: int, max_extend_len: int, block_rows: int) -> tuple[int, int]:
    """(queries, q heads) of a split-extend tile of about ``block_rows`` rows.

    Heads first: the whole GQA group (padded to a power of two) when it fits, so one K/V tile
    load serves every q head of the kv head; then as many queries as fill the rows, but no more
    than the longest extend needs, and at least 16 rows in all (tl.dot's minimum).
    """
    if not _is_pow2(block_rows) or block_rows < 16:
        raise ValueError(f"block rows must be a power of two >= 16; got {block_rows}")
    block_g = min(triton.next_power_of_2(max(group, 1)), block_rows)
    block_q = min(block_rows // block_g, triton.next_power_of_2(max(max_extend_len, 1)))
    block_q = max(block_q, triton.cdiv(16, block_g))
    return block_q, block_g


# Decode stage-1 tiles for bf16 / fp16 with head_dim <= 128, for A/B runs: {"block_n": ...,
# "num_warps": ..., "num_stages": ...} (KVTIER_DECODE_TILES, JSON, read at import; consulted
# on every call, so it may also be set at run time).
DECODE_TILES: dict[str, int] = json.loads(os.environ.get("KVTIER_DECODE_TILES", "{}"))


def default_decode_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Tiles for decode stage 1 (block_m unused: the head tile is the GQA group).

    On an H200 (4K context, 32 q / 4 kv heads, bf16) 64-key blocks with 4 warps and 3 stages
    were the best or within a few percent of it at batch 1, 32 and 128; 128-key blocks won
    only at batch 1 with too few splits. ``DECODE_TILES`` overrides entries of the bf16 / fp16
    tiles.
    """
    if INTERPRETED:
        return KernelConfig(16, 16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(16, 32, 4, 2)
    return KernelConfig(16, **{"block_n": 64, "num_warps": 4, "num_stages": 3, **DECODE_TILES})


def extend_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    out: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
    max_extend_len: int,
    *,
    page_size: int,
    config: KernelConfig | None = None,
    num_kv_splits: int = 1,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged KV (prefix + new tokens).

    Args:
        q: [T, Hq, D], the new tokens of all sequences, concatenated.
        k_buf, v_buf: [num_slots, Hkv, D], one layer of the pool (new tokens already stored).
        out: [T, Hq, D], written in full for the rows the extends cover.
        block_table: [B, P] int32 page ids; seq_lens / extend_lens / extend_starts /
            prefix_lens: [B] int32 (seq_len = prefix_len + extend_len).
        scale: softmax scale.
        max_extend_len: upper bound of extend_lens (sizes the grid; a host-side int).
        page_size: tokens per page (power of two).
        config: tiles of the kernel that runs: ``default_extend_config`` with one split,
            ``default_extend_split_config`` (block_m = tile rows) with more. Given with one
            split, it pins the per-head one-pass kernel.
        num_kv_splits: 1 runs one pass over the keys: at GQA with default tiles the packed
            kernel (``packed_one_pass``: one program per query block and kv head's group of q
            heads, float32 results cast into ``out``), else the per-head kernel (one program
            per query block and q head).
            More runs split-KV (e.g. from ``choose_extend_kv_splits``): each sequence cuts its
            keys 0 .. seq_len - 1 into that many pieces of whole key blocks (computed on the
            device from seq_lens, so short sequences may use fewer), one program per (query
            block, GQA head block, split) writes partial results, and a second kernel merges
            them. For short extends after long prefixes, where the one-pass grid is too small
            to fill the GPU.
        mid_o, mid_lse: split-KV scratch from ``extend_scratch`` with at least T rows and
            ``num_kv_splits`` splits (the packed one pass uses one); allocated here when
            omitted.
    Returns:
        ``out``.

    No host syncs, and no allocations when the scratch is given (with one split: when the
    per-head kernel runs, or the scratch is given for the packed one's float32 results): the
    grid depends only on T, the batch size, ``max_extend_len`` and ``num_kv_splits``, so a
    launch can be captured and replayed with other lengths up to those bounds.
    """
    num_q_heads, num_kv_heads, head_dim = _check_common(q, k_buf, v_buf, out, page_size)
    _check_scale(scale)
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1; got {num_kv_splits}")
    batch = seq_lens.shape[0]
    if batch == 0 or max_extend_len <= 0:
        return out
    if num_kv_splits > 1:
        return _extend_attention_split(
            q, k_buf, v_buf, out, block_table, seq_lens, extend_lens, extend_starts,
            prefix_lens, scale, max_extend_len, page_size, config, num_kv_splits, mid_o, mid_lse,
        )  # fmt: skip
    if config is None and packed_one_pass(num_q_heads, num_kv_heads):
        cfg = default_extend_split_config(
            head_dim, q.dtype, max_extend_len, num_q_heads // num_kv_heads
        )
        # One split: stage 1's float32 partials are the output; a cast instead of stage 2.
        if mid_o is None or mid_lse is None:
            mid_o, mid_lse = extend_scratch(q.shape[0], num_q_heads, 1, head_dim, q.device)
        else:
            _check_scratch(mid_o, mid_lse, q.shape[0], num_q_heads, 1, head_dim, "extend")
        _launch_packed_stage1(
            q, k_buf, v_buf, mid_o, mid_lse, block_table, seq_lens, extend_lens, extend_starts,
            prefix_lens, scale, max_extend_len, page_size, cfg, 1, reverse=PACKED_REVERSE,
        )  # fmt: skip
        return out.copy_(mid_o[:, :, 0])
    cfg = config or default_extend_config(
        head_dim, q.dtype, max_extend_len, num_q_heads=num_q_heads, batch_size=batch,
        num_sms=_num_sms(q.device),
    )  # fmt: skip
    grid = (triton.cdiv(max_extend_len, cfg.block_m), num_q_heads, batch)
    _extend_kernel[grid](
        q, k_buf, v_buf, out, block_table, seq_lens, extend_lens, extend_starts, prefix_lens,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PREC=_dot_precision(q.dtype),
        INTERPRET=INTERPRETED, CARRY=_carry(cfg.block_m <= _SHORT_EXTEND_ROWS),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **fused.pdl_options(q.device),
    )  # fmt: skip
    return out


def _check_scratch(
    mid_o: torch.Tensor, mid_lse: torch.Tensor, rows: int, num_q_heads: int, splits: int,
    head_dim: int, what: str,
) -> None:  # fmt: skip
    if (
        mid_o.shape[0] < rows
        or mid_o.shape[1] != num_q_heads
        or mid_o.shape[2] < splits
        or mid_o.shape[3] != head_dim
        or mid_lse.shape[0] < rows
        or mid_lse.shape[1] != num_q_heads
        or mid_lse.shape[2] < splits
        or mid_o.stride(-1) != 1
        or mid_lse.stride(-1) != 1
        or mid_o.dtype != torch.float32
        or mid_lse.dtype != torch.float32
    ):
        raise ValueError(
            f"{what} scratch {tuple(mid_o.shape)} / {tuple(mid_lse.shape)} too small for {rows} "
            f"rows, {num_q_heads} heads, {splits} splits, head_dim {head_dim} (fp32)"
        )


def _extend_attention_split(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    out: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
    max_extend_len: int,
    page_size: int,
    config: KernelConfig | None,
    num_kv_splits: int,
    mid_o: torch.Tensor | None,
    mid_lse: torch.Tensor | None,
) -> torch.Tensor:
    """Split-KV extend (see ``extend_attention``); arguments already validated."""
    num_tokens, num_q_heads, head_dim = q.shape
    if mid_o is None or mid_lse is None:
        mid_o, mid_lse = extend_scratch(num_tokens, num_q_heads, num_kv_splits, head_dim, q.device)
    else:
        _check_scratch(mid_o, mid_lse, num_tokens, num_q_heads, num_kv_splits, head_dim, "extend")
    cfg = config or default_extend_split_config(
        head_dim, q.dtype, max_extend_len, num_q_heads // k_buf.shape[1]
    )
    pdl = fused.pdl_options(q.device)
    _launch_packed_stage1(
        q, k_buf, v_buf, mid_o, mid_lse, block_table, seq_lens, extend_lens, extend_starts,
        prefix_lens, scale, max_extend_len, page_size, cfg, num_kv_splits,
    )  # fmt: skip
    # Stage 2 is a light, memory-bound pass: up to 4 queries x one head a program, merging
    # splits a chunk at a time (a [queries, splits, head_dim] tile of 32 x head_dim floats).
    block_m2 = min(4, triton.next_power_of_2(max_extend_len))
    block_s = max(1, min(triton.next_power_of_2(num_kv_splits), 32 // block_m2))
    grid2 = (triton.cdiv(max_extend_len, block_m2), num_q_heads, seq_lens.shape[0])
    _extend_split_stage2_kernel[grid2](
        out, mid_o, mid_lse, seq_lens, extend_lens, extend_starts, prefix_lens, num_kv_splits,
        out.stride(0), out.stride(1), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        HEAD_DIM=head_dim, BLOCK_M=block_m2, BLOCK_N=cfg.block_n, INTERPRET=INTERPRETED,
        BLOCK_S=block_s, num_warps=4 if head_dim >= 128 else 2, num_stages=1,
        **pdl,
    )  # fmt: skip
    return out


def _launch_packed_stage1(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
    max_extend_len: int,
    page_size: int,
    cfg: KernelConfig,
    num_kv_splits: int,
    *,
    reverse: bool = False,
) -> None:
    """Launch ``_extend_split_stage1_kernel`` (tiles of queries x a kv head's q heads) into
    the float32 scratch ``mid_o`` / ``mid_lse``; ``reverse``: query blocks last-first."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buf.shape[1]
    group = num_q_heads // num_kv_heads
    block_q, block_g = extend_split_tiles(group, max_extend_len, cfg.block_m)
    blocks_per_group = triton.cdiv(group, block_g)
    head_blocks = num_kv_heads * blocks_per_group
    grid = (triton.cdiv(max_extend_len, block_q), num_kv_splits * head_blocks, seq_lens.shape[0])
    _extend_split_stage1_kernel[grid](
        q, k_buf, v_buf, mid_o, mid_lse, block_table, seq_lens, extend_lens, extend_starts,
        prefix_lens, scale * _LOG2E, num_kv_splits, head_blocks,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), block_table.stride(0),
        GROUP=group, BLOCK_G=block_g, BLOCKS_PER_GROUP=blocks_per_group, BLOCK_Q=block_q,
        HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_N=cfg.block_n,
        DOT_PREC=_dot_precision(q.dtype), INTERPRET=INTERPRETED, CARRY=_carry(True),
        REVERSE=reverse, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **fused.pdl_options(q.device),
    )  # fmt: skip


def extend_scratch(
    max_tokens: int, num_q_heads: int, max_splits: int, head_dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV extend scratch for up to ``max_tokens`` new tokens (rows of q) and
    ``max_splits`` splits: (partial outputs [max_tokens, Hq, max_splits, D] fp32, log2-sum-exp
    [max_tokens, Hq, max_splits] fp32). Same layout as decode's, one row per token."""
    return decode_scratch(max_tokens, num_q_heads, max_splits, head_dim, device)


def decode_scratch(
    max_batch: int, num_q_heads: int, max_splits: int, head_dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 scratch for up to ``max_batch`` sequences and ``max_splits`` splits:
    (partial outputs [max_batch, Hq, max_splits, D] fp32, log2-sum-exp [max_batch, Hq,
    max_splits] fp32). Allocate once and reuse it (CUDA graphs need fixed addresses)."""
    mid_o = torch.empty((max_batch, num_q_heads, max_splits, head_dim), dtype=torch.float32,
                        device=device)  # fmt: skip
    mid_lse = torch.empty((max_batch, num_q_heads, max_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    out: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_kv_splits: int,
    *,
    page_size: int,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """One query per sequence over its paged KV ``0 .. seq_len - 1``, split-KV.

    Args:
        q: [B, Hq, D]; out: [B, Hq, D] (every element written; a row with seq_len 0 gets 0).
        k_buf, v_buf: [num_slots, Hkv, D]; block_table: [B', P] int32 with B' >= B;
            seq_lens: [B'] int32 (read on the device only).
        scale: softmax scale.
        num_kv_splits: splits per sequence (grid size; e.g. from ``choose_num_kv_splits``).
            Each sequence cuts its own keys into that many pieces of a whole number of key
            blocks, so short sequences may use fewer.
        page_size: tokens per page (power of two).
        mid_o, mid_lse: scratch from ``decode_scratch`` with at least B rows and
            ``num_kv_splits`` splits; allocated here when omitted (not for CUDA graphs).
        config: tiles; default ``default_decode_config``.
    Returns:
        ``out``.

    No host syncs and no allocations when the scratch is given: safe to capture.

    Precondition with PDL (``fused.pdl_options``): stage 1 loads ``seq_lens``, the block table
    and each split's first key block before it waits for the previous kernel. Of what it reads,
    the previous kernel may write only ``q`` and the K/V of key ``seq_len - 1`` of each
    sequence (decode's new token, as ``fused.qk_norm_rope_store`` does); every other key,
    ``seq_lens`` and the block table must have been written at least two launches back (in an
    earlier step, or before the step's first kernel). Stage 2 also reads ``seq_lens`` before
    its wait (stage 1, the kernel before it, never writes it).
    """
    num_q_heads, num_kv_heads, head_dim = _check_common(q, k_buf, v_buf, out, page_size)
    _check_scale(scale)
    batch = q.shape[0]
    if batch == 0:
        return out
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1; got {num_kv_splits}")
    cfg = config or default_decode_config(head_dim, q.dtype)
    group = num_q_heads // num_kv_heads
    single = num_kv_splits == 1
    if single:
        # Stage 1 writes `out` directly and never touches the scratch arguments: pass `out` in
        # their place rather than allocate (nothing may be allocated under graph capture).
        mid_o = mid_lse = None
    elif mid_o is None or mid_lse is None:
        mid_o, mid_lse = decode_scratch(batch, num_q_heads, num_kv_splits, head_dim, q.device)
    else:
        _check_scratch(mid_o, mid_lse, batch, num_q_heads, num_kv_splits, head_dim, "decode")
    mo_strides = mid_o.stride()[:3] if mid_o is not None else (0, 0, 0)
    ml_strides = mid_lse.stride()[:2] if mid_lse is not None else (0, 0)
    qk_scale = scale * _LOG2E
    pdl = fused.pdl_options(q.device)
    # Not with a single split (DECODE_PREFETCH left open): chosen when the batch alone fills the
    # GPU, each program then streams a whole sequence, and one block's latency is noise; but
    # the prefetch path took 168 registers a thread there against 80 (sm_90, bf16), too few
    # programs a SM to keep such a launch in one wave (H200, 2026-12-01, batch 128 at a 4K
    # context, prefetch forced on: 279.6 against 257.0 us a layer).
    prefetch = (pdl["PDL"] and not single) if DECODE_PREFETCH is None else DECODE_PREFETCH
    _decode_stage1_kernel[(batch, num_kv_heads, num_kv_splits)](
        q, k_buf, v_buf, out, out if mid_o is None else mid_o, out if mid_lse is None else mid_lse,
        block_table, seq_lens, qk_scale, num_kv_splits,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1), out.stride(0), out.stride(1),
        *mo_strides, *ml_strides, block_table.stride(0),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        PAGE_SIZE=page_size, BLOCK_N=cfg.block_n, SINGLE_SPLIT=single, PREFETCH=prefetch,
        DOT_PREC=_dot_precision(q.dtype), INTERPRET=INTERPRETED, CARRY=_carry(not single),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
    )  # fmt: skip
    if mid_o is not None and mid_lse is not None:
        _decode_stage2_kernel[(batch, num_q_heads)](
            out, mid_o, mid_lse, seq_lens, num_kv_splits,
            out.stride(0), out.stride(1), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_lse.stride(0), mid_lse.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_kv_splits),
            BLOCK_N=cfg.block_n, num_warps=4 if head_dim >= 128 else 2, num_stages=1, **pdl,
        )  # fmt: skip
    return out


def choose_num_kv_splits(
    batch_size: int,
    num_kv_heads: int,
    max_seq_len: int,
    *,
    num_sms: int = 132,
    max_splits: int = 64,
    min_split_len: int = 64,
    programs_per_sm: int = 2,
) -> int:
    """Split count for decode.

    Enough stage-1 programs for ``programs_per_sm`` per SM: a program streams its split
    serially, so a GPU needs many of them in flight to keep HBM busy; but beyond that, more
    splits only add merge work. Never splits shorter than ``min_split_len`` keys, nor more than
    ``max_splits`` (the scratch's size).

    Measured on an H200 (4K context, 4 kv heads, bf16; CUDA-graph replay): batch 1 ran in
    10.1 us with 64 splits against 11.0 with 32, 12.9 with 16 and 108 with 1 (and 10.7 with
    128); batch 32 in ~84 us with 2 to 5 splits against 126 with 1; batch 128 in 260 us with
    1 split (97% of copy bandwidth) against 308 with 2. This rule picks 64, 3 and 1.
    """
    programs = max(1, batch_size * num_kv_heads)
    want = triton.cdiv(programs_per_sm * num_sms, programs)
    by_len = max(1, triton.cdiv(max_seq_len, min_split_len))
    return max(1, min(want, by_len, max_splits))


def choose_extend_kv_splits(
    batch_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    max_extend_len: int,
    max_seq_len: int,
    *,
    num_sms: int = 132,
    block_rows: int = 128,
    max_splits: int = 128,
    min_split_len: int = 512,
    programs_per_sm: int = 1,
    single_tile_programs_per_sm: int = 4,
) -> int:
    """Split count for extend: 1 (the one-pass kernel) unless its grid is too small.

    The one-pass grid has batch x query blocks (of 128; an extend of <= 64 is one block of 64)
    x q heads programs, each walking its sequence's whole KV. When that is at least ``num_sms``
    the GPU is full: 1. Otherwise split-KV with tiles of ``block_rows`` rows
    (``extend_split_tiles``) has P = batch x query blocks x GQA head blocks programs per split;
    take as many splits as fit ``programs_per_sm`` waves' worth of programs without starting
    another (floor: a second, mostly idle wave would nearly double the time), but no split
    shorter than ``min_split_len`` keys and no more than ``max_splits`` (the scratch's size);
    if that leaves fewer than 2, 2 where the keys and the scratch allow (see below), else 1.
    Both grids then run in one wave (two at most with the floor of 2), and a split program walks
    1/splits of the keys a one-pass program does (with a tile twice as tall at most, which
    costs little more on tensor cores that a one-pass program of a short extend leaves mostly
    idle), so any split count >= 2 shortens the critical path, even at an equal program count.

    ``block_rows`` must be the split kernel's ``block_m`` (``default_extend_split_config``).
    E.g. 32 q / 4 kv heads, 1 sequence extending 64 tokens after a 32K prefix on 132 SMs: 32
    one-pass programs; split tiles of 16 queries x 8 heads, 4 x 4 = 16 programs a split: 8.

    An extend that fits one query tile (like the last token of a prompt found whole in the
    cache) has so few programs a split that one wave of them leaves most SMs with one program
    streaming keys with little in flight: it takes ``single_tile_programs_per_sm`` waves'
    worth instead. On an H200 (benchmarks/bench_attention.py --mode short-extend, bf16, stage 2
    included, one run each), 1 new token after 64K keys: 126.6 us at 32 splits, 113.7 at 64,
    69.9 at 128 (after 80K: 133.4, 114.7, 79.8); 64 new tokens after 64K keys (4 tiles): 249.8
    us at 8 splits against 277.0 at 33 (after 80K: 305.6 against 326.7), so more waves there
    did not pay.

    Two splits at least where the one-pass grid does not fill the GPU, even when one split's
    programs already make a wave: 512 new tokens after a 32K / 80K prefix (32 q / 4 kv heads,
    one sequence; 128 one-pass programs, 128 a split) took 1077.5 / 2622.5 us a layer in the
    one-pass kernel against 669.3 / 1627.0 with 2 splits (4: 678.7 / 1615.4, 8: 711.6 /
    1648.2; H200, 2026-12-02, ``--mode short-extend --short-extend-tokens 512
    --extend-splits N``). Past 512 new tokens the one-pass grid fills the GPU (160 programs and
    up) and one pass stays faster: 1024 tokens 1270.9 / 3172.2 us against 1332.3 / 3237.3 with
    2 splits, 2048 tokens 2656.4 / 6339.2 against 2728.0 / 6528.2 (4 and 8 splits slower
    still; the same day, ``--short-extend-tokens 512 1024 2048 --extend-splits 2 4 8``). With
    the 256-row tiles that extends from 256 tokens take since (``default_extend_split_config``;
    one split is then the packed one pass at GQA) the split counts stayed level past 512
    tokens: 1024 tokens after 80K 2961.5 / 3052.4 / 2943.2 us at 1 / 2 / 4 splits.
    """
    if batch_size <= 0 or max_extend_len <= 0 or max_seq_len <= 0:
        return 1
    one_pass = batch_size * triton.cdiv(max_extend_len, 128) * num_q_heads
    if one_pass >= num_sms:
        return 1
    group = max(1, num_q_heads // max(1, num_kv_heads))
    block_q, block_g = extend_split_tiles(group, max_extend_len, block_rows)
    query_tiles = triton.cdiv(max_extend_len, block_q)
    per_split = batch_size * query_tiles * num_kv_heads * triton.cdiv(group, block_g)
    waves = single_tile_programs_per_sm if query_tiles == 1 else programs_per_sm
    by_len = max_seq_len // min_split_len
    splits = min(waves * num_sms // per_split, by_len, max_splits)
    if splits < 2 and per_split <= num_sms and min(by_len, max_splits) >= 2:
        # One split's programs fill a wave by themselves (e.g. 512 new tokens at GQA 8: 128
        # one-pass programs, 128 a split): two splits, at most two programs an SM, still beat
        # the one-pass kernel, whose programs each read their q head's keys alone.
        splits = 2
    return splits if splits >= 2 else 1


# --------------------------------------------------------------------------------------------
# Pure-torch references (same arguments; fp32 math; slow, for tests)
# --------------------------------------------------------------------------------------------


def _gather_kv(
    k_buf: torch.Tensor, v_buf: torch.Tensor, bt_row: torch.Tensor, seq_len: int, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(seq_len, device=k_buf.device)
    slots = bt_row.to(torch.int64)[pos // page_size] * page_size + pos % page_size
    return k_buf[slots].float(), v_buf[slots].float()


def _attend_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [n, Hq, D], k/v [L, Hkv, D] fp32, causal by position; returns [n, Hq, D] fp32.

    Queries go in chunks so that the score matrix stays small for long sequences."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    key_pos = torch.arange(k.shape[0], device=q.device)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i in range(0, q.shape[0], 256):
        scores = torch.einsum("nhd,lhd->hnl", q[i : i + 256].float(), k) * scale
        visible = key_pos[None, :] <= q_pos[i : i + 256, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        out[i : i + 256] = torch.einsum("hnl,lhd->nhd", torch.softmax(scores, dim=-1), v)
    return out


def extend_attention_ref(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    out: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
    max_extend_len: int,
    *,
    page_size: int,
) -> torch.Tensor:
    """Reference for ``extend_attention`` (reads the length tensors on the host)."""
    del max_extend_len  # only sizes the kernel's grid
    for b in range(seq_lens.shape[0]):
        seq_len, n = int(seq_lens[b]), int(extend_lens[b])
        start, prefix = int(extend_starts[b]), int(prefix_lens[b])
        if n == 0:
            continue
        k, v = _gather_kv(k_buf, v_buf, block_table[b], seq_len, page_size)
        q_pos = torch.arange(prefix, prefix + n, device=q.device)
        out[start : start + n] = _attend_ref(q[start : start + n], k, v, q_pos, scale).to(out.dtype)
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    out: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_kv_splits: int = 1,
    *,
    page_size: int,
) -> torch.Tensor:
    """Reference for ``decode_attention`` (splits do not change the result; seq_len 0 -> 0)."""
    del num_kv_splits
    for b in range(q.shape[0]):
        seq_len = int(seq_lens[b])
        if seq_len == 0:
            out[b] = 0
            continue
        k, v = _gather_kv(k_buf, v_buf, block_table[b], seq_len, page_size)
        q_pos = torch.tensor([seq_len - 1], device=q.device)
        out[b] = _attend_ref(q[b : b + 1], k, v, q_pos, scale)[0].to(out.dtype)
    return out


__all__ = [
    "DECODE_PREFETCH",
    "INTERPRETED",
    "KernelConfig",
    "choose_extend_kv_splits",
    "choose_num_kv_splits",
    "decode_attention",
    "decode_attention_ref",
    "decode_scratch",
    "default_decode_config",
    "default_extend_config",
    "default_extend_split_config",
    "extend_attention",
    "extend_attention_ref",
    "extend_scratch",
    "extend_split_tiles",
]
