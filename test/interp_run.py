"""Shared by the kernel tests that run themselves under Triton's interpreter (test_cache_kernels.py,
test_norm_kernels.py): TRITON_INTERPRET=1 only takes effect before triton's jit decorators run, so the
test file is run again as a script in a fresh process, which writes the kernels' outputs to a file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str, out: Path) -> dict:
    """`python script out` with TRITON_INTERPRET=1 and the repository on the path; returns torch.load(out)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, script, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out)


def assert_bitwise_equal(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    diff = (got != ref).sum().item()
    assert diff == 0, f"{what}: {diff} of {got.numel()} elements differ, max |diff| {(got.float() - ref.float()).abs().max()}"
