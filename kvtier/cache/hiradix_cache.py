"""The hierarchical prefix cache: the GPU radix tree backed by an L2 tier (HiCache semantics).

A node is in one of three states: on the GPU only; on the GPU and in L2; in L2 only
(``device_pages is None``). Invariants, on top of the GPU tree's:
  - a node off the GPU has every descendant off the GPU too (GPU eviction takes GPU leaves);
  - every L2 page is exactly one of free or held by one node;
  - a transfer in flight holds a GPU lock (``lock_ref``) and an L2 lock (``host_lock_ref``) on
    the path to its node, released when the controller sees it complete.

Write policies decide when a node gets its L2 copy: ``write_through`` when it is inserted,
``write_through_selective`` on its second hit, ``write_back`` only when it is evicted from the
GPU (the GPU pages are freed once the copy completed). GPU eviction keeps a backed-up node as
L2-only; L2 eviction removes L2-only leaves no transfer pins.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from typing import Any

from kvtier.cache.controller import CacheController, TransferStats
from kvtier.cache.kv_pool import PageAllocator
from kvtier.cache.radix_cache import IntegrityError, MatchResult, RadixCache, TreeNode

logger = logging.getLogger(__name__)

# A continuation shorter than this is recomputed rather than loaded (not worth a transfer).
LOAD_BACK_MIN_TOKENS = 8


class HiRadixCache(RadixCache):
    def __init__(
        self,
        page_size: int,
        allocator: PageAllocator,
        host_allocator: PageAllocator,
        controller: CacheController,
        write_policy: str,
    ) -> None:
        super().__init__(page_size, allocator)
        self.host_allocator = host_allocator
        self.controller = controller
        self.write_policy = write_policy
        self.tier_name = controller.tier.name
        self.backups_skipped = 0  # L2 full of pinned or GPU-resident copies
        self.host_evicted_pages = 0
        self.device_evictions_to_host = 0
        self.load_back_min_tokens = LOAD_BACK_MIN_TOKENS

    # ------------------------------------------------------------------ locks on L2 pages
    def _lock_host(self, node: TreeNode) -> None:
        while node is not self.root:
            node.host_lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def _unlock_host(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.host_lock_ref <= 0:
                raise IntegrityError(f"L2 unlock of an unlocked node: {node}")
            node.host_lock_ref -= 1
            node = node.parent  # type: ignore[assignment]

    def _release_transfer(self, node: TreeNode) -> Callable[[], None]:
        def done() -> None:
            self.unlock(node)
            self._unlock_host(node)

        return done

    # ------------------------------------------------------------------ backups
    def _alloc_host(self, n: int) -> list[int] | None:
        pages = self.host_allocator.alloc(n)
        if pages is None:
            self.evict_host(n - self.host_allocator.num_free)
            pages = self.host_allocator.alloc(n)
        return pages

    def backup(self, node: TreeNode) -> bool:
        """Start copying ``node``'s GPU pages to L2. False when L2 has no room."""
        if node.host_pages is not None or node.device_pages is None:
            return True
        pages = self._alloc_host(len(node.device_pages))
        if pages is None:
            self.backups_skipped += 1
            return False
        node.host_pages = pages
        self.lock(node)
        self._lock_host(node)
        try:
            self.controller.backup(node.device_pages, pages, self._release_transfer(node))
        except Exception as e:
            # The prefix simply keeps no L2 copy; nothing was left running.
            logger.warning("backup of %d pages to L2 failed (%s); no L2 copy kept", len(pages), e)
            node.host_pages = None
            self.host_allocator.free(pages)
            self.unlock(node)
            self._unlock_host(node)
            return False
        return True

    def _on_new_node(self, node: TreeNode) -> None:
        node.hit_count = 1
        if self.write_policy == "write_through":
            self.backup(node)

    def _on_hit(self, node: TreeNode) -> None:
        node.hit_count += 1
        if self.write_policy == "write_through_selective" and node.hit_count >= 2:
            self.backup(node)

    # ------------------------------------------------------------------ GPU eviction
    def evict(self, num_pages: int) -> int:
        if self.write_policy == "write_back":
            self._write_back(num_pages)
        return super().evict(num_pages)

    def _write_back(self, num_pages: int) -> None:
        """Back up the least recently used evictable GPU leaves lacking an L2 copy, and wait,
        so that eviction keeps them as L2-only."""
        leaves = sorted(
            (n for n in self._device_leaves() if n.lock_ref == 0),
            key=lambda n: (n.last_access, n.node_id),
        )
        covered = 0
        started = False
        for node in leaves:
            if covered >= num_pages:
                break
            if node.host_pages is None and self.backup(node):
                started = True
            covered += len(node.device_pages or ())
        if started:
            self.controller.wait_all()

    def _evict_device(self, node: TreeNode) -> int:
        assert node.device_pages is not None
        n = len(node.device_pages)
        if node.host_pages is not None:
            self.allocator.free(node.device_pages)
            node.device_pages = None
            self.evictable_pages -= n
            self.device_evictions_to_host += 1
            return n
        # No L2 copy: the node goes, with its L2-only descendants (unless a transfer pins one).
        if any(d.host_lock_ref for d in self._subtree(node)):
            return 0
        for d in self._subtree(node):
            if d is not node and d.host_pages is not None:
                self.host_allocator.free(d.host_pages)
        self.allocator.free(node.device_pages)
        node.device_pages = None
        self.evictable_pages -= n
        self._delete(node)
        return n

    def _subtree(self, node: TreeNode) -> list[TreeNode]:
        out, stack = [], [node]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def _revive(self, node: TreeNode, pages: list[int]) -> None:
        """An insert brought freshly computed GPU pages for an L2-only node: adopt them."""
        node.device_pages = list(pages)
        self._add_device_pages(node)

    # ------------------------------------------------------------------ L2 eviction
    def evict_host(self, num_pages: int) -> int:
        """Free at least ``num_pages`` L2 pages from L2-only leaves, least recently used first."""

        def evictable(n: TreeNode) -> bool:
            return (
                n is not self.root
                and n.device_pages is None
                and not n.children
                and n.host_lock_ref == 0
                and n.host_pages is not None
            )

        heap = [(n.last_access, n.node_id, n) for n in self._all_nodes() if evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert node.host_pages is not None and parent is not None
            self.host_allocator.free(node.host_pages)
            freed += len(node.host_pages)
            node.host_pages = None
            self._delete(node)
            if evictable(parent):
                heapq.heappush(heap, (parent.last_access, parent.node_id, parent))
        self.host_evicted_pages += freed
        return freed

    # ------------------------------------------------------------------ load-back
    def load_back(self, match: MatchResult) -> tuple[MatchResult, int]:
        """Bring the L2-only continuation of ``match`` to the GPU: allocate GPU pages (evicting
        if needed, never the matched GPU prefix), give them to the L2-only nodes, and queue the
        load for the next step. Returns the match extended over what will be loaded and the
        number of tokens loaded (0 when skipped: too short, or no GPU room)."""
        if match.last_host_node is None or match.host_len < self.load_back_min_tokens:
            return match, 0
        n = len(match.host_pages)
        self.lock(match.last_device_node)
        pages = self.allocator.alloc(n)
        if pages is None:
            self.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n)
        self.unlock(match.last_device_node)
        if pages is None:
            return match, 0
        path: list[TreeNode] = []
        node: TreeNode = match.last_host_node
        while node is not match.last_device_node:
            path.append(node)
            node = node.parent  # type: ignore[assignment]
        i = 0
        for node in reversed(path):
            k = len(node.host_pages)  # type: ignore[arg-type]
            node.device_pages = pages[i : i + k]
            self._add_device_pages(node)
            i += k
        last = match.last_host_node
        # The new GPU pages stay pinned until the data has landed, the L2 pages until read.
        self.lock(last)
        self._lock_host(last)
        self.controller.queue_load(list(match.host_pages), pages, self._release_transfer(last))
        extended = MatchResult(match.device_pages + pages, last, [], None, self.page_size)
        return extended, n * self.page_size

    # ------------------------------------------------------------------ scheduler hooks
    def start_loads(self) -> Callable[[int], None] | None:
        return self.controller.start_loads()

    def poll(self) -> None:
        self.controller.poll()

    def drop_nodes_holding(self, device_pages: set[int]) -> int:
        """Remove every node holding one of ``device_pages``, with everything under it, from
        both tiers (after a failed load those GPU pages hold no data, and the L2 copy is not
        trusted). Pages, not node objects, identify them: a node may have been split since the
        load was queued. No request may hold them. Returns how many nodes were removed."""
        tops = [
            n
            for n in self._all_nodes()
            if n is not self.root
            and n.device_pages is not None
            and not device_pages.isdisjoint(n.device_pages)
        ]
        removed = 0
        for top in tops:
            if top.parent is None or not self._attached(top):  # gone with an ancestor
                continue
            sub = self._subtree(top)
            if any(n.lock_ref or n.host_lock_ref for n in sub):
                raise IntegrityError(f"dropping a node still in use: {top}")
            for n in sub:
                if n.device_pages is not None:
                    self.allocator.free(n.device_pages)
                    self.evictable_pages -= len(n.device_pages)
                    n.device_pages = None
                if n.host_pages is not None:
                    self.host_allocator.free(n.host_pages)
                    n.host_pages = None
            self._delete(top)
            removed += len(sub)
        return removed

    def _attached(self, node: TreeNode) -> bool:
        while node.parent is not None:
            node = node.parent
        return node is self.root

    def flush_device(self) -> int:
        """Drop the GPU copy of every unlocked node that has an L2 copy (after waiting for
        backups in flight), so the next matches are served from L2. Returns pages freed."""
        self.controller.wait_all()
        freed = 0
        while True:
            victims = [
                n for n in self._device_leaves() if n.lock_ref == 0 and n.host_pages is not None
            ]
            if not victims:
                return freed
            for node in victims:
                freed += self._evict_device(node)

    def reset(self) -> None:
        self.controller.wait_all()
        for node in self._all_nodes():
            if node is not self.root and node.host_pages is not None:
                if node.host_lock_ref:
                    raise IntegrityError(f"reset with an L2 transfer pinning {node}")
                self.host_allocator.free(node.host_pages)
                node.host_pages = None
        super().reset()

    def check_integrity(self) -> list[int]:
        device_pages = super().check_integrity()
        host: list[int] = []
        for node in self._all_nodes():
            if node is not self.root and node.host_pages is not None:
                host.extend(node.host_pages)
        if len(host) != len(set(host)):
            raise IntegrityError("an L2 page is held by two tree nodes")
        everything = host + self.host_allocator.free_pages()
        if sorted(everything) != list(range(1, self.host_allocator.num_pages)):
            missing = sorted(set(range(1, self.host_allocator.num_pages)) - set(everything))[:10]
            raise IntegrityError(f"L2 pages leaked or doubly owned: missing {missing}")
        if self.controller.idle:
            pinned = [n for n in self._all_nodes() if n is not self.root and n.host_lock_ref]
            if pinned:
                raise IntegrityError(f"L2 locks held with no transfer in flight: {pinned[0]}")
        return device_pages

    @property
    def transfers_idle(self) -> bool:
        return self.controller.idle

    def wait_transfers(self) -> None:
        self.controller.wait_all()

    def close(self) -> None:
        self.controller.wait_all()
        self.controller.tier.close()

    def reset_stats(self) -> None:
        """Zero the transfer and eviction counters (after the warm-up). Transfers must be idle:
        a landing one would count into the fresh totals."""
        self.controller.wait_all()
        self.backups_skipped = 0
        self.host_evicted_pages = 0
        self.device_evictions_to_host = 0
        self.controller.stats = TransferStats()

    def stats(self) -> dict[str, Any]:
        total = self.host_allocator.capacity
        used = total - self.host_allocator.num_free
        return {
            "l2_tier": self.tier_name,
            "l2_io_backend": self.controller.io_backend,
            "l2_pinned_bytes": self.controller.tier.pinned_nbytes,
            "l2_total_tokens": total * self.page_size,
            "l2_used_tokens": used * self.page_size,
            "l2_backups_skipped": self.backups_skipped,
            "l2_evicted_pages": self.host_evicted_pages,
            "device_evictions_to_l2": self.device_evictions_to_host,
            **self.controller.snapshot(),
        }
