"""Fault injection (kvtier.faults): what the user sees when L2 allocation, a load or a backup
fails, and that nothing leaks. Served tokens stay those of a recompute."""

import random

import pytest
import torch
from engine_utils import make_engine

from kvtier import faults
from kvtier.tiers import TierError
from kvtier.tiers.dram import pinned_bytes

SP = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def make(**kw):
    return make_engine(**{"log_level": "error", **kw})


def hicache(**kw):
    return make_engine(
        **{"log_level": "error", "enable_hierarchical_cache": True, "page_size": 4, **kw}
    )


@pytest.fixture(autouse=True)
def _disarm():
    faults.disarm()
    yield
    faults.disarm()


@pytest.fixture(scope="module")
def reference():
    with make(disable_radix_cache=True) as e:
        yield e


def prompt(seed, n=61):
    rng = random.Random(seed)
    return [rng.randrange(10, 1500) for _ in range(n)]


def test_unknown_fault_point_is_refused():
    with pytest.raises(ValueError, match="unknown fault point 'lod'; points: tier_alloc, load"):
        faults.arm("lod")


def test_l2_allocation_failure_is_a_clear_startup_error():
    before = pinned_bytes()
    faults.arm("tier_alloc")
    with pytest.raises(
        TierError,
        match=r"allocating the dram L2 tier failed \(injected fault at tier_alloc\); "
        "lower --hicache-size",
    ):
        hicache()
    assert pinned_bytes() == before
    with hicache() as e:  # the next start is unaffected
        e.generate(input_ids=prompt(0), sampling_params=SP)
        e.check_integrity()


def test_failed_load_falls_back_to_recompute_and_drops_the_l2_copy(reference):
    p = prompt(1)
    want = reference.generate(input_ids=p, sampling_params=SP)["output_ids"]
    with hicache() as e:
        e.generate(input_ids=p, sampling_params=SP)
        e.flush_cache(tier="device")
        # Freed GPU pages still hold the old KV and would be handed out again: poison them, so
        # that a page the failed load never filled cannot pass for a loaded one.
        pool = e.scheduler.runner.kv_pool
        pool.k.fill_(float("nan"))
        pool.v.fill_(float("nan"))
        before = faults.injected["load"]
        faults.arm("load")
        # Two requests share the prefix that fails to load: both are recomputed.
        outs = e.generate(input_ids=[p, p[:40] + [7, 8, 9]], sampling_params=SP)
        assert faults.injected["load"] - before == 1
        assert outs[0]["output_ids"] == want
        assert (
            outs[1]["output_ids"]
            == reference.generate(input_ids=p[:40] + [7, 8, 9], sampling_params=SP)["output_ids"]
        )
        assert "dram" not in outs[0]["meta_info"]["cached_tokens_by_tier"]
        stats = e.get_stats()
        assert stats["load_failures_recovered"] == 1 and stats["failed_loads"] == 1
        e.check_integrity()
        # The dropped prefix is cached again by the recompute and served from L2 next time.
        e.flush_cache(tier="device")
        again = e.generate(input_ids=p, sampling_params=SP)
        assert again["output_ids"] == want
        assert again["meta_info"]["cached_tokens_by_tier"] == {"dram": 60}
        e.check_integrity()


def test_failed_load_of_a_tail_page_only(reference):
    """The prefix's first page on the GPU, its second only in L2: that second page is loaded
    for its first 15 tokens alone (a tail, copied into the request's page). When the load
    fails, the request holds no page of it, but still goes back to be recomputed."""
    p = prompt(3, 32)
    want = reference.generate(input_ids=p, sampling_params=SP)["output_ids"]
    with hicache(page_size=16) as e:
        e.generate(input_ids=p, sampling_params=SP)
        e.flush_cache(tier="device")
        e.generate(input_ids=p[:16] + [5] * 4, sampling_params=SP)  # page 1 back on the GPU
        pool = e.scheduler.runner.kv_pool
        for buf in (pool.k, pool.v):  # free pages poisoned, as above
            free = torch.tensor(e.scheduler.allocator.free_pages()) * 16
            slots = (free[:, None] + torch.arange(16)).reshape(-1)
            buf[:, slots] = float("nan")
        faults.arm("load")
        out = e.generate(input_ids=p, sampling_params=SP)
        assert faults.injected["load"] >= 1
        assert out["output_ids"] == want
        stats = e.get_stats()
        assert stats["load_failures_recovered"] == 1
        e.check_integrity()
        # Served from the tail next time (the recompute cached the page again).
        again = e.generate(input_ids=p, sampling_params=SP)
        assert again["output_ids"] == want
        assert again["meta_info"]["cached_tokens"] == 31
        e.check_integrity()


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_failed_backups_leave_prefixes_without_l2_copy(policy, reference):
    ps = [prompt(10 + i, 40) for i in range(6)]
    want = [reference.generate(input_ids=p, sampling_params=SP)["output_ids"] for p in ps]
    # A GPU pool of ~3 prompts: evictions (and, with write_back, backups at eviction) happen.
    with hicache(max_total_tokens=160, hicache_write_policy=policy) as e:
        before = faults.injected["backup"]
        faults.arm("backup", times=3)
        got = [e.generate(input_ids=p, sampling_params=SP)["output_ids"] for p in ps]
        got += [e.generate(input_ids=p, sampling_params=SP)["output_ids"] for p in ps]
        assert got == want + want
        assert faults.injected["backup"] - before == 3
        assert e.get_stats()["failed_backups"] == 3
        e.check_integrity()
        assert e.flush_cache() is True
        stats = e.get_stats()
        assert stats["l2_used_tokens"] == 0
        assert stats["device_free_pages"] == stats["device_total_pages"]


def test_env_spec_arms_points():
    faults.arm_from_env("load=2, backup")
    with pytest.raises(faults.FaultInjected, match="injected fault at backup"):
        faults.check("backup")
    faults.check("backup")  # armed once only
    for _ in range(2):
        with pytest.raises(faults.FaultInjected):
            faults.check("load")
    faults.check("load")
