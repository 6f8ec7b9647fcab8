"""Page-granular radix tree over token ids: the GPU prefix cache.

Every edge key is a whole number of pages (``len(key) % page_size == 0``) and a node holds one
GPU page per ``page_size`` tokens of its key. Requests lock the path to the node they use;
locked nodes are never evicted. Eviction frees unlocked leaves in least-recently-used order.

Ownership invariant (checked by ``check_integrity`` together with the allocator and the
scheduler): every GPU page is exactly one of free, held by one tree node, or owned by one running
request (its pages past the part it shares with the tree).

The hierarchical cache (``hiradix_cache.py``) subclasses this tree: a node may then also hold
L2 pages, and lose its GPU pages while keeping the L2 copy. The hooks it overrides are marked.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.cache.kv_pool import PageAllocator


class IntegrityError(AssertionError):
    """The cache's bookkeeping contradicts itself: a leaked, doubly owned or lost page."""


class TreeNode:
    __slots__ = (
        "children",
        "device_pages",
        "hit_count",
        "host_lock_ref",
        "host_pages",
        "key",
        "last_access",
        "lock_ref",
        "node_id",
        "parent",
    )

    def __init__(self, key: tuple[int, ...], device_pages: list[int] | None, node_id: int) -> None:
        self.key = key
        # None once evicted from the GPU (only possible when an L2 copy exists).
        self.device_pages: list[int] | None = device_pages
        # L2 pages of the same tokens, or None when not backed up.
        self.host_pages: list[int] | None = None
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.parent: TreeNode | None = None
        # Running requests (and transfers) that need this node's GPU pages.
        self.lock_ref = 0
        # Transfers that need this node's L2 pages (a backup in flight, a load in flight).
        self.host_lock_ref = 0
        self.last_access = 0
        self.hit_count = 0
        self.node_id = node_id

    @property
    def on_device(self) -> bool:
        return self.device_pages is not None

    @property
    def backed_up(self) -> bool:
        return self.host_pages is not None

    def __repr__(self) -> str:
        return (
            f"TreeNode(id={self.node_id}, tokens={len(self.key)}, device={self.device_pages}, "
            f"host={self.host_pages}, lock={self.lock_ref})"
        )


@dataclass
class MatchResult:
    """The cached part of a token sequence, one handle per tier.

    ``device_pages`` cover tokens [0, device_len); ``host_pages`` (hierarchical cache only) cover
    the following ``host_len`` tokens, present in L2 but not on the GPU.
    """

    device_pages: list[int]
    last_device_node: TreeNode
    host_pages: list[int] = field(default_factory=list)
    last_host_node: TreeNode | None = None
    page_size: int = 1

    @property
    def device_len(self) -> int:
        return len(self.device_pages) * self.page_size

    @property
    def host_len(self) -> int:
        return len(self.host_pages) * self.page_size


@dataclass
class TailMatch:
    """A cached page whose first ``length`` tokens (fewer than a page) continue a match: their
    KV can be copied into a page of the request instead of recomputed. ``node`` holds exactly
    that page, on the GPU or (hierarchical cache) only in L2."""

    node: TreeNode
    length: int


# Children of the match's last node scanned for a tail page; a wider fan-out (many branches
# after one shared prefix) is skipped rather than scanned on every admission.
MAX_TAIL_SCAN = 64


@dataclass
class InsertResult:
    # The tree's GPU page for every page of the inserted key. Where it differs from the page the
    # caller passed, the caller's page is a duplicate that it must free.
    pages: list[int]
    last_node: TreeNode


