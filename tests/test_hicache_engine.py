"""The hierarchical cache inside the engine: greedy output identical to recompute while prefixes
come back from L2, under GPU and L2 pressure, for every write policy, layout and IO backend."""

import random

import pytest
from engine_utils import chats as run_chats
from engine_utils import make_engine, make_hicache_engine

from kvtier.kernels.copy_engine import batch_memcpy_available
from kvtier.tiers import TierError

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


make = make_engine


@pytest.fixture(scope="module")
def reference():
    with make(disable_radix_cache=True) as e:
        yield e


def chats(engine, n=5, turns=3, seed=0, concurrent=False):
    return run_chats(engine, n, turns, seed, concurrent, first_len=36, extra_len=9)


hicache = make_hicache_engine


@pytest.mark.parametrize("policy", ["write_through", "write_through_selective", "write_back"])
def test_multi_turn_under_pressure_equals_recompute(policy, reference):
    want, _ = chats(reference)
    with hicache(hicache_write_policy=policy) as e:
        got, metas = chats(e)
        assert got == want
        from_l2 = sum(m["cached_tokens_by_tier"].get("dram", 0) for m in metas)
        assert from_l2 > 0, "no prefix came back from L2"
        stats = e.get_stats()
        assert stats["loaded_bytes"] > 0
        assert stats["cached_tokens_by_tier"]["dram"] == from_l2
        e.check_integrity()


@pytest.mark.parametrize(
    "layout,backend,runs",
    [
        ("layer_first", "kernel", "kernel"),
        ("page_first", "kernel", "kernel"),
        ("page_first_direct", "direct", "direct"),
        # The default: the copy engines for dram where the layout and the driver allow.
        ("layer_first", "auto", "direct"),
        ("page_first", "auto", "kernel"),
    ],
)
def test_layouts_and_backends_equal_recompute(layout, backend, runs, reference):
    want, _ = chats(reference, concurrent=True)
    with hicache(hicache_mem_layout=layout, hicache_io_backend=backend) as e:
        got, metas = chats(e, concurrent=True)
        assert got == want
        assert any(m["cached_tokens_by_tier"].get("dram") for m in metas)
        ctrl = e.scheduler.cache.controller
        if not ctrl.on_gpu:
            runs = "torch"  # no streams, no kernels: torch copies whatever was asked
        elif runs == "direct" and backend == "auto" and not batch_memcpy_available():
            runs = "kernel"
        assert ctrl.io_backend == runs


def test_small_l2_evicts_and_stays_correct(reference):
    want, _ = chats(reference, n=6)
    with hicache(hicache_ratio=1.0) as e:
        got, _ = chats(e, n=6)
        assert got == want
        stats = e.get_stats()
        assert stats["l2_evicted_pages"] > 0 or stats["l2_backups_skipped"] > 0
        e.check_integrity()


def test_flush_device_forces_tier_hits(reference):
    rng = random.Random(5)
    prompt = [rng.randrange(10, 1500) for _ in range(61)]
    want = reference.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
    with hicache(max_total_tokens=512) as e:
        miss = e.generate(input_ids=prompt, sampling_params=GREEDY)
        assert miss["meta_info"]["cached_tokens"] == 0
        gpu_hit = e.generate(input_ids=prompt, sampling_params=GREEDY)
        assert gpu_hit["meta_info"]["cached_tokens_by_tier"] == {"device": 60}
        assert e.flush_cache(tier="device") is True
        stats = e.get_stats()
        assert stats["device_cached_pages"] == 0
        tier_hit = e.generate(input_ids=prompt, sampling_params=GREEDY)
        # 61 tokens: the first 60 (15 whole pages) come from L2, the last one is computed.
        assert tier_hit["meta_info"]["cached_tokens_by_tier"] == {"dram": 60}
        assert miss["output_ids"] == gpu_hit["output_ids"] == tier_hit["output_ids"] == want
        e.check_integrity()


