"""norm_kernels: the Triton RMSNorm kernels compute what graphs._rms (and the residual add) compute.

Specification: `rms_norm(x, w, eps)` = graphs._rms(x, w, eps) and `add_rms_norm(x, a, w, eps)` =
(x + a, graphs._rms(x + a, w, eps)), bitwise in bf16 / fp16 and within 1e-6 in fp32, for any row count,
any row width (padded to a power of two in the kernel), leading dims [B, Q, H], strided rows and rows
of very large or very small magnitude. graphs.fused_rms_norm / fused_add_rms_norm take the kernels only
for CUDA tensors the kernels support, and the CPU gets no programmatic dependent launch.

Bitwise comparisons need inputs whose fp32 sum of squares is exact in any order (the kernel's reduction
order is not torch's): the "grid" inputs are random multiples k * 2^e / 16 with |k| < 64, so every
square and every partial sum is an exact fp32 value, while x * rsqrt(...) still rounds like any real
input. Plain randn inputs are checked too: there a last-bit difference of the sum may, rarely, flip
one rounding.

The kernels run on the CPU through Triton's interpreter: TRITON_INTERPRET=1 must be set before
triton.jit decorates them, so they run in a fresh subprocess (this file run as a script) that writes
their outputs to a file; the references are computed here, in the pytest process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from interp_run import assert_bitwise_equal, run_interpreted  # noqa: E402 (test/, beside this file)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flashdrive_ros.engine import attention_kernel, graphs  # noqa: E402
from flashdrive_ros.engine import norm_kernels as nk  # noqa: E402

EPS = 1e-6
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# name: (dtype, shape [..., H], inputs) with inputs "grid" (exact sums of squares, see the docstring),
# "magnitudes" (grid rows scaled from 2^-20 to 2^40), "randn" or "strided" (grid rows that are column
# slices of a wider tensor: row stride != H)
CASES = {
    "bf16_1x128": (BF16, (1, 128), "grid"),
    "bf16_8x128": (BF16, (8, 128), "grid"),
    "bf16_64x128": (BF16, (64, 128), "grid"),
    "bf16_13x128": (BF16, (13, 128), "grid"),
    "bf16_1x96": (BF16, (1, 96), "grid"),
    "bf16_8x96": (BF16, (8, 96), "grid"),
    "bf16_13x96": (BF16, (13, 96), "grid"),
    "bf16_64x96": (BF16, (64, 96), "grid"),
    "bf16_b2_q5_h96": (BF16, (2, 5, 96), "grid"),
    "bf16_b2_q8_h256": (BF16, (2, 8, 256), "grid"),
    "bf16_magnitudes": (BF16, (12, 128), "magnitudes"),
    "bf16_strided_rows": (BF16, (9, 96), "strided"),
    "bf16_randn": (BF16, (16, 256), "randn"),
    "fp16_13x96": (FP16, (13, 96), "grid"),
    "fp16_randn": (FP16, (8, 128), "randn"),
    "fp32_8x128": (FP32, (8, 128), "randn"),
    "fp32_b2_q5_h96": (FP32, (2, 5, 96), "randn"),
}


def _grid(shape, g: torch.Generator, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Random k / 16 * scale with |k| < 64: x + a of two of them still fits 8 significant bits."""
    return torch.randint(-63, 64, shape, generator=g).float() / 16 * scale


def case_inputs(name: str):
    dtype, shape, kind = CASES[name]
    g = torch.Generator().manual_seed(len(name) * 31 + shape[-1])
    h = shape[-1]
    if kind == "randn":
        x, a = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
    elif kind == "magnitudes":  # each row its own power of two: huge sums of squares, and ones far below eps
        scale = 2.0 ** torch.tensor([-20, -12, -6, -1, 0, 3, 8, 16, 24, 30, 36, 40]).float()[:, None]
        x, a = _grid(shape, g, scale), _grid(shape, g, scale)
    elif kind == "strided":
        wide = (shape[0], h + 32)
        x, a = _grid(wide, g).to(dtype)[:, 16:16 + h], _grid(wide, g).to(dtype)[:, :h]
        assert x.stride(0) == h + 32 and a.stride(0) == h + 32
    else:
        x, a = _grid(shape, g), _grid(shape, g)
    w = (torch.randn(h, generator=g) * 0.2 + 1).to(dtype)
    return x.to(dtype), a.to(dtype), w


