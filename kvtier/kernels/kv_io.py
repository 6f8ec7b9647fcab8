"""Moving KV pages between the GPU pool and an L2 tier.

Both sides are described as a ``KVSpace``: flat K and V buffers plus a Layout giving the
element offset of the row (page, layer, token). Three ways to copy a list of page pairs for a
range of layers:

- ``kernel``: one Triton launch per call; each program copies one page of one layer of K or V
  through device-visible addresses (pinned host memory via UVA, a peer GPU, X-Mem). Works for
  any page list and any layout.
- ``direct``: copy-engine copies (``Tensor.copy_``, i.e. cudaMemcpyAsync), one per run of pages
  that are consecutive on both sides and contiguous in memory.
- ``torch``: row gathers with index tensors; the reference, and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvtier.tiers.layout import Layout

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]


@dataclass
class KVSpace:
    k: torch.Tensor  # 1-D, holds K rows at layout offsets
    v: torch.Tensor  # 1-D, holds V rows at layout offsets
    layout: Layout

    @property
    def device(self) -> torch.device:
        return self.k.device


class _DevicePointer:
    """A raw address Triton can take as a pointer argument: pinned host memory (its UVA
    address) or memory another allocator owns."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._ptr = tensor.data_ptr()
        self.dtype = tensor.dtype

    def data_ptr(self) -> int:
        return self._ptr


def _kernel_arg(t: torch.Tensor, target: torch.device) -> torch.Tensor | _DevicePointer:
    if t.device == target or target.type != "cuda":
        return t
    return _DevicePointer(t)


