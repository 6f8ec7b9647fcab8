"""L2 tier IO bandwidth: the engine's page loads and backups against one bulk copy.

For one tier (dram by default) and the Qwen3-30B-A3B KV geometry (48 layers, 4 KV heads,
head_dim 128, bf16, page 64, layer_first), builds the real ``KVPool``, tier and
``CacheController`` and times, for N random non-contiguous page pairs (``--gbytes`` of KV):

- bulk: one copy of the same total bytes between the tier's memory and the GPU pool, each way
  (pinned host <-> GPU for dram; GPU <-> GPU for peer and the X-Mem stand-in);
- load: the controller's merged load, all layers, one copy per layer on its load stream, exactly
  as a step with a tier hit issues it;
- backup: the controller's backup of the same pages on its write stream;

each with every IO backend (kernel, direct), as GB/s (1e9 bytes, from the controller's own CUDA
events, with wall-clock figures beside) and as a ratio of the bulk figure. The DESIGN bar is a
ratio >= 0.95 for dram and >= 0.90 for peer. Every load is also checked: the pages that arrive
equal the pages that were backed up.

    python benchmarks/bench_tier_io.py                      # dram, 8 GB of pages
    python benchmarks/bench_tier_io.py --tier peer --gbytes 16
    python benchmarks/bench_tier_io.py --smoke              # tiny geometry; runs on a CPU

Needs CUDA, except with ``--smoke`` (a check that the code path runs; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    copy_bandwidth,
    fmt_float,
    fmt_str,
    format_table,
    progress,
    run_metadata,
    run_stamp,
    time_cuda_gbps,
    write_csv,
    write_json,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The DESIGN bar: controller bandwidth as a share of the bulk copy in the same run.
BARS = {"dram": 0.95, "peer": 0.90, "xmem": 0.90}
SMOKE_GEOMETRY = {
    "layers": 2,
    "kv_heads": 2,
    "head_dim": 16,
    "dtype": "float32",
    "page_size": 4,
    "gbytes": 0.0005,
}
CHECKED_PAGES = 16


class Skip(Exception):
    """The tier cannot be built here; the message says why."""


@dataclass
class Setup:
    tier_name: str
    label: str
    device: torch.device
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    page_size: int
    layout: str
    num_pages: int  # pages moved per operation
    page_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.page_bytes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tier", choices=["dram", "xmem", "peer", "all"], default="dram")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument(
        "--layout",
        choices=["layer_first", "page_first", "page_first_direct"],
        default="layer_first",
    )
    p.add_argument("--io-backends", default="kernel,direct", help="comma-separated: kernel, direct")
    p.add_argument("--gbytes", type=float, default=8.0, help="KV moved per operation, GB")
    p.add_argument(
        "--spread",
        type=float,
        default=2.0,
        help="pool and tier hold this many times the pages moved, so random picks are scattered",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed operations each (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-devices", default=None, help="--hicache-peer-devices for the peer tier")
    p.add_argument("--output-dir", type=Path, default=Path("bench_out/tier_io"))
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny geometry, also on a CPU: checks that the code path runs (numbers mean nothing)",
    )
    ns = p.parse_args(argv)
    if ns.smoke:
        # Geometry flags left at their defaults shrink to the smoke geometry.
        for key, value in SMOKE_GEOMETRY.items():
            if getattr(ns, key) == p.get_default(key):
                setattr(ns, key, value)
        ns.repeats = min(ns.repeats, 2)
    return ns


def tier_label(tier: str) -> str:
    if tier == "xmem" and os.environ.get("KVTIER_XMEM_STANDIN", "") not in ("", "0"):
        return "xmem (stand-in banks on device memory, not X-Mem)"
    return tier


# ---------------------------------------------------------------------------- building
def build(ns: argparse.Namespace, tier_name: str, device: torch.device) -> tuple[Any, Any, Setup]:
    """The real KVPool and tier, each ``spread`` x the pages moved."""
    from kvtier.cache.kv_pool import KVPool
    from kvtier.server_args import ServerArgs
    from kvtier.tiers import TierError, TierSpec, create_tier

    if tier_name == "peer" and (device.type != "cuda" or torch.cuda.device_count() < 2):
        visible = torch.cuda.device_count() if device.type == "cuda" else 0
        raise Skip(f"the peer tier needs at least 2 GPUs; {visible} visible")
    dtype = DTYPES[ns.dtype]
    page_bytes = KVPool.bytes_per_token(ns.layers, ns.kv_heads, ns.head_dim, dtype) * ns.page_size
    n = max(CHECKED_PAGES, math.ceil(ns.gbytes * 1e9 / page_bytes))
    capacity = math.ceil(n * max(ns.spread, 1.0))
    tier_kwargs: dict[str, Any] = (
        {"hicache_use_xmem": True} if tier_name == "xmem" else {"hicache_tier": tier_name}
    )
    if ns.peer_devices:
        tier_kwargs["hicache_peer_devices"] = ns.peer_devices
    args = ServerArgs(
        device=device.type,
        page_size=ns.page_size,
        enable_hierarchical_cache=True,
        hicache_mem_layout=ns.layout,
        # Named so that ServerArgs keeps the layout as given (it pairs page_first_direct with
        # direct IO); the IO backends measured are chosen per controller below.
        hicache_io_backend="direct" if ns.layout == "page_first_direct" else "kernel",
        **tier_kwargs,
    )
    spec = TierSpec(
        capacity, ns.page_size, ns.layers, ns.kv_heads, ns.head_dim, dtype, args.hicache_mem_layout
    )
    pool = KVPool(capacity + 1, ns.page_size, ns.layers, ns.kv_heads, ns.head_dim, dtype, device)
    try:
        tier = create_tier(args, spec, device)
    except TierError as e:
        del pool
        raise Skip(str(e)) from e
    setup = Setup(
        tier_name=tier_name,
        label=tier_label(tier_name),
        device=device,
        layers=ns.layers,
        kv_heads=ns.kv_heads,
        head_dim=ns.head_dim,
        dtype=dtype,
        page_size=ns.page_size,
        layout=args.hicache_mem_layout,
        num_pages=n,
        page_bytes=page_bytes,
    )
    return pool, tier, setup


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bulk_pairs(pool: Any, tier: Any, total_bytes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pool span, tier span) pairs covering ``total_bytes``: the tier's memory in its largest
    contiguous pieces (K and V of each segment: one piece for dram, one per bank or peer GPU
    for striped tiers) against consecutive spans of the pool's K then V tensors."""
    space = tier.space
    segments = space.segments or ((space.k, space.v),)
    pieces = [t for kv in segments for t in kv]
    pool_flat = [pool.k.view(-1), pool.v.view(-1)]
    remaining = total_bytes // pool.k.element_size()
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    p_idx, p_off = 0, 0
    for piece in pieces:
        off = 0
        while remaining and off < piece.numel():
            dst = pool_flat[p_idx]
            n = min(remaining, piece.numel() - off, dst.numel() - p_off)
            pairs.append((dst[p_off : p_off + n], piece[off : off + n]))
            off, p_off, remaining = off + n, p_off + n, remaining - n
            if p_off == dst.numel():
                p_idx, p_off = p_idx + 1, 0
        if not remaining:
            break
    return pairs


