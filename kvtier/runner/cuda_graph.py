"""CUDA graphs for decode: one graph per batch size bucket, replayed with padded inputs.

An eager decode step of a 48-layer model launches thousands of small kernels; the host, not the
GPU, then sets the pace. Each bucket's graph is captured once over static input buffers; a step
copies its inputs into them (padding the rows past its batch size so they write to the
reserved page 0 and attend to it only) and replays the graph that fits.

All graphs share one memory pool. The attention backend fixes its split counts and scratch for
every captured size (``init_cuda_graph_state``) so no captured address ever moves.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

import torch

from kvtier.runner.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from kvtier.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def graph_batch_sizes(max_bs: int) -> list[int]:
    sizes = [b for b in BUCKETS if b < max_bs]
    return [*sizes, max_bs]


class CudaGraphRunner:
    """Decode through captured graphs. With ``capture=False`` the same padded static batches
    run eagerly: that is how the padding logic is tested on machines without CUDA."""

    def __init__(self, runner: ModelRunner, max_bs: int, max_pages: int, capture: bool = True):
        self.model = runner.model
        self.pool = runner.kv_pool
        self.backend = runner.attn_backend
        self.capture_enabled = capture
        self.batch_sizes = graph_batch_sizes(max_bs)
        self.max_bs = max_bs
        dev = self.pool.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros((max_bs, max_pages), dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(max_bs, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            cfg = runner.model_config
            self.backend.init_cuda_graph_state(  # type: ignore[attr-defined]
                max_bs,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
                max_pages * self.pool.page_size,
                dev,
            )
            self._capture_all()

    def _static_batch(self, bs: int, seq_lens_cpu: list[int]) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            seq_lens=self.seq_lens[:bs],
            block_table=self.block_table[:bs],
            logits_indices=self.logits_indices[:bs],
            kv_pool=self.pool,
            attn_backend=self.backend,
            seq_lens_cpu=seq_lens_cpu,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.pool.device)
        # Largest first: smaller graphs then fit in the memory the larger ones freed.
        for bs in reversed(self.batch_sizes):
            fb = self._static_batch(bs, [1] * bs)
            self.backend.prepare_graph(fb)  # type: ignore[attr-defined]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles kernels and settles allocations
                    self.model(fb)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[bs] = self.model(fb)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.is_decode
            and batch.batch_size <= self.max_bs
            and batch.block_table.shape[1] <= self.block_table.shape[1]
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [batch_size, vocab] of a decode batch."""
        bs = batch.batch_size
        gbs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        if batch.wait_layer is not None:
            # A graph cannot wait layer by layer: wait for the whole load (events are recorded
            # in layer order on one stream, so the last implies the others).
            batch.wait_layer(self.pool.num_layers - 1)
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        pages = batch.block_table.shape[1]
        self.block_table[:bs, :pages].copy_(batch.block_table)
        if gbs > bs:
            # Padding rows: one token at slot 0 of the reserved page 0.
            self.input_ids[bs:gbs].zero_()
            self.positions[bs:gbs].zero_()
            self.out_cache_loc[bs:gbs].zero_()
            self.seq_lens[bs:gbs].fill_(1)
            self.block_table[bs:gbs, 0].zero_()
        if self.capture_enabled:
            self.graphs[gbs].replay()
            return self.outputs[gbs][:bs]
        fb = self._static_batch(gbs, batch.seq_lens_cpu + [1] * (gbs - bs))
        self.backend.prepare(fb)
        return self.model(fb)[:bs]
