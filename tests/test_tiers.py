"""The X-Mem and peer-GPU tiers.

Without the hardware: the X-Mem SDK is replaced by its stand-in (``kvtier.tiers.xmem_standin``,
plain memory), which drives the xmem tier's allocation, striping, accounting and every error
path; the peer tier's checks run against monkeypatched ``torch.cuda`` queries. Striped buffers
(one allocation per bank / peer GPU) are checked through every IO path, with page lists that
cross the segment boundaries. GPU tests (skipped without CUDA) run the same engine equality with
stand-in banks in device memory and, with two or more GPUs, the real peer tier.
"""

import argparse
import random
import sys

import pytest
import torch
from engine_utils import make_engine, make_hicache_engine

import kvtier
from kvtier.kernels.kv_io import (
    KVSpace,
    copy_pages_direct,
    copy_pages_kernel,
    copy_pages_torch,
    page_runs,
    split_runs,
)
from kvtier.server_args import ServerArgs, ServerArgsError
from kvtier.tiers import TierError, TierSpec, stripe_pages, xmem_standin
from kvtier.tiers.device_memory import live_wrappers, tensor_from_pointer
from kvtier.tiers.layout import device_pool_layout, make_layout
from kvtier.tiers.peer import PeerTier, resolve_peer_devices
from kvtier.tiers.xmem import XMemTier, load_sdk

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
LAYERS, HEADS, DIM = 3, 2, 8
FALLBACK = "; --no-hicache-use-xmem falls back to host DRAM"
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
needs_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
needs_2_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")


def xmem_error(what):
    return f"the xmem L2 tier cannot start: {what}{FALLBACK}"


# ============================================================================ striping logic
def test_stripe_pages_splits_contiguous_equal_ranges():
    assert stripe_pages(10, 1) == (10, 1)
    assert stripe_pages(10, 2) == (5, 2)
    assert stripe_pages(10, 3) == (4, 3)  # 4 + 4 + 2 used
    assert stripe_pages(10, 4) == (3, 4)  # 3 + 3 + 3 + 1 used
    assert stripe_pages(10, 8) == (2, 5)  # 5 of 8 targets are enough
    assert stripe_pages(2, 3) == (1, 2)
    with pytest.raises(ValueError):
        stripe_pages(0, 2)


def test_locate_and_split_runs_cut_at_segment_boundaries():
    lay = make_layout("layer_first", 5, 2, LAYERS, HEADS, DIM)
    segs = [(torch.zeros(lay.kv_stride), torch.zeros(lay.kv_stride)) for _ in range(3)]
    tier = KVSpace.striped(segs, lay, 5)
    pool = KVSpace(torch.zeros(4), torch.zeros(4), device_pool_layout(40, 2, LAYERS, HEADS, DIM))
    assert [tier.locate(p) for p in (0, 4, 5, 9, 10, 14)] == [
        (0, 0),
        (0, 4),
        (1, 0),
        (1, 4),
        (2, 0),
        (2, 4),
    ]
    with pytest.raises(IndexError, match="page 15 is outside the striped space"):
        tier.locate(15)
    # Load: tier pages 3..11 into pool pages 20..28, one run cut into three.
    assert split_runs(tier, pool, page_runs(list(range(3, 12)), list(range(20, 29)))) == [
        (0, 0, [(3, 20, 2)]),
        (1, 0, [(0, 22, 5)]),
        (2, 0, [(0, 27, 2)]),
    ]
    # Backup: the cut is on the destination side.
    assert split_runs(pool, tier, [(7, 4, 2), (1, 9, 1)]) == [
        (0, 0, [(7, 4, 1)]),
        (0, 1, [(8, 0, 1), (1, 4, 1)]),
    ]
    # Unstriped on both sides: runs pass through.
    assert split_runs(pool, pool, [(1, 2, 3)]) == [(0, 0, [(1, 2, 3)])]


def test_striped_space_checks_its_segments():
    lay = make_layout("layer_first", 2, 2, LAYERS, HEADS, DIM)
    a, b = torch.zeros(lay.kv_stride), torch.zeros(lay.kv_stride)
    with pytest.raises(ValueError, match="k and v must be segment 0's"):
        KVSpace(a, b, lay, ((b, a),), 2)
    with pytest.raises(ValueError, match="needs segment_pages >= 1"):
        KVSpace(a, b, lay, ((a, b),), 0)


