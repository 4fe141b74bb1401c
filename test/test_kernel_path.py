"""The Triton kernel path of the fast path (cache_kernels + attention_kernel inside lm_forward,
expert_forward and cache_shift) against the engine's eager modules, through Triton's interpreter on
the CPU (TRITON_INTERPRET=1 must be set before triton compiles anything, hence a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is installed by scripts/setup.sh; its interpreter runs the kernels")

HERE = Path(__file__).resolve().parent


def test_kernel_path_matches_eager_modules_in_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(HERE / "kernel_path_check.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert err.pop("kernels") == 1.0, "the interpreter run did not take the kernel path"
    bad = {k: v for k, v in err.items() if not v < 1e-4}
    assert not bad, bad
