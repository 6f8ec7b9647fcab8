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

A space may be *striped*: split over several allocations (X-Mem banks, peer GPUs), each holding
an equal, contiguous range of pages in the same layout. Page ``p`` is then local page
``p % segment_pages`` of segment ``p // segment_pages``. The kernel still runs one launch per
call: it reads each page's segment from a small table of element offsets between the
segments' base addresses (all of them live in one unified address space); ``direct`` splits runs
at segment boundaries; ``torch`` groups the page pairs by segment.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvtier.kernels.copy_engine import batch_memcpy, batch_memcpy_available

if TYPE_CHECKING:
    from kvtier.tiers.layout import Layout

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]


# Programs per (layer, K/V) of one copy launch, and warps per program: enough loads in flight
# to fill the link, few enough to leave the multiprocessors to the forward running beside the
# load. Measured on an H200 (docs/benchmarks.md): over PCIe (pinned host memory) 16 programs of
# 2 warps move as much as 128 of 4 (51 GB/s) while slowing the concurrent forward far less;
# NVLink (peer GPUs, X-Mem banks) needs more in flight. KVTIER_COPY_PROGRAMS / _WARPS override.
HOST_COPY_SHAPE = (16, 2)
DEVICE_COPY_SHAPE = (64, 4)
_ENV_PROGRAMS = os.environ.get("KVTIER_COPY_PROGRAMS")
_ENV_WARPS = os.environ.get("KVTIER_COPY_WARPS")


def copy_shape(src: KVSpace, dst: KVSpace) -> tuple[int, int]:
    """(programs per (layer, K/V), warps per program) of a kernel copy between two spaces."""
    host = src.device.type == "cpu" or dst.device.type == "cpu"
    programs, warps = HOST_COPY_SHAPE if host else DEVICE_COPY_SHAPE
    return int(_ENV_PROGRAMS or programs), int(_ENV_WARPS or warps)


