"""The sampler's penalties and filters on hand-made logits (exact values), and logprobs."""

import math

import pytest
import torch

from kvtier.runner.sampler import History, penalize, sample, token_logprobs
from kvtier.sampling_params import SamplingParams, SamplingParamsError

ROW = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])


def params(**kw):
    return SamplingParams(**{"temperature": 0, **kw})


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # Tokens 0 (2.0) and 1 (-1.0) in the prompt, 4 (-2.0) in the output: the others untouched.
    out = penalize(ROW, params(repetition_penalty=2.0), History([0, 1, 1], [4]))
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0, -4.0, 1.0]
    assert ROW.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]  # the input is left as it was


def test_frequency_and_presence_penalties_count_output_tokens_only():
    p = params(frequency_penalty=0.5, presence_penalty=0.25)
    out = penalize(ROW, p, History([5, 5, 5], [3, 3, 2]))
    # token 3: twice (2 x 0.5 + 0.25), token 2: once (0.5 + 0.25); prompt token 5 untouched
    assert out.tolist() == [2.0, -1.0, -0.25, 1.75, -2.0, 1.0]


def test_banned_tokens_and_greedy_choice_after_penalties():
    hist = History([], [3], banned=(0,))
    out = penalize(ROW, params(presence_penalty=2.0), hist)
    assert out[0].item() == -math.inf and out[3].item() == 1.0
    # Greedy: 3.0 - 2 = 1.0 ties token 5 (1.0); argmax takes the first, token 3.
    logits = ROW.unsqueeze(0)
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, [params()], [None], gen).tolist() == [3]
    p = params(frequency_penalty=1.0, presence_penalty=1.5)  # token 3: 3.0 - 2.5 = 0.5
    assert sample(logits, [p], [None], gen, [History([], [3], banned=(0,))]).tolist() == [5]


def test_min_p_keeps_only_tokens_near_the_likeliest():
    # min_p = 1: only the likeliest token survives, so sampling is greedy whatever the seed.
    logits = ROW.repeat(8, 1)
    p = SamplingParams(temperature=1.0, min_p=1.0)
    gens = [torch.Generator().manual_seed(s) for s in range(8)]
    assert sample(logits, [p] * 8, gens, gens[0]).tolist() == [3] * 8
    # min_p = 0.3: tokens 3 (p ~ 0.53) and 0 (~0.19 / 0.53 = 0.37 of it) survive, 5 (0.13) not.
    p = SamplingParams(temperature=1.0, min_p=0.3)
    drawn = set(sample(logits, [p] * 8, gens, gens[0]).tolist())
    assert drawn <= {0, 3}


def test_penalty_arguments_are_checked():
    with pytest.raises(SamplingParamsError, match=r"^frequency_penalty must be in \[-2, 2\]"):
        SamplingParams(frequency_penalty=2.5)
    with pytest.raises(SamplingParamsError, match=r"^repetition_penalty must be in \(0, 2\]"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(SamplingParamsError, match=r"^min_p must be in \[0, 1\]; got 1.5"):
        SamplingParams(min_p=1.5)
    with pytest.raises(
        SamplingParamsError, match=r"^min_new_tokens must be in \[0, max_new_tokens=4\]; got 5"
    ):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)
    assert not SamplingParams().penalized and SamplingParams(min_new_tokens=1).penalized


def test_token_logprobs_are_the_log_softmax():
    logits = torch.stack([ROW, ROW.flip(0)])
    chosen, values, ids = token_logprobs(logits, torch.tensor([1, 0]), 3)
    ref = torch.log_softmax(logits, dim=-1)
    assert torch.equal(chosen, torch.stack([ref[0, 1], ref[1, 0]]))
    assert ids.tolist() == [[3, 0, 5], [2, 5, 0]]
    assert torch.equal(values, ref.gather(1, ids))
    _, none, no_ids = token_logprobs(logits, torch.tensor([1, 0]), 0)
    assert none.shape == no_ids.shape == (2, 0)


def test_logit_bias_forces_and_bans_tokens():
    logits = ROW.unsqueeze(0)
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, [params(logit_bias={4: 100.0})], [None], gen).tolist() == [4]
    # Keys as OpenAI sends them (strings); banning the likeliest leaves the next one.
    assert sample(logits, [params(logit_bias={"3": -100})], [None], gen).tolist() == [0]
    assert ROW.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]
    with pytest.raises(SamplingParamsError, match=r"^logit_bias values must be numbers in"):
        params(logit_bias={1: 101})
    with pytest.raises(SamplingParamsError, match=r"^logit_bias keys must be token ids"):
        params(logit_bias={"a": 1})