# ============================================================================ IO on striped buffers
def striped_space(layout, seg_pages, nseg, ps, reverse=False, misalign=False):
    """Segments as separate allocations; ``reverse`` orders them by descending address (negative
    offsets in the kernel's table); ``misalign`` shifts one segment by an element."""
    lay = make_layout(layout, seg_pages, ps, LAYERS, HEADS, DIM)
    bufs = [torch.randn(2 * lay.kv_stride + 1, device=DEV) for _ in range(nseg)]
    if reverse:
        bufs.sort(key=lambda t: -t.data_ptr())
    segs = []
    for i, buf in enumerate(bufs):
        buf = buf[1:] if misalign and i == 1 else buf[:-1]
        segs.append((buf[: lay.kv_stride], buf[lay.kv_stride :]))
    return KVSpace.striped(segs, lay, seg_pages)


def pool_space(num_pages, ps):
    lay = device_pool_layout(num_pages, ps, LAYERS, HEADS, DIM)
    return KVSpace(torch.randn(lay.numel, device=DEV), torch.randn(lay.numel, device=DEV), lay)


def clone(space):
    if not space.is_striped:
        return KVSpace(space.k.clone(), space.v.clone(), space.layout)
    return KVSpace.striped(
        [(k.clone(), v.clone()) for k, v in space.segments], space.layout, space.segment_pages
    )


def page_rows(space, page, layer):
    """Views of the K and V rows of one page of one layer, found by hand (not by kv_io)."""
    seg, local = space.locate(page)
    part = space.segment(seg)
    lay = part.layout
    return [
        buf[lay.offset(0, local, layer, t) : lay.offset(0, local, layer, t) + lay.row]
        for buf in (part.k, part.v)
        for t in range(lay.page_size)
    ]


def expected_copy(src, dst, sp, dp, layers):
    want = clone(dst)
    for s, d in zip(sp, dp):
        for layer in layers:
            for w, r in zip(page_rows(want, d, layer), page_rows(src, s, layer)):
                w.copy_(r)
    return want


def flat(space):
    parts = space.segments or ((space.k, space.v),)
    return torch.cat([t.cpu() for kv in parts for t in kv])


def run_path(path, src, dst, sp, dp, layers):
    if path == "torch":
        copy_pages_torch(src, dst, torch.tensor(sp), torch.tensor(dp), layers)
    elif path == "kernel":
        idx = {"dtype": torch.int32, "device": DEV}
        copy_pages_kernel(src, dst, torch.tensor(sp, **idx), torch.tensor(dp, **idx), layers)
    else:
        copy_pages_direct(src, dst, page_runs(sp, dp), layers)
    if DEV.type == "cuda":
        torch.cuda.synchronize()


# Tier pages around both boundaries of 3 segments of 5 pages, runs crossing them included.
TIER_PAGES = [3, 4, 5, 6, 9, 10, 14, 0, 12, 11]
POOL_PAGES = [1, 2, 3, 4, 8, 9, 5, 15, 11, 10]


@pytest.mark.parametrize(
    "layout,path",
    [
        ("layer_first", "torch"),
        ("layer_first", "kernel"),
        ("layer_first", "direct"),
        ("page_first", "torch"),
        ("page_first", "kernel"),
        ("page_first_direct", "kernel"),
        ("page_first_direct", "direct"),
    ],
)
@pytest.mark.parametrize("ps", [1, 4])
@pytest.mark.parametrize("direction", ["load", "backup"])
@pytest.mark.parametrize("reverse", [False, True])
def test_striped_tier_moves_exact_rows(layout, path, ps, direction, reverse):
    torch.manual_seed(0)
    tier = striped_space(layout, 5, 3, ps, reverse=reverse)
    pool = pool_space(16, ps)
    if direction == "load":
        src, dst, sp, dp = tier, pool, TIER_PAGES, POOL_PAGES
    else:
        src, dst, sp, dp = pool, tier, POOL_PAGES, TIER_PAGES
    layers = range(1, 3)  # layer 0 must stay untouched
    want = expected_copy(src, dst, sp, dp, layers)
    run_path(path, src, dst, sp, dp, layers)
    assert torch.equal(flat(dst), flat(want))


