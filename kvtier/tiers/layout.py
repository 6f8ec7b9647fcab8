"""Layouts of an L2 KV buffer (K and V stacked on dim 0), as element strides.

Every layout stores one token's K (or V) of one layer as a contiguous row of
``num_kv_heads * head_dim`` elements; they differ in how rows are ordered:

- ``layer_first``        (2, layers, pages * page_size, heads, dim): a page of one layer is one
                          contiguous chunk (best for layer-by-layer loads).
- ``page_first``         (2, pages * page_size, layers, heads, dim): a token's rows of every
                          layer are adjacent.
- ``page_first_direct``  (2, pages, layers, page_size, heads, dim): a page of one layer is one
                          contiguous chunk and a whole page (all layers) is too (best for
                          copy-engine copies of whole pages).

The IO paths only need the address of row (kv, page, layer, token), which in all three is
``kv * kv_stride + page * page_stride + layer * layer_stride + token * token_stride``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    name: str
    shape: tuple[int, ...]
    kv_stride: int
    page_stride: int
    layer_stride: int
    token_stride: int
    row: int  # elements per token row (heads * dim)
    page_size: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def page_contiguous(self) -> bool:
        """A page of one layer is one contiguous chunk."""
        return self.token_stride == self.row

    def offset(self, kv: int, page: int, layer: int, token: int = 0) -> int:
        return (
            kv * self.kv_stride
            + page * self.page_stride
            + layer * self.layer_stride
            + token * self.token_stride
        )


def make_layout(
    name: str, num_pages: int, page_size: int, num_layers: int, num_kv_heads: int, head_dim: int
) -> Layout:
    row = num_kv_heads * head_dim
    slots = num_pages * page_size
    if name == "layer_first":
        return Layout(
            name,
            (2, num_layers, slots, num_kv_heads, head_dim),
            kv_stride=num_layers * slots * row,
            page_stride=page_size * row,
            layer_stride=slots * row,
            token_stride=row,
            row=row,
            page_size=page_size,
        )
    if name == "page_first":
        return Layout(
            name,
            (2, slots, num_layers, num_kv_heads, head_dim),
            kv_stride=slots * num_layers * row,
            page_stride=page_size * num_layers * row,
            layer_stride=row,
            token_stride=num_layers * row,
            row=row,
            page_size=page_size,
        )
    if name == "page_first_direct":
        return Layout(
            name,
            (2, num_pages, num_layers, page_size, num_kv_heads, head_dim),
            kv_stride=num_pages * num_layers * page_size * row,
            page_stride=num_layers * page_size * row,
            layer_stride=page_size * row,
            token_stride=row,
            row=row,
            page_size=page_size,
        )
    raise ValueError(f"unknown --hicache-mem-layout {name!r}")


def device_pool_layout(
    num_pages: int, page_size: int, num_layers: int, num_kv_heads: int, head_dim: int
) -> Layout:
    """The GPU pool's K (and V) tensor [layers, slots, heads, dim], as a Layout with no kv axis
    (K and V are separate tensors there)."""
    row = num_kv_heads * head_dim
    slots = num_pages * page_size
    return Layout(
        "device",
        (num_layers, slots, num_kv_heads, head_dim),
        kv_stride=0,
        page_stride=page_size * row,
        layer_stride=slots * row,
        token_stride=row,
        row=row,
        page_size=page_size,
    )
