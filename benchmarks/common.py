"""Helpers shared by the benchmarks: copy-bandwidth probes, hardware and version facts, progress
bars, tables and result files (CSV, JSON, plots).

Nothing here imports the engine, so a probe can run before (and independently of) a model load.
Optional packages (tqdm, matplotlib) degrade to plain fallbacks: a GPU image without them still
produces every number, only without bars or pictures.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")

GiB = 1 << 30


# ---------------------------------------------------------------------------- parsing
def parse_token_count(text: str) -> int:
    """``"2048"`` -> 2048, ``"10K"``/``"10k"`` -> 10240 (K = 1024 tokens, as in the seed's
    "80K" = 81,920 tokens)."""
    s = text.strip().lower()
    if not s:
        raise ValueError("empty token count")
    scale = 1
    if s.endswith("k"):
        scale, s = 1024, s[:-1]
    value = float(s) * scale
    if value < 1 or value != int(value):
        raise ValueError(f"not a positive whole number of tokens: {text!r}")
    return int(value)


def parse_token_counts(text: str) -> list[int]:
    """A comma-separated list of token counts (``"1K,10K,20K"``), kept in the order given."""
    values = [parse_token_count(x) for x in text.split(",") if x.strip()]
    if not values:
        raise ValueError(f"no token counts in {text!r}")
    return values


# ---------------------------------------------------------------------------- bandwidth
def time_cuda_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Milliseconds of ``fn``, one figure per repeat, timed with CUDA events on ``device``'s
    current stream (``fn`` must enqueue its work there). One untimed call first: it maps pages,
    wakes the link and compiles what a first call compiles."""
    with torch.cuda.device(device):
        fn()
        torch.cuda.synchronize(device)
        out: list[float] = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
    return out


def time_cuda_gbps(
    fn: Callable[[], object], nbytes: int, device: torch.device, repeats: int
) -> list[float]:
    """GB/s (1e9 bytes) of ``fn`` moving ``nbytes``, one figure per repeat (``time_cuda_ms``)."""
    return [nbytes / (ms / 1e3) / 1e9 for ms in time_cuda_ms(fn, device, repeats)]


def time_copy_gbps(dst: torch.Tensor, src: torch.Tensor, repeats: int) -> list[float]:
    """GB/s of one ``dst.copy_(src)`` (a single cudaMemcpyAsync), per repeat; timed on the GPU
    side's stream (``dst``'s device, or ``src``'s when ``dst`` is on the host)."""
    device = dst.device if dst.device.type == "cuda" else src.device
    nbytes = src.numel() * src.element_size()
    return time_cuda_gbps(lambda: dst.copy_(src, non_blocking=True), nbytes, device, repeats)


def copy_bandwidth(
    device: str | torch.device = "cuda", nbytes: int = GiB, repeats: int = 5
) -> dict[str, Any]:
    """Bulk copy bandwidth of one ``nbytes`` buffer: pinned host -> device, device -> pinned
    host and device -> device (one cudaMemcpy each), the median of ``repeats`` in GB/s.

    On a machine without CUDA nothing is measured and the result says so.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return {"measured": False, "note": "no CUDA device: bulk copy bandwidth not measured"}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    h2d = time_copy_gbps(a, host, repeats)
    d2h = time_copy_gbps(host, a, repeats)
    d2d = time_copy_gbps(b, a, repeats)
    del host, a, b
    torch.cuda.empty_cache()
    return {
        "measured": True,
        "bytes": nbytes,
        "repeats": repeats,
        "h2d_gbps": statistics.median(h2d),
        "d2h_gbps": statistics.median(d2h),
        # One-way: bytes copied per second (HBM traffic is twice this: a read and a write).
        "d2d_gbps": statistics.median(d2d),
        "samples": {"h2d": h2d, "d2h": d2h, "d2d": d2d},
    }


def peer_copy_bandwidth(
    src_device: int, dst_device: int, nbytes: int = GiB, repeats: int = 5
) -> float:
    """Median GB/s of one bulk copy from GPU ``src_device`` to GPU ``dst_device``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src_device}")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_device}")
    gbps = statistics.median(time_copy_gbps(dst, src, repeats))
    del src, dst
    torch.cuda.empty_cache()
    return gbps


def median_gbps(nbytes: int, seconds: Sequence[float]) -> float:
    """GB/s of moving ``nbytes`` in the median of ``seconds`` (0 when nothing was timed)."""
    if not seconds:
        return 0.0
    t = statistics.median(seconds)
    return nbytes / t / 1e9 if t > 0 else math.inf


# ---------------------------------------------------------------------------- machine facts
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def hardware_info() -> dict[str, Any]:
    """GPUs (name, memory), CPU model and core count, host memory, OS."""
    gpus: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "memory_bytes": p.total_memory,
                    "capability": f"{p.major}.{p.minor}",
                    "multiprocessors": p.multi_processor_count,
                }
            )
    return {
        "gpus": gpus,
        "gpu_name": gpus[0]["name"] if gpus else None,
        "gpu_count": len(gpus),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "host_memory_bytes": _host_memory_bytes(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


def _git_revision() -> str | None:
    """The checkout's commit (with ``+dirty`` when files differ), read-only git calls only."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def versions() -> dict[str, Any]:
    """Python, torch (and its CUDA), triton and kvtier versions, and the checkout's commit."""
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        import kvtier

        out["kvtier"] = kvtier.__version__
    except ImportError:
        out["kvtier"] = None
    out["git"] = _git_revision()
    return out


def run_metadata() -> dict[str, Any]:
    """What every result file records about the run: when, how it was started, where, with what."""
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "hardware": hardware_info(),
        "versions": versions(),
    }


# ---------------------------------------------------------------------------- progress
class _PlainProgress(Generic[T]):
    """Stand-in for tqdm when it is not installed: a line to stderr at the end."""

    def __init__(self, iterable: Iterable[T], desc: str) -> None:
        self._it = iterable
        self._desc = desc

    def __iter__(self) -> Iterator[T]:
        n = 0
        for n, x in enumerate(self._it, 1):  # noqa: B007 - n is read after the loop
            yield x
        print(f"{self._desc}: {n} done", file=sys.stderr)


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """A progress bar on stderr (tqdm when installed), so stdout keeps only the tables."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(iterable, desc)
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------- tables and files
Column = tuple[str, str, Callable[[Any], str]]


def fmt_float(digits: int) -> Callable[[Any], str]:
    """Formatter: a number with ``digits`` decimals; None/NaN as "-"."""

    def f(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, str):
            return v
        return f"{v:.{digits}f}"

    return f


def fmt_str(v: Any) -> str:
    return "-" if v is None else str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A plain right-aligned text table: ``columns`` are (key, header, formatter)."""
    cells = [[fmt(row.get(key)) for key, _, fmt in columns] for row in rows]
    headers = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One line per row; the header is the union of the rows' keys in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return path


def _csv_cell(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        json.dump(obj, f, indent=2, default=_json_default, allow_nan=True)
        f.write("\n")
    return path


def load_pyplot() -> tuple[Any, str | None]:
    """matplotlib's pyplot on the file-only Agg backend, or (None, why not)."""
    try:
        import matplotlib
    except ImportError:
        return None, "matplotlib is not installed: plots skipped (pip install matplotlib)"
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, None


def run_stamp() -> str:
    """A file-name-safe local timestamp that orders runs."""
    return time.strftime("%Y%m%d-%H%M%S")
