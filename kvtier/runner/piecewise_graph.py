"""Per-layer CUDA graphs for short EXTEND steps (a new turn after a cache hit, a small prefill).

An eager forward of a 48-layer MoE model issues ~75 kernels per layer from Python: ~110 ms of
host time, whatever the number of tokens. For a prompt served from the cache (64 new tokens
after an 80K prefix) that host time, not the GPU, sets the time to first token. Here each decoder
layer of each (token bucket, batch bucket) is captured once as its own graph over static
buffers; a step copies its inputs in and replays 48 graphs. One graph per layer, not one for the
whole model, because a step that loads its prefix from a lower tier must wait for layer i's
pages before running layer i: the host makes the stream wait on the load's event i between
replays, so loading layer i + 1 still overlaps computing layer i. (Measured on an H200: the
GPU-hit TTFT of an 80K-token prompt went from 113.9 ms eager to 35.5 ms.)

Padding. A step of T tokens in B sequences runs in the smallest bucket (Tg >= T, Bg >= B).
Sequence slots B..Bg-1 get no tokens (extend length 0: their attention programs exit at once).
The Tg - T padding tokens belong to one extra slot (index Bg) with no prefix, whose block table
row is all page 0: they write their K/V to slot 0 of the reserved page 0 and attend over page 0,
so every value they touch is finite and no real sequence reads what they write. Embedding, RoPE
positions and the logits run eagerly (a handful of kernels).

All graphs share one memory pool and one hidden-state buffer (with its residual stream), updated
in place by each layer's graph: they are replayed in capture order, one at a time.
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

# Sequence-count buckets: short extends usually come one or a few at a time (new turns).
BATCH_BUCKETS = (1, 2, 4)
# Down to one token: a prompt found whole in the cache recomputes only its last token, and a
# 16-token bucket would run the MoE experts for 15 padding tokens too (on an H200 that was
# ~190 us a layer against ~27 for one token, most of a 1K-token GPU hit's 16 ms).
MIN_TOKEN_BUCKET = 1


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two from 1 below ``max_tokens``, then ``max_tokens`` itself."""
    sizes: list[int] = []
    t = MIN_TOKEN_BUCKET
    while t < max_tokens:
        sizes.append(t)
        t *= 2
    return [*sizes, max_tokens]