@pytest.mark.parametrize("path", ["torch", "kernel", "direct"])
def test_striped_to_striped_and_misaligned_segments(path):
    torch.manual_seed(1)
    src = striped_space("layer_first", 4, 3, 2, misalign=True)
    dst = striped_space("layer_first", 3, 4, 2, reverse=True)
    sp, dp = [3, 4, 7, 8, 11, 1], [2, 3, 5, 6, 11, 9]
    want = expected_copy(src, dst, sp, dp, range(LAYERS))
    run_path(path, src, dst, sp, dp, range(LAYERS))
    assert torch.equal(flat(dst), flat(want))
    if path == "kernel":
        assert src.offset_table(DEV)[1] == 1  # the shifted segment disables the hint
        assert dst.offset_table(DEV)[1] == 16


def test_tensor_from_pointer_shares_memory_and_keeps_its_owner_alive():
    owner = torch.zeros(64, dtype=torch.uint8)
    before = live_wrappers()
    t = tensor_from_pointer(owner.data_ptr(), 64, torch.float32, torch.device("cpu"), owner)
    assert t.shape == (16,) and t.dtype == torch.float32 and t.device.type == "cpu"
    t[1] = 2.0
    assert owner[4:8].view(torch.float32).item() == 2.0
    view = t[2:]
    assert live_wrappers() == before + 1
    del t
    assert live_wrappers() == before + 1  # the view still uses the memory
    del view
    assert live_wrappers() == before
    with pytest.raises(ValueError, match="not aligned"):
        tensor_from_pointer(owner.data_ptr() + 1, 4, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="whole number"):
        tensor_from_pointer(owner.data_ptr(), 6, torch.float32, torch.device("cpu"))


# ============================================================================ xmem tier (stand-in)
def spec(num_pages=9, layout="layer_first", ps=4):
    return TierSpec(num_pages, ps, 2, 2, 8, torch.float32, layout)


@pytest.fixture
def standin(monkeypatch):
    """The SDK stand-in with 3 banks, selected like in production runs (environment)."""
    monkeypatch.setenv("KVTIER_XMEM_STANDIN", "1")
    sdk = xmem_standin.configure(num_banks=3, bank_bytes=10**6)
    yield sdk
    xmem_standin.configure()


def test_xmem_stripes_pages_over_the_named_banks_in_order(standin):
    s = spec()  # 10 pages with the reserved one, 1024 bytes each
    tier = XMemTier(s, DEV, banks=[2, 0])
    try:
        assert tier.banks == [2, 0] and tier.segment_pages == 5
        assert [(b, n) for b, _, n in standin.allocations()] == [(2, 5 * 1024), (0, 5 * 1024)]
        assert [tier.page_location(p) for p in (0, 4, 5, 9)] == [(2, 0), (2, 4), (0, 0), (0, 4)]
        assert standin.get_bank_status(2).available_memory == 10**6 - 5 * 1024
        assert standin.get_bank_status(1).available_memory == 10**6
        # A page written through the tier's space lands in its bank, at its local offset.
        play = device_pool_layout(4, 4, 2, 2, 8)
        values = torch.arange(play.numel, dtype=torch.float32, device=DEV)
        pool = KVSpace(values, -values, play)
        copy_pages_torch(pool, tier.space, torch.tensor([1, 2]), torch.tensor([4, 5]), range(2))
        bank0 = standin.bank_memory(standin.allocations()[1][1]).view(torch.float32)
        lay = tier.layout
        for layer in range(2):
            got_k = bank0[lay.offset(0, 0, layer) : lay.offset(0, 0, layer) + 4 * lay.row]
            got_v = bank0[lay.offset(1, 0, layer) : lay.offset(1, 0, layer) + 4 * lay.row]
            o = pool.layout.offset(0, 2, layer)
            assert torch.equal(got_k, pool.k[o : o + 4 * lay.row])
            assert torch.equal(got_v, pool.v[o : o + 4 * lay.row])
        assert tier.describe()["banks"] == [2, 0]
        assert tier.describe()["standin"] is True
    finally:
        tier.close()


def test_xmem_uses_every_bank_by_default_and_only_those_needed(standin):
    tier = XMemTier(spec(9), DEV)
    assert standin.initialised
    assert tier.banks == [0, 1, 2] and tier.segment_pages == 4
    assert [b for b, _, _ in standin.allocations()] == [0, 1, 2]
    tier.close()
    tier = XMemTier(spec(1), DEV)  # 2 pages: 2 banks of 1 page
    assert tier.banks == [0, 1] and tier.segment_pages == 1
    assert standin.live_allocations() == 2
    tier.close()