def layer_norm_bias(w: torch.Tensor) -> torch.Tensor:
    return (w.float() * 0.5 - 0.5).to(w.dtype)


def run_case(impl, name: str) -> dict:
    x, a, w = case_inputs(name)
    total, norm_of_sum = impl.add_rms_norm(x, a, w, EPS)
    ln_sum, ln = impl.add_layer_norm(x, a, w, layer_norm_bias(w), EPS)
    return {"norm": impl.rms_norm(x, w, EPS), "sum": total, "norm_of_sum": norm_of_sum, "ln_sum": ln_sum, "ln": ln}


REFERENCE = SimpleNamespace(rms_norm=nk.rms_norm_reference, add_rms_norm=nk.add_rms_norm_reference,
                            add_layer_norm=nk.add_layer_norm_reference)


# -------------------------------------------------------------- the interpreter subprocess

@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory):
    """Outputs of every case computed by the Triton kernels under the interpreter."""
    pytest.importorskip("triton", reason="triton is installed by scripts/setup.sh; its interpreter runs the kernels")
    return run_interpreted(__file__, tmp_path_factory.mktemp("norm_kernels") / "out.pt")


def _equal(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert_bitwise_equal(got, ref, what)


def _matches(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, inputs: str, what: str) -> None:
    """fp32: within 1e-6. 16-bit: bitwise, except on randn inputs, where the fp32 sum of squares may
    differ in its last bit from torch's (another summation order) and flip a rounding: one ulp, rarely."""
    if dtype == FP32:
        assert got.dtype == ref.dtype and got.shape == ref.shape, what
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")
    elif inputs != "randn":
        _equal(got, ref, what)
    else:
        assert got.dtype == ref.dtype and got.shape == ref.shape, what
        diff = got != ref
        assert diff.float().mean().item() <= 1e-3, f"{what}: {diff.sum().item()} of {got.numel()} differ"
        ulp = torch.finfo(dtype).eps  # one ulp, relative to the value, at most
        assert ((got.float() - ref.float()).abs() <= ref.float().abs() * ulp).all(), f"{what}: beyond one ulp"


# --------------------------------------------------------------------------------------- tests

def test_the_interpreter_run_took_the_kernels_without_pdl(kernel_out):
    assert kernel_out["meta"] == {"interpreted": True, "available_cpu": True, "pdl_options": {}}


@pytest.mark.parametrize("name", list(CASES))
def test_rms_norm_equals_graphs_rms(kernel_out, name):
    dtype, _, inputs = CASES[name]
    ref = run_case(REFERENCE, name)
    _matches(kernel_out[name]["norm"], ref["norm"], dtype, inputs, f"{name}: rms_norm")


@pytest.mark.parametrize("name", list(CASES))
def test_add_rms_norm_returns_the_sum_and_its_norm(kernel_out, name):
    """The sum is one rounding of x + a (bitwise in every dtype); the norm is graphs._rms of that sum."""
    dtype, _, inputs = CASES[name]
    ref = run_case(REFERENCE, name)
    got = kernel_out[name]
    _equal(got["sum"], ref["sum"], f"{name}: x + a")
    assert got["sum"].is_contiguous() and got["norm_of_sum"].is_contiguous()
    _matches(got["norm_of_sum"], ref["norm_of_sum"], dtype, inputs, f"{name}: norm of x + a")


@pytest.mark.parametrize("name", list(CASES))
def test_add_layer_norm_returns_the_sum_and_its_layer_norm(kernel_out, name):
    """The vision tower's add + LayerNorm: the sum bitwise x + a; the norm F.layer_norm of it up to the
    fp32 statistics (two passes here, Welford in torch), i.e. within one rounding of the output dtype."""
    dtype, _, _ = CASES[name]
    ref = run_case(REFERENCE, name)
    got = kernel_out[name]
    _equal(got["ln_sum"], ref["ln_sum"], f"{name}: x + a")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == FP32 else dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    torch.testing.assert_close(got["ln"], ref["ln"], **tol, msg=lambda m: f"{name}: layer norm: {m}")


def test_grid_inputs_exercise_the_intermediate_roundings():
    """Guard for the cases above: on these inputs, skipping the rounding of x * r to bf16 (what an
    fp32-intermediate implementation does) changes the result, so a bitwise match means something."""
    x, _, w = case_inputs("bf16_64x96")
    xf = x.float()
    unrounded = (w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS))).to(BF16)
    assert (unrounded != nk.rms_norm_reference(x, w, EPS)).any()