class PiecewiseGraphRunner:
    """EXTEND steps of at most ``max_tokens`` tokens in at most ``max_bs`` sequences through
    per-layer graphs. With ``capture=False`` the same padded static batches run eagerly, layer
    by layer: that is how the padding is tested on machines without CUDA. ``graph_metadata``
    (default: ``capture``) gives the attention backend the captured form of the metadata (grid
    and split-KV count fixed per bucket, lengths read from the static buffers), which the
    Triton backend can also run eagerly, under Triton's interpreter on a CPU."""

    def __init__(
        self,
        runner: ModelRunner,
        max_tokens: int,
        max_bs: int,
        max_pages: int,
        capture: bool = True,
        graph_metadata: bool | None = None,
    ) -> None:
        self.model = runner.model
        self.pool = runner.kv_pool
        self.backend = runner.attn_backend
        self.capture_enabled = capture
        self.graph_metadata = capture if graph_metadata is None else graph_metadata
        self.token_sizes = token_buckets(max_tokens)
        top = min(max_bs, BATCH_BUCKETS[-1])
        self.batch_sizes = [b for b in BATCH_BUCKETS if b < top] + [top]
        self.max_tokens = max_tokens
        self.max_bs = self.batch_sizes[-1]
        # Wide enough for every real sequence and for the padding sequence, whose (up to
        # max_tokens) tokens all map to page 0 through this table: a narrower row would let
        # the attention kernel read past it.
        ps = self.pool.page_size
        self.max_pages = max(max_pages, (max_tokens + ps - 1) // ps)
        cfg = runner.model_config
        dev = self.pool.device
        slots = self.max_bs + 1  # + the padding sequence
        self.hidden = torch.zeros(max_tokens, cfg.hidden_size, dtype=runner.dtype, device=dev)
        self.residual = torch.zeros_like(self.hidden)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(slots, dtype=torch.int32, device=dev)
        self.extend_lens = torch.zeros(slots, dtype=torch.int32, device=dev)
        self.prefix_lens = torch.zeros(slots, dtype=torch.int32, device=dev)
        self.extend_starts = torch.zeros(slots, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros((slots, self.max_pages), dtype=torch.int32, device=dev)
        self.logits_indices = torch.zeros(1, dtype=torch.int64, device=dev)
        self.graphs: dict[tuple[int, int], list[torch.cuda.CUDAGraph]] = {}
        self.splits: dict[tuple[int, int], int] = {}
        if self.graph_metadata:
            self._reserve_attention_state(runner)
        if capture:
            self._capture_all()

    # ---------------------------------------------------------------- static batches

    def _static_batch(
        self, tokens: int, bs: int, host: tuple[list[int], list[int], list[int]] | None = None
    ) -> ForwardBatch:
        """The batch of bucket (tokens, bs): bs sequence slots plus the padding slot. ``host``:
        the (seq, extend, prefix) length lists of the slots, for backends that read them (the
        torch reference); by default every slot may hold ``tokens`` new tokens, which is all
        the Triton backend reads (to size its grid)."""
        slots = bs + 1
        seq_cpu, ext_cpu, pre_cpu = host or ([tokens] * slots, [tokens] * slots, [0] * slots)
        fb = ForwardBatch(
            mode=ForwardMode.EXTEND,
            input_ids=self.input_ids[:tokens],
            positions=self.positions[:tokens],
            out_cache_loc=self.out_cache_loc[:tokens],
            seq_lens=self.seq_lens[:slots],
            block_table=self.block_table[:slots],
            logits_indices=self.logits_indices,
            kv_pool=self.pool,
            attn_backend=self.backend,
            seq_lens_cpu=seq_cpu,
            extend_lens_cpu=ext_cpu,
            prefix_lens_cpu=pre_cpu,
            extend_lens=self.extend_lens[:slots],
            prefix_lens=self.prefix_lens[:slots],
            extend_starts=self.extend_starts[:slots],
        )
        if self.graph_metadata:
            # Grid and split count fixed for the bucket; lengths are read on the device.
            self.backend.prepare_extend_graph(  # type: ignore[attr-defined]
                fb, max_extend_len=tokens, num_kv_splits=self.splits[(tokens, bs)]
            )
        else:
            self.backend.prepare(fb)
        return fb

    def _fill(self, batch: ForwardBatch | None, tokens: int, bs: int) -> None:
        """Copy a step's metadata into the static buffers of bucket (tokens, bs); with no batch,
        a capture-time filler: every token in the padding slot."""
        t = batch.num_tokens if batch is not None else 0
        b = batch.batch_size if batch is not None else 0
        if batch is not None:
            self.out_cache_loc[:t].copy_(batch.out_cache_loc)
            assert batch.extend_lens is not None and batch.prefix_lens is not None
            assert batch.extend_starts is not None
            self.seq_lens[:b].copy_(batch.seq_lens)
            self.extend_lens[:b].copy_(batch.extend_lens)
            self.prefix_lens[:b].copy_(batch.prefix_lens)
            self.extend_starts[:b].copy_(batch.extend_starts)
            self.block_table[:b, : batch.block_table.shape[1]].copy_(batch.block_table)
        self.out_cache_loc[t:tokens].zero_()
        # Unused slots b..bs-1 take no tokens; slot bs is the padding sequence.
        self.seq_lens[b:bs].zero_()
        self.extend_lens[b:bs].zero_()
        self.prefix_lens[b:bs].zero_()
        self.extend_starts[b:bs].fill_(t)
        pad = tokens - t
        self.seq_lens[bs].fill_(pad)
        self.extend_lens[bs].fill_(pad)
        self.prefix_lens[bs].zero_()
        self.extend_starts[bs].fill_(t)
        self.block_table[bs].zero_()

    # ---------------------------------------------------------------- capture

    def _reserve_attention_state(self, runner: ModelRunner) -> None:
        """Fix each bucket's split-KV count for the longest context a replay may see (a
        short extend over a long prefix needs splits to fill the GPU; shorter contexts cut
        their keys into shorter splits on the device) and reserve the scratch of the largest."""
        cfg = runner.model_config
        heads = {
            "num_q_heads": cfg.num_attention_heads,
            "num_kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
        }
        context = self.max_pages * self.pool.page_size
        for tokens in self.token_sizes:
            for bs in self.batch_sizes:
                self.splits[(tokens, bs)] = self.backend.extend_splits_for(  # type: ignore[attr-defined]
                    bs, tokens, context, **heads, dtype=runner.dtype, device=self.pool.device
                )
        # Scratch is counted in (token x split) rows: the largest bucket's product covers all.
        rows = max(t * s for (t, _), s in self.splits.items())
        self.backend.reserve_extend_scratch(  # type: ignore[attr-defined]
            rows, 1, num_q_heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
            device=self.pool.device,
        )  # fmt: skip

    def _run_layer(self, index: int, tokens: int, fb: ForwardBatch) -> None:
        # RoPE input over the static positions: no kernel, so nothing of it is captured.
        rope = self.model.rope(self.positions[:tokens])
        x, residual = self.hidden[:tokens], self.residual[:tokens]
        # A layer returns (MLP output, residual stream); the first takes the embeddings alone.
        out, res = self.model.decoder_layers[index](x, residual if index else None, rope, fb)
        x.copy_(out)
        residual.copy_(res)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.pool.device)
        layers = self.model.decoder_layers
        # Largest first: smaller graphs then fit in the memory the larger ones freed.
        for tokens in reversed(self.token_sizes):
            for bs in reversed(self.batch_sizes):
                if not self._reachable(tokens, bs):
                    continue
                fb = self._static_batch(tokens, bs)
                self._fill(None, tokens, bs)
                graphs: list[torch.cuda.CUDAGraph] = []
                for index in range(len(layers)):
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        for _ in range(2):  # compiles kernels and settles allocations
                            self._run_layer(index, tokens, fb)
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self._run_layer(index, tokens, fb)
                    graphs.append(graph)
                self.graphs[(tokens, bs)] = graphs
        torch.cuda.synchronize()
        logger.info(
            "captured per-layer CUDA graphs for extends of up to %d tokens in %s sequences "
            "(token buckets %s; attention splits %s)",
            self.max_tokens,
            self.batch_sizes,
            self.token_sizes,
            sorted(set(self.splits.values())),
        )

    def _reachable(self, tokens: int, bs: int) -> bool:
        """Whether some step lands in bucket (tokens, bs): every sequence of an EXTEND step has
        at least one new token, so a step of b sequences has t >= b tokens, and the fewest
        sequences that round up to ``bs`` is one more than the next smaller batch bucket."""
        index = self.batch_sizes.index(bs)
        fewest = self.batch_sizes[index - 1] + 1 if index else 1
        return tokens >= fewest

    # ---------------------------------------------------------------- replay

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            not batch.is_decode
            and batch.num_tokens <= self.max_tokens
            and batch.batch_size <= self.max_bs
            and batch.block_table.shape[1] <= self.max_pages
        )

    def bucket(self, num_tokens: int, batch_size: int) -> tuple[int, int]:
        """The (tokens, bs) bucket a step of that many tokens and sequences replays."""
        tokens = self.token_sizes[bisect.bisect_left(self.token_sizes, num_tokens)]
        return tokens, self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch_size)]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits of an EXTEND batch (rows ``batch.logits_indices``)."""
        t, b = batch.num_tokens, batch.batch_size
        tokens, bs = self.bucket(t, b)
        self.hidden[:t].copy_(self.model.embed(batch.input_ids))
        self.positions[:t].copy_(batch.positions)
        self._fill(batch, tokens, bs)
        if self.capture_enabled:
            for i, graph in enumerate(self.graphs[(tokens, bs)]):
                if batch.wait_layer is not None:
                    batch.wait_layer(i)
                graph.replay()
        else:
            empty, pad = [0] * (bs - b), [tokens - t]
            host = (
                batch.seq_lens_cpu + empty + pad,
                batch.extend_lens_cpu + empty + pad,
                batch.prefix_lens_cpu + empty + [0],
            )
            fb = self._static_batch(tokens, bs, None if self.graph_metadata else host)
            for i in range(len(self.model.decoder_layers)):
                if batch.wait_layer is not None:
                    batch.wait_layer(i)
                self._run_layer(i, tokens, fb)
        return self.model.logits(self.hidden[:t], batch.logits_indices, self.residual[:t])
