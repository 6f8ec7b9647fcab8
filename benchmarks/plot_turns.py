"""Plot recorded ``kvcache_benchmark.py --turn-tokens`` runs for docs/: mean TTFT of each kind
of request (recompute, GPU hit, tier hit, new turn from the GPU, new turn from L2) by prompt
length, a group of bars per (run, length), on a log scale.

    python benchmarks/plot_turns.py \
        docs/results/ttft_turn_kernel_h200_2026-12-02_run14_call1.json="kernel IO" \
        docs/results/ttft_turn_auto_direct_h200_2026-12-02_run14_call3.csv="auto IO (direct)" \
        --out docs/turns_h200_run14.png

Each source is the benchmark's JSON (its ``ttft_samples``) or its samples CSV, optionally
followed by ``=LABEL``.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

KINDS = ("recompute", "gpu_hit", "tier_hit", "turn_gpu", "turn_tier")
KIND_LABELS = {
    "recompute": "recompute",
    "gpu_hit": "GPU hit",
    "tier_hit": "tier hit",
    "turn_gpu": "new turn, prefix on the GPU",
    "turn_tier": "new turn, prefix in L2",
}


def load_samples(path: Path) -> list[dict[str, Any]]:
    """The TTFT samples of one run: (length, kind, ttft_s) rows from its JSON or CSV."""
    if path.suffix == ".json":
        rows = json.loads(path.read_text())["ttft_samples"]
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise SystemExit(f"{path}: expected the benchmark's .json or samples .csv")
    return [
        {"length": int(r["length"]), "kind": r["kind"], "ttft_s": float(r["ttft_s"])} for r in rows
    ]


def means_ms(samples: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """{(length, kind): mean TTFT in ms}."""
    groups: dict[tuple[int, str], list[float]] = defaultdict(list)
    for s in samples:
        groups[(s["length"], s["kind"])].append(s["ttft_s"] * 1e3)
    return {k: mean(v) for k, v in groups.items()}


def parse_source(arg: str) -> tuple[Path, str]:
    path, _, label = arg.partition("=")
    return Path(path), label or Path(path).stem


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="+", metavar="FILE[=LABEL]")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument(
        "--title", default="Time to first token by request kind (Qwen3-30B-A3B, one H200)"
    )
    args = ap.parse_args(argv)
    runs = [
        (label, means_ms(load_samples(path))) for path, label in map(parse_source, args.sources)
    ]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        (label, length) for label, m in runs for length in sorted({length for length, _ in m})
    ]
    kinds = [k for k in KINDS if any((length, k) in m for _, m in runs for length, _ in m)]
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    for j, kind in enumerate(kinds):
        xs, ys = [], []
        for i, (label, length) in enumerate(groups):
            value = dict(runs)[label].get((length, kind))
            if value is not None:
                xs.append(i + (j - (len(kinds) - 1) / 2) * width)
                ys.append(value)
        bars = ax.bar(xs, ys, width, label=KIND_LABELS.get(kind, kind))
        ax.bar_label(bars, fmt="%.0f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{length // 1024}K\n{label}" for label, length in groups], fontsize=8)
    ax.set_yscale("log")
    # Room above the tallest bar for its label and for the legend.
    top = max(v for _, m in runs for v in m.values())
    ax.set_ylim(top=top * 20)
    ax.set_ylabel("TTFT (ms, mean, log scale)")
    ax.set_title(args.title)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
