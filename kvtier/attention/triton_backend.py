"""Attention backend on the Triton kernels of ``kvtier.kernels.attention``.

EXTEND batches go to the paged causal extend kernel, split-KV when its one-pass grid would be
too small for the GPU (a short extend after a long cached prefix; ``choose_extend_kv_splits``);
DECODE batches to split-KV decode. Both keep their stage-1 scratch in persistent buffers owned
by the backend (one for decode, one for extend), so that a CUDA-graph runner can capture
``attend``. Decode: the runner calls ``init_cuda_graph_state`` once (which reserves the scratch
for every batch size it will capture and freezes it), then ``prepare_graph`` instead of
``prepare`` before capture and before each replay. Extend, for a captured shape (batch size,
tokens, longest extend): ``extend_splits_for`` fixes the split count for the longest context a
replay may see, ``reserve_extend_scratch`` reserves (and freezes) the scratch, and
``prepare_extend_graph`` replaces ``prepare``. Under capture ``attend`` never allocates
scratch, syncs, or reads the host lists; the runner keeps ``seq_lens`` / ``block_table`` /
``q`` (and for extend the length tensors) in static tensors and may pass a static ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.attention.backend import AttentionBackend
from kvtier.kernels.attention import (
    KernelConfig,
    choose_extend_kv_splits,
    choose_num_kv_splits,
    decode_attention,
    default_extend_split_config,
    extend_attention,
)
from kvtier.kernels.dense_attention import (
    DENSE_BLOCK,
    cudnn_available,
    dense_extend_attention,
)
from kvtier.kernels.dense_attention import (
    prebuild as prebuild_dense,
)
from kvtier.runner.forward_batch import ForwardBatch


@dataclass
class TritonAttentionMetadata:
    """Per-step launch parameters, computed on the host in ``prepare``."""

    is_decode: bool
    num_kv_splits: int = 1  # decode
    # Decode: the split count was fixed by ``prepare_graph`` (reserved for a captured batch
    # size) and is used as is; otherwise ``attend`` may lower it to what frozen scratch holds.
    graph: bool = False
    max_extend_len: int = 0  # extend: sizes the grid
    extend_starts: torch.Tensor | None = None  # extend: [B] int32, when the batch lacks them
    max_seq_len: int = 0  # extend: longest KV, for the split heuristic
    # Extend splits; None until the first ``attend`` picks them (the q head count is not known
    # in ``prepare``), then kept for the step's other layers.
    extend_kv_splits: int | None = None


class _SplitScratch:
    """Flat fp32 scratch for split-KV partial outputs, one per kernel family, grown on demand.

    Capacity is counted in "split rows" (rows x splits: sequences for decode, tokens for
    extend) for one (device, Hq, D) key, so that one allocation serves every shape. Frozen
    while a captured CUDA graph may hold its address: then it is never replaced.
    """

    def __init__(self, name: str, reserve_hint: str) -> None:
        self.name = name
        self.reserve_hint = reserve_hint  # where to reserve more, for the frozen error
        self.mid_o: torch.Tensor | None = None  # [rows * Hq * D] fp32
        self.mid_lse: torch.Tensor | None = None  # [rows * Hq] fp32
        self.key: tuple[torch.device, int, int] | None = None  # (device, Hq, D)
        self.rows = 0
        self.frozen = False

    @staticmethod
    def _key(num_q_heads: int, head_dim: int, device: torch.device) -> tuple:
        if device.type == "cuda" and device.index is None:
            # "cuda" and "cuda:0" must name the same scratch (the pool may say "cuda").
            device = torch.device("cuda", torch.cuda.current_device())
        return (device, num_q_heads, head_dim)

    def fits(self, rows: int, num_q_heads: int, head_dim: int, device: torch.device) -> bool:
        return self.key == self._key(num_q_heads, head_dim, device) and self.rows >= rows

    def ensure(self, rows: int, num_q_heads: int, head_dim: int, device: torch.device) -> None:
        key = self._key(num_q_heads, head_dim, device)
        if self.key == key and self.rows >= rows:
            return
        if self.frozen:
            raise RuntimeError(
                f"{self.name} scratch is frozen for CUDA graphs at {self.rows} split rows "
                f"(key {self.key}); this step needs {rows} for key {key}: reserve it in "
                f"{self.reserve_hint}"
            )
        if self.key == key:
            rows = max(rows, self.rows)
        self.mid_o = torch.empty(rows * num_q_heads * head_dim, dtype=torch.float32, device=device)
        self.mid_lse = torch.empty(rows * num_q_heads, dtype=torch.float32, device=device)
        self.key = key
        self.rows = rows

    def views(
        self, n: int, num_q_heads: int, head_dim: int, splits: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [n, Hq, S, D] and [n, Hq, S] (grown if needed and not frozen)."""
        self.ensure(n * splits, num_q_heads, head_dim, device)
        assert self.mid_o is not None and self.mid_lse is not None
        m = n * num_q_heads * splits
        return (
            self.mid_o[: m * head_dim].view(n, num_q_heads, splits, head_dim),
            self.mid_lse[:m].view(n, num_q_heads, splits),
        )