def bulk_copies(pool: Any, tier: Any, setup: Setup, repeats: int) -> dict[str, Any]:
    """GB/s of bulk copies of ``total_bytes`` each way between the tier's memory and the pool:
    one cudaMemcpy per contiguous piece (a single one for dram)."""
    pairs = _bulk_pairs(pool, tier, setup.total_bytes)
    nbytes = sum(d.numel() * d.element_size() for d, _ in pairs)

    def to_gpu() -> None:
        for d, s in pairs:
            d.copy_(s, non_blocking=True)

    def from_gpu() -> None:
        for d, s in pairs:
            s.copy_(d, non_blocking=True)

    out: dict[str, Any] = {"copies": len(pairs), "bytes": nbytes}
    for key, fn in (("to_gpu", to_gpu), ("from_gpu", from_gpu)):
        if setup.device.type == "cuda":
            gbps = time_cuda_gbps(fn, nbytes, setup.device, repeats)
        else:
            gbps = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                gbps.append(nbytes / (time.perf_counter() - t) / 1e9)
        out[key] = statistics.median(gbps)
    return out


def _page(pool: Any, page: int) -> torch.Tensor:
    """Every layer's K and V of one pool page (a copy, for checks)."""
    ps = pool.page_size
    return torch.stack(
        [pool.k[:, page * ps : (page + 1) * ps], pool.v[:, page * ps : (page + 1) * ps]]
    )