def test_xmem_close_frees_every_allocation_once(standin):
    tier = XMemTier(spec(20), DEV)
    assert standin.live_allocations() == 3
    tier.close()
    assert standin.live_allocations() == 0
    assert all(standin.get_bank_status(b).available_memory == 10**6 for b in range(3))
    tier.close()  # idempotent
    with pytest.raises(TierError, match="the xmem tier is closed"):
        _ = tier.space


def test_xmem_standin_is_announced(standin, caplog):
    with caplog.at_level("WARNING"):
        XMemTier(spec(), DEV).close()
    assert "STAND-IN for the X-Mem SDK" in caplog.text


def test_xmem_package_missing(monkeypatch):
    monkeypatch.delenv("KVTIER_XMEM_STANDIN", raising=False)
    monkeypatch.setitem(sys.modules, "xmem", None)
    with pytest.raises(TierError) as e:
        load_sdk()
    assert str(e.value) == xmem_error(
        "the xmem-mtier package is not installed (pip install 'kvtier[xmem]'; it works only "
        "where X-Mem hardware and the MTier service exist)"
    )


def test_xmem_library_missing(standin, monkeypatch):
    monkeypatch.setenv("MTIER_LIB_PATH", "/nonexistent/libmtier.so")
    standin.config.import_error = "library"
    with pytest.raises(TierError) as e:
        XMemTier(spec(), DEV)
    assert str(e.value) == xmem_error(
        "the X-Mem SDK could not load libmtier.so from /nonexistent/libmtier.so (set "
        "MTIER_LIB_PATH): libmtier.so: cannot open shared object file: No such file or directory"
    )


def test_xmem_service_unavailable_at_import(standin):
    standin.config.import_error = "service"
    with pytest.raises(TierError) as e:
        XMemTier(spec(), DEV)
    assert str(e.value) == xmem_error(
        "the X-Mem SDK failed to initialise (MTierServiceUnavailableError: cannot connect to "
        "the MTier service); is the MTier service running?"
    )


def test_xmem_service_not_ready(standin):
    standin.config.service_ready = False
    with pytest.raises(TierError) as e:
        XMemTier(spec(), DEV)
    assert str(e.value) == xmem_error(
        "the MTier service is not ready (get_status() reports status 1)"
    )
    assert standin.live_allocations() == 0


def test_xmem_status_call_failing(standin, monkeypatch):
    def broken():
        raise xmem_standin.MTierServiceUnavailableError("connection reset")

    monkeypatch.setattr(standin, "get_status", broken)
    with pytest.raises(TierError) as e:
        XMemTier(spec(), DEV)
    assert str(e.value) == xmem_error(
        "the MTier service did not answer get_status() (MTierServiceUnavailableError: "
        "connection reset)"
    )


@pytest.mark.parametrize(
    "banks,what",
    [
        ([3], "--hicache-xmem-banks names bank 3 but the MTier service has 3 bank(s) (ids 0..2)"),
        ([1, 1], "--hicache-xmem-banks names bank 1 twice"),
    ],
)
def test_xmem_bad_bank_ids(standin, banks, what):
    with pytest.raises(TierError) as e:
        XMemTier(spec(), DEV, banks=banks)
    assert str(e.value) == xmem_error(what)


def test_xmem_bank_out_of_memory_is_refused_before_allocating(standin):
    standin.config.bank_bytes = 4096  # 4 pages of 1024 bytes; 2 banks need 5 pages each
    with pytest.raises(TierError) as e:
        XMemTier(spec(), DEV, banks=[0, 1])
    assert str(e.value) == xmem_error(
        "X-Mem bank 0 has 0.00 GB available but --hicache-size needs 0.00 GB on each of 2 "
        "bank(s); lower --hicache-size or stripe over more banks (--hicache-xmem-banks)"
    )
    assert standin.live_allocations() == 0


def test_xmem_malloc_failure_frees_what_was_allocated(standin, monkeypatch):
    real = standin.malloc

    def malloc(bank, size):
        if bank == 2:
            standin._last_error = "bank 2: out of memory"
            raise xmem_standin.MTierOutOfMemoryError("out of memory")
        return real(bank, size)

    monkeypatch.setattr(standin, "malloc", malloc)
    with pytest.raises(TierError) as e:
        XMemTier(spec(), DEV)
    assert str(e.value) == xmem_error(
        "malloc of 0.00 GB on X-Mem bank 2 failed (MTierOutOfMemoryError: out of memory; last "
        "error: bank 2: out of memory); lower --hicache-size"
    )
    assert standin.live_allocations() == 0


