"""The L2 tier interface: a KV buffer in some memory, in a chosen layout, addressed by page.

A tier owns its memory (allocation at construction, release in ``close()``) and says how IO may
reach it. Page accounting (which L2 pages are free) lives in the cache, which treats every tier
alike: nothing outside ``tiers/`` knows whether the bytes sit in host DRAM, X-Mem or a peer GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.kernels.kv_io import KVSpace
from kvtier.tiers.layout import Layout, make_layout


class TierError(RuntimeError):
    """The L2 tier cannot be set up; the message says why and which flag to change."""


@dataclass(frozen=True)
class TierSpec:
    """What the L2 buffer must hold."""

    num_pages: int  # usable pages; page 0 is reserved like in the GPU pool
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    layout: str

    def __post_init__(self) -> None:
        if self.num_pages < 1:
            raise TierError(f"the L2 tier must hold at least one page; got {self.num_pages}")

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers, K and V."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem

    @property
    def total_bytes(self) -> int:
        return (self.num_pages + 1) * self.page_bytes

    def make_layout(self, num_pages: int | None = None) -> Layout:
        """The layout of a buffer of ``num_pages`` pages (default: all, reserved page 0 too)."""
        return make_layout(
            self.layout,
            self.num_pages + 1 if num_pages is None else num_pages,
            self.page_size,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
        )


def stripe_pages(total_pages: int, num_targets: int) -> tuple[int, int]:
    """Split ``total_pages`` L2 pages into contiguous, equal ranges over at most ``num_targets``
    allocations: returns (pages per segment, segments). Segment i holds pages
    [i * per_segment, (i + 1) * per_segment); the last may have a few unused pages. Equal
    segments share one layout (identical strides), which keeps the kernel one launch."""
    if total_pages < 1 or num_targets < 1:
        raise ValueError(f"cannot stripe {total_pages} pages over {num_targets} allocations")
    per_segment = -(-total_pages // num_targets)
    return per_segment, -(-total_pages // per_segment)


class MemoryTier(ABC):
    name: str = "?"

    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self.layout = spec.make_layout()
        self._space: KVSpace | None = None

    @property
    def num_pages(self) -> int:
        return self.spec.num_pages

    @property
    def space(self) -> KVSpace:
        """The buffer as flat K and V views for the IO paths."""
        if self._space is None:
            raise TierError(f"the {self.name} tier is closed")
        return self._space

    def _set_buffer(self, buffer: torch.Tensor) -> None:
        """``buffer``: 1-D, ``2 * kv_stride`` elements (K then V)."""
        half = self.layout.kv_stride
        self._space = KVSpace(buffer[:half], buffer[half : 2 * half], self.layout)

    def _set_segments(self, buffers: list[torch.Tensor], segment_pages: int) -> None:
        """A buffer striped over several allocations: ``buffers[i]`` (1-D, ``2 * kv_stride``
        elements of the segment layout, K then V) holds L2 pages
        [i * segment_pages, (i + 1) * segment_pages). ``self.layout`` becomes that of one
        segment."""
        self.layout = self.spec.make_layout(segment_pages)
        half = self.layout.kv_stride
        self._space = KVSpace.striped(
            [(b[:half], b[half : 2 * half]) for b in buffers], self.layout, segment_pages
        )

    @property
    @abstractmethod
    def kernel_accessible(self) -> bool:
        """Whether GPU kernels can read and write the buffer through its addresses."""

    @property
    def pinned_nbytes(self) -> int:
        """Host memory this tier holds page-locked (0 for memory that is not host memory)."""
        return 0

    @abstractmethod
    def close(self) -> None:
        """Release the memory. Idempotent."""

    def describe(self) -> dict[str, Any]:
        return {
            "tier": self.name,
            "layout": self.layout.name,
            "pages": self.num_pages,
            "page_size": self.spec.page_size,
            "bytes": self.spec.total_bytes,
        }