def controller_ops(
    pool: Any, tier: Any, setup: Setup, io_backend: str, repeats: int, seed: int
) -> dict[str, Any]:
    """Median GB/s of the controller's load and backup of ``num_pages`` random page pairs,
    timed by the controller's own CUDA events (``device``) and by the wall clock (``wall``,
    launch overhead and the final synchronization included)."""
    from kvtier.cache.controller import CacheController
    from kvtier.kernels.kv_io import page_runs

    ctl = CacheController(pool, tier, io_backend)
    rng = random.Random(seed)
    n, cap = setup.num_pages, pool.num_pages - 1
    # Random picks in random order: almost no pair is consecutive on both sides, so the direct
    # path gets one copy per page and layer, the case the engine meets after churn.
    dev_src = rng.sample(range(1, cap + 1), n)
    host = rng.sample(range(1, tier.num_pages + 1), n)
    dev_dst = rng.sample(range(1, cap + 1), n)
    done = [0]

    def on_done() -> None:
        done[0] += 1

    def backup() -> None:
        ctl.backup(dev_src, host, on_done)
        ctl.wait_all()

    def load() -> None:
        ctl.queue_load(host, dev_dst, on_done)
        ctl.start_loads()
        ctl.wait_all()

    pool.k.normal_()
    pool.v.normal_()
    checked = rng.sample(range(n), min(CHECKED_PAGES, n))
    want = [_page(pool, dev_src[j]) for j in checked]

    result: dict[str, Any] = {"io_backend": ctl.io_backend, "runs": len(page_runs(host, dev_dst))}
    for name, op, seconds_attr in (
        ("backup", backup, "backup_seconds"),
        ("load", load, "load_seconds"),
    ):
        op()  # warm-up: kernel compilation, first touch of every page
        device_s: list[float] = []
        wall_s: list[float] = []
        for _ in progress(range(repeats), f"{setup.tier_name} {ctl.io_backend} {name}"):
            _sync(setup.device)
            before = getattr(ctl.stats, seconds_attr)
            t = time.perf_counter()
            op()
            wall_s.append(time.perf_counter() - t)
            device_s.append(getattr(ctl.stats, seconds_attr) - before)
        result[name] = {
            "device_gbps": _gbps(setup.total_bytes, device_s),
            "wall_gbps": _gbps(setup.total_bytes, wall_s),
            "device_s": device_s,
            "wall_s": wall_s,
        }
    # Every load so far copied host -> dev_dst what the backups copied dev_src -> host.
    bad = [j for j, w in zip(checked, want) if not torch.equal(_page(pool, dev_dst[j]), w)]
    result["checked_pages"] = len(checked)
    result["mismatched_pages"] = len(bad)
    if done[0] != 2 * (repeats + 1):
        result["callbacks"] = f"{done[0]} of {2 * (repeats + 1)} completion callbacks ran"
    return result


def _gbps(nbytes: int, seconds: list[float]) -> float | None:
    """GB/s at the median time; None when nothing was timed (no CUDA events on a CPU)."""
    positive = [s for s in seconds if s > 0]
    if not positive:
        return None
    return nbytes / statistics.median(positive) / 1e9


# ---------------------------------------------------------------------------- driver
COLUMNS = [
    ("tier", "tier", fmt_str),
    ("op", "operation", fmt_str),
    ("io_backend", "IO", fmt_str),
    ("gbps", "GB/s", fmt_float(1)),
    ("wall_gbps", "wall GB/s", fmt_float(1)),
    ("ratio", "of bulk", fmt_float(3)),
    ("bar", "bar", fmt_float(2)),
    ("meets_bar", "meets", fmt_str),
    ("check", "data", fmt_str),
]