# ---------------------------------------------------------------------------- torch reference
def _row_index(layout: Layout, pages: torch.Tensor, layers: range) -> torch.Tensor:
    """Row numbers ([pages, layers, page_size] flattened) of the given pages and layers, in
    units of ``layout.row`` elements."""
    row = layout.row
    t = torch.arange(layout.page_size, dtype=torch.int64)
    la = torch.tensor(list(layers), dtype=torch.int64)
    p = pages.to(torch.int64).cpu()
    off = (
        p[:, None, None] * (layout.page_stride // row)
        + la[None, :, None] * (layout.layer_stride // row)
        + t[None, None, :] * (layout.token_stride // row)
    )
    return off.reshape(-1)


def copy_pages_torch(
    src: KVSpace, dst: KVSpace, src_pages: torch.Tensor, dst_pages: torch.Tensor, layers: range
) -> None:
    si = _row_index(src.layout, src_pages, layers)
    di = _row_index(dst.layout, dst_pages, layers)
    row = src.layout.row
    for s, d in ((src.k, dst.k), (src.v, dst.v)):
        rows = s.view(-1, row)[si.to(s.device)]
        d.view(-1, row).index_copy_(0, di.to(d.device), rows.to(d.device, non_blocking=True))


# ---------------------------------------------------------------------------- Triton kernel
if triton is not None:

    @triton.jit
    def _copy_pages_kernel(
        src_k,
        src_v,
        dst_k,
        dst_v,
        src_pages,
        dst_pages,
        layer_start,
        src_page_stride,
        src_layer_stride,
        src_token_stride,
        dst_page_stride,
        dst_layer_stride,
        dst_token_stride,
        PAGE_SIZE: tl.constexpr,
        ROW: tl.constexpr,
        ROW_BLOCK: tl.constexpr,
        TOKENS_PER_ITER: tl.constexpr,
    ):
        # One program: one page of one layer of K (axis 2 == 0) or V (== 1).
        i = tl.program_id(0)
        layer = layer_start + tl.program_id(1)
        is_v = tl.program_id(2)
        sp = tl.load(src_pages + i).to(tl.int64)
        dp = tl.load(dst_pages + i).to(tl.int64)
        s_base = sp * src_page_stride + layer.to(tl.int64) * src_layer_stride
        d_base = dp * dst_page_stride + layer.to(tl.int64) * dst_layer_stride
        if is_v == 0:
            src = src_k
            dst = dst_k
        else:
            src = src_v
            dst = dst_v
        cols = tl.arange(0, ROW_BLOCK)
        toks = tl.arange(0, TOKENS_PER_ITER)
        for t0 in range(0, PAGE_SIZE, TOKENS_PER_ITER):
            t = t0 + toks
            mask = (t[:, None] < PAGE_SIZE) & (cols[None, :] < ROW)
            s_off = s_base + t[:, None].to(tl.int64) * src_token_stride + cols[None, :]
            d_off = d_base + t[:, None].to(tl.int64) * dst_token_stride + cols[None, :]
            x = tl.load(src + s_off, mask=mask)
            tl.store(dst + d_off, x, mask=mask)


def copy_pages_kernel(
    src: KVSpace, dst: KVSpace, src_pages: torch.Tensor, dst_pages: torch.Tensor, layers: range
) -> None:
    """One launch copying every (page pair, layer, K/V). Page id tensors must be on the GPU
    running the kernel (or CPU under the Triton interpreter)."""
    if triton is None:
        raise RuntimeError("--hicache-io-backend kernel needs triton")
    n = int(src_pages.shape[0])
    if n == 0 or len(layers) == 0:
        return
    gpu = dst.device if dst.device.type == "cuda" else src.device
    row = src.layout.row
    row_block = triton.next_power_of_2(row)
    # About 8K elements per iteration keeps registers in check and many loads in flight.
    tokens_per_iter = max(1, min(triton.next_power_of_2(src.layout.page_size), 8192 // row_block))
    grid = (n, len(layers), 2)
    _copy_pages_kernel[grid](
        _kernel_arg(src.k, gpu),
        _kernel_arg(src.v, gpu),
        _kernel_arg(dst.k, gpu),
        _kernel_arg(dst.v, gpu),
        src_pages,
        dst_pages,
        layers.start,
        src.layout.page_stride,
        src.layout.layer_stride,
        src.layout.token_stride,
        dst.layout.page_stride,
        dst.layout.layer_stride,
        dst.layout.token_stride,
        PAGE_SIZE=src.layout.page_size,
        ROW=row,
        ROW_BLOCK=row_block,
        TOKENS_PER_ITER=tokens_per_iter,
        num_warps=4,
    )


# ---------------------------------------------------------------------------- copy engine
def page_runs(src_pages: list[int], dst_pages: list[int]) -> list[tuple[int, int, int]]:
    """Merge page pairs into runs consecutive on both sides: (src_start, dst_start, length)."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_pages, dst_pages):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_pages_direct(
    src: KVSpace, dst: KVSpace, runs: list[tuple[int, int, int]], layers: range
) -> None:
    """Copy-engine copies, one per run, layer and K/V (both layouts must be page-contiguous)."""
    sl, dl = src.layout, dst.layout
    if not (sl.page_contiguous and dl.page_contiguous):
        raise ValueError(
            f"--hicache-io-backend direct needs page-contiguous layouts; got {sl.name}/{dl.name}"
        )
    page_elems = sl.page_size * sl.row
    for layer in layers:
        for s0, d0, length in runs:
            so = s0 * sl.page_stride + layer * sl.layer_stride
            do = d0 * dl.page_stride + layer * dl.layer_stride
            # A run is contiguous only if consecutive pages are adjacent in memory (strides
            # equal to a page): true for layer_first and the pool; page_first_direct runs are
            # split page by page.
            if sl.page_stride == page_elems and dl.page_stride == page_elems:
                spans = [(so, do, length * page_elems)]
            else:
                spans = [
                    (so + j * sl.page_stride, do + j * dl.page_stride, page_elems)
                    for j in range(length)
                ]
            for a, b, m in spans:
                dst.k[b : b + m].copy_(src.k[a : a + m], non_blocking=True)
                dst.v[b : b + m].copy_(src.v[a : a + m], non_blocking=True)
