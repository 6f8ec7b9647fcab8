"""The cache controller: moves KV pages between the GPU pool and the L2 tier.

Loads queued while a step is scheduled are merged into one operation when the step runs:
on a dedicated load stream, one copy per layer, one event per layer. The forward's attention of
layer i waits only on event i, so loading layer i + 1 overlaps computing layer i. Backups run on
their own write stream. Completion is polled (never waited on in the scheduler loop) and runs
the callbacks that release the locks the cache took for the transfer.

On a CPU device there are no streams: transfers are done synchronously with torch copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvtier import faults
from kvtier.cache.kv_pool import KVPool
from kvtier.kernels.copy_engine import batch_memcpy_available
from kvtier.kernels.kv_io import (
    DirectPlan,
    KVSpace,
    copy_pages_direct,
    copy_pages_kernel,
    copy_pages_torch,
    page_runs,
)
from kvtier.tiers.base import MemoryTier
from kvtier.tiers.layout import device_pool_layout

logger = logging.getLogger(__name__)

Callback = Callable[[], None]


def resolve_io_backend(
    requested: str,
    *,
    tier_name: str,
    kernel_accessible: bool,
    page_contiguous: bool,
    batch_memcpy: bool,
) -> str:
    """The IO backend a CUDA controller runs for ``--hicache-io-backend requested``.

    ``auto`` takes the copy engines (``direct``) for the dram tier and the Triton copy kernel
    for the GPU-side ones (peer, xmem). Why: an 80K-token dram tier hit on an H200 over PCIe
    (2026-12-02) took 154.3 ms with direct, 1.06 of the time its 8 GB take at the bulk pinned
    copy rate (55.0 GB/s), against 166.5 ms (1.15, 50.8 GB/s) with the kernel, which also
    takes multiprocessors from the forward it overlaps. Between GPUs the kernel moved 0.89 of
    the bulk NVLink copy rate and per-layer batches of 64 KiB copy-engine copies 0.25 (run 3);
    X-Mem banks are GPU-side memory reached like a peer's. ``auto`` also takes the kernel where
    direct cannot run well: a layout that is not page-contiguous (page_first), or a driver
    without cuMemcpyBatchAsync (one driver call per span instead of one per layer). Only a tier
    that kernels can address gets the kernel; an explicit ``kernel`` on one that they cannot
    becomes ``direct``, with a warning."""
    if requested == "auto":
        if kernel_accessible and (not page_contiguous or tier_name != "dram" or not batch_memcpy):
            return "kernel"
        return "direct"
    if requested == "kernel" and not kernel_accessible:
        logger.warning("the %s tier is not addressable by kernels; using direct IO", tier_name)
        return "direct"
    return requested


@dataclass
class _Transfer:
    kind: str  # "load" | "backup"
    num_pages: int
    callbacks: list[Callback]
    start: torch.cuda.Event | None = None
    end: torch.cuda.Event | None = None
    # Index tensors the kernels read; held until the transfer completes.
    keepalive: list[torch.Tensor] = field(default_factory=list)


@dataclass
class TransferStats:
    loaded_pages: int = 0
    backed_up_pages: int = 0
    load_ops: int = 0
    backup_ops: int = 0
    load_seconds: float = 0.0
    backup_seconds: float = 0.0
    failed_loads: int = 0
    failed_backups: int = 0


class LoadError(RuntimeError):
    """Issuing a merged load failed; ``device_pages`` were to receive it and hold no data."""

    def __init__(self, device_pages: list[int], cause: BaseException) -> None:
        super().__init__(f"loading {len(device_pages)} pages from L2 failed: {cause}")
        self.device_pages = device_pages


class CacheController:
    def __init__(self, kv_pool: KVPool, tier: MemoryTier, io_backend: str) -> None:
        self.kv_pool = kv_pool
        self.tier = tier
        self.device = kv_pool.device
        self.num_layers = kv_pool.num_layers
        self.page_bytes = tier.spec.page_bytes  # all layers, K and V
        self.pool_space = KVSpace(
            kv_pool.k.view(-1),
            kv_pool.v.view(-1),
            device_pool_layout(
                kv_pool.num_pages,
                kv_pool.page_size,
                kv_pool.num_layers,
                kv_pool.num_kv_heads,
                kv_pool.head_dim,
            ),
        )
        self.on_gpu = self.device.type == "cuda"
        if not self.on_gpu:
            self.io_backend = "torch"
        else:
            self.io_backend = resolve_io_backend(
                io_backend,
                tier_name=tier.name,
                kernel_accessible=tier.kernel_accessible,
                page_contiguous=tier.layout.page_contiguous,
                batch_memcpy=batch_memcpy_available(),
            )
            if io_backend == "auto":
                logger.info(
                    "--hicache-io-backend auto: %s for the %s tier", self.io_backend, tier.name
                )
        if self.on_gpu:
            self.load_stream = torch.cuda.Stream(self.device)
            self.write_stream = torch.cuda.Stream(self.device)
        self._queued_loads: list[tuple[list[int], list[int], Callback]] = []
        self._inflight: list[_Transfer] = []
        self.stats = TransferStats()

    # ------------------------------------------------------------------ copies
    def _copy(
        self, src: KVSpace, dst: KVSpace, src_pages: list[int], dst_pages: list[int], layers: range
    ) -> list[torch.Tensor]:
        """Issue the copy on the current stream; returns tensors to keep alive until it ends."""
        if self.io_backend == "direct":
            copy_pages_direct(src, dst, page_runs(src_pages, dst_pages), layers)
            return []
        idx_device = self.device if self.on_gpu else torch.device("cpu")
        s = torch.tensor(src_pages, dtype=torch.int32).to(idx_device, non_blocking=True)
        d = torch.tensor(dst_pages, dtype=torch.int32).to(idx_device, non_blocking=True)
        if self.io_backend == "kernel":
            copy_pages_kernel(src, dst, s, d, layers)
        else:
            copy_pages_torch(src, dst, s, d, layers)
        return [s, d]

    # ------------------------------------------------------------------ loads
    def queue_load(self, host_pages: list[int], device_pages: list[int], on_done: Callback) -> None:
        """Load ``host_pages`` into ``device_pages`` with the next step's merged load."""
        self._queued_loads.append((host_pages, device_pages, on_done))

    def start_loads(self) -> Callable[[int], None] | None:
        """Issue every queued load as one layer-by-layer operation; return the per-layer wait
        for the forward (None when there is nothing to wait for).

        If issuing fails, nothing of it is left running, the loads' callbacks have run (their
        locks are released) and ``LoadError`` lists the GPU pages the loads were to fill: they
        hold no valid data."""
        if not self._queued_loads:
            return None
        queued, self._queued_loads = self._queued_loads, []
        try:
            faults.check("load")
            return self._issue_loads(queued)
        except Exception as e:
            if self.on_gpu:
                self.load_stream.synchronize()
            self.stats.failed_loads += len(queued)
            for _, _, cb in queued:
                cb()
            raise LoadError([p for _, d, _ in queued for p in d], e) from e

    def _issue_loads(
        self, queued: list[tuple[list[int], list[int], Callback]]
    ) -> Callable[[int], None] | None:
        host: list[int] = []
        dev: list[int] = []
        callbacks: list[Callback] = []
        for h, d, cb in queued:
            host.extend(h)
            dev.extend(d)
            callbacks.append(cb)
        t = _Transfer("load", len(host), callbacks)
        self.stats.load_ops += 1
        if not self.on_gpu:
            # Synchronous copy; completion still goes through poll(), as on the GPU, so locks
            # behave the same way on both.
            self._copy(self.tier.space, self.pool_space, host, dev, range(self.num_layers))
            self._inflight.append(t)
            return None
        # Pages just allocated for the load may still be read by earlier work on the compute
        # stream (their previous owner): the load starts after it.
        self.load_stream.wait_stream(torch.cuda.current_stream(self.device))
        events: list[torch.cuda.Event] = []
        with torch.cuda.stream(self.load_stream):
            t.start = torch.cuda.Event(enable_timing=True)
            t.start.record()
            if self.io_backend == "direct":
                plan = DirectPlan(
                    self.tier.space, self.pool_space, page_runs(host, dev), range(self.num_layers)
                )
                for layer in range(self.num_layers):
                    plan.issue(layer)
                    ev = torch.cuda.Event()
                    ev.record()
                    events.append(ev)
            else:
                s = torch.tensor(host, dtype=torch.int32).to(self.device, non_blocking=True)
                d = torch.tensor(dev, dtype=torch.int32).to(self.device, non_blocking=True)
                t.keepalive = [s, d]
                for layer in range(self.num_layers):
                    copy_pages_kernel(
                        self.tier.space, self.pool_space, s, d, range(layer, layer + 1)
                    )
                    ev = torch.cuda.Event()
                    ev.record()
                    events.append(ev)
            t.end = torch.cuda.Event(enable_timing=True)
            t.end.record()
        self._inflight.append(t)

        def wait_layer(layer: int) -> None:
            torch.cuda.current_stream(self.device).wait_event(events[layer])

        return wait_layer

    # ------------------------------------------------------------------ backups
    def backup(self, device_pages: list[int], host_pages: list[int], on_done: Callback) -> None:
        """Copy ``device_pages`` (every layer) to ``host_pages`` on the write stream. If issuing
        fails it raises with nothing left running and ``on_done`` not called."""
        try:
            faults.check("backup")
            self._issue_backup(device_pages, host_pages, on_done)
        except Exception:
            if self.on_gpu:
                self.write_stream.synchronize()
            self.stats.failed_backups += 1
            raise

    def _issue_backup(
        self, device_pages: list[int], host_pages: list[int], on_done: Callback
    ) -> None:
        t = _Transfer("backup", len(device_pages), [on_done])
        self.stats.backup_ops += 1
        if not self.on_gpu:
            self._copy(
                self.pool_space, self.tier.space, device_pages, host_pages, range(self.num_layers)
            )
            self._inflight.append(t)
            return
        # The pages' KV was written by the compute stream.
        self.write_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.write_stream):
            t.start = torch.cuda.Event(enable_timing=True)
            t.start.record()
            t.keepalive = self._copy(
                self.pool_space, self.tier.space, device_pages, host_pages, range(self.num_layers)
            )
            t.end = torch.cuda.Event(enable_timing=True)
            t.end.record()
        self._inflight.append(t)

    # ------------------------------------------------------------------ completion
    def _complete(self, t: _Transfer) -> None:
        seconds = 0.0
        if t.start is not None and t.end is not None:
            seconds = t.start.elapsed_time(t.end) / 1000.0
        if t.kind == "load":
            self.stats.loaded_pages += t.num_pages
            self.stats.load_seconds += seconds
        else:
            self.stats.backed_up_pages += t.num_pages
            self.stats.backup_seconds += seconds
        for cb in t.callbacks:
            cb()

    def poll(self) -> int:
        """Complete every finished transfer (running its callbacks); returns how many."""
        done = [t for t in self._inflight if t.end is None or t.end.query()]
        if done:
            self._inflight = [t for t in self._inflight if t not in done]
            for t in done:
                self._complete(t)
        return len(done)

    def wait_all(self) -> None:
        """Block until every issued transfer has finished, then complete them. (Queued loads
        are not issued: they belong to the next step.)"""
        for t in self._inflight:
            if t.end is not None:
                t.end.synchronize()
        self.poll()

    @property
    def idle(self) -> bool:
        return not self._inflight and not self._queued_loads

    def snapshot(self) -> dict[str, float]:
        s = self.stats
        loaded = s.loaded_pages * self.page_bytes
        backed = s.backed_up_pages * self.page_bytes
        return {
            "loaded_bytes": loaded,
            "backed_up_bytes": backed,
            "load_ops": s.load_ops,
            "backup_ops": s.backup_ops,
            "failed_loads": s.failed_loads,
            "failed_backups": s.failed_backups,
            "load_bandwidth_gbps": loaded / s.load_seconds / 1e9 if s.load_seconds else 0.0,
            "backup_bandwidth_gbps": backed / s.backup_seconds / 1e9 if s.backup_seconds else 0.0,
        }