@dataclass
class KVSpace:
    """Flat K and V buffers whose rows sit at ``layout`` offsets.

    Striped (``segments`` non-empty): ``layout`` describes one segment of ``segment_pages``
    pages, ``segments[i]`` is segment i's (K, V) and ``k``/``v`` are segment 0's.
    """

    k: torch.Tensor  # 1-D, holds K rows at layout offsets
    v: torch.Tensor  # 1-D, holds V rows at layout offsets
    layout: Layout
    segments: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    segment_pages: int = 0
    # Per device: the kernel's segment offset table and the alignment all its entries share.
    _tables: dict[torch.device, tuple[torch.Tensor, int]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.segments:
            if self.segment_pages < 1:
                raise ValueError("a striped KVSpace needs segment_pages >= 1")
            if self.segments[0][0] is not self.k or self.segments[0][1] is not self.v:
                raise ValueError("a striped KVSpace's k and v must be segment 0's")
            devices = {t.device for kv in self.segments for t in kv}
            if len(devices) != 1:
                raise ValueError(f"a striped KVSpace's segments must share a device; got {devices}")

    @classmethod
    def striped(
        cls,
        segments: Sequence[tuple[torch.Tensor, torch.Tensor]],
        layout: Layout,
        segment_pages: int,
    ) -> KVSpace:
        """A space over ``segments`` (each one ``layout`` of ``segment_pages`` pages)."""
        if not segments:
            raise ValueError("a striped KVSpace needs at least one segment")
        k, v = segments[0]
        return cls(k, v, layout, tuple(segments), segment_pages)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def is_striped(self) -> bool:
        return bool(self.segments)

    def locate(self, page: int) -> tuple[int, int]:
        """(segment, local page) of ``page``."""
        if not self.segments:
            return 0, page
        seg, local = divmod(page, self.segment_pages)
        if not 0 <= seg < len(self.segments):
            raise IndexError(
                f"page {page} is outside the striped space "
                f"({len(self.segments)} x {self.segment_pages} pages)"
            )
        return seg, local

    def segment(self, i: int) -> KVSpace:
        """Segment ``i`` as an ordinary (unstriped) space; the space itself when unstriped."""
        if not self.segments:
            if i != 0:
                raise IndexError(f"an unstriped KVSpace has only segment 0; asked for {i}")
            return self
        k, v = self.segments[i]
        return KVSpace(k, v, self.layout)

    def offset_table(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """For the kernel: int64 [segments * 2] element offsets of each segment's K and V from
        segment 0's, and the largest power of two (<= 16) dividing every one of them."""
        cached = self._tables.get(device)
        if cached is not None:
            return cached
        elem = self.k.element_size()
        offsets: list[int] = []
        for k, v in self.segments:
            for t, base in ((k, self.k), (v, self.v)):
                delta = t.data_ptr() - base.data_ptr()
                if delta % elem:
                    raise ValueError(
                        "striped KVSpace segments must be aligned to the element size; "
                        f"got a byte offset of {delta}"
                    )
                offsets.append(delta // elem)
        align = 16
        while align > 1 and any(o % align for o in offsets):
            align //= 2
        table = torch.tensor(offsets, dtype=torch.int64).to(device)
        self._tables[device] = (table, align)
        return table, align


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


def _segment_pairs(
    src: KVSpace, dst: KVSpace, src_pages: list[int], dst_pages: list[int]
) -> list[tuple[KVSpace, KVSpace, list[int], list[int]]]:
    """Page pairs grouped by (source segment, destination segment), in local page ids."""
    if not (src.is_striped or dst.is_striped):
        return [(src, dst, src_pages, dst_pages)]
    groups: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for s, d in zip(src_pages, dst_pages):
        si, sl = src.locate(s)
        di, dl = dst.locate(d)
        ss, dd = groups.setdefault((si, di), ([], []))
        ss.append(sl)
        dd.append(dl)
    return [(src.segment(si), dst.segment(di), ss, dd) for (si, di), (ss, dd) in groups.items()]


def copy_pages_torch(
    src: KVSpace, dst: KVSpace, src_pages: torch.Tensor, dst_pages: torch.Tensor, layers: range
) -> None:
    if src.is_striped or dst.is_striped:
        for s, d, sp, dp in _segment_pairs(src, dst, src_pages.tolist(), dst_pages.tolist()):
            _copy_rows_torch(s, d, torch.tensor(sp), torch.tensor(dp), layers)
        return
    _copy_rows_torch(src, dst, src_pages, dst_pages, layers)


def _copy_rows_torch(
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
        src_seg_offsets,
        dst_seg_offsets,
        src_seg_pages,
        dst_seg_pages,
        num_pages,
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
        SRC_STRIPED: tl.constexpr,
        DST_STRIPED: tl.constexpr,
        SRC_SEG_ALIGN: tl.constexpr,
        DST_SEG_ALIGN: tl.constexpr,
    ):
        # A fixed number of programs per (layer, K/V) walks the page list with a stride: a load
        # then occupies only part of the GPU, so the forward's kernels on the compute stream
        # keep finding free multiprocessors while layers are still arriving.
        layer = layer_start + tl.program_id(1)
        is_v = tl.program_id(2)
        if is_v == 0:
            src = src_k
            dst = dst_k
        else:
            src = src_v
            dst = dst_v
        cols = tl.arange(0, ROW_BLOCK)
        toks = tl.arange(0, TOKENS_PER_ITER)
        # A while loop: Triton's interpreter (CPU tests) cannot take program ids as range bounds.
        i = tl.program_id(0)
        while i < num_pages:
            sp = tl.load(src_pages + i).to(tl.int64)
            dp = tl.load(dst_pages + i).to(tl.int64)
            s_base = layer.to(tl.int64) * src_layer_stride
            d_base = layer.to(tl.int64) * dst_layer_stride
            # A striped side: the page's segment is reached through its offset from segment 0;
            # the alignment hint keeps the loads vectorised (the offset is read at run time).
            if SRC_STRIPED:
                seg = sp // src_seg_pages
                sp = sp - seg * src_seg_pages
                s_base += tl.multiple_of(tl.load(src_seg_offsets + seg * 2 + is_v), SRC_SEG_ALIGN)
            if DST_STRIPED:
                seg = dp // dst_seg_pages
                dp = dp - seg * dst_seg_pages
                d_base += tl.multiple_of(tl.load(dst_seg_offsets + seg * 2 + is_v), DST_SEG_ALIGN)
            s_base += sp * src_page_stride
            d_base += dp * dst_page_stride
            for t0 in range(0, PAGE_SIZE, TOKENS_PER_ITER):
                t = t0 + toks
                mask = (t[:, None] < PAGE_SIZE) & (cols[None, :] < ROW)
                s_off = s_base + t[:, None].to(tl.int64) * src_token_stride + cols[None, :]
                d_off = d_base + t[:, None].to(tl.int64) * dst_token_stride + cols[None, :]
                x = tl.load(src + s_off, mask=mask)
                tl.store(dst + d_off, x, mask=mask)
            i += tl.num_programs(0)


def _segment_args(
    space: KVSpace, device: torch.device, unused: torch.Tensor
) -> tuple[torch.Tensor, int, bool, int]:
    """(offset table, pages per segment, striped, alignment) for one side of the kernel; an
    unstriped side passes ``unused`` as its (never read) table."""
    if not space.is_striped:
        return unused, 1, False, 1
    table, align = space.offset_table(device)
    return table, space.segment_pages, True, align


def copy_pages_kernel(
    src: KVSpace,
    dst: KVSpace,
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
    layers: range,
    max_programs: int | None = None,
    num_warps: int | None = None,
) -> None:
    """One launch copying every (page pair, layer, K/V). Page id tensors must be on the GPU
    running the kernel (or CPU under the Triton interpreter). ``max_programs``: programs per
    (layer, K/V) and ``num_warps`` per program default to ``copy_shape(src, dst)``."""
    if triton is None:
        raise RuntimeError("--hicache-io-backend kernel needs triton")
    n = int(src_pages.shape[0])
    if n == 0 or len(layers) == 0:
        return
    # The kernel runs where the page ids are; a tier buffer on another device (a peer GPU) is
    # then reached through its address.
    if src_pages.device.type == "cuda":
        gpu = src_pages.device
    else:
        gpu = dst.device if dst.device.type == "cuda" else src.device
    row = src.layout.row
    row_block = triton.next_power_of_2(row)
    # About 8K elements per iteration keeps registers in check and many loads in flight.
    tokens_per_iter = max(1, min(triton.next_power_of_2(src.layout.page_size), 8192 // row_block))
    src_tab, src_seg_pages, src_striped, src_align = _segment_args(src, src_pages.device, src_pages)
    dst_tab, dst_seg_pages, dst_striped, dst_align = _segment_args(dst, src_pages.device, src_pages)
    default_programs, default_warps = copy_shape(src, dst)
    grid = (min(n, max_programs or default_programs), len(layers), 2)
    _copy_pages_kernel[grid](
        _kernel_arg(src.k, gpu),
        _kernel_arg(src.v, gpu),
        _kernel_arg(dst.k, gpu),
        _kernel_arg(dst.v, gpu),
        src_pages,
        dst_pages,
        src_tab,
        dst_tab,
        src_seg_pages,
        dst_seg_pages,
        n,
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
        SRC_STRIPED=src_striped,
        DST_STRIPED=dst_striped,
        SRC_SEG_ALIGN=src_align,
        DST_SEG_ALIGN=dst_align,
        num_warps=num_warps or default_warps,
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


def split_runs(
    src: KVSpace, dst: KVSpace, runs: list[tuple[int, int, int]]
) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Cut runs at the segment boundaries of either side: (src segment, dst segment, runs in
    local page ids). Unstriped spaces pass through unchanged."""
    if not (src.is_striped or dst.is_striped):
        return [(0, 0, runs)]
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for s0, d0, length in runs:
        while length > 0:
            si, sl = src.locate(s0)
            di, dl = dst.locate(d0)
            take = length
            if src.is_striped:
                take = min(take, src.segment_pages - sl)
            if dst.is_striped:
                take = min(take, dst.segment_pages - dl)
            groups.setdefault((si, di), []).append((sl, dl, take))
            s0, d0, length = s0 + take, d0 + take, length - take
    return [(si, di, r) for (si, di), r in groups.items()]


def copy_pages_direct(
    src: KVSpace, dst: KVSpace, runs: list[tuple[int, int, int]], layers: range
) -> None:
    """Copy-engine copies of every run, layer and K/V (both layouts must be page-contiguous):
    one cuMemcpyBatchAsync per layer where the driver has it, else one cudaMemcpyAsync per
    span. Per layer, not one batch for the call: on an H200 (2026-12-01) a 4 GB backup as one
    batch over all 48 layers moved 44.1 GB/s (0.80 of the bulk copy), per-layer batches
    51.9 GB/s (0.948)."""
    DirectPlan(src, dst, runs, layers).issue_all()


class DirectPlan:
    """The copy-engine spans of ``runs`` for each of ``layers``, ready to issue layer by layer
    (one driver call per layer when batched).

    Only the first layer's spans are computed up front: a layer's spans are the first layer's
    moved by whole layer strides (every layout is linear in the layer, and the segments of a
    striped space share one layout), so ``issue`` adds that offset. Why: the plan is built on
    the load's critical path, before its first copy starts; computing every layer's addresses
    first took ~3 ms for an 80K-token load (48 layers x 2,560 spans, on a CPU of the dev
    machine) against ~0.6 ms for one layer's."""

    def __init__(
        self,
        src: KVSpace,
        dst: KVSpace,
        runs: list[tuple[int, int, int]],
        layers: range,
        batched: bool | None = None,
    ) -> None:
        """``batched``: issue through ``batch_memcpy`` (default: when a side is on a GPU and
        the driver has it), else one copy per span."""
        sl, dl = src.layout, dst.layout
        if not (sl.page_contiguous and dl.page_contiguous):
            raise ValueError(
                "--hicache-io-backend direct needs page-contiguous layouts; "
                f"got {sl.name}/{dl.name}"
            )
        self.layers = layers
        self.num_layers = len(layers)
        # Elements between one layer's row and the next one's, on each side.
        self.src_layer_stride, self.dst_layer_stride = sl.layer_stride, dl.layer_stride
        if batched is None:
            on_gpu = src.device.type == "cuda" or dst.device.type == "cuda"
            batched = on_gpu and batch_memcpy_available()
        self.batched = batched
        # Per (segment pair, K/V): tensors and the first layer's span offsets and lengths.
        self.groups: list[
            tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
        ] = []
        if not self.num_layers:
            return
        first = range(layers[0], layers[0] + 1)
        for si, di, local_runs in split_runs(src, dst, runs):
            s, d = src.segment(si), dst.segment(di)
            s_off, d_off, n = _span_offsets(s, d, local_runs, first)
            self.groups += [(s.k, d.k, s_off, d_off, n), (s.v, d.v, s_off, d_off, n)]
        if self.batched:
            # Byte addresses of the first layer's spans, all groups side by side. K and V, and
            # both sides of a copy, share one element size.
            esize = src.k.element_size()
            self.dsts = torch.cat([d.data_ptr() + o * esize for _, d, _, o, _ in self.groups])
            self.srcs = torch.cat([s.data_ptr() + o * esize for s, _, o, _, _ in self.groups])
            self.sizes = torch.cat([n * esize for _, _, _, _, n in self.groups])
            self.src_layer_bytes = self.src_layer_stride * esize
            self.dst_layer_bytes = self.dst_layer_stride * esize

    def issue_all(self) -> None:
        """Queue every layer's copies on the current stream, layer by layer (one driver call
        per layer when batched)."""
        for i in range(self.num_layers):
            self.issue(i)

    def issue(self, i: int) -> None:
        """Queue layer ``layers[i]``'s copies on the current stream."""
        step = self.layers[i] - self.layers[0]
        if self.batched:
            batch_memcpy(
                self.dsts + step * self.dst_layer_bytes,
                self.srcs + step * self.src_layer_bytes,
                self.sizes,
            )
            return
        s_step, d_step = step * self.src_layer_stride, step * self.dst_layer_stride
        for s_t, d_t, s_off, d_off, n in self.groups:
            for a, b, m in zip(s_off.tolist(), d_off.tolist(), n.tolist()):
                d_t[b + d_step : b + d_step + m].copy_(
                    s_t[a + s_step : a + s_step + m], non_blocking=True
                )


def _span_offsets(
    src: KVSpace, dst: KVSpace, runs: list[tuple[int, int, int]], layers: range
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Element offsets (source, destination) and lengths of the contiguous spans that copy
    ``runs`` for ``layers`` between two unstriped spaces (the same for K and V).

    A run is one span only if consecutive pages are adjacent on both sides (page stride equal
    to a page: true for layer_first and the pool); page_first_direct runs split page by page.
    """
    sl, dl = src.layout, dst.layout
    page_elems = sl.page_size * sl.row
    r = torch.tensor(runs, dtype=torch.int64).view(-1, 3)
    s0, d0, length = r[:, 0], r[:, 1], r[:, 2]
    if not (sl.page_stride == page_elems and dl.page_stride == page_elems):
        # One span per page: expand each run into its pages.
        j = torch.repeat_interleave(length)
        first = torch.cumsum(length, 0) - length
        k = torch.arange(int(length.sum())) - torch.repeat_interleave(first, length)
        s0, d0 = s0[j] + k, d0[j] + k
        length = torch.ones_like(s0)
    la = torch.tensor(list(layers), dtype=torch.int64)
    s_off = (s0[None, :] * sl.page_stride + la[:, None] * sl.layer_stride).reshape(-1)
    d_off = (d0[None, :] * dl.page_stride + la[:, None] * dl.layer_stride).reshape(-1)
    n = (length * page_elems).repeat(len(la))
    return s_off, d_off, n