def run_tier(ns: argparse.Namespace, tier_name: str, device: torch.device) -> list[dict[str, Any]]:
    pool, tier, setup = build(ns, tier_name, device)
    rows: list[dict[str, Any]] = []
    try:
        bulk = bulk_copies(pool, tier, setup, ns.repeats)
        bar = None if ns.smoke or device.type != "cuda" else BARS.get(tier_name)
        common = {
            "tier": setup.label,
            "pages": setup.num_pages,
            "bytes": setup.total_bytes,
            "page_bytes": setup.page_bytes,
            "layout": setup.layout,
        }
        for direction, key in (("bulk to GPU", "to_gpu"), ("bulk from GPU", "from_gpu")):
            rows.append({**common, "op": direction, "io_backend": "memcpy", "gbps": bulk[key]})
        backends = [b.strip() for b in ns.io_backends.split(",") if b.strip()]
        for backend in backends:
            if backend == "direct" and setup.layout == "page_first":
                rows.append(
                    {
                        **common,
                        "op": "load/backup",
                        "io_backend": backend,
                        "check": "skipped: direct needs a page-contiguous layout",
                    }
                )
                continue
            res = controller_ops(pool, tier, setup, backend, ns.repeats, ns.seed)
            check = (
                "ok"
                if res["mismatched_pages"] == 0
                else f"{res['mismatched_pages']}/{res['checked_pages']} pages WRONG"
            )
            # The controller may change the backend (no kernels on a CPU; direct IO for a tier
            # kernels cannot address): show both when it did.
            actual = res["io_backend"]
            shown = backend if actual == backend else f"{backend}->{actual}"
            for op, ref in (("load", "to_gpu"), ("backup", "from_gpu")):
                r = res[op]
                gbps = r["device_gbps"] if r["device_gbps"] is not None else r["wall_gbps"]
                ratio = gbps / bulk[ref] if gbps and bulk[ref] else None
                rows.append(
                    {
                        **common,
                        "op": op,
                        "io_backend": shown,
                        "gbps": gbps,
                        "wall_gbps": r["wall_gbps"],
                        "ratio": ratio,
                        "bar": bar,
                        "meets_bar": None if bar is None or ratio is None else ratio >= bar,
                        "check": check,
                        "page_runs": res["runs"],
                        "device_s": r["device_s"],
                        "wall_s": r["wall_s"],
                        "callbacks": res.get("callbacks"),
                    }
                )
    finally:
        tier.close()
        del pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not ns.smoke:
        print(
            "bench_tier_io measures PCIe/NVLink copy bandwidth and needs a CUDA device; none is "
            "visible. Use --smoke to check the code path on a CPU.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(ns.seed)
    tiers = ["dram", "xmem", "peer"] if ns.tier == "all" else [ns.tier]
    meta = run_metadata()
    probe = copy_bandwidth(device) if cuda and not ns.smoke else {"measured": False}
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for name in tiers:
        try:
            rows.extend(run_tier(ns, name, device))
        except Skip as e:
            skipped.append({"tier": name, "reason": str(e)})
    dtype_bytes = torch.empty((), dtype=DTYPES[ns.dtype]).element_size()
    print(
        f"tier IO: {ns.layers} layers x {ns.kv_heads} KV heads x {ns.head_dim} dim, {ns.dtype} "
        f"({dtype_bytes} B), page {ns.page_size}, {ns.layout}, on {device}"
        + (" [smoke: numbers mean nothing]" if ns.smoke else "")
    )
    if rows:
        print(
            f"{rows[0]['pages']} random page pairs = {rows[0]['bytes'] / 1e9:.2f} GB per operation "
            f"({rows[0]['page_bytes'] / 1e6:.2f} MB per page); median of {ns.repeats}"
        )
    if probe.get("measured"):
        print(
            f"reference probe (1 GiB, torch pinned): H2D {probe['h2d_gbps']:.1f} GB/s, "
            f"D2H {probe['d2h_gbps']:.1f} GB/s, D2D {probe['d2d_gbps']:.0f} GB/s"
        )
    for s in skipped:
        print(f"skipped: {s['tier']}: {s['reason']}")
    if rows:
        print(format_table(rows, COLUMNS))
    stamp = run_stamp()
    doc = {
        **meta,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()},
        "bandwidth_probe": probe,
        "skipped": skipped,
        "rows": rows,
    }
    out = ns.output_dir
    for path in (
        write_json(out / f"tier_io_{stamp}.json", doc),
        write_csv(out / f"tier_io_{stamp}.csv", rows),
    ):
        print(f"wrote {path}")
    if any(str(r.get("check", "")).endswith("WRONG") for r in rows):
        print("bench_tier_io: data check failed: pages arrived wrong", file=sys.stderr)
        return 1
    return 0 if rows else 2


if __name__ == "__main__":
    sys.exit(main())
