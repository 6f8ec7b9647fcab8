"""Overlap scheduling (Scheduler.step with a decode step left in flight): the same tokens as
stepping without it, requests that stop while their next step is already running lose nothing
and leak nothing, aborts in flight, and --disable-overlap-schedule turns it off."""

import random

import pytest
from engine_utils import make_engine

from kvtier.sampling_params import SamplingParams
from kvtier.scheduler.request import Req


@pytest.fixture(scope="module")
def overlapped():
    with make_engine(page_size=4) as e:
        assert e.scheduler.overlap
        yield e


@pytest.fixture(scope="module")
def plain():
    with make_engine(page_size=4, disable_overlap_schedule=True) as e:
        assert not e.scheduler.overlap
        yield e


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(10, 1500) for _ in range(rng.randrange(5, 30))] for _ in range(n)]


def _run(engine, params, prompts, check_each_step=True, abort_after=None):
    """Step the scheduler by hand until every request finished; returns {rid: output ids} and
    the number of decode steps launched ahead."""
    s = engine.scheduler
    s.counters["decode_steps_ahead"] = 0
    reqs = [
        Req(rid=f"r{i}", input_ids=p, sampling=SamplingParams.from_dict(sp))
        for i, (p, sp) in enumerate(zip(prompts, params))
    ]
    for r in reqs:
        s.add_request(r)
    steps = 0
    while s.has_work():
        s.step()
        steps += 1
        if abort_after is not None and steps == abort_after[1]:
            assert s.abort_request(abort_after[0])
        if check_each_step:
            s.check_integrity()  # in flight or not, every page is owned exactly once
    s.check_integrity()
    assert s._inflight is None
    return {r.rid: (r.output_ids, r.finish.type) for r in reqs}, s.counters["decode_steps_ahead"]


def test_same_tokens_as_without_overlap_and_steps_run_ahead(overlapped, plain):
    prompts = _prompts(5, seed=1)
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (1, 2, 9, 17, 5)]
    want, ahead_plain = _run(plain, params, prompts)
    got, ahead = _run(overlapped, params, prompts)
    assert got == want
    assert [len(want[f"r{i}"][0]) for i in range(5)] == [1, 2, 9, 17, 5]
    assert ahead_plain == 0
    assert ahead > 0


def test_stop_token_while_the_next_step_runs(overlapped, plain):
    # Stop on a token the request produces mid-stream: its step ahead is already running and
    # its token must be dropped; the others go on.
    prompts = _prompts(3, seed=2)
    free = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    outs, _ = _run(plain, [free] * 3, prompts)
    stop_at = outs["r1"][0][4]
    first = outs["r1"][0].index(stop_at)
    params = [free, dict(free, stop_token_ids=[stop_at]), free]
    want, _ = _run(plain, params, prompts)
    got, ahead = _run(overlapped, params, prompts)
    assert got == want
    assert got["r1"] == (outs["r1"][0][: first + 1], "stop")
    assert ahead > 0


def test_stop_string_and_seeded_sampling(overlapped, plain):
    prompts = _prompts(3, seed=3)
    params = [
        {"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 10, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 10, "stop": ["e"], "ignore_eos": True},
        {"temperature": 1.0, "top_k": 20, "seed": 3, "max_new_tokens": 8, "ignore_eos": True},
    ]
    want, _ = _run(plain, params, prompts)
    got, _ = _run(overlapped, params, prompts)
    assert got == want


def test_abort_while_a_step_is_in_flight(overlapped):
    prompts = _prompts(3, seed=4)
    params = [{"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}] * 3
    full, _ = _run(overlapped, params, prompts)
    got, _ = _run(overlapped, params, prompts, abort_after=("r1", 6))
    assert got["r1"][1] == "abort"
    assert got["r1"][0] == full["r1"][0][: len(got["r1"][0])]
    assert len(got["r1"][0]) < 20
    assert got["r0"] == full["r0"] and got["r2"] == full["r2"]


def test_a_request_stopping_by_length_leaves_the_others_ahead(overlapped, plain):
    # Two requests decode together; the first stops by length after 3 tokens. The step after
    # its last one goes ahead without it: every decode step but the first runs ahead.
    prompts = _prompts(2, seed=5)
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (3, 10)]
    want, _ = _run(plain, params, prompts)
    s = overlapped.scheduler
    steps = s.counters["forward_steps"]
    got, ahead = _run(overlapped, params, prompts)
    assert got == want
    # One extend step (both prompts), then 9 decode steps for the second request's tokens
    # 2..10; all but the first of them launched ahead.
    assert s.counters["forward_steps"] - steps == 10
    assert ahead == 8


def test_engine_after_a_stop_in_flight_can_flush(overlapped):
    # generate() returns once its request stopped on a token; the step ahead launched for it
    # may still be in flight. Flushing the cache then is not refused, and nothing leaks.
    p = _prompts(1, seed=6)[0]
    free = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    tokens = overlapped.generate(input_ids=p, sampling_params=free)["output_ids"]
    stop = dict(free, stop_token_ids=[tokens[5]])
    out = overlapped.generate(input_ids=p, sampling_params=stop)
    assert out["output_ids"] == tokens[: tokens.index(tokens[5]) + 1]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert overlapped.scheduler._inflight is not None  # the step ahead, not yet processed
    overlapped.check_integrity()
    assert overlapped.flush_cache()
    assert overlapped.scheduler._inflight is None and not overlapped.scheduler.has_work()
    overlapped.check_integrity()


def test_logprobs_ride_with_the_steps_run_ahead(overlapped, plain):
    # Logprobs come back with each step's tokens, also for steps scheduled while the previous
    # one ran: the same values, aligned with the same tokens, as without overlap.
    prompts = _prompts(3, seed=5)
    sp = {"temperature": 0, "max_new_tokens": 9, "ignore_eos": True}
    kw = {"sampling_params": sp, "return_logprob": True, "top_logprobs_num": 2}
    before = overlapped.scheduler.counters["decode_steps_ahead"]
    with_overlap = overlapped.generate(input_ids=prompts, **kw)
    assert overlapped.scheduler.counters["decode_steps_ahead"] > before
    without = plain.generate(input_ids=prompts, **kw)
    for a, b in zip(with_overlap, without, strict=True):
        assert a["output_ids"] == b["output_ids"]
        ma, mb = a["meta_info"], b["meta_info"]
        assert len(ma["output_token_logprobs"]) == 9
        for x, y in zip(ma["output_token_logprobs"], mb["output_token_logprobs"], strict=True):
            assert x[1] == y[1] and abs(x[0] - y[0]) < 1e-5
        assert [[t for _, t, _ in top] for top in ma["output_top_logprobs"]] == [
            [t for _, t, _ in top] for top in mb["output_top_logprobs"]
        ]
    overlapped.check_integrity()


def test_penalized_requests_are_not_scheduled_ahead(overlapped, plain):
    # A penalty needs the previous token, which a step launched ahead does not have: batches
    # with a penalized request run one step at a time, with the tokens of running without
    # overlap.
    prompts = _prompts(2, seed=6)
    sp = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True, "frequency_penalty": 1.0}
    want, _ = _run(plain, [sp, sp], prompts)
    got, ahead = _run(overlapped, [sp, sp], prompts)
    assert got == want and ahead == 0