def test_magnitude_rows_span_eps_dominated_to_huge_sums_of_squares():
    x, _, _ = case_inputs("bf16_magnitudes")
    ms = x.float().pow(2).mean(-1)
    assert ms.min() < EPS / 100 and ms.max() > 1e20 and torch.isfinite(ms).all()


# ------------------------------------------------------------------- graphs.py dispatch (CPU)

class _FakeKernels:
    """Stands in for engine.norm_kernels: records what it was asked to compute."""

    def __init__(self, supports: bool = True):
        self.supports, self.calls = supports, []

    def supported(self, x, w, a=None):
        return self.supports

    def rms_norm(self, x, w, eps):
        self.calls.append("rms_norm")
        return "kernel"

    def add_rms_norm(self, x, a, w, eps):
        self.calls.append("add_rms_norm")
        return "kernel", "kernel"

    def layer_norm_supported(self, x, w, b, a):
        return self.supports

    def add_layer_norm(self, x, a, w, b, eps):
        self.calls.append("add_layer_norm")
        return "kernel", "kernel"


def _fake_cuda_tensor(rows: int = 8, width: int = 64):
    return SimpleNamespace(is_cuda=True, shape=(rows, width), numel=lambda: rows * width)


def test_graphs_norms_take_the_kernels_for_supported_cuda_tensors(monkeypatch):
    fake = _FakeKernels()
    monkeypatch.setattr(graphs, "_kernel_module", lambda name, t: fake if name == "norm_kernels" else None)
    x, w = _fake_cuda_tensor(), _fake_cuda_tensor()
    assert graphs.fused_rms_norm(x, w, EPS) == "kernel"
    assert graphs.fused_add_rms_norm(x, x, w, EPS) == ("kernel", "kernel")
    assert fake.calls == ["rms_norm", "add_rms_norm"]


def test_vision_add_layer_norm_takes_the_kernel_on_cuda_only(monkeypatch):
    """All rows (the tower's 2 880 patches are memory bound: the one-pass kernel), CUDA tensors only."""
    fake = _FakeKernels()
    monkeypatch.setattr(graphs, "_kernel_module", lambda name, t: fake if name == "norm_kernels" else None)
    x = _fake_cuda_tensor(rows=2880)
    assert graphs.fused_add_layer_norm(x, x, x, x, EPS) == ("kernel", "kernel") and fake.calls == ["add_layer_norm"]
    g = torch.Generator().manual_seed(1)
    xc, ac = torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g)
    wc, bc = torch.randn(32, generator=g), torch.randn(32, generator=g)
    y, h = graphs.fused_add_layer_norm(xc, ac, wc, bc, EPS)  # CPU: the PyTorch chain, not the fake
    assert fake.calls == ["add_layer_norm"]
    torch.testing.assert_close(h, torch.nn.functional.layer_norm(xc + ac, (32,), wc, bc, EPS))


def test_graphs_norms_keep_the_compiled_chain_for_many_rows(monkeypatch):
    """The prefill's hundreds of rows are not latency bound: the compiled chain, not the kernels."""
    monkeypatch.setattr(graphs, "_compiled_rms_norm", lambda x, w, eps: "chain")
    fake = _FakeKernels()
    monkeypatch.setattr(graphs, "_kernel_module", lambda name, t: fake)
    x, w = _fake_cuda_tensor(rows=graphs.SKINNY_ROWS + 1), _fake_cuda_tensor()
    assert graphs.fused_rms_norm(x, w, EPS) == "chain" and fake.calls == []


def test_graphs_norms_keep_the_compiled_chain_when_the_kernels_cannot(monkeypatch):
    """Unsupported operands (e.g. an fp32 weight on bf16 x) or kernels off: the compiled chain."""
    compiled = []
    monkeypatch.setattr(graphs, "_compiled_rms_norm", lambda x, w, eps: compiled.append("rms_norm") or "chain")
    monkeypatch.setattr(graphs, "_compiled_add_rms_norm", lambda x, a, w, eps: compiled.append("add") or "chain")
    x, w = _fake_cuda_tensor(), _fake_cuda_tensor()
    fake = _FakeKernels(supports=False)
    monkeypatch.setattr(graphs, "_kernel_module", lambda name, t: fake)
    assert graphs.fused_rms_norm(x, w, EPS) == "chain" and graphs.fused_add_rms_norm(x, x, w, EPS) == "chain"
    monkeypatch.setattr(graphs, "_kernel_module", lambda name, t: None)  # kernels switched off / unavailable
    assert graphs.fused_rms_norm(x, w, EPS) == "chain" and graphs.fused_add_rms_norm(x, x, w, EPS) == "chain"
    assert compiled == ["rms_norm", "add"] * 2 and fake.calls == []


