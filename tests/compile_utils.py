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

# A folder holding another Triton (``pip install --target DIR --no-deps triton==X``), e.g. the
# GPU machine's: the scripts then also compile with it. Triton versions differ in what they
# compile (Triton 3.6, the H200's, refused a str default of a nested jit function that 3.9
# took), so CI compiles the kernels with the GPU's Triton too (.ci/run).
DEVICE_TRITON_ENV = "KVTIER_DEVICE_TRITON"


def run_compile_check(script: str) -> None:
    """Run ``script`` (Python source) as described above, with the installed Triton and, when
    ``KVTIER_DEVICE_TRITON`` names a folder, again with the Triton there; skip the calling
    test where ptxas is missing, fail it unless each run exits 0 having printed exactly
    "ok"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    runs = [("installed Triton", env)]
    device_triton = os.environ.get(DEVICE_TRITON_ENV)
    if device_triton:
        if not (Path(device_triton) / "triton").is_dir():
            pytest.fail(f"{DEVICE_TRITON_ENV}={device_triton} holds no triton package")
        path = os.pathsep.join(p for p in (device_triton, env.get("PYTHONPATH")) if p)
        runs.append((f"Triton from {device_triton}", {**env, "PYTHONPATH": path}))
    for label, run_env in runs:
        proc = subprocess.run(
            [sys.executable, "-c", script], env=run_env, cwd=root, capture_output=True, text=True
        )
        if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
            pytest.skip("no ptxas")
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", (
            f"{label}:\n{proc.stderr[-3000:]}"
        )
