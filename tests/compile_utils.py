"""Test helper: run a script that compiles Triton kernels for sm_90 (H100 / H200) and prints
"ok" (tests/test_fused_kernels.py, test_fused_moe.py, test_triton_attention.py).

The interpreter never compiles the kernels. The script runs in a process without
TRITON_INTERPRET from the repository root; it needs no GPU, only ptxas (shipped with Triton).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_compile_check(script: str) -> None:
    """Run ``script`` (Python source) as described above; skip the calling test where ptxas is
    missing, fail it unless the script exits 0 having printed exactly "ok"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
