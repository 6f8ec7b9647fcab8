"""The GPU radix tree and page allocator: exact page ids, splits, locks, LRU eviction."""

import pytest

from kvtier.cache.kv_pool import PageAllocator
from kvtier.cache.radix_cache import IntegrityError, RadixCache


def check(cache: RadixCache, owned: list[int] = ()) -> None:
    """Global ownership: every page is free, in the tree, or owned by the caller; once."""
    tree = cache.check_integrity()
    everything = tree + list(owned) + cache.allocator.free_pages()
    assert sorted(everything) == list(range(1, cache.allocator.num_pages))


def test_allocator_order_is_deterministic():
    a = PageAllocator(8)
    assert a.alloc(3) == [1, 2, 3]
    assert a.alloc(2) == [4, 5]
    a.free([2, 3])
    assert a.alloc(1) == [2]
    assert a.alloc(3) == [3, 6, 7]
    assert a.alloc(1) is None
    assert a.num_free == 0
    with pytest.raises(ValueError, match="at least 2 pages"):
        PageAllocator(1)


def test_insert_match_split_page_size_1():
    alloc = PageAllocator(32)
    cache = RadixCache(1, alloc)
    pages = alloc.alloc(5)
    assert pages == [1, 2, 3, 4, 5]
    res = cache.insert([10, 11, 12, 13, 14], pages)
    assert res.pages == [1, 2, 3, 4, 5]
    m = cache.match_prefix([10, 11, 12, 99])
    assert m.device_pages == [1, 2, 3]
    assert m.device_len == 3
    # The match split the node at 3 tokens: [10,11,12] -> [13,14].
    assert m.last_device_node.key == (10, 11, 12)
    assert next(iter(m.last_device_node.children.values())).key == (13, 14)
    # A second sequence branching off after 2 tokens.
    p2 = alloc.alloc(3)
    assert p2 == [6, 7, 8]
    res = cache.insert([10, 11, 20, 21], [1, 2, *p2[:2]])
    assert res.pages == [1, 2, 6, 7]
    alloc.free([p2[2]])
    check(cache)
    assert cache.evictable_pages == 7 and cache.protected_pages == 0


def test_duplicate_insert_returns_tree_pages():
    alloc = PageAllocator(16)
    cache = RadixCache(2, alloc)
    first = alloc.alloc(2)
    cache.insert([1, 2, 3, 4], first)
    dup = alloc.alloc(3)
    assert dup == [3, 4, 5]
    res = cache.insert([1, 2, 3, 4, 5, 6], dup)
    # The first two pages were already cached: the tree keeps its own.
    assert res.pages == [1, 2, 5]
    alloc.free([p for p, t in zip(dup, res.pages) if p != t])
    check(cache)


def test_page_aligned_matching_page_size_4():
    alloc = PageAllocator(16)
    cache = RadixCache(4, alloc)
    cache.insert(list(range(12)), alloc.alloc(3))
    # Only whole pages match: 6 common tokens -> 1 page.
    m = cache.match_prefix([0, 1, 2, 3, 4, 5, 99, 99, 99])
    assert m.device_pages == [1]
    assert m.device_len == 4
    # Fewer tokens than a page: nothing.
    assert cache.match_prefix([0, 1, 2]).device_pages == []
    with pytest.raises(ValueError, match="insert needs whole pages: 5 tokens, 1 pages of 4"):
        cache.insert([1, 2, 3, 4, 5], [9])
    check(cache)


def test_lock_protects_from_eviction_and_lru_order():
    alloc = PageAllocator(16)
    cache = RadixCache(1, alloc)
    a = cache.insert([1, 2, 3], alloc.alloc(3)).last_node  # pages 1,2,3
    b = cache.insert([7, 8], alloc.alloc(2)).last_node  # pages 4,5
    c = cache.insert([1, 2, 9], [1, 2, *alloc.alloc(1)]).last_node  # page 6, splits a
    assert cache.evictable_pages == 6
    cache.lock(b)
    assert (cache.evictable_pages, cache.protected_pages) == (4, 2)
    # LRU leaf first: [3] (page 3, touched before c was inserted), then [9] (page 6), then
    # their parent [1, 2] once it became a leaf; b is locked.
    assert cache.evict(1) == 1
    assert alloc.free_pages()[-1] == 3
    assert cache.evict(10) == 3
    assert sorted(alloc.free_pages()[-3:]) == [1, 2, 6]
    assert cache.match_prefix([1, 2, 3]).device_pages == []
    assert cache.match_prefix([7, 8]).device_pages == [4, 5]
    cache.unlock(b)
    assert cache.evict(10) == 2
    assert cache.device_pages_in_tree == 0
    with pytest.raises(IntegrityError, match="unlock of an unlocked node"):
        cache.unlock(a if a.parent else c)
    check(cache)


