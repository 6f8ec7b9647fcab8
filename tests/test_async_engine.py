"""Engine.async_generate: concurrent asyncio callers batched by the driver thread, streaming,
cancellation, errors, and the guard between synchronous and asynchronous calls."""

import asyncio
import random
import time

import pytest
from engine_utils import make_engine

from kvtier.sampling_params import SamplingParamsError

GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine():
    with make_engine(page_size=4) as e:
        yield e


def prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(10, 1500) for _ in range(rng.randrange(8, 30))] for _ in range(n)]


def test_concurrent_calls_equal_synchronous_ones(engine):
    ps = prompts(6, seed=1)
    want = [engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in ps]

    async def main():
        singles = [engine.async_generate(input_ids=p, sampling_params=GREEDY) for p in ps[:4]]
        batch = engine.async_generate(input_ids=ps[4:], sampling_params=GREEDY)
        return await asyncio.gather(*singles, batch)

    steps = engine.get_stats()["forward_steps"]
    *singles, batch = asyncio.run(main())
    assert [o["output_ids"] for o in singles] + [o["output_ids"] for o in batch] == want
    # Batched together: far fewer steps than the 6 x 10 of running them one by one.
    assert engine.get_stats()["forward_steps"] - steps < 40
    assert all(o["meta_info"]["finish_reason"] == {"type": "length"} for o in singles)
    engine.check_integrity()
    assert not engine.scheduler.has_work()


def test_streaming_and_logprobs(engine):
    p = prompts(1, seed=2)[0]
    want = engine.generate(input_ids=p, sampling_params=GREEDY, return_logprob=True)

    async def main():
        it = await engine.async_generate(
            input_ids=p, sampling_params=GREEDY, stream=True, return_logprob=True
        )
        return [chunk async for chunk in it]

    chunks = asyncio.run(main())
    assert [t for c in chunks for t in c["output_ids"]] == want["output_ids"]
    lps = [e[0] for c in chunks for e in c["meta_info"]["output_token_logprobs"]]
    ref = [e[0] for e in want["meta_info"]["output_token_logprobs"]]
    assert all(abs(a - b) < 1e-5 for a, b in zip(lps, ref, strict=True))
    engine.check_integrity()


def test_cancelled_call_aborts_and_frees(engine):
    p = prompts(1, seed=3)[0]
    long = {"temperature": 0, "max_new_tokens": 300, "ignore_eos": True}
    before = engine.get_stats()["requests_aborted"]

    async def main():
        it = await engine.async_generate(input_ids=p, sampling_params=long, stream=True)
        first = await it.__anext__()
        await it.aclose()  # the consumer leaves: its request is aborted
        task = asyncio.ensure_future(engine.async_generate(input_ids=p, sampling_params=long))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return first

    first = asyncio.run(main())
    assert len(first["output_ids"]) >= 1
    for _ in range(200):  # the driver finishes the aborts on its thread
        if not engine._driver.busy:
            break
        time.sleep(0.01)
    assert engine.get_stats()["requests_aborted"] == before + 2
    engine.check_integrity()
    assert not engine.scheduler.has_work()


def test_errors_reach_the_caller(engine):
    async def bad():
        return await engine.async_generate(input_ids=[5, 6], sampling_params={"top_p": 0})

    with pytest.raises(SamplingParamsError, match=r"top_p must be in \(0, 1\]"):
        asyncio.run(bad())

    async def too_long():
        return await engine.async_generate(input_ids=[5] * 40000, sampling_params=GREEDY)

    with pytest.raises(ValueError, match="the prompt has 40000 tokens"):
        asyncio.run(too_long())
    engine.check_integrity()


def test_synchronous_calls_refused_while_async_ones_run(engine):
    p = prompts(1, seed=4)[0]

    async def main():
        task = asyncio.ensure_future(
            engine.async_generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 200})
        )
        await asyncio.sleep(0.05)
        with pytest.raises(RuntimeError, match=r"^async_generate requests are in flight"):
            engine.generate(input_ids=p, sampling_params=GREEDY)
        return await task

    out = asyncio.run(main())
    assert len(out["output_ids"]) == 200
    engine.check_integrity()


def test_event_loops_on_several_threads_share_one_driver(engine):
    # Two threads, each with its own event loop, call at once: one driver thread serves both.
    import threading

    ps = prompts(4, seed=5)
    want = [engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in ps]
    got: dict[int, list[int]] = {}

    def worker(i):
        async def main():
            return await engine.async_generate(input_ids=ps[i], sampling_params=GREEDY)

        got[i] = asyncio.run(main())["output_ids"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(4)] == want
    assert sum(t.name == "kvtier-driver" for t in threading.enumerate()) == 1
    engine.check_integrity()