def test_graphs_norms_never_take_the_kernels_on_the_cpu(monkeypatch):
    """Even where the kernels could run on the CPU (Triton's interpreter), the CPU path stays the
    eager math: bitwise graphs._rms."""
    fake = _FakeKernels()
    monkeypatch.setattr(graphs, "_kernel_module", lambda name, t: fake)
    g = torch.Generator().manual_seed(0)
    x, a, w = torch.randn(2, 3, 64, generator=g), torch.randn(2, 3, 64, generator=g), torch.randn(64, generator=g)
    _equal(graphs.fused_rms_norm(x, w, EPS), graphs._rms(x, w, EPS), "fused_rms_norm on the CPU")
    total, norm = graphs.fused_add_rms_norm(x, a, w, EPS)
    _equal(total, x + a, "x + a on the CPU")
    _equal(norm, graphs._rms(x + a, w, EPS), "fused_add_rms_norm on the CPU")
    assert fake.calls == []


def test_eager_versions_stay_the_plain_math():
    g = torch.Generator().manual_seed(1)
    x, a, w = torch.randn(4, 32, generator=g).to(BF16), torch.randn(4, 32, generator=g).to(BF16), torch.ones(32, dtype=BF16)
    _equal(graphs.fused_rms_norm.eager(x, w, EPS), graphs._rms(x, w, EPS), "fused_rms_norm.eager")
    total, norm = graphs.fused_add_rms_norm.eager(x, a, w, EPS)
    _equal(total, x + a, "fused_add_rms_norm.eager sum")
    _equal(norm, graphs._rms(x + a, w, EPS), "fused_add_rms_norm.eager norm")


def test_no_programmatic_dependent_launch_on_the_cpu(monkeypatch):
    monkeypatch.setattr(attention_kernel, "PDL", True)
    opts = nk._options(torch.zeros(2, 128, dtype=BF16), 128)
    assert "launch_pdl" not in opts and "USE_PDL" not in opts


def test_supported_names_exactly_what_the_kernels_reproduce():
    x = torch.zeros(3, 8, dtype=BF16)
    w = torch.ones(8, dtype=BF16)
    assert nk.supported(x, w) and nk.supported(x, w, x)
    assert not nk.supported(x, w.float())              # torch would promote the result to fp32
    assert not nk.supported(x, w, x.float())            # likewise for x + a
    assert not nk.supported(x, w, x[:, :4])             # a broadcast residual
    assert not nk.supported(x, torch.ones(4, dtype=BF16))
    assert not nk.supported(x.to(torch.float64), w.double())
    wide = torch.zeros(1, nk.MAX_COLS + 1, dtype=BF16)
    assert not nk.supported(wide, torch.ones(nk.MAX_COLS + 1, dtype=BF16))


def test_without_the_kernels_the_functions_are_the_eager_reference():
    """In this process the kernels were not built by the interpreter: CPU tensors take the reference
    path, so callers need no branch of their own."""
    if nk.cache_kernels.interpreted():
        pytest.skip("TRITON_INTERPRET was set for the pytest process itself")
    assert not nk.available(torch.zeros(1))
    got, ref = run_case(nk, "bf16_13x96"), run_case(REFERENCE, "bf16_13x96")
    for key in got:
        _equal(got[key], ref[key], f"fallback: {key}")


# ------------------------------------------------------------ subprocess entry (interpreter)

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the pytest fixture (needs TRITON_INTERPRET=1)"
    attention_kernel.PDL = True  # on, as in the engine: the interpreter must still get no PDL
    probe = torch.zeros(1, 8, dtype=BF16)
    result = {
        "meta": {"interpreted": nk.cache_kernels.interpreted(), "available_cpu": nk.available(probe),
                 "pdl_options": {k: v for k, v in nk._options(probe, 8).items() if k in ("USE_PDL", "launch_pdl")}},
    }
    for name in CASES:
        x, a, w = case_inputs(name)
        assert nk.supported(x, w, a), name  # every case runs the kernel, not the fallback
        assert nk.layer_norm_supported(x, w, layer_norm_bias(w), a), name
        result[name] = run_case(nk, name)
    torch.save(result, sys.argv[1])
