"""Building blocks shared by the model files: norms, RoPE, fused projections, attention, MLPs,
the MoE block, and the loader that maps Hugging Face weight names onto fused parameters.

Tensors inside a model are token-major with no batch dimension: the hidden states of all
sequences of a step are concatenated into ``[T, hidden]`` (see ForwardBatch).
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvtier.kernels import fused, fused_moe, gemv, grouped_moe, moe_block
from kvtier.models.config import ModelConfig, RopeScaling
from kvtier.runner.forward_batch import ForwardBatch

# Read once at import (see normed_linear, SparseMoeBlock): switches for A/B runs.
NORM_IN_GEMV: bool = os.environ.get("KVTIER_NORM_GEMV", "1") != "0"


class WeightLoadError(ValueError):
    """A checkpoint does not match the model: unexpected, missing or mis-shaped weights."""


# ---------------------------------------------------------------------------- norms, activations
class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 and cast back before the weight (the
    order HF uses, so bf16 outputs round identically)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel on CUDA; the same ops, in the same order, elsewhere.
        return fused.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``, the sum rounded to x's dtype first (as the
        separate add would): one kernel on CUDA instead of an add and a norm."""
        return fused.fused_add_rms_norm(x, residual, self.weight, self.eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dim."""
    return fused.silu_and_mul(x)


# ---------------------------------------------------------------------------- rotary embedding
def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, with the config's scaling applied."""
    # Explicitly on the CPU: models are constructed under a meta-device context.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    # llama3: wavelengths longer than the original context / low_freq_factor are stretched by
    # `factor`; shorter than context / high_freq_factor are kept; the band between is a linear
    # blend in (context / wavelength).
    context = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    ratio = context / wavelen
    blend = ((ratio - low) / (high - low)).clamp(0.0, 1.0)
    return (1.0 - blend) * inv_freq / scaling.factor + blend * inv_freq


def _yarn_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    # Frequency pair i turns (original context) * inv_freq[i] / 2 pi times over the original
    # context: pairs below beta_slow turns are interpolated (divided by factor), pairs above
    # beta_fast kept, and a linear ramp over the pair index blends the two between.
    def pair_index(turns: float) -> float:
        context = scaling.original_max_position_embeddings
        return head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(scaling.beta_fast), pair_index(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = (
        (torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)
    ).clamp(0, 1)
    keep = 1 - ramp  # 1: the unscaled frequency, 0: the interpolated one
    # Written as HF writes it, so the float32 values are the same.
    pos_freqs = theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    )
    return 1.0 / (scaling.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the "rotate half" layout (first half of each head pairs with
    the second half). cos/sin are computed per step from the positions instead of a table sized
    for max_position_embeddings (262K positions x head_dim would be hundreds of MB)."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        # A plain attribute, not a buffer: models are built on the meta device and materialised
        # with to_empty(), which would leave a buffer uninitialised.
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each attention layer rotates by: (positions [T], inv_freq [head_dim / 2] float32
        on the positions' device). cos / sin of ``positions * inv_freq`` are computed in float32
        inside the fused q/k kernel (on the host path: by each layer)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return positions, self.inv_freq


# ---------------------------------------------------------------------------- projections
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``: the Triton skinny GEMM for the few-row shapes where it beat cuBLAS on
    an H200 (decode; see ``gemv.prefer_gemv``), cuBLAS / torch otherwise."""
    if gemv.use_gemv(x, weight):
        return gemv.gemv(x, weight)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """A bias-free projection through ``linear``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def normed_linear(
    norm: RMSNorm,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    *,
    want_normed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A pre-norm projection: ``(linear(h_n, weight), h, h_n if want_normed else None)`` with
    ``h = x + residual`` (rounded to x's dtype; ``x`` itself when ``residual`` is None) and
    ``h_n = norm(h)``. Where ``gemv.use_gemv_norm`` takes it (one row, a router-sized weight:
    where it was measured faster) the norm runs in the skinny GEMM's prologue (one kernel
    instead of two; ``gemv.NormPrologue``), unless ``KVTIER_NORM_GEMV=0`` was set at import;
    otherwise the norm kernel, then ``linear``. Both compute the norm with the same
    float32 formula; on a GPU the sum of squares may add in another order (a last-bit
    difference)."""
    if NORM_IN_GEMV and gemv.use_gemv_norm(x, weight, norm.weight):
        h = None if residual is None else torch.empty_like(x)
        normed = torch.empty_like(x) if want_normed else None
        prologue = gemv.NormPrologue(norm.weight, norm.eps, residual, h, normed)
        return gemv.gemv(x, weight, norm=prologue), x if h is None else h, normed
    if residual is None:
        h, h_n = x, norm(x)
    else:
        h_n, h = norm.add_forward(x, residual)
    return linear(h_n, weight), h, h_n if want_normed else None


class MergedLinear(Linear):
    """Several bias-free projections of the same input as one GEMM; checkpoints store them
    apart, so each keeps a shard id (its index in ``output_sizes``) for the loader."""

    def __init__(self, in_features: int, output_sizes: Sequence[int]) -> None:
        super().__init__(in_features, sum(output_sizes))
        self.output_sizes = tuple(output_sizes)

    def shard_index(self, param: str, shard: int) -> tuple[slice, ...]:
        start = sum(self.output_sizes[:shard])
        return (slice(start, start + self.output_sizes[shard]),)


# ---------------------------------------------------------------------------- attention
class DecoderAttention(nn.Module):
    """Grouped-query self-attention with a fused qkv projection and RoPE; ``qk_norm`` adds the
    per-head RMSNorm of Qwen3 on q and k before RoPE. The KV cache and the attention itself
    belong to the batch's attention backend."""

    def __init__(self, config: ModelConfig, layer_id: int, qk_norm: bool) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        # YaRN scales q and k after RoPE (cos and sin) by its attention factor: folded into the
        # softmax scale instead (the same logits; the cache holds the unscaled k).
        scaling = config.rope_scaling
        self.scale = config.head_dim**-0.5 * (scaling.attention_scale() if scaling else 1.0)
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = MergedLinear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size])
        self.o_proj = Linear(self.q_size, config.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(
        self,
        qkv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """Attention from the fused q/k/v projection's output ``qkv`` [T, q + 2 kv] (the
        decoder layer computes it, with the input norm: see ``normed_linear``) to o_proj's."""
        t = qkv.shape[0]
        positions, inv_freq = rope
        use_norm = self.q_norm is not None and self.k_norm is not None
        args = (
            qkv,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            positions,
            inv_freq,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.q_norm.eps if self.q_norm is not None else 0.0,
            use_norm,
        )
        backend = batch.attn_backend
        target = backend.kv_store_target(self.layer_id, batch)
        if target is not None:
            # Split, per-head RMSNorm of q and k (Qwen3), RoPE and the KV-cache write: one
            # kernel on CUDA.
            q = fused.qk_norm_rope_store(*args, *target)
            o = backend.attend(q, self.layer_id, batch, self.scale)
        else:
            q, k, v = fused.qk_norm_rope(*args)
            o = backend.forward(q, k, v, self.layer_id, batch, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


# ---------------------------------------------------------------------------- MLPs
class DenseMLP(nn.Module):
    """SwiGLU MLP with gate and up fused into one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size])
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))

    def forward_norm(
        self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(norm(x + residual)), x + residual)``: the norm goes with the gate/up
        projection (``normed_linear``)."""
        h, residual, _ = normed_linear(norm, x, residual, self.gate_up_proj.weight)
        return self.down_proj(silu_and_mul(h)), residual


class FusedExperts(nn.Module):
    """The SwiGLU experts of one MoE layer, stacked: ``w13`` [E, 2I, H] holds each expert's
    gate rows then up rows, ``w2`` [E, H, I] its down projection."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # None: grouped GEMM on CUDA in bf16, the exact per-expert loop elsewhere. Tests set it
        # to compare the two paths.
        self.use_grouped_mm: bool | None = None

    def shard_index(self, param: str, shard: Any) -> tuple[Any, ...]:
        # w13 shards are (expert, 0 for gate | 1 for up); w2 shards are the expert id.
        if param == "w13":
            expert, half = shard
            i = self.intermediate_size
            return (expert, slice(half * i, (half + 1) * i))
        return (shard,)

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """``x`` [T, H]; each token's ``topk_ids`` / ``topk_weights`` [T, k]. Returns [T, H].

        The T * k (token, expert) pairs are sorted by expert so that each expert's rows are
        contiguous, run through the experts, put back in pair order, and each token's k outputs
        are combined by a batched [1, k] x [k, H] product. No atomics: the result is the same
        run to run (index_add_ on CUDA would sum in a racy order), and the sum accumulates in
        float32 inside the GEMM even for bf16 activations. No host sync outside the loop path.
        On CUDA in bf16, decode-sized batches take Triton kernels instead: T * k up to
        ``fused_moe.MAX_PAIRS`` the per-pair ones (``fused_moe_small``), then up to
        ``grouped_moe.MAX_PAIRS`` the expert-major ones (``grouped_moe``); ``use_grouped_mm``
        set (by tests) pins the torch path.
        """
        t, k = topk_ids.shape
        # Two GEMV kernels for decode-sized T * k, bf16 on CUDA (KVTIER_FUSED_MOE=0: off),
        # unless a test pinned the path.
        if self.use_grouped_mm is None and fused_moe.use_fused(x, t * k):
            return fused_moe.fused_moe_small(x, self.w13, self.w2, topk_ids, topk_weights)
        # Up to a few thousand pairs (decode batches): the expert-major kernels, each expert's
        # weights read once per 16 pairs, no sort (KVTIER_GROUPED_MOE=0: off).
        if self.use_grouped_mm is None and grouped_moe.use_grouped(x, t * k):
            return grouped_moe.grouped_moe(x, self.w13, self.w2, topk_ids, topk_weights)
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        # Counts by scatter_add, not bincount: bincount on CUDA reads the max id on the host.
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        sorted_x = x[order // k]
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = x.is_cuda and x.dtype == torch.bfloat16
        if grouped:
            sorted_y = self._experts_grouped(sorted_x, counts)
        else:
            sorted_y = self._experts_loop(sorted_x, counts)
        # Back to pair order by a row gather through the inverse permutation: a gather streams
        # at copy speed where the equivalent scatter (y[order] = sorted_y) ran ~4x slower on an
        # H200 (index_put, 0.6 ms a layer for 16K tokens). Same values either way.
        inverse = torch.empty_like(order)
        inverse.scatter_(0, order, torch.arange(order.numel(), device=order.device))
        y = sorted_y.index_select(0, inverse)
        return torch.bmm(topk_weights.unsqueeze(1), y.view(t, k, -1)).squeeze(1)

    def _experts_loop(self, sorted_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Reference path: one GEMM pair per expert that received tokens. Reads the counts on
        # the host, so it cannot run inside a CUDA graph.
        out = torch.empty_like(sorted_x)
        start = 0
        for expert, n in enumerate(counts.tolist()):
            if n:
                rows = slice(start, start + n)
                h = silu_and_mul(sorted_x[rows] @ self.w13[expert].t())
                out[rows] = h @ self.w2[expert].t()
                start += n
        return out

    def _experts_grouped(self, sorted_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # One grouped GEMM per projection; offs[e] is the end row of expert e's group.
        # torch._grouped_mm takes [rows, K] x [E, K, N]; the transposed weight views are the
        # column-major layout it accepts without a copy.
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(sorted_x, self.w13.transpose(1, 2), offs=offs)
        return torch._grouped_mm(silu_and_mul(h), self.w2.transpose(1, 2), offs=offs)


class SparseMoeBlock(nn.Module):
    """Top-k routed experts: softmax over all experts in float32, keep the k largest,
    renormalise them to sum 1 when ``norm_topk_prob``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts)
        self.experts = FusedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._experts(x, self.gate(x))

    def forward_norm(
        self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(norm(x + residual)), x + residual)``: the norm goes with the router
        projection (``normed_linear``), which also hands the normed rows to the experts. With
        ``KVTIER_MOE_BLOCK=1`` one token on CUDA in bf16 takes the whole block as one persistent
        kernel instead (``moe_block``; off by default: slower), unless a test pinned the
        experts' path."""
        if (
            residual is not None
            and self.experts.use_grouped_mm is None
            and moe_block.use_moe_block(x, self.experts.num_experts, self.top_k)
        ):
            return moe_block.moe_block(
                x, residual, norm.weight, norm.eps, self.gate.weight, self.experts.w13,
                self.experts.w2, self.top_k, self.norm_topk_prob,
            )  # fmt: skip
        logits, residual, normed = normed_linear(
            norm, x, residual, self.gate.weight, want_normed=True
        )
        assert normed is not None
        return self._experts(normed, logits), residual

    def _experts(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        weights, ids = fused.moe_route(logits, self.top_k, self.norm_topk_prob, out_dtype=x.dtype)
        return self.experts(x, ids, weights)


# ---------------------------------------------------------------------------- LM head
def compute_logits(
    hidden: torch.Tensor,
    norm: RMSNorm,
    lm_head_weight: torch.Tensor,
    rows: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 logits of the selected ``rows`` of the (pre-norm) final hidden states, given
    whole or as the last layer's output plus its ``residual`` stream; the add, the norm and
    the vocab GEMM run only on those rows."""
    if residual is None:
        normed = norm(hidden[rows])
    else:
        normed, _ = norm.add_forward(hidden[rows], residual[rows])
    return linear(normed, lm_head_weight).float()


# ---------------------------------------------------------------------------- weight loading
# A route sends one checkpoint tensor to (our parameter name, shard id); shard id None means the
# whole parameter. The owning module's shard_index(param, shard) turns a shard id into an index.
# A route of None drops the tensor on purpose (e.g. lm_head.weight of a tied model).
WeightRoute = tuple[str, Any]
Router = Callable[[str], WeightRoute | None]

# Buffers some checkpoints carry that the models recompute.
IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def stacked_router(mapping: Sequence[tuple[str, str, Any]], tied_lm_head: bool = False) -> Router:
    """Route HF names through a table of (our fragment, HF fragment, shard id), e.g.
    ``("qkv_proj", "k_proj", 1)``; names matching no entry keep their name, whole."""

    def route(name: str) -> WeightRoute | None:
        if tied_lm_head and name == "lm_head.weight":
            return None
        for ours, theirs, shard in mapping:
            if theirs in name:
                return name.replace(theirs, ours), shard
        return name, None

    return route


_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(\.weight)?$")


def expert_route(name: str) -> WeightRoute | None:
    """Route HF expert weights onto FusedExperts: the per-expert form
    ``mlp.experts.{e}.gate_proj.weight`` (what checkpoints on the Hub and save_pretrained write)
    and the stacked form ``mlp.experts.gate_up_proj`` [E, 2I, H] / ``mlp.experts.down_proj``
    [E, H, I] (transformers 5's in-memory layout, gate rows first). None if not an expert."""
    m = _EXPERT_RE.match(name)
    if m:
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        if proj == "down_proj":
            return f"{prefix}.w2", expert
        return f"{prefix}.w13", (expert, 0 if proj == "gate_proj" else 1)
    m = _FUSED_EXPERT_RE.match(name)
    if m:
        return f"{m.group(1)}.{'w13' if m.group(2) == 'gate_up_proj' else 'w2'}", None
    return None


def load_hf_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], route: Router
) -> None:
    """Copy checkpoint tensors into ``model``'s parameters (casting dtype, moving device).

    Raises WeightLoadError on a tensor no parameter takes, a shape mismatch, a tensor given
    twice, or parameters the checkpoint left (partly) unfilled.
    """
    arch = type(model).__name__
    params = dict(model.named_parameters())
    filled: dict[str, int] = defaultdict(int)
    seen: set[tuple[str, str]] = set()
    for hf_name, tensor in weights:
        if hf_name.endswith(IGNORED_WEIGHT_SUFFIXES):
            continue
        routed = route(hf_name)
        if routed is None:
            continue
        name, shard = routed
        param = params.get(name)
        if param is None:
            raise WeightLoadError(
                f"unexpected weight {hf_name!r} in the checkpoint: {arch} has no parameter {name!r}"
            )
        key = (name, repr(shard))
        if key in seen:
            raise WeightLoadError(f"weight {hf_name!r} appears twice in the checkpoint")
        seen.add(key)
        dst = param.data
        if shard is not None:
            module_name, _, attr = name.rpartition(".")
            dst = dst[model.get_submodule(module_name).shard_index(attr, shard)]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise WeightLoadError(
                f"weight {hf_name!r} has shape {tuple(tensor.shape)} but {arch} expects "
                f"{tuple(dst.shape)} for {name!r}"
                + (f" shard {shard}" if shard is not None else "")
            )
        dst.copy_(tensor)
        filled[name] += tensor.numel()
    missing = [n for n, p in params.items() if filled[n] != p.numel()]
    if missing:
        shown = ", ".join(n + (" (partly)" if filled[n] else "") for n in missing[:8]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 8 else ""
        )
        raise WeightLoadError(f"the checkpoint lacks weights for {arch} parameters: {shown}")
