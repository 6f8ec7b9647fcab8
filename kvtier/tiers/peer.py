"""``peer``: the L2 buffer in the HBM of other GPUs of the same machine, reached over NVLink.

The open, runnable form of scale-up memory expansion: the compute GPU's kernels and copy engines
read and write a peer GPU's memory directly (unified addressing + peer access), at NVLink
bandwidth instead of PCIe's. The buffer is striped over the peer GPUs (``--hicache-peer-devices``
in that order, default every other visible GPU): one allocation per peer holding an equal,
contiguous range of L2 pages (see ``stripe_pages`` and ``KVSpace.striped``).

Each allocation is a torch tensor on its peer GPU; the tier hands the IO paths views of them
that live on the compute GPU (``tensor_from_pointer``), so every copy runs on the compute GPU's
load and write streams.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvtier.tiers.base import MemoryTier, TierError, TierSpec, stripe_pages
from kvtier.tiers.device_memory import enable_peer_access, tensor_from_pointer

logger = logging.getLogger(__name__)

# Memory left free on each peer GPU (its CUDA context, other users) when sizing the L2 stripe.
PEER_HEADROOM_BYTES = 1024**3


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_peer_devices(compute: int, num_gpus: int, requested: list[int] | None) -> list[int]:
    """The peer GPUs in striping order; a TierError naming the flag when the list is wrong."""
    if requested is None:
        return [g for g in range(num_gpus) if g != compute]
    seen: set[int] = set()
    for g in requested:
        if not 0 <= g < num_gpus:
            raise TierError(
                f"--hicache-peer-devices names GPU {g} but {num_gpus} are visible "
                f"(ids 0..{num_gpus - 1})"
            )
        if g == compute:
            raise TierError(
                f"--hicache-peer-devices names GPU {g}, the compute GPU; name other GPUs"
            )
        if g in seen:
            raise TierError(f"--hicache-peer-devices names GPU {g} twice")
        seen.add(g)
    return list(requested)


class PeerTier(MemoryTier):
    name = "peer"

    def __init__(
        self, spec: TierSpec, device: torch.device, peer_devices: list[int] | None = None
    ) -> None:
        """``peer_devices``: GPU ids in striping order (default: every GPU but ``device``)."""
        super().__init__(spec)
        self.device = device
        self.peers: list[int] = []
        self._owners: list[torch.Tensor] = []
        num_gpus = visible_gpus()
        if num_gpus < 2:
            raise TierError(
                f"the peer tier needs at least 2 GPUs; {num_gpus} visible (use --hicache-tier dram)"
            )
        if device.type != "cuda":
            raise TierError(f"the peer tier needs --device cuda; this engine runs on {device}")
        compute = device.index if device.index is not None else torch.cuda.current_device()
        self.device = device = torch.device("cuda", compute)
        peers = resolve_peer_devices(compute, num_gpus, peer_devices)
        for g in peers:
            if not torch.cuda.can_device_access_peer(compute, g):
                raise TierError(
                    f"GPU {compute} cannot access GPU {g}'s memory directly (no peer access "
                    "between them; see nvidia-smi topo -m); leave it out of "
                    "--hicache-peer-devices or use --hicache-tier dram"
                )
        self.compute = compute
        total = spec.num_pages + 1
        self.segment_pages, segments = stripe_pages(total, len(peers))
        self.peers = peers[:segments]
        self.segment_bytes = self.segment_pages * spec.page_bytes
        for g in self.peers:
            free, _ = torch.cuda.mem_get_info(g)
            if free - PEER_HEADROOM_BYTES < self.segment_bytes:
                raise TierError(
                    f"--hicache-size needs {self.segment_bytes / 1e9:.2f} GB on each of "
                    f"{len(self.peers)} peer GPU(s) but GPU {g} has "
                    f"{max(free - PEER_HEADROOM_BYTES, 0) / 1e9:.2f} GB free (less "
                    f"{PEER_HEADROOM_BYTES / 1e9:.2f} GB headroom); lower --hicache-size or add "
                    "peer GPUs (--hicache-peer-devices)"
                )
        elem = torch.empty((), dtype=spec.dtype).element_size()
        views: list[torch.Tensor] = []
        try:
            for g in self.peers:
                owner = torch.empty(
                    self.segment_bytes // elem, dtype=spec.dtype, device=f"cuda:{g}"
                )
                self._owners.append(owner)
                # Before any kernel of ours dereferences a peer address.
                enable_peer_access(compute, g)
                views.append(
                    tensor_from_pointer(
                        owner.data_ptr(), self.segment_bytes, spec.dtype, device, owner=owner
                    )
                )
        except torch.OutOfMemoryError as e:
            self._owners.clear()
            raise TierError(
                f"allocating {self.segment_bytes / 1e9:.2f} GB on peer GPU {g} failed ({e}); "
                "lower --hicache-size"
            ) from e
        self._set_segments(views, self.segment_pages)

    @property
    def kernel_accessible(self) -> bool:
        return True

    def page_location(self, page: int) -> tuple[int, int]:
        """(peer GPU id, page within that GPU's allocation) of L2 page ``page``."""
        seg, local = self.space.locate(page)
        return self.peers[seg], local

    def close(self) -> None:
        if self._space is None and not self._owners:
            return
        self._space = None
        if self._owners:
            # Copies still queued on the compute GPU may touch the memory being released.
            torch.cuda.synchronize(self.device)
            self._owners.clear()
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "peer_devices": list(self.peers),
            "pages_per_device": self.segment_pages,
        }
