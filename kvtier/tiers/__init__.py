"""L2 tiers: where the second level of the KV cache lives.

``create_tier`` is the only entry point the rest of the engine uses; every tier satisfies
``MemoryTier`` (see base.py), so nothing outside this package depends on which one runs.
"""

from __future__ import annotations

import logging

import torch

from kvtier import faults
from kvtier.server_args import ServerArgs
from kvtier.tiers.base import MemoryTier, TierError, TierSpec, stripe_pages

logger = logging.getLogger(__name__)

__all__ = ["MemoryTier", "TierError", "TierSpec", "create_tier", "l2_num_pages", "stripe_pages"]


def l2_num_pages(args: ServerArgs, device_pages: int, page_bytes: int) -> int:
    """L2 capacity in pages: --hicache-size GB if given, else --hicache-ratio x the GPU pool."""
    if args.hicache_size > 0:
        pages = int(args.hicache_size * 1e9 // page_bytes) - 1
        if pages < 1:
            raise TierError(
                f"--hicache-size {args.hicache_size} GB is less than one page of "
                f"{page_bytes / 1e6:.2f} MB"
            )
    else:
        pages = int(args.hicache_ratio * device_pages)
    if pages < device_pages:
        logger.warning(
            "the L2 tier (%d pages) is smaller than the GPU pool (%d pages): with "
            "write_through some prefixes will not get an L2 copy",
            pages,
            device_pages,
        )
    return pages


def create_tier(args: ServerArgs, spec: TierSpec, device: torch.device) -> MemoryTier:
    """The L2 tier chosen by ``--hicache-tier`` (or its alias ``--hicache-use-xmem``), sized by
    ``spec``, serving the compute ``device``. Each tier's module is imported only when chosen:
    the X-Mem SDK initialises itself at import and must never load for the other tiers."""
    try:
        faults.check("tier_alloc")
    except faults.FaultInjected as e:
        raise TierError(
            f"allocating the {args.hicache_tier} L2 tier failed ({e}); lower --hicache-size or "
            "choose another --hicache-tier"
        ) from e
    if args.hicache_tier == "dram":
        from kvtier.tiers.dram import DramTier

        return DramTier(spec, device)
    if args.hicache_tier == "xmem":
        from kvtier.tiers.xmem import XMemTier

        return XMemTier(spec, device, banks=ServerArgs.parse_ids(args.hicache_xmem_banks))
    if args.hicache_tier == "peer":
        from kvtier.tiers.peer import PeerTier

        return PeerTier(spec, device, ServerArgs.parse_ids(args.hicache_peer_devices))
    raise TierError(f"--hicache-tier {args.hicache_tier} is not available in this build")