class RadixCache:
    def __init__(self, page_size: int, allocator: PageAllocator) -> None:
        self.page_size = page_size
        self.allocator = allocator
        self._next_id = 0
        self._clock = 0
        self.root = self._new_node((), [])
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable_pages = 0  # GPU pages in unlocked nodes
        self.protected_pages = 0  # GPU pages in locked nodes

    # ------------------------------------------------------------------ helpers
    def _new_node(self, key: tuple[int, ...], device_pages: list[int] | None) -> TreeNode:
        node = TreeNode(key, device_pages, self._next_id)
        self._next_id += 1
        return node

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _page_key(self, tokens: tuple[int, ...], pos: int) -> tuple[int, ...]:
        return tokens[pos : pos + self.page_size]

    def _common_len(self, key: tuple[int, ...], tokens: tuple[int, ...], pos: int) -> int:
        """Length of the common prefix of ``key`` and ``tokens[pos:]``, rounded down to pages."""
        n = min(len(key), len(tokens) - pos)
        if key[:n] == tokens[pos : pos + n]:
            common = n
        else:
            lo, hi = 0, n  # key[:lo] matches, key[:hi] does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if key[:mid] == tokens[pos : pos + mid]:
                    lo = mid
                else:
                    hi = mid
            common = lo
        return common - common % self.page_size

    def _split(self, node: TreeNode, at: int) -> TreeNode:
        """Split ``node`` after ``at`` tokens; returns the new upper node."""
        pages_at = at // self.page_size
        parent = node.parent
        assert parent is not None
        upper = self._new_node(
            node.key[:at], None if node.device_pages is None else node.device_pages[:pages_at]
        )
        upper.host_pages = None if node.host_pages is None else node.host_pages[:pages_at]
        upper.parent = parent
        upper.lock_ref = node.lock_ref
        upper.host_lock_ref = node.host_lock_ref
        upper.last_access = node.last_access
        upper.hit_count = node.hit_count
        parent.children[self._page_key(upper.key, 0)] = upper
        node.key = node.key[at:]
        if node.device_pages is not None:
            node.device_pages = node.device_pages[pages_at:]
        if node.host_pages is not None:
            node.host_pages = node.host_pages[pages_at:]
        node.parent = upper
        upper.children[self._page_key(node.key, 0)] = node
        self._on_split(upper, node)
        return upper

    def _walk(self, tokens: tuple[int, ...]) -> Iterator[TreeNode]:
        """Yield the nodes whose keys cover the longest page-aligned cached prefix of tokens,
        splitting the last one so that it ends exactly at the end of the match."""
        node, pos = self.root, 0
        while len(tokens) - pos >= self.page_size:
            child = node.children.get(self._page_key(tokens, pos))
            if child is None:
                return
            common = self._common_len(child.key, tokens, pos)
            if common == 0:
                return
            if common < len(child.key):
                child = self._split(child, common)
            yield child
            node, pos = child, pos + common

    # ------------------------------------------------------------------ interface
    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """The longest page-aligned cached prefix of ``tokens``. Touches the matched nodes."""
        t = tuple(tokens)
        now = self._tick()
        device_pages: list[int] = []
        host_pages: list[int] = []
        last_device = self.root
        last_host: TreeNode | None = None
        for node in self._walk(t):
            node.last_access = now
            if node.device_pages is not None and not host_pages:
                device_pages.extend(node.device_pages)
                last_device = node
            elif node.host_pages is not None:
                host_pages.extend(node.host_pages)
                last_host = node
            else:  # neither tier holds it (cannot happen by the invariants); stop here
                break
        return MatchResult(device_pages, last_device, host_pages, last_host, self.page_size)

    def match_tail(self, match: MatchResult, tokens: Sequence[int]) -> TailMatch | None:
        """The child page of ``match``'s last node that continues it over the most tokens of
        ``tokens`` after the match, at least one and fewer than a page; None if no child does
        (or the node has more than ``MAX_TAIL_SCAN`` children). A child of several pages is
        split so that the returned node holds just the first. Touches the node."""
        ps = self.page_size
        start = match.last_host_node if match.host_pages else match.last_device_node
        pos = match.device_len + match.host_len
        rest = tuple(tokens[pos : pos + ps - 1])
        if start is None or not rest or len(start.children) > MAX_TAIL_SCAN:
            return None
        best, best_len = None, 0
        for child in start.children.values():
            n = 0
            while n < len(rest) and child.key[n] == rest[n]:
                n += 1
            if n > best_len:
                best, best_len = child, n
        if best is None or (best.device_pages is None and best.host_pages is None):
            return None
        if len(best.key) > ps:
            best = self._split(best, ps)
        best.last_access = self._tick()
        return TailMatch(best, best_len)

    def insert(self, tokens: Sequence[int], pages: list[int]) -> InsertResult:
        """Add ``tokens`` (a whole number of pages) with their GPU ``pages`` to the tree."""
        ps = self.page_size
        if len(tokens) % ps or len(tokens) // ps != len(pages):
            raise ValueError(
                f"insert needs whole pages: {len(tokens)} tokens, {len(pages)} pages of {ps}"
            )
        t = tuple(tokens)
        now = self._tick()
        tree_pages: list[int] = []
        node, pos = self.root, 0
        for node in self._walk(t):
            node.last_access = now
            n = len(node.key) // ps
            if node.device_pages is None:
                self._revive(node, pages[pos // ps : pos // ps + n])
            else:
                self._on_hit(node)
            tree_pages.extend(node.device_pages)  # type: ignore[arg-type]
            pos += len(node.key)
        if pos < len(t):
            leaf = self._new_node(t[pos:], list(pages[pos // ps :]))
            leaf.parent = node
            leaf.last_access = now
            node.children[self._page_key(leaf.key, 0)] = leaf
            self._add_device_pages(leaf)
            tree_pages.extend(leaf.device_pages)  # type: ignore[arg-type]
            self._on_new_node(leaf)
            node = leaf
        return InsertResult(tree_pages, node)

    def lock(self, node: TreeNode) -> None:
        """Pin ``node`` and its ancestors on the GPU (a running request uses them)."""
        while node is not self.root:
            if node.lock_ref == 0 and node.device_pages is not None:
                self.evictable_pages -= len(node.device_pages)
                self.protected_pages += len(node.device_pages)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise IntegrityError(f"unlock of an unlocked node: {node}")
            node.lock_ref -= 1
            if node.lock_ref == 0 and node.device_pages is not None:
                self.evictable_pages += len(node.device_pages)
                self.protected_pages -= len(node.device_pages)
            node = node.parent  # type: ignore[assignment]

    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` GPU pages from unlocked leaves, least recently used first.
        Returns how many were freed (fewer when not enough are evictable)."""
        heap = [(n.last_access, n.node_id, n) for n in self._device_leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            freed += self._evict_device(node)
            assert parent is not None
            if (
                parent is not self.root
                and parent.lock_ref == 0
                and parent.device_pages is not None
                and self._is_device_leaf(parent)
            ):
                heapq.heappush(heap, (parent.last_access, parent.node_id, parent))
        return freed

    @property
    def device_pages_in_tree(self) -> int:
        return self.evictable_pages + self.protected_pages

    def reset(self) -> None:
        """Drop every node, freeing its GPU pages. Only valid with no node locked."""
        for node in self._all_nodes():
            if node is not self.root and node.lock_ref:
                raise IntegrityError(f"reset with a locked node: {node}")
        for node in self._all_nodes():
            if node is not self.root and node.device_pages:
                self.allocator.free(node.device_pages)
        self.root.children = {}
        self.evictable_pages = 0
        self.protected_pages = 0

    def check_integrity(self) -> list[int]:
        """Check the tree's own invariants; return every GPU page it holds (for the global
        ownership check)."""
        pages: list[int] = []
        evictable = protected = 0
        ps = self.page_size
        for node in self._all_nodes():
            if node is self.root:
                continue
            if not node.key or len(node.key) % ps:
                raise IntegrityError(f"node key is not whole pages: {node}")
            parent = node.parent
            if parent is None or parent.children.get(self._page_key(node.key, 0)) is not node:
                raise IntegrityError(f"node not linked under its parent: {node}")
            if node.lock_ref < 0 or node.host_lock_ref < 0:
                raise IntegrityError(f"negative lock count: {node}")
            if parent is not self.root and parent.lock_ref < node.lock_ref:
                raise IntegrityError(f"child locked more than its parent: {node}")
            n = len(node.key) // ps
            if node.device_pages is not None:
                if len(node.device_pages) != n:
                    raise IntegrityError(f"page count does not match key: {node}")
                if parent is not self.root and parent.device_pages is None:
                    raise IntegrityError(f"GPU node under an evicted parent: {node}")
                pages.extend(node.device_pages)
                if node.lock_ref:
                    protected += n
                else:
                    evictable += n
            elif node.host_pages is None:
                raise IntegrityError(f"node in no tier: {node}")
            if node.host_pages is not None and len(node.host_pages) != n:
                raise IntegrityError(f"L2 page count does not match key: {node}")
        if len(set(pages)) != len(pages):
            raise IntegrityError("a GPU page is held by two tree nodes")
        if (evictable, protected) != (self.evictable_pages, self.protected_pages):
            raise IntegrityError(
                f"size counters drifted: counted evictable={evictable} protected={protected}, "
                f"tracked {self.evictable_pages}/{self.protected_pages}"
            )
        return pages

    # ------------------------------------------------------------------ tier hooks
    # The GPU-only tree has no lower tier; the hierarchical cache overrides these.
    def load_back(self, match: MatchResult) -> tuple[MatchResult, int]:
        """Queue loading the lower-tier part of ``match``; returns the extended match and the
        tokens it loads."""
        return match, 0

    def start_loads(self) -> Callable[[int], None] | None:
        """Issue the loads queued for this step; returns the forward's per-layer wait."""
        return None

    def poll(self) -> None:
        """Complete finished transfers."""

    def flush_device(self) -> int:
        raise ValueError("flush_cache(tier='device') needs --enable-hierarchical-cache")

    @property
    def transfers_idle(self) -> bool:
        return True

    def wait_transfers(self) -> None:
        """Block until transfers in flight have landed and released their locks."""

    def stats(self) -> dict[str, Any]:
        return {}

    def reset_stats(self) -> None:
        """Zero the counters ``stats`` reports (none here)."""

    def close(self) -> None:
        """Release lower-tier memory."""

    # ------------------------------------------------------------------ traversal
    def _all_nodes(self) -> Iterator[TreeNode]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _is_device_leaf(self, node: TreeNode) -> bool:
        return all(c.device_pages is None for c in node.children.values())

    def _device_leaves(self) -> list[TreeNode]:
        return [
            n
            for n in self._all_nodes()
            if n is not self.root and n.device_pages is not None and self._is_device_leaf(n)
        ]

    # ------------------------------------------------------------------ hooks (HiRadixCache)
    def _add_device_pages(self, node: TreeNode) -> None:
        assert node.device_pages is not None
        if node.lock_ref:
            self.protected_pages += len(node.device_pages)
        else:
            self.evictable_pages += len(node.device_pages)

    def _evict_device(self, node: TreeNode) -> int:
        """Free ``node``'s GPU pages; the plain tree deletes the node. Returns pages freed."""
        assert node.device_pages is not None and not node.children
        n = len(node.device_pages)
        self.allocator.free(node.device_pages)
        self.evictable_pages -= n
        node.device_pages = None
        self._delete(node)
        return n

    def _delete(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[self._page_key(node.key, 0)]
        node.parent = None

    def _revive(self, node: TreeNode, pages: list[int]) -> None:
        raise IntegrityError(f"node without GPU pages in a GPU-only tree: {node}")

    def _on_hit(self, node: TreeNode) -> None:
        """A request inserted tokens this node already held."""

    def _on_new_node(self, node: TreeNode) -> None:
        """A new node holding freshly computed GPU pages was added."""

    def _on_split(self, upper: TreeNode, lower: TreeNode) -> None:
        """``upper`` was split off the top of ``lower``."""