def test_xmem_needs_cuda(standin):
    if DEV.type == "cuda":
        pytest.skip("a CUDA device is present")
    standin.config.host = False
    with pytest.raises(TierError) as e:
        XMemTier(spec(), DEV)
    assert str(e.value) == xmem_error(
        "X-Mem is reached through CUDA device pointers but this engine runs on cpu (no CUDA GPU)"
    )


def test_standin_malloc_rejects_concurrent_use(standin):
    assert standin._busy.acquire()
    try:
        with pytest.raises(AssertionError, match="called concurrently"):
            standin.malloc(0, 16)
    finally:
        standin._busy.release()


# ============================================================================ flags
SEED_FLAGS = [
    "--model", "builtin:tiny-qwen3", "--enable-hierarchical-cache", "--hicache-size", "60",
    "--hicache-write-policy", "write_through", "--hicache-io-backend", "kernel",
    "--hicache-mem-layout", "layer_first", "--page-size", "64", "--mem-fraction-static", "0.5",
]  # fmt: skip


@pytest.mark.parametrize(
    "extra,tier",
    [
        (["--hicache-use-xmem"], "xmem"),
        (["--no-hicache-use-xmem"], "dram"),
        ([], "dram"),
        (["--hicache-tier", "xmem"], "xmem"),
        (["--hicache-tier", "peer", "--hicache-peer-devices", "1,2"], "peer"),
        (["--hicache-tier", "xmem", "--hicache-xmem-banks", "1,0"], "xmem"),
    ],
)
def test_seed_flags_select_the_tier(extra, tier):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = ServerArgs.from_cli_args(parser.parse_args(SEED_FLAGS + extra))
    assert args.hicache_tier == tier
    assert args.hicache_size == 60 and args.page_size == 64 and args.enable_hierarchical_cache


def test_xmem_alias_contradicting_the_tier_is_refused():
    with pytest.raises(ServerArgsError, match="--hicache-use-xmem=True contradicts"):
        ServerArgs(hicache_use_xmem=True, hicache_tier="peer")
    with pytest.raises(ServerArgsError, match="--hicache-use-xmem=False contradicts"):
        ServerArgs(hicache_use_xmem=False, hicache_tier="xmem")


def test_seed_engine_call_reaches_the_xmem_error(monkeypatch):
    monkeypatch.delenv("KVTIER_XMEM_STANDIN", raising=False)
    monkeypatch.setitem(sys.modules, "xmem", None)
    with pytest.raises(TierError) as e:
        kvtier.Engine(
            model_path="builtin:tiny-qwen3",
            page_size=64,
            mem_fraction_static=0.5,
            enable_hierarchical_cache=True,
            hicache_size=60,
            hicache_write_policy="write_through",
            hicache_io_backend="kernel",
            hicache_mem_layout="layer_first",
            hicache_use_xmem=True,
            log_level="warning",
        )
    assert "the xmem-mtier package is not installed" in str(e.value)
    assert str(e.value).endswith(FALLBACK)


# ============================================================================ peer tier checks
def fake_gpus(monkeypatch, n, access=lambda a, b: True, free=80 * 10**9):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", access)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (free, 80 * 10**9))


def test_resolve_peer_devices():
    assert resolve_peer_devices(0, 4, None) == [1, 2, 3]
    assert resolve_peer_devices(2, 4, None) == [0, 1, 3]
    assert resolve_peer_devices(0, 4, [3, 1]) == [3, 1]


@pytest.mark.parametrize("n", [0, 1])
def test_peer_needs_two_gpus(monkeypatch, n):
    fake_gpus(monkeypatch, n)
    with pytest.raises(TierError) as e:
        PeerTier(spec(), torch.device("cuda", 0))
    assert str(e.value) == (
        f"the peer tier needs at least 2 GPUs; {n} visible (use --hicache-tier dram)"
    )


def test_peer_on_a_cpu_machine_names_the_gpu_count():
    if GPUS >= 2:
        pytest.skip("2 GPUs are visible")
    with pytest.raises(TierError, match=f"needs at least 2 GPUs; {GPUS} visible"):
        kvtier.Engine(
            model_path="builtin:tiny-qwen3",
            enable_hierarchical_cache=True,
            hicache_tier="peer",
            log_level="warning",
        )


