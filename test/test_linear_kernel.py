"""skinny_linear (engine/linear_kernel.py): F.linear with few rows, at weight bandwidth.

The Triton kernel runs on the CPU through Triton's interpreter. TRITON_INTERPRET=1 must be set before
triton's jit decorators run, so every kernel case below is built here, run once in one fresh process
(test/linear_interp.py) and compared here with the specification `skinny_linear_reference`. Inputs are
fp32 (the interpreter computes tl.dot on 16-bit inputs wrongly, so the kernel upcasts those when
interpreting; one bf16 case checks the loads, casts and stores around the dot). Small shapes and forced
small blocks so that N and K span several blocks, with and without remainders, split and not.
skinny_swiglu (the gate|up GEMM with the SwiGLU as its epilogue) is checked the same way against
skinny_swiglu_reference, and graphs._mlp's choice of it by a shipped record in the same process.
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


def _row_slice(n, k, seed, scale=1.0, dtype=torch.float32):
    """w = rows [10, 10 + n) of a fused [n + 24, k] buffer (times scale): base pointer offset, row stride k."""
    return (_t((n + 24, k), seed) * scale).to(dtype)[10:10 + n]


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

# skinny_swiglu: name -> (x, w_gate_up [2I, K], forced config or None = the default config). Weights are
# scaled by K^-1/2 so that g and u are O(1), where silu is neither linear nor zero.
SWIGLU_CASES = {
    "m1_even": lambda: (_t((1, 64), 30), _t((2 * 48, 64), 31) / 8, _cfg(16, 32, 1)),
    "m8_row_slice_n_and_k_tails": lambda: (_t((8, 160), 32), _row_slice(2 * 40, 160, 33, 1 / 12), _cfg(16, 64, 1)),
    "m8_split3_n_and_k_tails": lambda: (_t((8, 160), 34), _t((2 * 40, 160), 35) / 12, _cfg(16, 64, 3)),
    "m64_split2": lambda: (_t((64, 64), 36), _t((2 * 32, 64), 37) / 8, _cfg(32, 32, 2)),
    "m50_leading_dims_row_slice_split_k_tail": lambda: (_t((2, 25, 96), 38), _row_slice(2 * 48, 96, 39, 1 / 10),
                                                        _cfg(32, 64, 2)),
    "default_config": lambda: (_t((3, 160), 40), _t((2 * 40, 160), 41) / 12, None),
    "bf16": lambda: (_t((8, 160), 42, torch.bfloat16), _row_slice(2 * 48, 160, 43, 1 / 12, torch.bfloat16),
                     _cfg(32, 64, 1)),
    "bf16_split": lambda: (_t((8, 160), 42, torch.bfloat16), _row_slice(2 * 48, 160, 43, 1 / 12, torch.bfloat16),
                           _cfg(32, 64, 2)),
}

# graphs._mlp with and without a shipped swiglu record: name -> (h, gate, up, down weights)
MLP_CASES = {
    "fp32_m8": lambda: (_t((2, 4, 64), 44), _t((48, 64), 45) / 8, _t((48, 64), 46) / 8, _t((64, 48), 47) / 7),
    "bf16_m8": lambda: tuple(t.bfloat16() for t in
                             (_t((2, 4, 64), 48), _t((48, 64), 49) / 8, _t((48, 64), 50) / 8, _t((64, 48), 51) / 7)),
}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """name -> (inputs, kernel output, w strides seen by the kernel); one interpreter process for all."""
    if L.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("linear_interp")
    inputs = {name: build() for name, build in CASES.items()}
    inputs["__swiglu__"] = {name: build() for name, build in SWIGLU_CASES.items()}
    inputs["__mlp__"] = {name: build() for name, build in MLP_CASES.items()}
    torch.save(inputs, d / "cases.pt")
    proc = subprocess.run([sys.executable, str(HERE / "linear_interp.py"), str(d / "cases.pt"), str(d / "out.pt")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(d / "out.pt", weights_only=False)
    out = {name: (inputs[name], *results[name]) for name in CASES if name != "__capture__"}
    out["__capture__"] = (inputs["__capture__"], results["__capture__"])
    for group in ("__swiglu__", "__mlp__"):
        out[group] = {name: (inputs[group][name], results[group][name]) for name in inputs[group]}
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


# ------------------------------------------------------------------------- skinny_swiglu == specification

@pytest.mark.parametrize("name", [n for n in SWIGLU_CASES if not n.startswith("bf16")])
def test_swiglu_epilogue_matches_the_specification(kernel, name):
    (x, w, _), out = kernel["__swiglu__"][name]
    ref = L.skinny_swiglu_reference(x, w)
    assert out.shape == (*x.shape[:-1], w.shape[0] // 2) and out.dtype == x.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **TOL)


def test_swiglu_specification_is_silu_of_the_gate_rows_times_the_up_rows():
    x, w = torch.randn(3, 16, dtype=torch.float64), torch.randn(2 * 8, 16, dtype=torch.float64)
    g, u = x @ w[:8].T, x @ w[8:].T
    torch.testing.assert_close(L.skinny_swiglu_reference(x.float(), w.float()), (g * torch.sigmoid(g) * u).float())


def test_swiglu_reads_gate_and_up_rows_of_a_row_slice_in_place(kernel):
    (x, w, _), out = kernel["__swiglu__"]["m50_leading_dims_row_slice_split_k_tail"]
    assert w.storage_offset() > 0 and w.stride() == (96, 1) and out.shape == (2, 25, 48)
    torch.testing.assert_close(out, L.skinny_swiglu_reference(x, w), **TOL)


def test_swiglu_split_applies_the_nonlinearity_to_the_full_sums(kernel):
    """silu of each split's partial, summed, would be a different function: the split result must be
    the unsplit one (the same K sums, in another order)."""
    (x, w, _), split = kernel["__swiglu__"]["m8_split3_n_and_k_tails"]
    g, u = F.linear(x, w).chunk(2, dim=-1)
    torch.testing.assert_close(split, F.silu(g) * u, **TOL)


@pytest.mark.parametrize("name", ["bf16", "bf16_split"])
def test_bf16_swiglu_rounds_once_from_fp32(kernel, name):
    """The fp32 silu(g) * u rounded once to bf16: within one bf16 ulp (2^-7 relative) of the reference
    (the fp32 sums may differ in their last bits), where the two-kernel path rounds g|u first."""
    (x, w, _), out = kernel["__swiglu__"][name]
    ref = L.skinny_swiglu_reference(x, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("name", list(MLP_CASES))
def test_mlp_takes_the_swiglu_epilogue_only_with_a_shipped_record(kernel, name):
    (h, gate, up, down), r = kernel["__mlp__"][name]
    assert r["launches_with"] == 1 and r["launches_without"] == 0
    g, u = F.linear(h.float(), gate.float()), F.linear(h.float(), up.float())
    exact = F.linear(F.silu(g) * u, down.float())
    tol = TOL if h.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # bf16: roundings in between
    torch.testing.assert_close(r["with_record"].float(), exact, **tol)
    torch.testing.assert_close(r["with_record"], r["without"], **tol)
    # without a record: the unfused path, op for op (one gate|up GEMM, eager SwiGLU on the CPU, down GEMM)
    g, u = F.linear(h, torch.cat([gate, up])).chunk(2, dim=-1)
    assert torch.equal(r["without"], F.linear(F.silu(g) * u, down))


# ------------------------------------------------------------------------------- host side (in process)

def _fake_kernel(monkeypatch):
    """Pretend the kernel is available on CPU tensors; record launches and tunings instead."""
    launches, tunes = [], []
    monkeypatch.setattr(L, "available", lambda t: True)
    monkeypatch.setattr(L, "_launch", lambda x2, w, b, c: launches.append(c) or F.linear(x2, w, b))
    monkeypatch.setattr(L, "_launch_swiglu", lambda x2, w, c: launches.append(c) or L.skinny_swiglu_reference(x2, w))
    monkeypatch.setattr(L, "_tune", lambda x2, w, b, swiglu=False: tunes.append(x2.shape)
                        or L.Tuned(L.Config(64, 128, 1, 4, 4), 1.0, 2.0))
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


def test_swiglu_has_its_own_cache_entries_and_never_tunes_during_capture(monkeypatch):
    launches, tunes = _fake_kernel(monkeypatch)
    x, w = torch.randn(8, 32), torch.randn(2 * 48, 32)
    monkeypatch.setattr(L, "_capturing", lambda: True)
    y = L.skinny_swiglu(x, w)  # never tuned: the two-kernel path, nothing cached
    assert torch.equal(y, L.swiglu_reference(F.linear(x, w))) and not launches and L.tuned(x, w, swiglu=True) is None
    monkeypatch.setattr(L, "_capturing", lambda: False)
    L.skinny_linear(x, w)  # the plain GEMM of the same weight: a separate entry
    L.skinny_swiglu(x, w)
    plain, swiglu = L.tuned(x, w), L.tuned(x, w, swiglu=True)
    assert plain.config == L.default_config(8, 96, 32, 132, 4)
    assert swiglu.config == L.default_config(8, 48, 32, 132, 4, tiles=2)  # I columns, two weight tiles
    assert launches == [plain.config, swiglu.config] and not tunes
    monkeypatch.setattr(L, "_capturing", lambda: True)
    L.skinny_swiglu(x, w)
    assert launches[-1] == swiglu.config and not tunes


def test_export_and_load_carry_the_swiglu_flag_and_old_records_are_plain(monkeypatch):
    launches, _ = _fake_kernel(monkeypatch)
    x, w = torch.randn(8, 32), torch.randn(2 * 48, 32)
    plain_cfg, swiglu_cfg = L.Config(32, 256, 4, 8, 5), L.Config(64, 128, 2, 4, 4)
    old = dict(device=-1, dtype="float32", m=8, n=96, k=32, bias=False, **plain_cfg.__dict__)  # no "swiglu"
    L.load_tuned([old, dict(old, swiglu=True, **swiglu_cfg.__dict__)])
    assert L.tuned(x, w).config == plain_cfg and L.tuned(x, w, swiglu=True).config == swiglu_cfg
    rec = L.export_tuned()
    assert sorted(r["swiglu"] for r in rec) == [False, True]
    L.clear_tuned()
    L.load_tuned(rec)
    monkeypatch.setattr(L, "_capturing", lambda: True)
    L.skinny_linear(x, w)
    L.skinny_swiglu(x, w)
    assert launches == [plain_cfg, swiglu_cfg]
    L.clear_tuned()


def test_swiglu_needs_gate_and_up_halves():
    with pytest.raises(ValueError, match="2I, K"):
        L.skinny_swiglu(torch.randn(5, 32), torch.randn(95, 32))


@pytest.mark.parametrize("why", ["rows", "dtype"])
def test_swiglu_calls_the_kernel_cannot_take_are_the_two_kernel_path(monkeypatch, why):
    launches, _ = _fake_kernel(monkeypatch)
    x, w = torch.randn(5, 32), torch.randn(2 * 48, 32)
    if why == "rows":
        x = torch.randn(L.MAX_ROWS + 1, 32)
    else:
        x, w = x.double(), w.double()
    assert torch.equal(L.skinny_swiglu(x, w), L.swiglu_reference(F.linear(x, w))) and not launches
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


@pytest.mark.parametrize("m,n,k", [(64, 16512, 2048), (8, 24576, 4096), (1, 24576, 4096)])
def test_swiglu_candidates_fit_two_weight_tiles_and_fill_an_h100(m, n, k):
    sms, i = 132, n // 2
    cands = L.candidates(m, i, k, sms, tiles=2)
    assert cands and len(cands) <= 32
    for c in cands:
        assert L._smem(c, m, 2, tiles=2) <= L.SMEM_BYTES
        assert L._programs(c, i, k) >= 0.9 * sms
    assert any(L._smem(c, m, 2, tiles=2) > L.SMEM_BYTES for c in L.candidates(m, i, k, sms))  # the filter bites
    assert L.default_config(m, i, k, sms, tiles=2) in cands


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


@pytest.mark.parametrize("block_m,tile,split", [(16, (32, 256, 4, 4), False), (64, (64, 128, 4, 4), True)])
def test_swiglu_kernel_compiles_for_hopper_with_both_weight_streams_multi_buffered(block_m, tile, split):
    """As above for _skinny_swiglu_fwd: gate, up and x tiles all cp.async, multi-buffered, within
    _smem's two-tile estimate (the candidate filter's bound)."""
    if L.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {"X": "*bf16", "WG": "*bf16", "WU": "*bf16", "Y": "*bf16", "P": "*fp32", "M": "i32", "I": "i32",
           "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "chunk": "i32"}
    names = list(sig) + ["BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT", "EVEN_N", "EVEN_K", "UPCAST", "PRECISION",
                         "RNE_BF16"]
    sig.update({n: "constexpr" for n in names[len(sig):]})
    aligned = ("X", "WG", "WU", "Y", "P", "I", "K", "stride_xm", "stride_wn", "chunk")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    bn, bk, warps, stages = tile
    consts = dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, EVEN_N=True, EVEN_K=True, UPCAST=False,
                  PRECISION="tf32", RNE_BF16=False)
    k = L.triton.compile(ASTSource(L._skinny_swiglu_fwd, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages))
    assert k.asm["ttgir"].count("async_copy_global") == 3 * stages
    bound = L._smem(L.Config(bn, bk, 1, warps, stages), block_m, 2, tiles=2)
    assert 0.7 * bound <= k.metadata.shared <= bound
