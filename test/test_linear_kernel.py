"""skinny_linear (engine/linear_kernel.py): F.linear with few rows, at weight bandwidth.

The Triton kernel runs on the CPU through Triton's interpreter. TRITON_INTERPRET=1 must be set before
triton's jit decorators run, so every kernel case below is built here, run once in one fresh process
(test/linear_interp.py) and compared here with the specification `skinny_linear_reference`. Inputs are
fp32 (the interpreter computes tl.dot on 16-bit inputs wrongly, so the kernel upcasts those when
interpreting; one bf16 case checks the loads, casts and stores around the dot). Small shapes and forced
small blocks so that N and K span several blocks, with and without remainders, split and not; the
balanced mode's cases are chosen so that its shares of the work cut column blocks in every way
(checked against the pure-Python partition in each test). skinny_swiglu (the gate|up GEMM with the
SwiGLU as its epilogue) is checked the same way against skinny_swiglu_reference, and graphs._mlp's
choice of it by a shipped record in the same process.
"""

import itertools
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashdrive_ros.engine import linear_kernel as L

HERE = Path(__file__).resolve().parent
NO_TRITON = "triton is installed by scripts/setup.sh; the tuner tests stub its do_bench"
TOL = dict(rtol=1e-4, atol=1e-4)


def _cfg(bn, bk, split):
    return dict(block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=2)


def _tma(bn, bk, split):
    return dict(_cfg(bn, bk, split), tma=True)


def _bal(bn, bk, programs):
    return dict(block_n=bn, block_k=bk, split_k=0, num_warps=4, num_stages=2, programs=programs)


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
    # balanced mode (units = column blocks x K blocks, shared out over the programs):
    # 3 x 2 units over 4 programs: blocks 0 and 1 split over two programs each, block 2 whole
    "balanced_m1": lambda: (_t((1, 64), 30), _t((48, 64), 31), None, _bal(16, 32, 4)),
    # 4 x 3 units over 5 programs, N tail (100 = 3 x 32 + 4) and K tail (160 = 2 x 64 + 32), bias
    "balanced_m8_bias_n_k_tails": lambda: (_t((8, 160), 32), _t((100, 160), 33), _t((100,), 34), _bal(32, 64, 5)),
    # 2 x 8 units over 5 programs: each column block split over three programs; row slice
    "balanced_m60_row_slice": lambda: (_t((60, 256), 35), _row_slice(32, 256, 36), _t((32,), 37), _bal(16, 32, 5)),
    # 7 x 2 units over 3 programs: ranges of two whole column blocks and a half
    "balanced_ranges_span_blocks": lambda: (_t((5, 64), 38), _t((112, 64), 39), None, _bal(16, 32, 3)),
    # 3 x 2 units, 16 programs asked for: 6 run, a unit each
    "balanced_more_programs_than_units": lambda: (_t((3, 64), 40), _t((40, 64), 41), _t((40,), 42), _bal(16, 32, 16)),
    # 4 x 2 units over 2 programs: no column block split, no partials, no reduce
    "balanced_no_block_split": lambda: (_t((4, 64), 43), _t((64, 64), 44), _t((64,), 45), _bal(16, 32, 2)),
    "balanced_m100_block_m_128": lambda: (_t((100, 64), 46), _t((48, 64), 47), _t((48,), 48), _bal(16, 32, 4)),
    "balanced_bf16": lambda: (_t((8, 160), 49, torch.bfloat16), _row_slice(96, 160, 50).bfloat16(),
                              _t((96,), 51, torch.bfloat16), _bal(32, 64, 5)),
    "__capture__": lambda: (_t((2, 2, 64), 27), _row_slice(48, 64, 28), _t((48,), 29), None),
    # the TMA variant (Config.tma) of pointer cases above: same inputs, same tiles
    "tma_m5_row_slice_bias_k_tail": lambda: (_t((5, 160), 3), _row_slice(96, 160, 4), _t((96,), 5), _tma(32, 64, 1)),
    "tma_m16_split3_n_tail_bias": lambda: (_t((16, 160), 6), _t((200, 160), 7), _t((200,), 8), _tma(32, 32, 3)),
    "tma_column_slice_row_stride": lambda: (_t((5, 64), 17), _t((96, 96), 18)[:, 16:80], None, _tma(32, 32, 2)),
    "tma_bf16_split": lambda: (_t((8, 160), 22, torch.bfloat16), _row_slice(96, 160, 23).bfloat16(),
                               _t((96,), 24, torch.bfloat16), _tma(32, 64, 2)),
    # a weight whose base is not 16-byte aligned (a column slice starting at element 1): no descriptor can
    # address it, so the pointer kernel runs the TMA config
    "tma_unaligned_falls_back": lambda: (_t((5, 64), 52), _t((48, 65), 53)[:, 1:], None, _tma(16, 32, 1)),
}
TMA_TWINS = {"tma_m5_row_slice_bias_k_tail": "m5_row_slice_bias_k_tail",
             "tma_m16_split3_n_tail_bias": "m16_split3_n_tail_bias",
             "tma_column_slice_row_stride": "column_slice_row_stride", "tma_bf16_split": "bf16_split"}
