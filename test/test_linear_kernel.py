"""skinny_linear (engine/linear_kernel.py): F.linear with few rows, at weight bandwidth.

The Triton kernel runs on the CPU through Triton's interpreter. TRITON_INTERPRET=1 must be set before
triton's jit decorators run, so every kernel case below is built here, run once in one fresh process
(test/linear_interp.py) and compared here with the specification `skinny_linear_reference`. Inputs are
fp32 (the interpreter computes tl.dot on 16-bit inputs wrongly, so the kernel upcasts those when
interpreting; one bf16 case checks the loads, casts and stores around the dot). Small shapes and forced
small blocks so that N and K span several blocks, with and without remainders, split and not.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashdrive_ros.engine import linear_kernel as L

HERE = Path(__file__).resolve().parent
TOL = dict(rtol=1e-4, atol=1e-4)


def _cfg(bn, bk, split):
    return dict(block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=2)


def _t(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _row_slice(n, k, seed):
    """w = rows [10, 10 + n) of a fused [n + 24, k] buffer: base pointer offset, row stride k."""
    return _t((n + 24, k), seed)[10:10 + n]


CASES = {
    # name: (x, w, bias, forced config or None = the default config)
    "m1_even": lambda: (_t((1, 64), 1), _t((48, 64), 2), None, _cfg(16, 32, 1)),
    "m5_row_slice_bias_k_tail": lambda: (_t((5, 160), 3), _row_slice(96, 160, 4), _t((96,), 5), _cfg(32, 64, 1)),
    "m16_split3_n_tail_bias": lambda: (_t((16, 160), 6), _t((200, 160), 7), _t((200,), 8), _cfg(32, 32, 3)),
    "m64_split2": lambda: (_t((64, 64), 9), _t((96, 64), 10), None, _cfg(32, 32, 2)),
    "bqk_leading_dims_split_k_tail": lambda: (_t((2, 3, 160), 11), _row_slice(200, 160, 12), _t((200,), 13),
                                              _cfg(64, 64, 2)),
    "m100_block_m_128": lambda: (_t((100, 64), 14), _t((48, 64), 15), _t((48,), 16), _cfg(16, 64, 1)),
    "column_slice_row_stride": lambda: (_t((5, 64), 17), _t((96, 96), 18)[:, 16:80], None, _cfg(32, 32, 2)),
    "default_config": lambda: (_t((5, 160), 19), _t((200, 160), 20), _t((200,), 21), None),
    "bf16_split": lambda: (_t((8, 160), 22, torch.bfloat16), _row_slice(96, 160, 23).bfloat16(),
                           _t((96,), 24, torch.bfloat16), _cfg(32, 64, 2)),
    "fp16": lambda: (_t((3, 64), 25, torch.float16), _t((48, 64), 26, torch.float16), None, _cfg(16, 32, 1)),
    "__capture__": lambda: (_t((2, 2, 64), 27), _row_slice(48, 64, 28), _t((48,), 29), None),
}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """name -> (inputs, kernel output, w strides seen by the kernel); one interpreter process for all."""
    if L.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("linear_interp")
    inputs = {name: build() for name, build in CASES.items()}
    torch.save(inputs, d / "cases.pt")
    proc = subprocess.run([sys.executable, str(HERE / "linear_interp.py"), str(d / "cases.pt"), str(d / "out.pt")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(d / "out.pt", weights_only=False)
    out = {name: (inputs[name], *results[name]) for name in CASES if name != "__capture__"}
    out["__capture__"] = (inputs["__capture__"], results["__capture__"])
    return out


def _check(kernel, name, **tol):
    (x, w, bias, _), out, _ = kernel[name]
    ref = L.skinny_linear_reference(x, w, bias)
    assert out.shape == (*x.shape[:-1], w.shape[0]) and out.dtype == x.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **(tol or TOL))
    return out


# ------------------------------------------------------------------------- kernel == specification

@pytest.mark.parametrize("name", ["m1_even", "m5_row_slice_bias_k_tail", "m16_split3_n_tail_bias", "m64_split2",
                                  "bqk_leading_dims_split_k_tail", "m100_block_m_128", "default_config"])
def test_kernel_matches_the_specification(kernel, name):
    _check(kernel, name)


def test_weight_row_slice_of_a_fused_buffer_is_read_in_place(kernel):
    (_, w, *_), _, strides = kernel["m5_row_slice_bias_k_tail"]
    assert w.storage_offset() > 0 and strides == (160, 1)
    _check(kernel, "m5_row_slice_bias_k_tail")


def test_weight_with_a_row_stride_larger_than_k(kernel):
    (_, w, *_), _, strides = kernel["column_slice_row_stride"]
    assert strides == (96, 1) and not w.is_contiguous()
    _check(kernel, "column_slice_row_stride")


def test_split_and_unsplit_agree(kernel):
    (x, w, bias, _), out, _ = kernel["m16_split3_n_tail_bias"]
    torch.testing.assert_close(out, F.linear(x, w, bias), **TOL)


def test_16_bit_inputs_give_16_bit_outputs_close_to_fp32(kernel):
    _check(kernel, "bf16_split", rtol=1e-2, atol=2e-2)
    _check(kernel, "fp16", rtol=1e-3, atol=1e-2)


def test_untuned_shape_during_capture_falls_back_to_f_linear_then_uses_the_cached_config(kernel):
    (x, w, bias, _), r = kernel["__capture__"]
    assert torch.equal(r["during_untuned"], F.linear(x, w, bias))   # F.linear itself, bit for bit
    assert r["launches_untuned"] == 0 and r["cached_after_untuned"] is None  # nothing tuned, nothing cached
    assert r["launches"] == 2  # outside capture, then inside capture with the cached config
    assert r["config"] == L.default_config(4, 48, 64, 4)  # the interpreter caches the default, times nothing
    torch.testing.assert_close(r["outside"], L.skinny_linear_reference(x, w, bias), **TOL)
    assert torch.equal(r["during_tuned"], r["outside"])


# ------------------------------------------------------------------------------- host side (in process)

def _fake_kernel(monkeypatch):
    """Pretend the kernel is available on CPU tensors; record launches and tunings instead."""
    launches, tunes = [], []
    monkeypatch.setattr(L, "available", lambda t: True)
    monkeypatch.setattr(L, "_launch", lambda x2, w, b, c: launches.append(c) or F.linear(x2, w, b))
    monkeypatch.setattr(L, "_tune", lambda x2, w, b: tunes.append(x2.shape) or L.Tuned(L.Config(64, 128, 1, 4, 4), 1.0, 2.0))
    monkeypatch.setattr(L, "sm_count", lambda t: 132)
    L.clear_tuned()
    return launches, tunes


def test_capture_never_tunes_and_uses_only_cached_configs(monkeypatch):
    launches, tunes = _fake_kernel(monkeypatch)
    x, w = torch.randn(64, 32), torch.randn(48, 32)
    monkeypatch.setattr(L, "_capturing", lambda: True)
    y = L.skinny_linear(x, w)
    assert torch.equal(y, F.linear(x, w)) and not launches and not tunes and L.tuned(x, w) is None
    monkeypatch.setattr(L, "_capturing", lambda: False)
    L.skinny_linear(x, w, tune=True)  # a CPU tensor: no timing even with tune=True, the default is cached
    assert not tunes and launches == [L.default_config(64, 48, 32, 132, 4)]
    monkeypatch.setattr(L, "_capturing", lambda: True)
    L.skinny_linear(x, w)
    assert len(launches) == 2 and not tunes


def test_load_and_export_tuned_round_trip(monkeypatch):
    launches, tunes = _fake_kernel(monkeypatch)
    x, w = torch.randn(2, 3, 32), torch.randn(48, 32)
    cfg = L.Config(32, 256, 4, 8, 5)
    L.load_tuned([dict(device=-1, dtype="float32", m=6, n=48, k=32, bias=False, **cfg.__dict__)])
    monkeypatch.setattr(L, "_capturing", lambda: True)
    L.skinny_linear(x, w)
    assert launches == [cfg] and not tunes
    rec = L.export_tuned()
    L.clear_tuned()
    L.load_tuned(rec)
    assert L.tuned(x, w).config == cfg
    L.clear_tuned()


@pytest.mark.parametrize("why", ["rows", "dtype", "k", "no_triton"])
def test_unsupported_calls_are_f_linear(monkeypatch, why):
    launches, _ = _fake_kernel(monkeypatch)
    x, w = torch.randn(5, 32), torch.randn(48, 32)
    if why == "rows":
        x = torch.randn(L.MAX_ROWS + 1, 32)
    elif why == "dtype":
        w = w.double()
        x = x.double()
    elif why == "k":
        w = torch.randn(48, 64)[:, ::2]  # column stride 2: not a row-major weight
    else:
        monkeypatch.setattr(L, "available", lambda t: False)
    assert torch.equal(L.skinny_linear(x, w), F.linear(x, w)) and not launches
    L.clear_tuned()


def test_available_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not L.available(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert L.available(torch.zeros(1)) == (L.triton is not None)


EXPERT = [(64, 4096, 2048), (64, 2048, 2048), (64, 16512, 2048), (64, 2048, 8256)]
LM = [(m, n, k) for m in (8, 1) for n, k in ((6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288))]


@pytest.mark.parametrize("m,n,k", EXPERT + LM + [(8, 155712, 4096)])
def test_candidates_fit_and_fill_an_h100(m, n, k):
    sms = 132
    cands = L.candidates(m, n, k, sms)
    assert cands and len(cands) <= 32  # bounded autotuning time per shape
    for c in cands:
        assert L._smem(c, m, 2) <= L.SMEM_BYTES
        assert L._programs(c, n, k) >= 0.9 * sms
        assert L._n_splits(c, k) == c.split_k
    assert L.default_config(m, n, k, sms) in cands
    if n == 2048:  # narrow N: only split configs have enough programs with wide blocks
        assert any(c.split_k > 1 for c in cands)


def test_chunks_cover_k_exactly():
    for k in (64, 160, 2048, 8256, 12288):
        for c in L.CONFIGS:
            s, ch = L._n_splits(c, k), L._chunk(c, k)
            assert ch % c.block_k == 0 and (s - 1) * ch < k <= s * ch


def test_reference_is_fp32_f_linear_cast_back():
    x, w, b = torch.randn(3, 4, 32).bfloat16(), torch.randn(16, 32).bfloat16(), torch.randn(16).bfloat16()
    ref = L.skinny_linear_reference(x, w, b)
    assert ref.dtype == torch.bfloat16 and ref.shape == (3, 4, 16)
    assert torch.equal(ref, F.linear(x.float(), w.float(), b.float()).bfloat16())


@pytest.mark.parametrize("block_m,tile,split", [(16, (64, 128, 4, 4), False), (64, (32, 256, 4, 4), True)])
def test_kernel_compiles_for_hopper_with_a_multi_buffered_pipeline(block_m, tile, split):
    """Offline compile for sm_90 (no GPU needed) with the alignment the JIT specializes on for model
    weights: the loads must become cp.async, multi-buffered (shared memory within _smem's estimate)."""
    if L.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {"X": "*bf16", "W": "*bf16", "B": "*bf16", "Y": "*bf16", "P": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_wn": "i32", "chunk": "i32"}
    names = list(sig) + ["BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT", "HAS_BIAS", "EVEN_N", "EVEN_K", "UPCAST", "PRECISION"]
    sig.update({n: "constexpr" for n in names[len(sig):]})
    aligned = ("X", "W", "B", "Y", "P", "N", "K", "stride_xm", "stride_wn", "chunk")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    bn, bk, warps, stages = tile
    consts = dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, HAS_BIAS=True, EVEN_N=True, EVEN_K=True,
                  UPCAST=False, PRECISION="tf32")
    k = L.triton.compile(ASTSource(L._skinny_linear_fwd, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages))
    assert k.asm["ttgir"].count("async_copy_global") == 2 * stages
    # wgmma keeps num_stages buffers, mma.sync (block_n 32) one fewer: _smem is the bound
    assert 0.7 * L._smem(L.Config(bn, bk, 1, warps, stages), block_m, 2) <= k.metadata.shared \
        <= L._smem(L.Config(bn, bk, 1, warps, stages), block_m, 2)
