"""The GPU KV pool: K and V of every layer, addressed by token slot, allocated by page.

Slot ``s`` belongs to page ``s // page_size``. Page 0 is never handed out: padded tokens (CUDA
graph replays, empty batch rows) write their KV there, so a stray write can never land in a page
that holds real data.
"""

from __future__ import annotations

import torch


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a small CPU tensor) on ``device`` without the host waiting for the device: the
    copy is queued on the current stream behind a step still running (overlap scheduling).

    A plain non-blocking copy from pageable memory: the driver copies the bytes into its own
    staging memory before returning (so ``host`` may be freed at once) and queues the transfer.
    On an H200 it did not wait for a busy stream and was the cheapest of three ways
    (scripts/probe_h2d.py, 2026-12-01, 512 bytes: 10.4 us a call, against 24.3 through a
    ``torch.empty(pin_memory=True)`` staging copy and 28.2 through ``Tensor.pin_memory()``).
    CUDA allows the driver to wait for the stream before a pageable copy; that would cost the
    overlap, never correctness (the copy stays ordered on the stream)."""
    return host.to(device, non_blocking=True)


class PageAllocator:
    """Free list of KV pages (ids 1..num_pages-1).

    Allocation is deterministic: a fresh allocator hands out 1, 2, 3, ...; freed pages are
    reused first, in the order they were freed (so tests can assert exact page ids and recently
    touched memory is reused while it is warm).
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (1 is reserved); got {num_pages}")
        self.num_pages = num_pages
        # A stack: the next page handed out is the last element.
        self._stack: list[int] = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._stack)

    @property
    def capacity(self) -> int:
        """Pages that can ever be allocated (all but the reserved page 0)."""
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int] | None:
        """Take ``n`` pages, or None (taking nothing) when fewer are free."""
        if n > len(self._stack):
            return None
        if n == 0:
            return []
        pages = self._stack[-n:]
        del self._stack[-n:]
        pages.reverse()
        return pages

    def free(self, pages: list[int]) -> None:
        self._stack.extend(reversed(pages))

    def free_pages(self) -> list[int]:
        return list(self._stack)

    def reset(self) -> None:
        self._stack = list(range(self.num_pages - 1, 0, -1))


class KVPool:
    """K and V buffers of shape [num_layers, num_pages * page_size, num_kv_heads, head_dim]."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return (
            2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        )

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def token_bytes(self) -> int:
        return self.bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def page_bytes_per_layer(self) -> int:
        """Bytes of one page of K (or of V) in one layer: the unit the tier IO paths move."""
        return self.page_size * self.num_kv_heads * self.head_dim * self.k.element_size()

    def k_buffer(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def v_buffer(self, layer: int) -> torch.Tensor:
        return self.v[layer]

    def write(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the KV of new tokens at slots ``loc`` ([T] int64) of ``layer``."""
        self.k[layer].index_copy_(0, loc, k.to(self.dtype))
        self.v[layer].index_copy_(0, loc, v.to(self.dtype))

    def copy_slots(self, layer: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the KV at slots ``src`` to slots ``dst`` ([N] int64 each) of ``layer``."""
        self.write(
            layer, dst, self.k[layer].index_select(0, src), self.v[layer].index_select(0, src)
        )

    def copy_slots_all_layers(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """``copy_slots`` for every layer at once: four kernels instead of four a layer."""
        self.k.index_copy_(1, dst, self.k.index_select(1, src))
        self.v.index_copy_(1, dst, self.v.index_select(1, src))


class ReqToPageTable:
    """Device table of each running request's pages: row r, column i = the page holding tokens
    [i * page_size, (i + 1) * page_size) of the request in row r.

    Kept on the device so that a batch's block table is one gather, not a rebuild from Python
    lists each step. Unused entries point to the reserved page 0.
    """

    def __init__(self, max_rows: int, max_pages_per_row: int, device: torch.device | str) -> None:
        self.max_rows = max_rows
        self.max_pages_per_row = max_pages_per_row
        self.table = torch.zeros((max_rows, max_pages_per_row), dtype=torch.int32, device=device)
        self._free_rows: list[int] = list(range(max_rows - 1, -1, -1))

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def set_pages(self, row: int, start: int, pages: list[int]) -> None:
        if not pages:
            return
        if start + len(pages) > self.max_pages_per_row:
            raise ValueError(
                f"request needs {start + len(pages)} pages; "
                f"the table holds {self.max_pages_per_row}"
            )
        # Overlap scheduling grows a request's pages while its step is in flight.
        src = torch.tensor(pages, dtype=torch.int32)
        self.table[row, start : start + len(pages)] = to_device_async(src, self.table.device)

    def reset(self) -> None:
        self.table.zero_()
        self._free_rows = list(range(self.max_rows - 1, -1, -1))
