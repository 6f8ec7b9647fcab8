"""Plot recorded GPU results (docs/results/*.csv) for the README.

python benchmarks/plot_results.py docs/results/ttft_h200_2026-11-29.csv docs/ttft_h200.png
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: str, dst: str) -> None:
    with open(src) as f:
        rows = list(csv.DictReader(f))
    latest = max(int(r["run"]) for r in rows)
    # The newest run of each (backend, length) wins.
    best: dict[tuple[str, int], dict[str, str]] = {}
    for r in sorted(rows, key=lambda r: int(r["run"])):
        best[(r["backend"], int(r["tokens"]))] = r
    by_len: dict[int, dict[str, float]] = defaultdict(dict)
    for (backend, n), r in best.items():
        by_len[n]["recompute"] = float(r["recompute_ms"])
        by_len[n][f"{backend} hit"] = float(r["tier_hit_ms"])
        by_len[n]["ideal load (PCIe)"] = int(r["kv_bytes"]) / float(r["h2d_gbps"]) / 1e6
    lengths = sorted(by_len)
    series = ["recompute", "dram hit", "peer hit", "ideal load (PCIe)"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, name in enumerate(series):
        xs = [j + (i - 1.5) * width for j in range(len(lengths))]
        ys = [by_len[n].get(name, float("nan")) for n in lengths]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K tokens" for n in lengths])
    ax.set_ylabel("time to first token, ms (log)")
    ax.set_title(f"Qwen3-30B-A3B (dummy bf16), H200: TTFT by source (newest of runs 1-{latest})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