def test_lock_counts_propagate_through_splits():
    alloc = PageAllocator(16)
    cache = RadixCache(1, alloc)
    node = cache.insert([1, 2, 3, 4], alloc.alloc(4)).last_node
    cache.lock(node)
    m = cache.match_prefix([1, 2, 5])  # splits the locked node
    assert m.last_device_node.lock_ref == 1
    assert cache.evict(10) == 0
    cache.unlock(node)
    assert cache.evict(10) == 4
    check(cache)


def test_reset_frees_everything_and_refuses_locked():
    alloc = PageAllocator(16)
    cache = RadixCache(1, alloc)
    node = cache.insert([1, 2], alloc.alloc(2)).last_node
    cache.lock(node)
    with pytest.raises(IntegrityError, match="reset with a locked node"):
        cache.reset()
    cache.unlock(node)
    cache.reset()
    assert alloc.num_free == 15
    check(cache)


def test_integrity_detects_double_ownership():
    alloc = PageAllocator(8)
    cache = RadixCache(1, alloc)
    pages = alloc.alloc(2)
    cache.insert([1, 2], pages)
    alloc.free([pages[0]])  # a bug: freed while the tree still holds it
    with pytest.raises(AssertionError):
        check(cache)


def test_match_tail_finds_the_page_that_continues_a_match():
    alloc = PageAllocator(32)
    cache = RadixCache(4, alloc)
    pages = alloc.alloc(3)
    assert pages == [1, 2, 3]
    cache.insert(list(range(10, 22)), pages)  # one node of 3 pages: 10..13 | 14..17 | 18..21
    other = alloc.alloc(1)
    assert other == [4]
    cache.insert([10, 11, 12, 13, 30, 31, 32, 33], [1, *other])  # a branch after page 1
    query = [10, 11, 12, 13, 14, 15, 16]  # page 1 whole, then 3 tokens of page 2
    m = cache.match_prefix(query)
    assert m.device_pages == [1]
    tail = cache.match_tail(m, query)
    assert tail is not None and tail.length == 3
    # The 2-page continuation was split: the tail node holds page 2 alone.
    assert tail.node.key == (14, 15, 16, 17) and tail.node.device_pages == [2]
    assert tail.node.parent is m.last_device_node
    assert next(iter(tail.node.children.values())).device_pages == [3]
    # The other branch matches 2 tokens; the longest wins whichever order the children are in.
    tail = cache.match_tail(m, [10, 11, 12, 13, 30, 31, 99])
    assert tail is not None and tail.length == 2 and tail.node.device_pages == [4]
    # Never a whole page (that is the full-page match's job), never zero tokens.
    assert cache.match_tail(m, [10, 11, 12, 13, 14, 15, 16, 17, 18]).length == 3
    assert cache.match_tail(m, [10, 11, 12, 13, 99]) is None
    assert cache.match_tail(m, [10, 11, 12, 13]) is None
    check(cache)


def test_match_tail_skips_page_size_1_and_wide_fan_outs(monkeypatch):
    import kvtier.cache.radix_cache as rc

    alloc = PageAllocator(32)
    cache = RadixCache(1, alloc)
    cache.insert([5, 6], alloc.alloc(2))
    assert cache.match_tail(cache.match_prefix([5]), [5, 6]) is None  # no partial pages
    cache = RadixCache(2, PageAllocator(32))
    for i in range(3):
        cache.insert([1, 2, 3, 10 + i], cache.allocator.alloc(2))
    m = cache.match_prefix([1, 2, 3])
    assert cache.match_tail(m, [1, 2, 3]).length == 1
    monkeypatch.setattr(rc, "MAX_TAIL_SCAN", 2)
    assert cache.match_tail(m, [1, 2, 3]) is None
