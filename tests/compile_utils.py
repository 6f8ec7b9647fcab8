"""Test helper: run a script that compiles Triton kernels for sm_90 (H100 / H200) and prints
"ok" (tests/test_fused_kernels.py, test_fused_moe.py, test_triton_attention.py, test_spills.py).

The interpreter never compiles the kernels. The script runs in a process without
TRITON_INTERPRET from the repository root; it needs no GPU, only ptxas (shipped with Triton).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# A folder holding another Triton (``pip install --target DIR --no-deps triton==X``), e.g. the
# GPU machine's: the scripts then also compile with it. Triton versions differ in what they
# compile (Triton 3.6, the H200's, refused a str default of a nested jit function that 3.9
# took), so CI compiles the kernels with the GPU's Triton too (.ci/run).
DEVICE_TRITON_ENV = "KVTIER_DEVICE_TRITON"

# Source for the scripts to start with: ``compile_sm90`` compiles a kernel for sm_90 specialised
# as a launch would (pointers and ints divisible by 16 get that divisibility, ints equal to 1
# become constants); ``spill_bytes`` is what ptxas -v reports a compiled kernel spills.
SM90_HELPERS = textwrap.dedent(
    """
    import os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    def compile_sm90(fn, args, constexprs, num_warps, num_stages=3, **options):
        sig, attrs, consts = {}, {}, dict(constexprs)
        for name, v in args.items():
            pos = (fn.arg_names.index(name),)
            if isinstance(v, str):
                sig[name] = v
                if v.startswith("*"):
                    attrs[pos] = [["tt.divisibility", 16]]
            elif v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[pos] = [["tt.divisibility", 16]]
        sig.update({name: "constexpr" for name in constexprs})
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        options.update(num_warps=num_warps, num_stages=num_stages)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

    def spill_bytes(kernel):
        # The ptxas Triton itself uses for sm_90, on the kernel's PTX.
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx, "-o",
                                  ptx + ".cubin"], capture_output=True, text=True,
                                 check=True).stderr
        return max(int(n) for n in re.findall(r"(\\d+) bytes spill stores", log))
    """
)


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
