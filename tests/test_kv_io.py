"""The KV IO paths (Triton kernel, copy-engine runs, torch reference) move exactly the rows they
should, for every layout, any page list and page size. On CPU the kernel runs in Triton's
interpreter; on a GPU the tier side is pinned host memory reached through UVA."""

import pytest
import torch

from kvtier.kernels.kv_io import (
    KVSpace,
    copy_pages_direct,
    copy_pages_kernel,
    copy_pages_torch,
    page_runs,
)
from kvtier.tiers.layout import device_pool_layout, make_layout

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYERS, HEADS, DIM = 3, 2, 8


def pool_space(num_pages, ps):
    lay = device_pool_layout(num_pages, ps, LAYERS, HEADS, DIM)
    k = torch.randn(lay.numel, device=DEV)
    v = torch.randn(lay.numel, device=DEV)
    return KVSpace(k, v, lay)


def tier_space(name, num_pages, ps):
    lay = make_layout(name, num_pages, ps, LAYERS, HEADS, DIM)
    buf = torch.randn(lay.numel, pin_memory=DEV.type == "cuda")
    half = lay.kv_stride
    return KVSpace(buf[:half], buf[half:], lay)


def clone(space):
    # A clone of pinned memory is pageable: re-pin it, or GPU kernels cannot reach it.
    def c(t):
        return t.clone().pin_memory() if t.is_pinned() else t.clone()

    return KVSpace(c(space.k), c(space.v), space.layout)


def expected_rows(space, page, layer):
    lay = space.layout
    rows = []
    for buf in (space.k, space.v):
        for t in range(lay.page_size):
            o = lay.offset(0, page, layer, t)
            rows.append(buf[o : o + lay.row].cpu())
    return torch.stack(rows)


def test_page_runs_merge_consecutive_pairs():
    assert page_runs([4, 5, 6, 9, 10], [1, 2, 3, 7, 8]) == [(4, 1, 3), (9, 7, 2)]
    assert page_runs([1, 2, 3], [5, 4, 3]) == [(1, 5, 1), (2, 4, 1), (3, 3, 1)]
    assert page_runs([], []) == []


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
@pytest.mark.parametrize("ps", [1, 4])
@pytest.mark.parametrize("direction", ["load", "backup"])
def test_kernel_and_torch_paths_copy_exact_rows(layout, ps, direction):
    torch.manual_seed(0)
    pool = pool_space(10, ps)
    tier = tier_space(layout, 12, ps)
    tier_pages = [7, 2, 3, 11]
    pool_pages = [5, 1, 9, 2]
    if direction == "load":
        src, dst, sp, dp = tier, pool, tier_pages, pool_pages
    else:
        src, dst, sp, dp = pool, tier, pool_pages, tier_pages
    layers = range(1, 3)  # a sub-range: layer 0 must stay untouched
    dst_ref = clone(dst)
    copy_pages_torch(src, dst_ref, torch.tensor(sp), torch.tensor(dp), layers)
    dst_kernel = clone(dst)
    idx = {"dtype": torch.int32, "device": DEV}
    # Three programs for four pages: one of them walks two pages.
    sp_t, dp_t = torch.tensor(sp, **idx), torch.tensor(dp, **idx)
    copy_pages_kernel(src, dst_kernel, sp_t, dp_t, layers, max_programs=3)
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    for s, d in zip(sp, dp):
        for layer in range(LAYERS):
            copied = layer in layers
            want = expected_rows(src if copied else dst, s if copied else d, layer)
            assert torch.equal(expected_rows(dst_ref, d, layer), want)
            assert torch.equal(expected_rows(dst_kernel, d, layer), want)
    # Nothing else changed.
    assert torch.equal(dst_ref.k.cpu(), dst_kernel.k.cpu())
    assert torch.equal(dst_ref.v.cpu(), dst_kernel.v.cpu())


