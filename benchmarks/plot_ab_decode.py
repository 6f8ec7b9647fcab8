"""Plot a recorded ``ab_decode.py --output`` run: ms a decode step against the context length,
a line per (variant, batch size), for docs/.

    python benchmarks/plot_ab_decode.py docs/results/ab_carry_h200_2026-12-02_run12.json \
        docs/decode_context_h200_run12.png --label base="a step ahead" --label old="in the step"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def series(doc: dict[str, Any]) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """{(variant, batch): [(context, ms a step), ...] sorted by context} from the JSON that
    ab_decode.py writes (its keys "context/batch", each with the median seconds a step)."""
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for variant, cells in doc["variants"].items():
        for key, cell in cells.items():
            context, batch = (int(x) for x in key.split("/"))
            out.setdefault((variant, batch), []).append((context, cell["median_s"] * 1e3))
    return {k: sorted(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="ab_decode.py's JSON")
    ap.add_argument("dst", help="the PNG to write")
    ap.add_argument("--label", action="append", default=[], metavar="VARIANT=TEXT")
    ap.add_argument("--title", default="Decode step time by context (Qwen3-30B-A3B, one H200)")
    args = ap.parse_args(argv)
    labels = dict(item.split("=", 1) for item in args.label)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(args.src).read_text())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["o-", "s--", "^:", "d-."]
    variants = list(doc["variants"])
    for (variant, batch), points in sorted(series(doc).items(), key=lambda kv: kv[0][1]):
        xs = [c / 1024 for c, _ in points]
        ax.plot(
            xs,
            [ms for _, ms in points],
            styles[variants.index(variant) % len(styles)],
            label=f"{labels.get(variant, variant)}, batch {batch}",
        )
    ax.set_xlabel("context, K tokens")
    ax.set_ylabel("ms a decode step")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.dst, dpi=120)
    print("wrote", args.dst)


if __name__ == "__main__":
    main()
