"""Token sampling: greedy, temperature, top-k, top-p, with optional per-request seeds."""

from __future__ import annotations

import torch

from kvtier.sampling_params import SamplingParams


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus of one row."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens strictly more likely than it already reach top_p.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor,  # [B, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
) -> torch.Tensor:  # [B] int64
    out = torch.argmax(logits, dim=-1)
    if all(p.greedy for p in params):
        return out
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        gen = generators[i] or default_generator
        out[i] = torch.multinomial(probs, 1, generator=gen)[0]
    return out


def token_logprobs(
    logits: torch.Tensor,  # [N, V] float32, the rows of the requests that want logprobs
    ids: torch.Tensor,  # [N] int64, the tokens sampled from them
    top_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution (the raw logits, before
    temperature, top-k or top-p): each sampled token's [N], and the ``top_n`` most likely
    tokens' values and ids [N, top_n], most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, ids.view(-1, 1)).view(-1)
    if top_n == 0:
        empty = logprobs.new_empty(logprobs.shape[0], 0)
        return chosen, empty, empty.to(torch.int64)
    values, order = torch.topk(logprobs, min(top_n, logprobs.shape[-1]), dim=-1, sorted=True)
    return chosen, values, order