@pytest.mark.parametrize("layout", ["layer_first", "page_first_direct"])
def test_direct_runs_match_reference(layout):
    torch.manual_seed(1)
    ps = 4
    pool = pool_space(12, ps)
    tier = tier_space(layout, 12, ps)
    sp, dp = [3, 4, 5, 9, 1], [6, 7, 8, 2, 11]
    ref = clone(pool)
    copy_pages_torch(tier, ref, torch.tensor(sp), torch.tensor(dp), range(LAYERS))
    out = clone(pool)
    copy_pages_direct(tier, out, page_runs(sp, dp), range(LAYERS))
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(ref.k.cpu(), out.k.cpu()) and torch.equal(ref.v.cpu(), out.v.cpu())


def test_direct_refuses_token_interleaved_layout():
    pool = pool_space(4, 2)
    tier = tier_space("page_first", 4, 2)
    with pytest.raises(ValueError, match="direct needs page-contiguous layouts; got page_first"):
        copy_pages_direct(tier, pool, [(1, 1, 1)], range(LAYERS))


@pytest.mark.parametrize("layout", ["layer_first", "page_first_direct"])
def test_direct_batch_addresses_copy_exact_rows(layout, monkeypatch):
    """The copy-engine batch path (one cuMemcpyBatchAsync per layer on a GPU) computes byte
    addresses and sizes for every span. Here the driver call is replaced by a host memmove of
    the same (dst, src, size) triples, so the address arithmetic is checked on any machine,
    layer by layer as a load issues it."""
    import ctypes

    from kvtier.kernels import kv_io

    calls = []

    def memmove_batch(dsts, srcs, sizes):
        calls.append(int(dsts.numel()))
        for d, s, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
            ctypes.memmove(d, s, n)

    monkeypatch.setattr(kv_io, "batch_memcpy", memmove_batch)
    torch.manual_seed(2)
    ps = 4
    lay = device_pool_layout(12, ps, LAYERS, HEADS, DIM)
    pool = KVSpace(torch.randn(lay.numel), torch.randn(lay.numel), lay)
    tier = tier_space(layout, 12, ps)
    if tier.k.device.type != "cpu" or tier.k.is_pinned():
        pytest.skip("the host memmove stands in for the driver on host tensors only")
    sp, dp = [3, 4, 5, 9, 1], [6, 7, 8, 2, 11]
    ref = clone(pool)
    copy_pages_torch(tier, ref, torch.tensor(sp), torch.tensor(dp), range(LAYERS))
    out = clone(pool)
    plan = kv_io.DirectPlan(tier, out, page_runs(sp, dp), range(LAYERS), batched=True)
    for i in range(LAYERS):
        plan.issue(i)
    # layer_first keeps the run 3,4,5 -> 6,7,8 as one span per K/V (3 spans); page_first_direct
    # pages are not adjacent in memory, so each page is its own span (5).
    spans = 3 if layout == "layer_first" else 5
    assert calls == [2 * spans] * LAYERS
    assert torch.equal(ref.k, out.k) and torch.equal(ref.v, out.v)
    # A whole-call copy (a backup) goes out as one batch per layer as well (one batch over all
    # layers was slower on the H200).
    calls.clear()
    out = clone(pool)
    kv_io.DirectPlan(tier, out, page_runs(sp, dp), range(LAYERS), batched=True).issue_all()
    assert calls == [2 * spans] * LAYERS
    assert torch.equal(ref.k, out.k) and torch.equal(ref.v, out.v)
    # Layers that do not start at 0: each layer's spans are the first one's moved by whole
    # layer strides, on both paths (batched and one copy per span); layer 0 stays as it was.
    some = range(1, LAYERS)
    ref = clone(pool)
    copy_pages_torch(tier, ref, torch.tensor(sp), torch.tensor(dp), some)
    for batched in (True, False):
        calls.clear()
        out = clone(pool)
        kv_io.DirectPlan(tier, out, page_runs(sp, dp), some, batched=batched).issue_all()
        assert calls == ([2 * spans] * len(some) if batched else [])
        assert torch.equal(ref.k, out.k) and torch.equal(ref.v, out.v)
