"""Test helper: random inputs of one MoE layer (tests/test_fused_moe.py, test_grouped_moe.py)."""

from __future__ import annotations

import torch

NUM_EXPERTS = 8


def moe_inputs(t, k, hidden, inter, dtype, seed, device="cpu", num_experts=NUM_EXPERTS, scale=0.2):
    # Drawn on the target device: a full Qwen3-30B layer's weights are 1.2 GB in bf16.
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(shape, generator=gen, device=device) * s).to(dtype)

    x = randn(t, hidden)
    w13 = randn(num_experts, 2 * inter, hidden, s=scale)
    w2 = randn(num_experts, hidden, inter, s=scale)
    # Distinct experts per token (what top-k gives); tokens share experts across the batch.
    ids = torch.stack(
        [torch.randperm(num_experts, generator=gen, device=device)[:k] for _ in range(t)]
    )
    weights = torch.softmax(torch.randn(t, k, generator=gen, device=device), dim=-1).to(dtype)
    return x, w13, w2, ids, weights