def test_repeated_rounds_leak_nothing(reference):
    with hicache() as e:
        for round_ in range(3):
            chats(e, n=4, turns=2, seed=round_)
            e.flush_cache(tier="device")
            e.check_integrity()
        assert e.flush_cache() is True
        stats = e.get_stats()
        assert stats["device_free_pages"] == stats["device_total_pages"]
        assert stats["l2_used_tokens"] == 0
        e.check_integrity()


def test_l2_too_large_is_refused_naming_the_flag():
    with pytest.raises(TierError, match=r"--hicache-size asks for 100000\.00 GB of host memory"):
        make(enable_hierarchical_cache=True, hicache_size=100000)


def test_flush_device_needs_hierarchical_cache():
    with make() as e, pytest.raises(ValueError, match="needs --enable-hierarchical-cache"):
        e.flush_cache(tier="device")


def test_decode_pressure_with_backups_in_flight_retracts_instead_of_crashing(reference):
    """Retracted requests' KV goes to the tree and starts L2 backups that pin its pages; the
    next allocation waits for them instead of declaring the pool exhausted."""
    rng = random.Random(21)
    ps = [[rng.randrange(10, 1500) for _ in range(30)] for _ in range(8)]
    sp = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    want = [reference.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in ps]
    with hicache(page_size=1, max_total_tokens=200, hicache_ratio=2.0) as e:
        got = e.generate(input_ids=ps, sampling_params=sp)
        assert [g["output_ids"] for g in got] == want
        assert e.get_stats()["retractions"] > 0
        e.check_integrity()


def test_tail_page_from_l2(reference):
    """A prompt cached whole, then only in L2: all pages are loaded, the last one lends 3 of
    its 4 tokens, and 39 of 40 prompt tokens are reported from dram."""
    p = [(7 * i) % 1400 + 10 for i in range(40)]
    want = reference.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
    with hicache() as e:
        e.generate(input_ids=p, sampling_params=GREEDY)
        e.flush_cache(tier="device")
        out = e.generate(input_ids=p, sampling_params=GREEDY)
        assert out["output_ids"] == want
        assert out["meta_info"]["cached_tokens_by_tier"] == {"dram": 39}
        stats = e.get_stats()
        assert stats["tail_tokens_copied"] == 3 and stats["l2_tail_tokens_unused"] == 1
        assert stats["loaded_bytes"] == 40 * stats["kv_bytes_per_token"]
        e.check_integrity()


def test_every_load_is_reported_as_an_l2_hit(reference):
    """Room is checked before a load is queued, so no load is wasted on a request that is then
    not admitted, and the tokens loaded equal the tokens reported as L2 hits."""
    with hicache() as e:
        _, metas = chats(e, n=6, concurrent=True)
        stats = e.get_stats()
        page_bytes = stats["kv_bytes_per_token"] * stats["page_size"]
        loaded_tokens = stats["loaded_bytes"] // page_bytes * stats["page_size"]
        reported = sum(m["cached_tokens_by_tier"].get("dram", 0) for m in metas)
        assert loaded_tokens > 0
        # A tail page loaded from L2 serves only its first tokens; the rest are counted apart.
        assert loaded_tokens == reported + stats["l2_tail_tokens_unused"]


def test_request_larger_than_the_pool_is_aborted_not_fatal():
    with hicache(max_total_tokens=64) as e:
        out = e.generate(
            input_ids=list(range(10, 50)),
            sampling_params={"max_new_tokens": 100, "ignore_eos": True},
        )
        assert out["meta_info"]["finish_reason"] == {
            "type": "abort",
            "message": "out of KV memory: the request needs more than the 64 tokens of the "
            "KV pool (see --max-total-tokens)",
        }
        # 40 prompt tokens + 24 generated fill the 64 slots; the 25th needs no KV slot.
        assert out["meta_info"]["completion_tokens"] == 25
        e.check_integrity()
        # The engine keeps serving.
        assert (
            e.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)["meta_info"][
                "completion_tokens"
            ]
            == 8
        )
