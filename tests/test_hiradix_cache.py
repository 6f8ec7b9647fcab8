"""The hierarchical cache's state machine on CPU: exact page ids in both tiers, the bytes that
move, write policies, eviction to L2-only, load-back, L2 eviction, locks during transfers."""

import pytest
import torch

from kvtier.cache.controller import CacheController, resolve_io_backend
from kvtier.cache.hiradix_cache import HiRadixCache
from kvtier.cache.kv_pool import KVPool, PageAllocator
from kvtier.cache.radix_cache import IntegrityError
from kvtier.tiers.base import TierSpec
from kvtier.tiers.dram import DramTier

PS = 2  # page size
LAYERS, HEADS, DIM = 3, 2, 4


class Setup:
    def __init__(self, device_pages=9, host_pages=6, policy="write_through", layout="layer_first"):
        self.pool = KVPool(device_pages, PS, LAYERS, HEADS, DIM, torch.float32, "cpu")
        # Distinct values everywhere, so a misplaced copy shows.
        self.pool.k.copy_(torch.randn_like(self.pool.k))
        self.pool.v.copy_(torch.randn_like(self.pool.v))
        spec = TierSpec(host_pages, PS, LAYERS, HEADS, DIM, torch.float32, layout)
        self.tier = DramTier(spec, torch.device("cpu"))
        self.alloc = PageAllocator(device_pages)
        self.host_alloc = PageAllocator(host_pages + 1)
        self.ctrl = CacheController(self.pool, self.tier, "kernel")
        self.cache = HiRadixCache(PS, self.alloc, self.host_alloc, self.ctrl, policy)
        self.cache.load_back_min_tokens = 1

    def page_kv(self, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = slice(page * PS, (page + 1) * PS)
        return self.pool.k[:, s].clone(), self.pool.v[:, s].clone()

    def host_kv(self, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self.tier.space
        lay = self.tier.layout
        ks, vs = [], []
        for layer in range(LAYERS):
            rows = [lay.offset(0, page, layer, t) for t in range(PS)]
            ks.append(torch.stack([buf.k[r : r + HEADS * DIM] for r in rows]))
            vs.append(torch.stack([buf.v[r : r + HEADS * DIM] for r in rows]))
        shape = (LAYERS, PS, HEADS, DIM)
        return torch.stack(ks).view(shape), torch.stack(vs).view(shape)

    def check(self, owned=()):
        tree = self.cache.check_integrity()
        everything = sorted(tree + list(owned) + self.alloc.free_pages())
        assert everything == list(range(1, self.alloc.num_pages))

    def insert(self, tokens, prefix_pages=()):
        pages = list(prefix_pages) + self.alloc.alloc(len(tokens) // PS - len(prefix_pages))
        res = self.cache.insert(tokens, pages)
        self.alloc.free([p for p, t in zip(pages, res.pages) if p != t])
        return res


def test_write_through_backs_up_on_insert_and_holds_locks_until_polled():
    s = Setup()
    res = s.insert([1, 2, 3, 4])
    node = res.last_node
    assert node.device_pages == [1, 2] and node.host_pages == [1, 2]
    # The backup is in flight until the controller sees it complete.
    assert node.lock_ref == 1 and node.host_lock_ref == 1
    assert s.cache.evict(10) == 0
    s.cache.poll()
    assert node.lock_ref == 0 and node.host_lock_ref == 0
    for dp, hp in zip([1, 2], [1, 2]):
        dk, dv = s.page_kv(dp)
        hk, hv = s.host_kv(hp)
        assert torch.equal(dk, hk) and torch.equal(dv, hv)
    s.check()


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_evict_to_l2_then_load_back_restores_exact_bytes(layout):
    s = Setup(layout=layout)
    s.insert([1, 2, 3, 4, 5, 6])
    s.cache.poll()
    before = [s.page_kv(p) for p in (1, 2, 3)]
    assert s.cache.evict(3) == 3
    node = s.cache.match_prefix([1, 2, 3, 4, 5, 6, 7]).last_host_node
    assert node.device_pages is None and node.host_pages == [1, 2, 3]
    assert s.alloc.num_free == 8
    # Scribble over the freed GPU pages so a skipped load would show.
    s.pool.k.fill_(7.0)
    s.pool.v.fill_(7.0)
    m = s.cache.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert m.device_pages == [] and m.host_pages == [1, 2, 3] and m.host_len == 6
    m2, loaded = s.cache.load_back(m)
    assert loaded == 6
    # Freed pages are reused in the order they were freed: 1, 2, 3.
    assert m2.device_pages == [1, 2, 3] and m2.last_device_node is node
    assert node.lock_ref == 1 and node.host_lock_ref == 1  # pinned until the load lands
    assert s.cache.start_loads() is None  # CPU: no per-layer wait
    s.cache.poll()
    assert node.lock_ref == 0 and node.host_lock_ref == 0
    for (bk, bv), p in zip(before, (1, 2, 3)):
        k, v = s.page_kv(p)
        assert torch.equal(k, bk) and torch.equal(v, bv)
    s.check()


def test_load_back_never_evicts_the_matched_gpu_prefix():
    s = Setup(device_pages=5, host_pages=8)  # 4 usable GPU pages
    s.insert([1, 2, 3, 4])  # pages 1, 2
    s.insert([1, 2, 3, 4, 5, 6, 7, 8], [1, 2])  # adds 3, 4 under it
    s.cache.poll()
    # Evict only the child ([5..8]) to L2: the parent is its GPU prefix.
    assert s.cache.evict(2) == 2
    m = s.cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert m.device_pages == [1, 2] and m.host_pages == [3, 4]
    taken = s.alloc.alloc(2)  # leave no free GPU page
    assert taken == [3, 4]
    m2, loaded = s.cache.load_back(m)
    # No free page and the only evictable GPU node is the locked prefix: the load is skipped.
    assert loaded == 0 and m2.device_pages == [1, 2]
    s.alloc.free(taken)
    m3, loaded = s.cache.load_back(m)
    assert loaded == 4 and m3.device_pages == [1, 2, 3, 4]
    s.cache.start_loads()
    s.cache.poll()
    s.check()


def test_write_through_selective_backs_up_on_second_hit():
    s = Setup(policy="write_through_selective")
    node = s.insert([1, 2, 3, 4]).last_node
    assert node.host_pages is None
    s.insert([1, 2, 3, 4])
    assert node.host_pages == [1, 2]
    s.cache.poll()
    s.check()


def test_write_back_copies_at_eviction_only():
    s = Setup(policy="write_back")
    node = s.insert([1, 2, 3, 4]).last_node
    assert node.host_pages is None
    data = [s.page_kv(p) for p in node.device_pages]
    assert s.cache.evict(2) == 2
    assert node.device_pages is None and node.host_pages == [1, 2]
    for (k, v), hp in zip(data, [1, 2]):
        hk, hv = s.host_kv(hp)
        assert torch.equal(k, hk) and torch.equal(v, hv)
    s.check()


def test_l2_eviction_takes_lru_l2_only_leaves():
    s = Setup(device_pages=9, host_pages=4)
    a = s.insert([1, 2, 3, 4]).last_node  # host 1, 2
    b = s.insert([5, 6, 7, 8]).last_node  # host 3, 4
    s.cache.poll()
    s.cache.match_prefix([5, 6, 7, 8])  # b is now more recent than a
    assert s.cache.evict(4) == 4  # both to L2-only
    assert a.device_pages is None and b.device_pages is None
    # A new node needs 2 L2 pages: the least recently used L2-only leaf (a) goes.
    c = s.insert([9, 10, 11, 12]).last_node
    assert c.host_pages == [1, 2]
    assert s.cache.match_prefix([1, 2, 3, 4]).host_pages == []
    assert s.cache.match_prefix([5, 6, 7, 8]).host_pages == [3, 4]
    s.cache.poll()
    s.check()


def test_backup_skipped_when_l2_is_pinned_full():
    s = Setup(device_pages=9, host_pages=2)
    a = s.insert([1, 2, 3, 4]).last_node  # takes both L2 pages, GPU copy kept
    b = s.insert([5, 6, 7, 8]).last_node
    assert a.host_pages == [1, 2] and b.host_pages is None
    assert s.cache.backups_skipped == 1
    s.cache.poll()
    # b has no L2 copy: GPU eviction deletes it.
    assert s.cache.evict(4) == 4
    assert s.cache.match_prefix([5, 6, 7, 8]).device_pages == []
    assert s.cache.match_prefix([1, 2, 3, 4]).host_pages == [1, 2]
    s.check()


def test_flush_device_leaves_everything_in_l2():
    s = Setup()
    s.insert([1, 2, 3, 4])
    s.insert([1, 2, 5, 6])
    s.cache.flush_device()  # waits for the backups itself
    assert s.cache.device_pages_in_tree == 0
    assert s.alloc.num_free == 8
    m = s.cache.match_prefix([1, 2, 5, 6, 7])
    assert m.device_pages == [] and m.host_len == 4
    s.check()


def test_reset_frees_both_tiers_and_integrity_catches_l2_leaks():
    s = Setup()
    s.insert([1, 2, 3, 4])
    s.cache.evict(2)  # in flight: nothing evicted yet
    s.cache.poll()
    s.cache.evict(2)
    s.cache.reset()
    assert s.alloc.num_free == 8 and s.host_alloc.num_free == 6
    s.check()
    s.host_alloc.alloc(1)  # a page that nobody holds: a leak
    with pytest.raises(IntegrityError, match="L2 pages leaked"):
        s.cache.check_integrity()


def test_short_continuations_are_recomputed_not_loaded():
    s = Setup()
    s.cache.load_back_min_tokens = 8
    s.insert([1, 2, 3, 4, 5, 6])
    s.cache.flush_device()
    m = s.cache.match_prefix([1, 2, 3, 4, 5, 6, 7])
    m2, loaded = s.cache.load_back(m)
    assert loaded == 0 and m2.device_pages == [] and s.alloc.num_free == 8
    s.check()


@pytest.mark.parametrize(
    "requested,tier,kernel_ok,contiguous,batch,expected",
    [
        # auto: copy engines for pinned host memory, the kernel for GPU-side memory.
        ("auto", "dram", True, True, True, "direct"),
        ("auto", "xmem", True, True, True, "kernel"),
        ("auto", "peer", True, True, True, "kernel"),
        # ... and the kernel where direct cannot run well.
        ("auto", "dram", True, False, True, "kernel"),  # page_first
        ("auto", "dram", True, True, False, "kernel"),  # no cuMemcpyBatchAsync
        ("auto", "xmem", False, True, False, "direct"),  # not addressable: direct anyway
        ("auto", "peer", False, True, True, "direct"),
        # Explicit choices stand, but for a kernel on a tier kernels cannot address.
        ("kernel", "dram", True, True, True, "kernel"),
        ("direct", "peer", True, True, True, "direct"),
        ("kernel", "xmem", False, True, True, "direct"),
    ],
)
def test_resolve_io_backend(requested, tier, kernel_ok, contiguous, batch, expected):
    got = resolve_io_backend(
        requested,
        tier_name=tier,
        kernel_accessible=kernel_ok,
        page_contiguous=contiguous,
        batch_memcpy=batch,
    )
    assert got == expected
