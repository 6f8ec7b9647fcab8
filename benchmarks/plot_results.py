"""Redraw the plots of a recorded kvcache_benchmark run from its JSON (for docs/).

python benchmarks/plot_results.py docs/results/ttft_h200_2026-11-29_run3.json docs/ h200
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from kvcache_benchmark import make_plots


def main(src: str, out_dir: str, tag: str) -> None:
    doc = json.loads(Path(src).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SimpleNamespace(output_dir=Path(tmp), model=doc["config"]["model"])
        results = SimpleNamespace(
            ttft_rows=doc["ttft_summary"], throughput_rows=doc.get("throughput") or [], files={}
        )
        why = make_plots(cfg, results, "plot")  # type: ignore[arg-type]
        if why:
            raise SystemExit(why)
        for kind, path in results.files.items():
            dst = Path(out_dir) / f"{kind.removesuffix('_png')}_{tag}.png"
            shutil.copy(path, dst)
            print("wrote", dst)


if __name__ == "__main__":
    main(*sys.argv[1:4])