class TritonAttention(AttentionBackend):
    """Triton paged attention.

    Args:
        max_kv_splits: most decode splits per sequence (bounds the scratch).
        min_split_len: fewest keys per decode split the heuristic will choose.
        num_sms: multiprocessors to fill (default: read off the device; 132 on CPU).
        extend_config / decode_config: tile overrides (default: the kernels' heuristics);
            ``extend_config`` pins one-split extends to the per-head one-pass kernel.
        max_extend_splits: most extend splits per sequence; 1 disables split-KV extend.
        min_extend_split_len: fewest keys per extend split the heuristic will choose.
        extend_split_config: split-KV extend stage-1 tiles (block_m = tile rows; default
            ``default_extend_split_config``).
        dense_prefill: EXTEND batches whose every sequence has a non-zero multiple of
            ``dense_block`` new tokens after a prefix that is a multiple of it (every full chunk
            of a long prompt; see ``DENSE_BLOCK``) go to ``dense_extend_attention`` (cuDNN over
            gathered KV) instead of the paged kernel. None (auto): on a GPU where cuDNN
            attention runs, in bf16/fp16, never under CUDA-graph capture. True forces it
            wherever the batch qualifies (on CPU the dense calls run a float32 reference: tests
            only); False never.
    """

    def __init__(
        self,
        max_kv_splits: int = 64,
        *,
        min_split_len: int = 64,
        num_sms: int | None = None,
        extend_config: KernelConfig | None = None,
        decode_config: KernelConfig | None = None,
        max_extend_splits: int = 128,
        min_extend_split_len: int = 512,
        extend_split_config: KernelConfig | None = None,
        dense_prefill: bool | None = None,
        dense_block: int = DENSE_BLOCK,
    ) -> None:
        if max_kv_splits < 1:
            raise ValueError(f"max_kv_splits must be >= 1; got {max_kv_splits}")
        if max_extend_splits < 1:
            raise ValueError(f"max_extend_splits must be >= 1; got {max_extend_splits}")
        self.max_kv_splits = max_kv_splits
        self.min_split_len = min_split_len
        # Stage-1 programs a decode launch aims for per SM (choose_num_kv_splits).
        self.programs_per_sm = 2
        self._num_sms = num_sms
        self.extend_config = extend_config
        self.decode_config = decode_config
        self.max_extend_splits = max_extend_splits
        self.min_extend_split_len = min_extend_split_len
        self.extend_split_config = extend_split_config
        if dense_block < 1:
            raise ValueError(f"dense_block must be >= 1; got {dense_block}")
        self.dense_prefill = dense_prefill
        self.dense_block = dense_block
        self._cudnn: dict[torch.device, bool] = {}
        # Stage-1 scratch of split-KV decode (rows: sequences) and extend (rows: tokens).
        self._decode_scratch = _SplitScratch("decode", "init_cuda_graph_state")
        self._extend_scratch = _SplitScratch("extend", "reserve_extend_scratch")
        # CUDA-graph state: decode split count per captured batch size.
        self._graph_splits: dict[int, int] = {}

    # ---------------------------------------------------------------- heuristics

    def num_sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            if device.type == "cuda":
                self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
            else:
                return 132  # an H200's count; only shapes the CPU (interpreter) launches
        return self._num_sms

    def num_kv_splits_for(
        self, batch_size: int, num_kv_heads: int, max_seq_len: int, device: torch.device
    ) -> int:
        """Decode split count for a batch (see ``choose_num_kv_splits``)."""
        return choose_num_kv_splits(
            batch_size,
            num_kv_heads,
            max_seq_len,
            num_sms=self.num_sms(device),
            max_splits=self.max_kv_splits,
            min_split_len=self.min_split_len,
            programs_per_sm=self.programs_per_sm,
        )

    def split_extend_config(
        self, head_dim: int, dtype: torch.dtype, max_extend_len: int, group: int
    ) -> KernelConfig:
        """Stage-1 tiles of split-KV extend (the override, else the kernel's default for
        extends of up to ``max_extend_len`` tokens at ``group`` q heads a kv head)."""
        return self.extend_split_config or default_extend_split_config(
            head_dim, dtype, max_extend_len, group
        )

    def extend_splits_for(
        self,
        batch_size: int,
        max_extend_len: int,
        max_context_len: int,
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> int:
        """Extend split count (1: the one-pass kernel) for ``batch_size`` sequences of at most
        ``max_extend_len`` new tokens and ``max_context_len`` keys (prefix + new tokens); see
        ``choose_extend_kv_splits``.

        A CUDA-graph runner capturing an extend shape calls it with the longest context a
        replay may see and passes the result to ``reserve_extend_scratch`` and
        ``prepare_extend_graph``: the kernels cut each sequence's keys into splits from its
        device ``seq_len`` at replay, so a count fixed for the longest context is correct (if
        not optimal) for any shorter one.
        """
        device = torch.device(device)
        return choose_extend_kv_splits(
            batch_size,
            num_q_heads,
            num_kv_heads,
            max_extend_len,
            max_context_len,
            num_sms=self.num_sms(device),
            block_rows=self.split_extend_config(
                head_dim, dtype, max_extend_len, num_q_heads // max(1, num_kv_heads)
            ).block_m,
            max_splits=self.max_extend_splits,
            min_split_len=self.min_extend_split_len,
        )

    def use_dense_prefill(self, q: torch.Tensor, batch: ForwardBatch) -> bool:
        """Whether this EXTEND batch's attention runs on ``dense_extend_attention``."""
        if self.dense_prefill is False or batch.is_decode or not batch.extend_lens_cpu:
            return False
        block = self.dense_block
        for n, prefix in zip(batch.extend_lens_cpu, batch.prefix_lens_cpu, strict=True):
            if n == 0 or n % block or prefix % block:
                return False
        if self.dense_prefill:
            return True
        return (
            self._dense_auto(q.dtype, q.shape[-1], q.device)
            and not torch.cuda.is_current_stream_capturing()
        )

    def _dense_auto(self, dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
        """The auto rule's static part: half precision, head_dim <= 128, cuDNN on the GPU."""
        if dtype not in (torch.bfloat16, torch.float16) or head_dim > 128:
            return False
        if device not in self._cudnn:
            self._cudnn[device] = cudnn_available(device)
        return self._cudnn[device]

    def prebuild_dense(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        chunk: int,
        max_len: int,
    ) -> int:
        """Build now the cuDNN graphs that full ``chunk``-token prefill chunks will take on the
        dense path, for every prefix up to ``max_len`` (see ``dense_attention.prebuild``).
        Only where the auto rule would send such chunks there; returns the graphs' count."""
        if self.dense_prefill is False or chunk % self.dense_block or chunk > max_len:
            return 0
        if self.dense_prefill is None and not self._dense_auto(dtype, head_dim, device):
            return 0
        return prebuild_dense(
            num_q_heads, num_kv_heads, head_dim, dtype, device, chunk, max_len, head_dim**-0.5
        )

    # ---------------------------------------------------------------- per step

    def prepare(self, batch: ForwardBatch) -> None:
        if batch.is_decode:
            max_seq_len = max(batch.seq_lens_cpu, default=0)
            splits = self.num_kv_splits_for(
                batch.batch_size, batch.kv_pool.num_kv_heads, max_seq_len, batch.kv_pool.device
            )
            batch.attn_metadata = TritonAttentionMetadata(is_decode=True, num_kv_splits=splits)
            return
        starts = None
        if batch.extend_starts is None:
            # Offsets of each sequence's first new token in q: a prefix sum of the extend lens.
            offsets = [0]
            for n in batch.extend_lens_cpu[:-1]:
                offsets.append(offsets[-1] + n)
            starts = torch.tensor(offsets, dtype=torch.int32).to(
                batch.seq_lens.device, non_blocking=True
            )
        batch.attn_metadata = TritonAttentionMetadata(
            is_decode=False,
            max_extend_len=max(batch.extend_lens_cpu, default=0),
            extend_starts=starts,
            max_seq_len=max(batch.seq_lens_cpu, default=0),
        )

    # ---------------------------------------------------------------- CUDA graphs

    def init_cuda_graph_state(
        self,
        max_batch_size: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_context_len: int,
        device: torch.device | str,
    ) -> None:
        """Fix the decode split count of every batch size 1..max_batch_size (chosen for the
        longest context a replay may see; shorter sequences cut their keys into shorter splits
        on the device) and reserve scratch for all of them, then freeze the scratch so that no
        captured address is ever freed. An eager decode that would need more split rows (a
        batch larger than ``max_batch_size``) then runs with fewer splits instead."""
        device = torch.device(device)
        self._graph_splits = {
            bs: self.num_kv_splits_for(bs, num_kv_heads, max_context_len, device)
            for bs in range(1, max_batch_size + 1)
        }
        rows = max(bs * s for bs, s in self._graph_splits.items())
        self._decode_scratch.frozen = False
        self._decode_scratch.ensure(rows, num_q_heads, head_dim, device)
        self._decode_scratch.frozen = True

    def graph_num_kv_splits(self, batch_size: int) -> int:
        """The split count captured for ``batch_size`` (after ``init_cuda_graph_state``)."""
        try:
            return self._graph_splits[batch_size]
        except KeyError:
            raise ValueError(
                f"batch size {batch_size} was not reserved by init_cuda_graph_state"
            ) from None

    def prepare_graph(self, batch: ForwardBatch) -> None:
        """``prepare`` for capturing or replaying a decode batch: the split count is the one
        fixed for its batch size; nothing is read from the host lists."""
        if not batch.is_decode:
            raise ValueError("CUDA graphs are captured for decode batches only")
        splits = self.graph_num_kv_splits(int(batch.seq_lens.shape[0]))
        batch.attn_metadata = TritonAttentionMetadata(
            is_decode=True, num_kv_splits=splits, graph=True
        )

    def reserve_extend_scratch(
        self,
        num_tokens: int,
        num_kv_splits: int,
        *,
        num_q_heads: int,
        head_dim: int,
        device: torch.device | str,
        freeze: bool = True,
    ) -> None:
        """Reserve extend scratch for ``num_tokens`` new tokens (rows of q) x ``num_kv_splits``
        splits; call it for every extend shape to be captured (or once with the largest
        product) before capturing. ``freeze`` keeps the scratch's address fixed from then on;
        an eager extend that would need more then runs with fewer splits instead."""
        device = torch.device(device)
        self._extend_scratch.frozen = False
        self._extend_scratch.ensure(num_tokens * num_kv_splits, num_q_heads, head_dim, device)
        self._extend_scratch.frozen = freeze

    def prepare_extend_graph(
        self, batch: ForwardBatch, max_extend_len: int, num_kv_splits: int
    ) -> None:
        """``prepare`` for capturing or replaying an extend batch: the grid bound
        ``max_extend_len`` and the split count (``extend_splits_for``) are the ones fixed for
        the captured shape; nothing is read from the host lists. The batch must carry
        ``extend_lens`` / ``prefix_lens`` / ``extend_starts`` tensors."""
        if batch.is_decode:
            raise ValueError("prepare_extend_graph takes EXTEND batches; use prepare_graph")
        if batch.extend_lens is None or batch.prefix_lens is None or batch.extend_starts is None:
            raise ValueError("a captured EXTEND batch needs extend_lens, prefix_lens and starts")
        if num_kv_splits < 1:
            raise ValueError(f"num_kv_splits must be >= 1; got {num_kv_splits}")
        batch.attn_metadata = TritonAttentionMetadata(
            is_decode=False, max_extend_len=max_extend_len, extend_kv_splits=num_kv_splits
        )

    # ---------------------------------------------------------------- scratch

    def decode_scratch_views(
        self, batch_size: int, num_q_heads: int, head_dim: int, num_kv_splits: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Views [B, Hq, S, D] and [B, Hq, S] of the persistent scratch (grown if needed)."""
        return self._decode_scratch.views(batch_size, num_q_heads, head_dim, num_kv_splits, device)

    def extend_scratch_views(
        self, num_tokens: int, num_q_heads: int, head_dim: int, num_kv_splits: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Views [T, Hq, S, D] and [T, Hq, S] of the persistent extend scratch (grown if
        needed and not frozen)."""
        return self._extend_scratch.views(num_tokens, num_q_heads, head_dim, num_kv_splits, device)

    @staticmethod
    def _splits_that_fit(
        scratch: _SplitScratch, splits: int, rows: int, num_q_heads: int, head_dim: int,
        device: torch.device,
    ) -> int:  # fmt: skip
        """``splits``, unless ``scratch`` is frozen (captured graphs hold its address, so it
        is never reallocated) and too small for ``rows`` x ``splits``: then the most splits it
        holds (>= 2), or 1 (the single-split kernel, no scratch)."""
        if splits == 1 or not scratch.frozen:
            return splits
        if scratch.fits(rows * splits, num_q_heads, head_dim, device):
            return splits
        fit = min(splits, scratch.rows // max(rows, 1))
        if fit >= 2 and scratch.fits(rows * fit, num_q_heads, head_dim, device):
            return fit
        return 1

    def _extend_splits_that_fit(
        self, splits: int, num_tokens: int, num_q_heads: int, head_dim: int,
        device: torch.device,
    ) -> int:  # fmt: skip
        """Extend splits that the (possibly frozen) extend scratch holds; see
        ``_splits_that_fit``."""
        return self._splits_that_fit(
            self._extend_scratch, splits, num_tokens, num_q_heads, head_dim, device
        )

    def _decode_splits_that_fit(
        self, splits: int, batch_size: int, num_q_heads: int, head_dim: int,
        device: torch.device,
    ) -> int:  # fmt: skip
        """Decode splits that the (possibly frozen) decode scratch holds: an eager step larger
        than the captured batch sizes (frozen by ``init_cuda_graph_state``) runs with fewer
        splits instead of reallocating the scratch; see ``_splits_that_fit``."""
        return self._splits_that_fit(
            self._decode_scratch, splits, batch_size, num_q_heads, head_dim, device
        )

    # ---------------------------------------------------------------- attention

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        batch: ForwardBatch,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the new queries over the pool; ``out`` (optional) receives it."""
        meta = batch.attn_metadata
        if not isinstance(meta, TritonAttentionMetadata) or meta.is_decode != batch.is_decode:
            self.prepare(batch)
            meta = batch.attn_metadata
        if q.stride(-1) != 1:
            q = q.contiguous()
        if out is None:
            out = torch.empty_like(q)
        k_buf = batch.kv_pool.k_buffer(layer)
        v_buf = batch.kv_pool.v_buffer(layer)
        page_size = batch.page_size

        if batch.is_decode:
            splits = meta.num_kv_splits
            if not meta.graph:
                # Eager: never reallocate frozen scratch; take fewer splits (kept in the
                # metadata for the step's other layers).
                splits = self._decode_splits_that_fit(
                    splits, q.shape[0], q.shape[1], q.shape[2], q.device
                )
                meta.num_kv_splits = splits
            mid_o = mid_lse = None
            if splits > 1:
                mid_o, mid_lse = self.decode_scratch_views(
                    q.shape[0], q.shape[1], q.shape[2], splits, q.device
                )
            return decode_attention(
                q, k_buf, v_buf, out, batch.block_table, batch.seq_lens, scale, splits,
                page_size=page_size, mid_o=mid_o, mid_lse=mid_lse, config=self.decode_config,
            )  # fmt: skip

        if batch.extend_lens is None or batch.prefix_lens is None:
            raise ValueError("an EXTEND batch needs extend_lens and prefix_lens tensors")
        if self.use_dense_prefill(q, batch):
            return dense_extend_attention(
                q, k_buf, v_buf, out, batch.block_table, batch.prefix_lens_cpu,
                batch.extend_lens_cpu, scale, page_size=page_size,
            )  # fmt: skip
        starts = batch.extend_starts if batch.extend_starts is not None else meta.extend_starts
        num_tokens, num_q_heads, head_dim = q.shape
        splits = meta.extend_kv_splits
        if splits is None:
            splits = self.extend_splits_for(
                int(batch.seq_lens.shape[0]), meta.max_extend_len, meta.max_seq_len,
                num_q_heads=num_q_heads, num_kv_heads=k_buf.shape[1], head_dim=head_dim,
                dtype=q.dtype, device=q.device,
            )  # fmt: skip
            splits = self._extend_splits_that_fit(
                splits, num_tokens, num_q_heads, head_dim, q.device
            )
            meta.extend_kv_splits = splits
        mid_o = mid_lse = None
        config = self.extend_config
        if splits == 1 and self._extend_scratch.fits(num_tokens, num_q_heads, head_dim, q.device):
            # The packed one pass's float32 results go to the split scratch where it already
            # holds them (a captured short extend then allocates nothing); a long extend gets
            # them from the call instead of growing the persistent scratch to its size. The
            # per-head kernel leaves the scratch alone.
            mid_o, mid_lse = self.extend_scratch_views(
                num_tokens, num_q_heads, head_dim, 1, q.device
            )
        if splits > 1:
            mid_o, mid_lse = self.extend_scratch_views(
                num_tokens, num_q_heads, head_dim, splits, q.device
            )
            config = self.split_extend_config(
                head_dim, q.dtype, meta.max_extend_len, num_q_heads // k_buf.shape[1]
            )
        return extend_attention(
            q, k_buf, v_buf, out, batch.block_table, batch.seq_lens, batch.extend_lens, starts,
            batch.prefix_lens, scale, meta.max_extend_len, page_size=page_size, config=config,
            num_kv_splits=splits, mid_o=mid_o, mid_lse=mid_lse,
        )  # fmt: skip