REPEAT = ["balanced_m8_bias_n_k_tails", "balanced_m60_row_slice", "balanced_bf16"]  # rerun with NaN-filled memory

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
    "tma_m8_row_slice_n_and_k_tails": lambda: (_t((8, 160), 32), _row_slice(2 * 40, 160, 33, 1 / 12), _tma(16, 64, 1)),
    "tma_bf16_split": lambda: (_t((8, 160), 42, torch.bfloat16), _row_slice(2 * 48, 160, 43, 1 / 12, torch.bfloat16),
                               _tma(32, 64, 2)),
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
    torch.save(dict(inputs, __repeat__=REPEAT), d / "cases.pt")
    proc = subprocess.run([sys.executable, str(HERE / "linear_interp.py"), str(d / "cases.pt"), str(d / "out.pt")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(d / "out.pt", weights_only=False)
    out = {name: (inputs[name], *results[name]) for name in CASES if name != "__capture__"}
    out["__capture__"] = (inputs["__capture__"], results["__capture__"])
    out["__repeat__"] = results["__repeat__"]
    out["__tma__"] = results["__tma__"]
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


def test_the_tma_variant_gives_bitwise_the_pointer_kernels_output(kernel):
    """Config.tma loads the W and x tiles through TMA descriptors (zeros past N, M and K instead of masks):
    the same tiles and sums, so the same bits as the pointer kernel, split or not, bias or not, fp32 or bf16,
    a weight row slice or a row stride larger than K."""
    for tma_case, twin in TMA_TWINS.items():
        assert kernel["__tma__"][tma_case], f"{tma_case}: the TMA kernel did not run"
        assert torch.equal(kernel[tma_case][1], kernel[twin][1]), tma_case
        _check(kernel, tma_case, **({"rtol": 1e-2, "atol": 2e-2} if "bf16" in tma_case else {}))


def test_a_tma_config_on_operands_no_descriptor_can_address_runs_the_pointer_kernel(kernel):
    assert not kernel["__tma__"]["tma_unaligned_falls_back"]
    _check(kernel, "tma_unaligned_falls_back")


def test_the_tma_swiglu_variant_gives_bitwise_the_pointer_kernels_output(kernel):
    sw = kernel["__swiglu__"]
    for tma_case, twin in (("tma_m8_row_slice_n_and_k_tails", "m8_row_slice_n_and_k_tails"),
                           ("tma_bf16_split", "bf16_split")):
        assert torch.equal(sw[tma_case][1], sw[twin][1]), tma_case


def test_tma_candidates_double_the_split_grids_and_alternate_with_the_other_kinds():
    plain = L.candidates(8, 4096, 4096, 132)
    both = L.candidates(8, 4096, 4096, 132, tma=True)
    split = L.split_candidates(8, 4096, 4096, 132)
    assert both == split + [L.Config(**{**c.__dict__, "tma": True}) for c in split] + [c for c in plain if c.balanced]
    order = L._alternating_kinds(both)
    assert sorted(map(repr, order)) == sorted(map(repr, both))
    kinds = ["balanced" if c.balanced else "tma" if c.tma else "split" for c in order[:3]]
    assert kinds == ["split", "tma", "balanced"]
    sw = L.split_candidates(8, 4096, 4096, 132, tiles=2)
    assert L.candidates(8, 4096, 4096, 132, tiles=2, tma=True) == sw + [L.Config(**{**c.__dict__, "tma": True}) for c in sw]
    with pytest.raises(ValueError):
        L.Config(64, 128, 0, 4, 4, programs=132, tma=True)  # no balanced TMA kernel


def test_untuned_shape_during_capture_falls_back_to_f_linear_then_uses_the_cached_config(kernel):
    (x, w, bias, _), r = kernel["__capture__"]
    assert torch.equal(r["during_untuned"], F.linear(x, w, bias))   # F.linear itself, bit for bit
    assert r["launches_untuned"] == 0 and r["cached_after_untuned"] is None  # nothing tuned, nothing cached
    assert r["launches"] == 2  # outside capture, then inside capture with the cached config
    assert r["config"] == L.default_config(4, 48, 64, 4)  # the interpreter caches the default, times nothing
    torch.testing.assert_close(r["outside"], L.skinny_linear_reference(x, w, bias), **TOL)
    assert torch.equal(r["during_tuned"], r["outside"])


# ------------------------------------------------------------------ balanced mode == specification

def _owners(kernel, name):
    """Column block -> the programs whose shares touch it (pure-Python partition), and the program count."""
    (x, w, _, cfg), _, _ = kernel[name]
    k_blocks = -(-x.shape[-1] // cfg["block_k"])
    units = -(-w.shape[0] // cfg["block_n"]) * k_blocks
    programs = L._programs(L.Config(**cfg), w.shape[0], x.shape[-1])
    owners = {}
    for p in range(programs):
        for col, _ in L.balanced_segments(p, units, programs, k_blocks):
            owners.setdefault(col, []).append(p)
    return owners, programs


BALANCED = [name for name in CASES if name.startswith("balanced")]


@pytest.mark.parametrize("name", BALANCED)
def test_balanced_mode_matches_the_specification(kernel, name):
    _check(kernel, name, **(dict(rtol=1e-2, atol=2e-2) if "bf16" in name else TOL))


@pytest.mark.parametrize("name,owners,programs", [
    ("balanced_m1", {0: [0, 1], 1: [1, 2], 2: [3]}, 4),
    ("balanced_m8_bias_n_k_tails", {0: [0, 1], 1: [1, 2], 2: [2, 3], 3: [4]}, 5),
    ("balanced_m60_row_slice", {0: [0, 1, 2], 1: [2, 3, 4]}, 5),
    ("balanced_ranges_span_blocks", {0: [0], 1: [0], 2: [1], 3: [1], 4: [1, 2], 5: [2], 6: [2]}, 3),
    ("balanced_more_programs_than_units", {0: [0, 1], 1: [2, 3], 2: [4, 5]}, 6),  # 16 asked, 6 units
    ("balanced_no_block_split", {0: [0], 1: [0], 2: [1], 3: [1]}, 2),
])
def test_balanced_cases_cut_the_column_blocks_as_intended(kernel, name, owners, programs):
    """Which program streams which column block in the cases above: whole blocks finished in place, blocks
    split over two or three programs (reduced), ranges over several blocks, more programs than work."""
    assert _owners(kernel, name) == (owners, programs)
    (x, w, bias, _), out, _ = kernel[name]
    torch.testing.assert_close(out, L.skinny_linear_reference(x, w, bias), **TOL)


@pytest.mark.parametrize("name", REPEAT)
def test_balanced_mode_is_bitwise_deterministic_and_reads_only_what_it_wrote(kernel, name):
    """The second run had its output and partials allocated NaN-filled: the same bits again, so no element
    is left unwritten and no partial slot is summed that no program wrote."""
    _, out, _ = kernel[name]
    assert torch.equal(kernel["__repeat__"][name], out)


def test_balanced_shares_cover_every_unit_once_in_equal_contiguous_ranges():
    for n_blocks, k_blocks in itertools.product(range(1, 10), range(1, 7)):
        units = n_blocks * k_blocks
        for programs in range(1, units + 1):  # the launcher never runs more programs than units
            ranges = [L.balanced_range(p, units, programs) for p in range(programs)]
            assert [u for r in ranges for u in r] == list(range(units))  # each unit once, in order
            assert {len(r) for r in ranges} <= {units // programs, -(-units // programs)}
            assert all(L.balanced_owner(u, units, programs) == p for p, r in enumerate(ranges) for u in r)
            segs = [(p, col, kbs) for p in range(programs)
                    for col, kbs in L.balanced_segments(p, units, programs, k_blocks)]
            assert sorted((col, kb) for _, col, kbs in segs for kb in kbs) == \
                list(itertools.product(range(n_blocks), range(k_blocks)))
            slots = [p + col for p, col, _ in segs]  # where the partials go
            assert len(set(slots)) == len(slots) and max(slots) < programs + n_blocks - 1
            for col in range(n_blocks):  # the reduce sums programs first .. last of a split column block
                first = L.balanced_owner(col * k_blocks, units, programs)
                last = L.balanced_owner((col + 1) * k_blocks - 1, units, programs)
                assert [p for p, c, _ in segs if c == col] == list(range(first, last + 1))
                assert (first < last) == any(c == col and len(kbs) < k_blocks for _, c, kbs in segs)
            assert L.balanced_splits_a_block(units, programs, k_blocks) == any(len(kbs) < k_blocks for *_, kbs in segs)


def test_balanced_configs_are_marked_by_split_k_0_and_programs():
    assert L.Config(64, 128, 0, 4, 4, programs=132).balanced and not L.Config(64, 128, 1, 4, 4).balanced
    for bad in (dict(split_k=0), dict(split_k=1, programs=132)):
        with pytest.raises(ValueError):
            L.Config(**dict(dict(block_n=64, block_k=128, num_warps=4, num_stages=4), **bad))


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


@pytest.mark.parametrize("cfg", [L.Config(32, 256, 4, 8, 5), L.Config(64, 128, 0, 4, 4, programs=264)])
def test_load_and_export_tuned_round_trip(monkeypatch, cfg):
    launches, tunes = _fake_kernel(monkeypatch)
    x, w = torch.randn(2, 3, 32), torch.randn(48, 32)
    L.load_tuned([dict(device=-1, dtype="float32", m=6, n=48, k=32, bias=False, **cfg.__dict__)])
    monkeypatch.setattr(L, "_capturing", lambda: True)
    L.skinny_linear(x, w)
    assert launches == [cfg] and not tunes
    rec = L.export_tuned()
    assert rec[0]["programs"] == cfg.programs
    L.clear_tuned()
    L.load_tuned(rec)
    assert L.tuned(x, w).config == cfg
    L.clear_tuned()


def test_records_from_before_the_balanced_mode_load_as_split_grids():
    old = dict(device=-1, dtype="bfloat16", m=8, n=4096, k=4096, bias=False, block_n=64, block_k=128, split_k=2,
               num_warps=4, num_stages=4, kernel_us=14.2, cublas_us=16.4)  # no "programs" field
    L.clear_tuned()
    L.load_tuned([old])
    x, w = torch.empty(8, 4096, dtype=torch.bfloat16), torch.empty(4096, 4096, dtype=torch.bfloat16)
    assert L.tuned(x, w).config == L.Config(64, 128, 2, 4, 4, programs=0)
    L.clear_tuned()


def test_fused_layers_never_take_a_balanced_record():
    """fused_linear has no partials (split_k 1 only): a balanced record of the shape is passed over."""
    L.clear_tuned()
    L.load_tuned([dict(device=-1, dtype="bfloat16", m=8, n=4096, k=4096, bias=False, block_n=64, block_k=128,
                       split_k=0, num_warps=4, num_stages=4, programs=132)])
    c = L.fused_config(8, 4096, 4096, torch.bfloat16, torch.device("cpu"), 132)
    assert c.split_k == 1 and not c.balanced
    L.clear_tuned()


def test_the_tuner_times_the_balanced_candidates_with_the_others_and_keeps_the_fastest(monkeypatch):
    testing = pytest.importorskip("triton.testing", reason=NO_TRITON)
    x, w = torch.randn(8, 256), torch.randn(512, 256)
    cands = L.candidates(8, 512, 256, 4, 4)
    fastest = next(c for c in cands if c.balanced and c.programs == 8)
    launched = []
    monkeypatch.setattr(L, "sm_count", lambda t: 4)
    monkeypatch.setattr(L, "_launch", lambda x2, w, b, c: launched.append(c))

    def do_bench(fn, **kw):  # ms: 1 us for `fastest`, 2 us for the other configs, 5 us for F.linear
        before = len(launched)
        fn()
        return 0.005 if len(launched) == before else 0.001 if launched[-1] == fastest else 0.002

    monkeypatch.setattr(testing, "do_bench", do_bench)
    t = L._tune(x, w, None)
    assert (t.config, t.kernel_us, t.cublas_us) == (fastest, 1.0, 5.0)
    assert [c for c, _ in t.sweep] == cands and any(not c.balanced for c in cands)


def test_a_tuning_budget_cuts_the_sweep_after_timing_both_kinds_alternately(monkeypatch):
    """TUNE_BUDGET_S: no candidate is started past the deadline; split-K and balanced grids are timed in
    turn, so a cut leaves both kinds; the sweep lists what was timed in candidates' order."""
    testing = pytest.importorskip("triton.testing", reason=NO_TRITON)
    x, w = torch.randn(8, 256), torch.randn(512, 256)
    clock = [0.0]  # each timed call takes a second of this clock
    monkeypatch.setattr(L, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(L, "sm_count", lambda t: 4)
    monkeypatch.setattr(L, "_launch", lambda x2, w, b, c: None)

    def do_bench(fn, **kw):
        fn()
        clock[0] += 1.0
        return 0.002

    monkeypatch.setattr(testing, "do_bench", do_bench)
    monkeypatch.setattr(L, "TUNE_BUDGET_S", 3.5)
    t = L._tune(x, w, None)
    cands = L.candidates(8, 512, 256, 4, 4)
    timed = [c for c, _ in t.sweep]
    assert len(timed) == 4 and sum(c.balanced for c in timed) == 2  # started at 0, 1, 2 and 3 s
    assert timed == [c for c in cands if c in timed] and t.config == timed[0]  # ties: the first candidate


def test_the_tuner_times_the_tma_variants_where_the_operands_allow_tma(monkeypatch):
    testing = pytest.importorskip("triton.testing", reason=NO_TRITON)
    x, w = torch.randn(8, 256), torch.randn(512, 256)
    monkeypatch.setattr(L, "sm_count", lambda t: 4)
    monkeypatch.setattr(L, "_launch", lambda x2, w, b, c: None)
    monkeypatch.setattr(testing, "do_bench", lambda fn, **kw: (fn(), 0.002)[1])
    monkeypatch.setattr(L, "_tma_usable", lambda x2, w: True)
    t = L._tune(x, w, None)
    assert [c for c, _ in t.sweep] == L.candidates(8, 512, 256, 4, 4, tma=True)
    assert any(c.tma for c, _ in t.sweep)
    monkeypatch.setattr(L, "TMA_CANDIDATES", False)  # the switch
    assert not any(c.tma for c, _ in L._tune(x, w, None).sweep)
    monkeypatch.setattr(L, "TMA_CANDIDATES", True)
    monkeypatch.setattr(L, "_tma_usable", lambda x2, w: False)  # e.g. before sm_90
    assert not any(c.tma for c, _ in L._tune(x, w, None).sweep)


def test_tma_is_never_chosen_for_cpu_tensors_outside_the_interpreter():
    """TMA needs the hardware (sm_90+) or Triton's interpreter; the operand checks (alignment, strides) are
    covered by the interpreter cases tma_* above."""
    import os
    if os.environ.get("TRITON_INTERPRET", "0") != "0" or L.TensorDescriptor is None:
        pytest.skip("checks the CPU-tensor answer outside the interpreter")
    x, w = torch.randn(8, 64), torch.randn(32, 64)
    assert not L._tma_usable(x, w)  # CPU tensors outside the interpreter: no TMA hardware


def test_the_swiglu_tuner_times_split_grids_only(monkeypatch):
    testing = pytest.importorskip("triton.testing", reason=NO_TRITON)
    x, w = torch.randn(8, 256), torch.randn(2 * 512, 256)
    launched = []
    monkeypatch.setattr(L, "sm_count", lambda t: 4)
    monkeypatch.setattr(L, "_launch_swiglu", lambda x2, w, c: launched.append(c))
    monkeypatch.setattr(testing, "do_bench", lambda fn, **kw: 0.001 if fn() is None else 0.005)  # F.linear: a tensor
    t = L._tune(x, w, None, swiglu=True)
    assert launched and not any(c.balanced for c in launched)
    assert [c for c, _ in t.sweep] == L.candidates(8, 512, 256, 4, 4, tiles=2)
    assert any(c.balanced for c in L.candidates(8, 512, 256, 4, 4))  # the plain GEMM of that size has some


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
    assert cands and len(cands) <= 56  # bounded autotuning time per shape
    for c in cands:
        assert L._smem(c, m, 2) <= L.SMEM_BYTES
        assert L._programs(c, n, k) >= 0.9 * sms
        assert c.balanced or L._n_splits(c, k) == c.split_k
    assert L.default_config(m, n, k, sms) in cands and not L.default_config(m, n, k, sms).balanced
    if n == 2048:  # narrow N: only split configs have enough programs with wide blocks
        assert any(c.split_k > 1 for c in cands)


@pytest.mark.parametrize("m,n,k", EXPERT + LM)
def test_candidates_include_every_fitting_tile_balanced_over_one_and_two_programs_per_sm(m, n, k):
    cands = L.candidates(m, n, k, 132)
    fitting = {t for t in L.TILES if L._fits(L.Config(t[0], t[1], 1, t[2], t[3]), m, k, 2)}
    for programs in (132, 264):  # and at least a unit (block_n x block_k of weight) per program
        enough = {t for t in fitting if -(-n // t[0]) * -(-k // t[1]) >= programs}
        assert programs == 264 or enough == fitting  # every real shape has the work for a program per SM
        bal = [c for c in cands if c.programs == programs]
        assert {(c.block_n, c.block_k, c.num_warps, c.num_stages) for c in bal} == enough
        assert all(c.split_k == 0 and L._programs(c, n, k) == programs for c in bal)
    assert L.split_candidates(m, n, k, 132) == [c for c in cands if not c.balanced]


@pytest.mark.parametrize("m,n,k", [(64, 16512, 2048), (8, 24576, 4096), (1, 24576, 4096)])
def test_swiglu_candidates_fit_two_weight_tiles_and_fill_an_h100(m, n, k):
    sms, i = 132, n // 2
    cands = L.candidates(m, i, k, sms, tiles=2)
    assert cands and len(cands) <= 32
    for c in cands:
        assert L._smem(c, m, 2, tiles=2) <= L.SMEM_BYTES
        assert L._programs(c, i, k) >= 0.9 * sms
        assert not c.balanced and L._n_splits(c, k) == c.split_k  # its kernel has no balanced mode
    assert cands == L.split_candidates(m, i, k, sms, tiles=2)
    assert any(L._smem(c, m, 2, tiles=2) > L.SMEM_BYTES for c in L.split_candidates(m, i, k, sms))  # the filter bites
    assert L.default_config(m, i, k, sms, tiles=2) in cands


def test_swiglu_refuses_a_balanced_config():
    balanced = L.Config(64, 128, 0, 4, 4, programs=132)
    with pytest.raises(ValueError, match="balanced"):
        L.skinny_swiglu(torch.randn(5, 32), torch.randn(96, 32), config=balanced)
    with pytest.raises(ValueError, match="balanced"):
        L._launch_swiglu(torch.randn(5, 32), torch.randn(96, 32), balanced)


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
    sig.update(X_DESC="constexpr", W_DESC="constexpr")
    names = list(sig) + ["BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT", "HAS_BIAS", "EVEN_N", "EVEN_K", "UPCAST", "PRECISION",
                         "USE_PDL", "PREFETCH", "LINE", "EARLY", "TMA"]
    sig.update({n: "constexpr" for n in names[len(sig):]})
    aligned = ("X", "W", "B", "Y", "P", "N", "K", "stride_xm", "stride_wn", "chunk")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    bn, bk, warps, stages = tile
    consts = dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, HAS_BIAS=True, EVEN_N=True, EVEN_K=True,
                  UPCAST=False, PRECISION="tf32", USE_PDL=False, PREFETCH=0, LINE=64, EARLY=False, X_DESC=None,
                  W_DESC=None, TMA=False)
    k = L.triton.compile(ASTSource(L._skinny_linear_fwd, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages))
    assert k.asm["ttgir"].count("async_copy_global") == 2 * stages
    # wgmma keeps num_stages buffers, mma.sync (block_n 32) one fewer: _smem is the bound
    assert 0.7 * L._smem(L.Config(bn, bk, 1, warps, stages), block_m, 2) <= k.metadata.shared \
        <= L._smem(L.Config(bn, bk, 1, warps, stages), block_m, 2)


@pytest.mark.parametrize("block_m,tile,even", [(16, (64, 128, 4, 4), True), (64, (128, 128, 8, 4), False),
                                               (64, (32, 256, 4, 4), True)])
def test_balanced_kernel_compiles_for_hopper_with_a_multi_buffered_pipeline(block_m, tile, even):
    """As above for the balanced kernel (K offsets of its units are multiples of BLOCK_K): cp.async,
    num_stages deep, also with masked N and K tails (expert down: K = 8256, 64 past a 128 block). Its
    epilogue inside the loop stages the accumulator through at most BLOCK_N x 128 bytes of shared memory
    more than _smem, which keeps every candidate within the H100's 227 KB."""
    if L.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {"X": "*bf16", "W": "*bf16", "B": "*bf16", "Y": "*bf16", "P": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_wn": "i32", "units": "i32", "programs": "i32", "k_blocks": "i32"}
    names = list(sig) + ["BLOCK_M", "BLOCK_N", "BLOCK_K", "HAS_BIAS", "EVEN_N", "EVEN_K", "UPCAST", "PRECISION"]
    sig.update({n: "constexpr" for n in names[len(sig):]})
    aligned = ("X", "W", "B", "Y", "P", "N", "K", "stride_xm", "stride_wn")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    bn, bk, warps, stages = tile
    consts = dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=even, EVEN_N=even, EVEN_K=even,
                  UPCAST=False, PRECISION="tf32")
    k = L.triton.compile(ASTSource(L._balanced_linear_fwd, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages))
    assert k.asm["ttgir"].count("async_copy_global") == 2 * stages
    smem = L._smem(L.Config(bn, bk, 1, warps, stages), block_m, 2)
    assert smem <= L.SMEM_BYTES and 0.7 * smem <= k.metadata.shared <= smem + bn * 128 <= 227 * 1024


def _compile_swiglu_for_hopper(block_m, tile, split, use_pdl=False):
    """_skinny_swiglu_fwd compiled offline for sm_90 with the alignment the JIT specializes on for model weights."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {"X": "*bf16", "WG": "*bf16", "WU": "*bf16", "Y": "*bf16", "P": "*fp32", "M": "i32", "I": "i32",
           "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "chunk": "i32",
           "X_DESC": "constexpr", "WG_DESC": "constexpr", "WU_DESC": "constexpr"}
    names = list(sig) + ["BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT", "EVEN_N", "EVEN_K", "UPCAST", "PRECISION",
                         "RNE_BF16", "USE_PDL", "PREFETCH", "LINE", "EARLY", "TMA"]
    sig.update({n: "constexpr" for n in names[len(sig):]})
    aligned = ("X", "WG", "WU", "Y", "P", "I", "K", "stride_xm", "stride_wn", "chunk")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    bn, bk, warps, stages = tile
    consts = dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, EVEN_N=True, EVEN_K=True, UPCAST=False,
                  PRECISION="tf32", RNE_BF16=False, USE_PDL=use_pdl, PREFETCH=0, LINE=64, EARLY=False, X_DESC=None,
                  WG_DESC=None, WU_DESC=None, TMA=False)
    return L.triton.compile(ASTSource(L._skinny_swiglu_fwd, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=stages))


@pytest.mark.parametrize("block_m,tile,split", [(16, (32, 256, 4, 4), False), (64, (64, 128, 4, 4), True)])
def test_swiglu_kernel_compiles_for_hopper_with_both_weight_streams_multi_buffered(block_m, tile, split):
    """As above for _skinny_swiglu_fwd: gate, up and x tiles all cp.async, multi-buffered, within
    _smem's two-tile estimate (the candidate filter's bound)."""
    if L.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    k = _compile_swiglu_for_hopper(block_m, tile, split)
    bn, bk, warps, stages = tile
    assert k.asm["ttgir"].count("async_copy_global") == 3 * stages
    bound = L._smem(L.Config(bn, bk, 1, warps, stages), block_m, 2, tiles=2)
    assert 0.7 * bound <= k.metadata.shared <= bound


@pytest.mark.parametrize("split", [False, True])
def test_swiglu_kernel_with_pdl_waits_first_and_releases_after_its_k_loop(split):
    """USE_PDL as in the other GEMMs, without the weight prefetch and with the late trigger (PREFETCH 0, EARLY
    off; test_pdl_ptx.py covers both): griddepcontrol.wait before any load, launch_dependents once the
    weights are streamed (before the epilogue's stores); without it, neither."""
    if L.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    ptx = _compile_swiglu_for_hopper(16, (64, 128, 4, 4), split, use_pdl=True).asm["ptx"]
    wait, launch = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
    loads = [i for i in (ptx.find("cp.async"), ptx.find("ld.global")) if i >= 0]
    assert 0 <= wait < min(loads)
    assert max(ptx.rfind("cp.async"), ptx.rfind("mma")) < launch < ptx.rfind("st.global")
    assert "griddepcontrol" not in _compile_swiglu_for_hopper(16, (64, 128, 4, 4), split).asm["ptx"]


@pytest.mark.parametrize("swiglu", [False, True], ids=["linear", "swiglu"])
def test_the_tma_config_compiles_for_hopper_to_bulk_tensor_copies(swiglu):
    """Config.tma on sm_90 (offline compile): every W and x tile is a TMA bulk tensor copy (cp.async.bulk.tensor),
    none a per-thread cp.async; the pointer config of the same tile is the other way round."""
    if L.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = L._skinny_swiglu_fwd if swiglu else L._skinny_linear_fwd
    bm, bn, bk, k = (64, 64, 128, 2048) if swiglu else (16, 32, 256, 4096)
    descs = ("X_DESC", "WG_DESC", "WU_DESC") if swiglu else ("X_DESC", "W_DESC")
    ints = dict(M=8, N=4096, I=4096, K=k, stride_xm=k, stride_wn=k, chunk=k)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=False, EVEN_N=True, EVEN_K=True, UPCAST=False,
                  PRECISION="tf32", USE_PDL=False, PREFETCH=0, LINE=64, EARLY=False)
    common.update(RNE_BF16=False) if swiglu else common.update(HAS_BIAS=False)
    counts = {}
    for tma in (True, False):
        consts = dict(common, TMA=tma, **({} if tma else dict.fromkeys(descs)))
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name in descs:
                sig[name] = f"tensordesc<bf16[{bm if name == 'X_DESC' else bn},{bk}]>"
            elif name in ints:
                sig[name] = "i32"
                attrs[(i,)] = [["tt.divisibility", 16]] if ints[name] % 16 == 0 else []
            else:
                sig[name] = "*fp32" if name == "P" else "*bf16"
                attrs[(i,)] = [["tt.divisibility", 16]]
        ptx = L.triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=4, num_stages=4)).asm["ptx"]
        counts[tma] = (ptx.count("cp.async.bulk.tensor"), ptx.count("cp.async.cg"))
    assert counts[True][0] > 0 and counts[True][1] == 0
    assert counts[False][0] == 0 and counts[False][1] > 0