@pytest.mark.parametrize(
    "device,peers,message",
    [
        ("cpu", None, "the peer tier needs --device cuda; this engine runs on cpu"),
        (
            "cuda:0",
            [1, 5],
            "--hicache-peer-devices names GPU 5 but 4 are visible (ids 0..3)",
        ),
        (
            "cuda:0",
            [0, 1],
            "--hicache-peer-devices names GPU 0, the compute GPU; name other GPUs",
        ),
        ("cuda:1", [2, 2], "--hicache-peer-devices names GPU 2 twice"),
    ],
)
def test_peer_device_list_errors(monkeypatch, device, peers, message):
    fake_gpus(monkeypatch, 4)
    with pytest.raises(TierError) as e:
        PeerTier(spec(), torch.device(device), peers)
    assert str(e.value) == message


def test_peer_without_peer_access(monkeypatch):
    fake_gpus(monkeypatch, 4, access=lambda a, b: b != 2)
    with pytest.raises(TierError) as e:
        PeerTier(spec(), torch.device("cuda", 0))
    assert str(e.value) == (
        "GPU 0 cannot access GPU 2's memory directly (no peer access between them; see "
        "nvidia-smi topo -m); leave it out of --hicache-peer-devices or use --hicache-tier dram"
    )


def test_peer_sizing_checks_free_memory_on_each_peer(monkeypatch):
    fake_gpus(monkeypatch, 3, free=2 * 1024**3)
    big = TierSpec(999, 64, 48, 4, 128, torch.bfloat16, "layer_first")
    with pytest.raises(TierError) as e:
        PeerTier(big, torch.device("cuda", 0))
    # 1000 pages of 6 MiB (Qwen3-30B-A3B geometry, page 64) over 2 peers; 1 GiB of each peer's
    # 2 GiB is headroom.
    assert str(e.value) == (
        "--hicache-size needs 3.15 GB on each of 2 peer GPU(s) but GPU 1 has 1.07 GB free "
        "(less 1.07 GB headroom); lower --hicache-size or add peer GPUs (--hicache-peer-devices)"
    )


# ============================================================================ engine equality
make = make_engine


hicache = make_hicache_engine


@pytest.fixture(scope="module")
def reference():
    with make(disable_radix_cache=True) as e:
        yield e


def chats(engine, n=5, turns=3, seed=0):
    rng = random.Random(seed)
    hist = [[rng.randrange(10, 1500) for _ in range(36)] for _ in range(n)]
    outs, metas = [], []
    for _ in range(turns):
        res = engine.generate(input_ids=hist, sampling_params=GREEDY)
        for i, r in enumerate(res):
            outs.append(r["output_ids"])
            metas.append(r["meta_info"])
            hist[i] = hist[i] + r["output_ids"] + [rng.randrange(10, 1500) for _ in range(9)]
        engine.check_integrity()
    return outs, metas


def assert_tier_served(engine, metas, tier):
    from_l2 = sum(m["cached_tokens_by_tier"].get(tier, 0) for m in metas)
    assert from_l2 > 0, "no prefix came back from L2"
    stats = engine.get_stats()
    assert stats["l2_tier"] == tier
    assert stats["cached_tokens_by_tier"][tier] == from_l2
    engine.check_integrity()


def assert_every_bank_written(sdk):
    for bank, ptr, _ in sdk.allocations():
        assert (sdk.bank_memory(ptr) != 0xFF).any(), f"bank {bank} never received a page"


@pytest.mark.parametrize("banks", [None, "2,0,1"])
def test_xmem_standin_engine_equals_recompute(standin, reference, banks):
    standin.config.bank_bytes = 10**9
    want, _ = chats(reference)
    with hicache(hicache_use_xmem=True, hicache_xmem_banks=banks) as e:
        got, metas = chats(e)
        assert got == want
        assert_tier_served(e, metas, "xmem")
        assert [b for b, _, _ in standin.allocations()] == (
            [0, 1, 2] if banks is None else [2, 0, 1]
        )
        assert_every_bank_written(standin)
    assert standin.live_allocations() == 0


