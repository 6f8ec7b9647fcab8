"""Token sampling: greedy, temperature, top-k, top-p, min-p, frequency / presence / repetition
penalties, with optional per-request seeds; logprobs of the sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.sampling_params import SamplingParams


@dataclass(frozen=True)
class History:
    """What a penalized request's next sample depends on besides its logits: its prompt and
    output so far, and the tokens it may not sample yet (EOS and stop tokens before
    min_new_tokens)."""

    prompt_ids: list[int]
    output_ids: list[int]
    banned: tuple[int, ...] = ()


def penalize(row: torch.Tensor, p: SamplingParams, history: History) -> torch.Tensor:
    """One row of logits with ``p``'s penalties applied (a new tensor)."""
    row = row.clone()
    device = row.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(
            sorted(set(history.prompt_ids) | set(history.output_ids)), dtype=torch.int64
        ).to(device)
        values = row[seen]
        r = p.repetition_penalty
        row[seen] = torch.where(values > 0, values / r, values * r)
    if (p.frequency_penalty or p.presence_penalty) and history.output_ids:
        out = torch.tensor(history.output_ids, dtype=torch.int64).to(device)
        counts = torch.zeros_like(row).index_add_(0, out, torch.ones_like(out, dtype=row.dtype))
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    if history.banned:
        row[torch.tensor(history.banned, dtype=torch.int64).to(device)] = float("-inf")
    return row


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus of one row, and
    what is less likely than min_p x the likeliest."""
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
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
    histories: list[History | None] | None = None,
) -> torch.Tensor:  # [B] int64
    """One token a row: greedy (argmax) or sampled with the row's temperature, top-k, top-p
    and min-p, after its logit_bias; ``histories[i]`` (needed where ``params[i].penalized``)
    gives the penalties their tokens. ``logits`` is left as it is."""
    if histories is not None and any(h is not None for h in histories):
        rows = [
            penalize(logits[i], p, h) if h is not None else logits[i]
            for i, (p, h) in enumerate(zip(params, histories, strict=True))
        ]
        logits = torch.stack(rows)
    if any(p.logit_bias for p in params):
        logits = logits.clone()
        for i, p in enumerate(params):
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.int64).to(logits.device)
                bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
                logits[i].index_add_(0, ids, bias.to(logits.device))
    out = torch.argmax(logits, dim=-1)
    if all(p.greedy for p in params):
        return out
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
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
