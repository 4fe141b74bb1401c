"""Fused few-row decoder layers in graphs._decoder_stack (LM verify / decode): each layer is

    q|k|v = rmsnorm(x) @ Wqkv^T ; attention ; x = x + o @ Wo^T ; g|u = rmsnorm(x) @ Wgu^T ; x = x + swiglu(g|u) @ Wd^T

through linear_kernel.fused_linear, and the stack ends with final_norm(x). It must compute what the
unfused kernel path and the eager modules compute. The kernels run under Triton's interpreter in a
subprocess (test/fused_stack_check.py; TRITON_INTERPRET=1 must be set before triton compiles anything).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashdrive_ros.engine import graphs
from flashdrive_ros.engine.config import tiny_config
from flashdrive_ros.engine.text_model import TextModel

HERE = Path(__file__).resolve().parent
CASES = ("verify8_deepstack_capture", "decode1", "rows16")


@pytest.fixture(scope="module")
def stack():
    pytest.importorskip("triton", reason="triton is installed by scripts/setup.sh; its interpreter runs the kernels")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(HERE / "fused_stack_check.py")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["kernels"] == 1.0, "the interpreter run could not use the kernels"
    return r


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_every_layer_runs_as_four_fused_gemms(stack, dtype, case):
    """Per layer: q|k|v with the norm, o with the residual epilogue, gate|up with the norm, down with the
    residual epilogue (and the swiglu prologue when graphs.FUSED_LAYER_STYLE asks for it)."""
    assert stack[f"{dtype}/{case}/launches"] == 4 * stack["layers"]
    kinds = ["(False, False, True)", "(True, False, False)"]
    if stack["swiglu_prologue"]:
        kinds.insert(1, "(False, True, True)")
    assert stack[f"{dtype}/{case}/launch_kinds"] == kinds


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_more_rows_than_fused_layer_rows_run_unfused(stack, dtype):
    assert stack[f"{dtype}/prefill50/launches"] == 0


@pytest.mark.parametrize("case", CASES)
def test_fp32_fused_stack_equals_unfused_and_eager(stack, case):
    for what in ("fused_vs_unfused", "fused_vs_eager", "fused_vs_spec", "cache_fused_vs_eager"):
        assert stack[f"fp32/{case}/{what}"] < 1e-5, what
    if case != "rows16":  # capture_layers hold the residual stream (deepstack added after the capture)
        assert stack[f"fp32/{case}/captured_fused_vs_eager"] < 1e-5
        assert stack[f"fp32/{case}/captured_fused_vs_unfused"] < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_bf16_fused_calls_are_their_references_and_the_stack_stays_at_rounding_distance(stack, case):
    """Each fused_linear call of the stack equals fused_linear_reference on its inputs but for rare
    last-bit flips (the fp32 sum order of the GEMM and the norm statistic); through 4 bf16 layers the
    stack is at bf16 rounding distance from the unfused path and the eager modules (whose CPU SwiGLU
    rounds twice)."""
    assert stack[f"bf16/{case}/calls_max_mismatch_fraction"] < 0.01
    assert stack[f"bf16/{case}/calls_max_rel"] < 1e-3
    for what in ("fused_vs_spec", "fused_vs_unfused", "fused_vs_eager", "cache_fused_vs_eager"):
        assert stack[f"bf16/{case}/{what}"] < 1.5e-2, what


# ------------------------------------------------------------------------------- host side (in process)

def _layers():
    lm = TextModel(tiny_config().text)
    graphs.fuse_projections(lm)
    return lm


@pytest.mark.parametrize("shape,fused", [((1, 8), True), ((1, 1), True), ((1, 16), True), ((2, 8), True),
                                         ((1, 17), False), ((1, 64), False)])
def test_fused_layers_take_at_most_fused_layer_rows(monkeypatch, shape, fused):
    monkeypatch.setattr(graphs, "_kernel_module", lambda name, t: object())
    monkeypatch.setitem(graphs._FUSED_LAYERS, "enabled", True)
    x = torch.zeros(*shape, 128)
    assert (graphs._fused_layer_kernels(x) is not None) == fused
    assert graphs.FUSED_LAYER_ROWS == 16


def test_fused_layers_are_off_by_default_and_the_switches_turn_them_on_and_off(monkeypatch):
    """Off by default: measured slower than the unfused layers on an H100 (graphs._FUSED_LAYERS)."""
    x = torch.zeros(1, 8, 128)
    monkeypatch.setattr(graphs, "_kernel_module", lambda name, t: object())
    assert graphs._fused_layer_kernels(x) is None
    graphs.set_fused_layers(True)
    try:
        assert graphs._fused_layer_kernels(x) is not None
        monkeypatch.undo()
        graphs.set_kernels(False)  # no kernels at all: nothing fused either (and on a plain CPU run: never)
        try:
            assert graphs._fused_layer_kernels(x) is None
        finally:
            graphs.set_kernels(True)
    finally:
        graphs.set_fused_layers(False)
    assert not graphs._FUSED_LAYERS["enabled"]


def test_only_bias_free_layers_with_fused_buffers_in_the_activation_dtype_fuse():
    lm = _layers()
    x = torch.zeros(1, 8, 128)
    assert all(graphs._fusable(layer, x) for layer in lm.layers)
    assert not graphs._fusable(lm.layers[0], x.bfloat16())  # fp32 weights, bf16 rows
    plain = TextModel(tiny_config().text)  # not fused: separate q/k/v and gate/up weights
    assert not graphs._fusable(plain.layers[0], x)
    lm.layers[1].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(128))
    assert not graphs._fusable(lm.layers[1], x)
