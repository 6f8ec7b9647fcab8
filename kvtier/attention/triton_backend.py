"""Attention backend on the Triton kernels of ``kvtier.kernels.attention``.

EXTEND batches go to the paged causal extend kernel; DECODE batches to split-KV decode. Decode
keeps its stage-1 scratch in persistent buffers owned by the backend, so that a CUDA-graph
runner can capture ``attend``: it calls ``init_cuda_graph_state`` once (which reserves the
scratch for every batch size it will capture and freezes it), then ``prepare_graph`` instead of
``prepare`` before capture and before each replay. Under capture ``attend`` never allocates
scratch, syncs, or reads the host lists; the runner keeps ``seq_lens`` / ``block_table`` /
``q`` in static tensors and may pass a static ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.attention.backend import AttentionBackend
from kvtier.kernels.attention import (
    KernelConfig,
    choose_num_kv_splits,
    decode_attention,
    extend_attention,
)
from kvtier.runner.forward_batch import ForwardBatch


@dataclass
class TritonAttentionMetadata:
    """Per-step launch parameters, computed on the host in ``prepare``."""

    is_decode: bool
    num_kv_splits: int = 1  # decode
    max_extend_len: int = 0  # extend: sizes the grid
    extend_starts: torch.Tensor | None = None  # extend: [B] int32, when the batch lacks them


class TritonAttention(AttentionBackend):
    """Triton paged attention.

    Args:
        max_kv_splits: most decode splits per sequence (bounds the scratch).
        min_split_len: fewest keys per decode split the heuristic will choose.
        num_sms: multiprocessors to fill (default: read off the device; 132 on CPU).
        extend_config / decode_config: tile overrides (default: the kernels' heuristics).
    """

    def __init__(
        self,
        max_kv_splits: int = 32,
        *,
        min_split_len: int = 128,
        num_sms: int | None = None,
        extend_config: KernelConfig | None = None,
        decode_config: KernelConfig | None = None,
    ) -> None:
        if max_kv_splits < 1:
            raise ValueError(f"max_kv_splits must be >= 1; got {max_kv_splits}")
        self.max_kv_splits = max_kv_splits
        self.min_split_len = min_split_len
        self._num_sms = num_sms
        self.extend_config = extend_config
        self.decode_config = decode_config
        # Decode scratch, flat so one allocation serves every (batch, splits) shape: capacity is
        # counted in "split rows" (batch * splits). Replaced only while not frozen, since a
        # captured graph holds its address.
        self._mid_o: torch.Tensor | None = None  # [rows * Hq * D] fp32
        self._mid_lse: torch.Tensor | None = None  # [rows * Hq] fp32
        self._scratch_key: tuple[torch.device, int, int] | None = None  # (device, Hq, D)
        self._scratch_rows = 0
        self._scratch_frozen = False
        # CUDA-graph state: split count per captured batch size.
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
        captured address is ever freed."""
        device = torch.device(device)
        self._graph_splits = {
            bs: self.num_kv_splits_for(bs, num_kv_heads, max_context_len, device)
            for bs in range(1, max_batch_size + 1)
        }
        rows = max(bs * s for bs, s in self._graph_splits.items())
        self._scratch_frozen = False
        self._ensure_scratch(rows, num_q_heads, head_dim, device)
        self._scratch_frozen = True

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
        batch.attn_metadata = TritonAttentionMetadata(is_decode=True, num_kv_splits=splits)

    # ---------------------------------------------------------------- scratch

    def _ensure_scratch(
        self, rows: int, num_q_heads: int, head_dim: int, device: torch.device
    ) -> None:
        if device.type == "cuda" and device.index is None:
            # "cuda" and "cuda:0" must name the same scratch (the pool may say "cuda").
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, num_q_heads, head_dim)
        if self._scratch_key == key and self._scratch_rows >= rows:
            return
        if self._scratch_frozen:
            raise RuntimeError(
                f"decode scratch is frozen for CUDA graphs at {self._scratch_rows} split rows "
                f"(key {self._scratch_key}); this step needs {rows} for key {key}: reserve it in "
                "init_cuda_graph_state"
            )
        if self._scratch_key == key:
            rows = max(rows, self._scratch_rows)
        self._mid_o = torch.empty(rows * num_q_heads * head_dim, dtype=torch.float32, device=device)
        self._mid_lse = torch.empty(rows * num_q_heads, dtype=torch.float32, device=device)
        self._scratch_key = key
        self._scratch_rows = rows

    def decode_scratch_views(
        self, batch_size: int, num_q_heads: int, head_dim: int, num_kv_splits: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Views [B, Hq, S, D] and [B, Hq, S] of the persistent scratch (grown if needed)."""
        self._ensure_scratch(batch_size * num_kv_splits, num_q_heads, head_dim, device)
        assert self._mid_o is not None and self._mid_lse is not None
        n = batch_size * num_q_heads * num_kv_splits
        mid_o = self._mid_o[: n * head_dim].view(batch_size, num_q_heads, num_kv_splits, head_dim)
        mid_lse = self._mid_lse[:n].view(batch_size, num_q_heads, num_kv_splits)
        return mid_o, mid_lse

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
        starts = batch.extend_starts if batch.extend_starts is not None else meta.extend_starts
        return extend_attention(
            q, k_buf, v_buf, out, batch.block_table, batch.seq_lens, batch.extend_lens, starts,
            batch.prefix_lens, scale, meta.max_extend_len, page_size=page_size,
            config=self.extend_config,
        )  # fmt: skip
