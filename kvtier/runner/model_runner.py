"""Owns the model, the GPU KV pool and the attention backend; runs one ForwardBatch."""

from __future__ import annotations

import logging

import torch

from kvtier.attention.backend import AttentionBackend
from kvtier.cache.kv_pool import KVPool
from kvtier.models import ResolvedModel, load_model, resolve_dtype
from kvtier.models.layers import FusedExperts
from kvtier.runner.cuda_graph import CudaGraphRunner
from kvtier.runner.forward_batch import ForwardBatch
from kvtier.runner.piecewise_graph import PiecewiseGraphRunner
from kvtier.server_args import ServerArgs, ServerArgsError

logger = logging.getLogger(__name__)

# KV pool size on CPU when --max-total-tokens is not given (there is no memory to profile).
CPU_DEFAULT_KV_TOKENS = 32768


def make_attention_backend(
    name: str, device: torch.device, prefill: str = "auto", max_kv_splits: int = 64
) -> AttentionBackend:
    """The backend named by --attention-backend; ``prefill`` (--prefill-attention-backend) picks
    the Triton backend's path for long prefill chunks, ``max_kv_splits``
    (--triton-attention-num-kv-splits) bounds its decode splits."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from kvtier.attention.torch_backend import TorchAttention

        return TorchAttention()
    from kvtier.attention.triton_backend import TritonAttention

    dense = {"auto": None, "triton": False, "cudnn": True}[prefill]
    return TritonAttention(max_kv_splits, dense_prefill=dense)


class ModelRunner:
    def __init__(self, args: ServerArgs, resolved: ResolvedModel) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.model_config = config = resolved.config
        self.dtype = resolve_dtype(args.dtype, config, self.device)
        self.model = load_model(
            resolved, args.load_format, self.dtype, self.device, args.random_seed
        )
        self.vocab_size = config.vocab_size
        self.eos_token_ids = list(config.eos_token_ids)
        self.context_length = args.context_length or config.max_position_embeddings
        self.kv_pool = KVPool(
            num_pages=self._num_pages(),
            page_size=args.page_size,
            num_layers=config.num_hidden_layers,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.attn_backend = make_attention_backend(
            args.attention_backend,
            self.device,
            args.prefill_attention_backend,
            args.triton_attention_num_kv_splits,
        )
        ps = args.page_size
        # Columns of the request-to-page table: a request never outgrows the context or the pool.
        self.max_pages_per_req = (
            min((self.context_length + ps - 1) // ps, self.kv_pool.num_pages) + 1
        )
        self.graph_runner: CudaGraphRunner | None = None
        self.piecewise_runner: PiecewiseGraphRunner | None = None
        if self.device.type == "cuda" and not args.disable_cuda_graph and self._graphs_possible():
            max_bs = min(args.cuda_graph_max_bs, args.max_running_requests)
            self.graph_runner = CudaGraphRunner(self, max_bs, self.max_pages_per_req)
            if args.piecewise_cuda_graph_max_tokens > 0:
                self.piecewise_runner = PiecewiseGraphRunner(
                    self,
                    args.piecewise_cuda_graph_max_tokens,
                    args.max_running_requests,
                    self.max_pages_per_req,
                )
        logger.info(
            "KV pool: %d pages of %d tokens (%.2f GB), %d bytes per token",
            self.kv_pool.num_pages - 1,
            args.page_size,
            self.kv_pool.num_slots * self.kv_pool.token_bytes / 1e9,
            self.kv_pool.token_bytes,
        )

    def _graphs_possible(self) -> bool:
        """CUDA graphs need the Triton attention backend (the torch one reads host lists) and no
        host sync in the model: MoE experts run as grouped GEMMs only in bfloat16; other dtypes
        take a per-expert loop that reads the expert counts on the host."""
        from kvtier.attention.triton_backend import TritonAttention

        if not isinstance(self.attn_backend, TritonAttention):
            return False
        has_moe = any(isinstance(m, FusedExperts) for m in self.model.modules())
        if has_moe and self.dtype != torch.bfloat16:
            logger.info("CUDA graphs off: MoE experts in %s run a host-synced loop", self.dtype)
            return False
        return True

    def _num_pages(self) -> int:
        cfg, ps = self.model_config, self.args.page_size
        token_bytes = KVPool.bytes_per_token(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, self.dtype
        )
        if self.args.max_total_tokens is not None:
            tokens = self.args.max_total_tokens
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                if tokens * token_bytes > free:
                    raise ServerArgsError(
                        f"--max-total-tokens {tokens} needs {tokens * token_bytes / 1e9:.1f} GB of "
                        f"KV memory; {free / 1e9:.1f} GB are free on {self.device}"
                    )
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * self.args.mem_fraction_static - (total - free)
            tokens = int(budget // token_bytes)
            if tokens < 4 * ps:
                raise ServerArgsError(
                    f"--mem-fraction-static {self.args.mem_fraction_static} leaves no room for "
                    f"the KV cache after the weights ({(total - free) / 1e9:.1f} GB in use of "
                    f"{total / 1e9:.1f} GB); raise it"
                )
        else:
            tokens = CPU_DEFAULT_KV_TOKENS
        if tokens < ps:
            raise ServerArgsError(f"--max-total-tokens {tokens} is less than one page ({ps})")
        return tokens // ps + 1  # page 0 is reserved

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [len(batch.logits_indices), vocab]."""
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.run(batch)
        if self.piecewise_runner is not None and self.piecewise_runner.can_run(batch):
            return self.piecewise_runner.run(batch)
        self.attn_backend.prepare(batch)
        return self.model(batch)