def test_xmem_standin_engine_tier_hits_after_device_flush(standin, reference):
    sdk = xmem_standin.configure(num_banks=8, bank_bytes=10**9)
    rng = random.Random(5)
    prompt = [rng.randrange(10, 1500) for _ in range(61)]
    want = reference.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
    # L2: 32 pages + the reserved one striped 5 per bank (7 of the 8 banks); the prompt's 15
    # whole pages span 4 banks.
    with hicache(max_total_tokens=256, hicache_ratio=0.5, hicache_use_xmem=True) as e:
        assert e.get_stats()["l2_total_tokens"] == 32 * 4
        assert e.scheduler.cache.controller.tier.segment_pages == 5
        assert e.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"] == want
        assert e.flush_cache(tier="device") is True
        hit = e.generate(input_ids=prompt, sampling_params=GREEDY)
        assert hit["meta_info"]["cached_tokens_by_tier"] == {"xmem": 60}
        assert hit["output_ids"] == want
        assert sum((sdk.bank_memory(p) != 0xFF).any().item() for _, p, _ in sdk.allocations()) >= 4
        e.check_integrity()
    assert sdk.live_allocations() == 0


# ============================================================================ GPU only
@needs_gpu
@pytest.mark.parametrize(
    "layout,backend,runs",
    [
        ("layer_first", "kernel", "kernel"),
        ("layer_first", "direct", "direct"),
        ("page_first", "kernel", "kernel"),
        ("layer_first", "auto", "kernel"),  # banks are GPU-side memory: the copy kernel
    ],
)
def test_gpu_xmem_standin_device_banks_equal_recompute(standin, reference, layout, backend, runs):
    standin.config.bank_bytes = 10**9
    want, _ = chats(reference)
    with hicache(hicache_use_xmem=True, hicache_mem_layout=layout, hicache_io_backend=backend) as e:
        assert e.scheduler.cache.controller.io_backend == runs
        assert e.get_stats()["l2_io_backend"] == runs
        got, metas = chats(e)
        assert got == want
        assert_tier_served(e, metas, "xmem")
        assert_every_bank_written(standin)
    assert standin.live_allocations() == 0


@needs_2_gpus
@pytest.mark.parametrize("backend", ["kernel", "direct"])
def test_gpu_xmem_standin_banks_on_peer_gpus(standin, reference, backend):
    standin.config.bank_bytes = 10**9
    standin.config.devices = tuple(range(1, GPUS))
    want, _ = chats(reference)
    with hicache(hicache_use_xmem=True, hicache_io_backend=backend) as e:
        got, metas = chats(e)
        assert got == want
        assert_tier_served(e, metas, "xmem")
    assert standin.live_allocations() == 0


@needs_2_gpus
@pytest.mark.parametrize(
    "layout,backend",
    [("layer_first", "kernel"), ("layer_first", "direct"), ("page_first_direct", "direct")],
)
def test_gpu_peer_tier_equals_recompute(reference, layout, backend):
    want, _ = chats(reference)
    with hicache(hicache_tier="peer", hicache_mem_layout=layout, hicache_io_backend=backend) as e:
        got, metas = chats(e)
        assert got == want
        assert_tier_served(e, metas, "peer")
        desc = e.scheduler.cache.controller.tier.describe()
        assert (
            desc["peer_devices"] == [g for g in range(GPUS) if g != 0][: len(desc["peer_devices"])]
        )


@needs_2_gpus
def test_gpu_peer_tier_pages_live_on_the_peers():
    tier = PeerTier(spec(9), torch.device("cuda", 0), [1])
    try:
        assert tier.page_location(7) == (1, 7)
        assert tier._owners[0].device == torch.device("cuda", 1)
        assert tier.space.device == torch.device("cuda", 0)
        lay = device_pool_layout(4, 4, 2, 2, 8)
        pool = KVSpace(torch.randn(lay.numel, device=DEV), torch.randn(lay.numel, device=DEV), lay)
        idx = {"dtype": torch.int32, "device": DEV}
        up = (torch.tensor([1, 2], **idx), torch.tensor([5, 9], **idx))
        copy_pages_kernel(pool, tier.space, *up, range(2))
        back = clone(pool)
        copy_pages_kernel(tier.space, back, up[1], torch.tensor([3, 0], **idx), range(2))
        torch.cuda.synchronize()
        want = expected_copy(pool, clone(pool), [1, 2], [3, 0], range(2))
        assert torch.equal(flat(back), flat(want))
    finally:
        tier.close()
