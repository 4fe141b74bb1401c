"""fused_linear (engine/linear_kernel.py): a few-row GEMM with its decoder-layer neighbours folded in.

    rmsnorm prologue     y = rms_norm(x) @ w^T          (q|k|v, gate|up: the layer's two norms)
    residual epilogue    y = r + x @ w^T                (o_proj, down_proj: the residual stream)
    swiglu prologue      y = silu(g) * u @ w^T          (down_proj, on gate|up's output)

Each variant equals its `*_reference`, the specification. The kernel runs on the CPU through Triton's
interpreter in one fresh process (test/fused_linear_interp.py; TRITON_INTERPRET=1 must be set before
triton's jit decorators run). Identity weights (w = I, so y = A exactly) expose the A operand the
prologue built, which must be the bf16 tensor the eager stage functions compute, bit for bit, where
that is claimed. Forced small blocks so that N and K span several blocks, with and without tails.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashdrive_ros.engine import graphs
from flashdrive_ros.engine import linear_kernel as L

HERE = Path(__file__).resolve().parent
BF = torch.bfloat16
EPS = 1e-6
ULP = 2.0 ** -7  # relative spacing of bf16 near the top of a binade (an upper bound on one ulp)


def _cfg(bn, bk):
    return dict(block_n=bn, block_k=bk, split_k=1, num_warps=4, num_stages=2)


def _t(shape, seed, dtype=BF, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _exact(shape, seed):
    """Multiples of 1/16 in (-4, 4): squares and their sums are exact in fp32 in any order, so the
    row statistic cannot depend on the summation order."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-63, 64, shape, generator=g).float() / 16).to(BF)


def _norm_w(k, seed, dtype=BF):
    return (1.0 + 0.2 * torch.randn(k, generator=torch.Generator().manual_seed(seed))).to(dtype)


def _row_slice(n, k, seed):
    """Rows [10, 10 + n) of a fused [n + 24, k] buffer: base pointer offset, row stride k."""
    return _t((n + 24, k), seed, scale=k ** -0.5)[10:10 + n]


def _eye(k):
    return torch.eye(k, dtype=BF)


CASES = {
    # name: (x, w, fused_linear kwargs, forced config or None = fused_config's choice)
    "norm_identity_exact_stats": lambda: (_exact((8, 128), 1), _eye(128), dict(norm_weight=_norm_w(128, 2), eps=EPS),
                                          _cfg(32, 32)),
    "norm_identity_exact_stats_prepass_tiles": lambda: (_exact((8, 1024), 41), _eye(1024),
                                                        dict(norm_weight=_norm_w(1024, 42), eps=EPS), _cfg(64, 128)),
    "norm_k600_prepass_tiles_and_tails": lambda: (_t((8, 600), 43), _row_slice(64, 600, 44),
                                                  dict(norm_weight=_norm_w(600, 45), eps=EPS), _cfg(32, 128)),
    "norm_identity_random": lambda: (_t((8, 256), 3, scale=3.0), _eye(256), dict(norm_weight=_norm_w(256, 4), eps=EPS),
                                     _cfg(64, 64)),
    "norm_n_tail_k_tail": lambda: (_t((8, 160), 5), _row_slice(200, 160, 6), dict(norm_weight=_norm_w(160, 7), eps=EPS),
                                   _cfg(32, 64)),
    "norm_m1": lambda: (_t((1, 1, 128), 8), _row_slice(96, 128, 9), dict(norm_weight=_norm_w(128, 10), eps=1e-5),
                        _cfg(32, 32)),
    "norm_m16_leading_dims": lambda: (_t((2, 8, 128), 11), _row_slice(64, 128, 12),
                                      dict(norm_weight=_norm_w(128, 13), eps=EPS), _cfg(16, 64)),
    "residual_identity": lambda: (_t((8, 128), 14), _eye(128), dict(residual=_t((8, 128), 15)), _cfg(32, 32)),
    "residual_n_tail_k_tail": lambda: (_t((8, 160), 16), _row_slice(200, 160, 17), dict(residual=_t((8, 200), 18)),
                                       _cfg(32, 64)),
    "swiglu_identity": lambda: (_t((8, 256), 19, scale=2.0), _eye(128), dict(swiglu=True), _cfg(32, 32)),
    "swiglu_residual_k_tail": lambda: (_t((1, 8, 320), 20), _row_slice(96, 160, 21),
                                       dict(swiglu=True, residual=_t((1, 8, 96), 22)), _cfg(32, 64)),
    "swiglu_residual_m1": lambda: (_t((1, 256), 23), _row_slice(64, 128, 24), dict(swiglu=True, residual=_t((1, 64), 25)),
                                   _cfg(16, 64)),
    "norm_and_residual": lambda: (_t((8, 128), 26), _row_slice(128, 128, 27),
                                  dict(norm_weight=_norm_w(128, 28), eps=EPS, residual=_t((8, 128), 29)), _cfg(32, 32)),
    "plain": lambda: (_t((5, 160), 30), _row_slice(96, 160, 31), {}, _cfg(32, 64)),
    "fp32_norm": lambda: (_t((8, 160), 32, torch.float32), _row_slice(96, 160, 33).float(),
                          dict(norm_weight=_norm_w(160, 34, torch.float32), eps=EPS), _cfg(32, 64)),
    "fp32_swiglu_residual": lambda: (_t((8, 320), 35, torch.float32), _row_slice(96, 160, 36).float(),
                                     dict(swiglu=True, residual=_t((8, 96), 37, torch.float32)), _cfg(32, 64)),
    "default_config": lambda: (_t((8, 256), 38), _row_slice(200, 256, 39), dict(norm_weight=_norm_w(256, 40), eps=EPS),
                               None),
    # the norm as a row scale after the GEMM (graphs.FUSED_LAYER_STYLE["norm_scale"]): no pre-pass
    "norm_scale_n_tail_k_tail": lambda: (_t((8, 600), 46), _row_slice(200, 600, 47),
                                         dict(norm_weight=_norm_w(600, 48), eps=EPS, norm_scale=True), _cfg(32, 128)),
    "norm_scale_m1_residual": lambda: (_t((1, 1, 256), 49, scale=3.0), _row_slice(96, 256, 50),
                                       dict(norm_weight=_norm_w(256, 51), eps=1e-5, norm_scale=True,
                                            residual=_t((1, 1, 96), 52)), _cfg(32, 64)),
    "fp32_norm_scale": lambda: (_t((8, 160), 53, torch.float32), _row_slice(96, 160, 54).float(),
                                dict(norm_weight=_norm_w(160, 55, torch.float32), eps=EPS, norm_scale=True), _cfg(32, 64)),
}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """name -> (inputs, kernel output, launches); one interpreter process for all cases."""
    if L.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("fused_linear_interp")
    inputs = {name: build() for name, build in CASES.items()}
    torch.save(inputs, d / "cases.pt")
    proc = subprocess.run([sys.executable, str(HERE / "fused_linear_interp.py"), str(d / "cases.pt"), str(d / "out.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(d / "out.pt", weights_only=False)
    return {name: (inputs[name], *results[name]) for name in CASES}


def _reference(case):
    x, w, kw, _ = case
    return L.fused_linear_reference(x, w, **kw)


def _launched_once_as_specified(case, launches):
    x, w, kw, cfg = case
    assert len(launches) == 1, "fell back to the reference instead of launching the kernel"
    (l,) = launches
    assert (l["norm"], l["swiglu"], l["residual"]) == ("norm_weight" in kw, bool(kw.get("swiglu")), "residual" in kw)
    assert l["norm_scale"] == bool(kw.get("norm_scale"))
    if cfg is not None:
        assert (l["block_n"], l["block_k"]) == (cfg["block_n"], cfg["block_k"])


# ------------------------------------------------------------------------- kernel == specification

@pytest.mark.parametrize("name", [n for n in CASES if "identity" not in n])
def test_fused_linear_matches_its_reference(kernel, name):
    """Same bf16 A operand, fp32 accumulation in another order: at most a rounding of the output apart."""
    case, out, launches = kernel[name]
    _launched_once_as_specified(case, launches)
    ref = _reference(case)
    assert out.shape == ref.shape and out.dtype == ref.dtype and not out.isnan().any()
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out, ref, rtol=ULP, atol=1e-3)


def test_norm_scale_is_the_norm_prologue_up_to_bf16_rounding():
    """The row-scale form computes the same function as norm-then-GEMM: in fp32 they agree to rounding,
    in bf16 within the rounding of the normed row."""
    x, w, nw = _t((8, 600), 60, torch.float32), _row_slice(64, 600, 61).float(), _norm_w(600, 62, torch.float32)
    torch.testing.assert_close(L.rms_scale_reference(x, w, nw, EPS),
                               L.skinny_linear_reference(L.rms_norm_reference(x, nw, EPS), w), rtol=1e-5, atol=1e-5)
    xb, wb, nwb = x.to(BF), w.to(BF), nw.to(BF)
    a = L.rms_scale_reference(xb, wb, nwb, EPS).float()
    b = L.skinny_linear_reference(L.rms_norm_reference(xb, nwb, EPS), wb).float()
    assert float((a - b).norm() / b.norm()) < 1e-2


def test_norm_prologue_is_bitwise_the_eager_norm_when_the_row_statistic_is_exact(kernel):
    """h = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))): the very tensor graphs._rms feeds the GEMM
    (K = 1024: the row statistic over two NORM_PRE_K-wide pre-pass tiles)."""
    for name in ("norm_identity_exact_stats", "norm_identity_exact_stats_prepass_tiles"):
        (x, w, kw, _), out, _ = kernel[name]
        assert torch.equal(out, graphs._rms(x, kw["norm_weight"], kw["eps"]))
        assert torch.equal(out, L.rms_norm_reference(x, kw["norm_weight"], kw["eps"]))


def test_norm_prologue_on_random_rows_differs_from_eager_by_at_most_an_ulp_in_rare_elements(kernel):
    """Only the row sum of squares is summed in another order (an fp32 ulp of rstd at most), which can
    move an element of h across a bf16 rounding boundary, rarely."""
    (x, w, kw, _), out, _ = kernel["norm_identity_random"]
    ref = graphs._rms(x, kw["norm_weight"], kw["eps"])
    torch.testing.assert_close(out, ref, rtol=ULP, atol=0)
    assert (out != ref).float().mean() < 0.01


def test_residual_epilogue_rounds_the_gemm_output_then_adds_in_bf16(kernel):
    """y = bf16(r + bf16(x @ I)) = r + x, the eager residual add, bit for bit."""
    (x, w, kw, _), out, _ = kernel["residual_identity"]
    assert torch.equal(out, kw["residual"] + x)


def test_swiglu_prologue_rounds_once_like_the_compiled_gpu_path(kernel):
    """A = bf16(silu(g) * u) in fp32: equal to swiglu_reference up to exp's last fp32 bits (a bf16
    ulp in rare elements). The eager CPU chain on bf16 tensors rounds twice and is farther away."""
    (gu, w, kw, _), out, _ = kernel["swiglu_identity"]
    ref = L.swiglu_reference(gu)
    torch.testing.assert_close(out, ref, rtol=ULP, atol=0)
    mismatch = (out != ref).float().mean()
    assert mismatch < 0.01
    g, u = gu.chunk(2, dim=-1)
    eager_cpu = F.silu(g) * u  # what graphs.fused_swiglu yields without torch.compile
    assert (eager_cpu != ref).float().mean() > mismatch


def test_fused_config_is_used_without_a_forced_config(kernel):
    (x, w, kw, _), out, launches = kernel["default_config"]
    c = L.fused_config(8, 200, 256, BF, x.device, L.sm_count(x))
    assert c.split_k == 1 and (launches[0]["block_n"], launches[0]["block_k"]) == (c.block_n, c.block_k)


# ------------------------------------------------------------------------------- host side (in process)

def test_references_are_the_eager_stage_functions():
    x, nw, gu = _t((3, 64), 1), _norm_w(64, 2), _t((3, 128), 3)
    assert torch.equal(L.rms_norm_reference(x, nw, EPS), graphs._rms(x, nw, EPS))
    g, u = gu.chunk(2, dim=-1)
    assert torch.equal(L.swiglu_reference(gu), (F.silu(g.float()) * u.float()).bfloat16())
    w, r = _t((16, 64), 4), _t((3, 16), 5)
    assert torch.equal(L.fused_linear_reference(x, w, norm_weight=nw, eps=EPS, residual=r),
                       r + L.skinny_linear_reference(graphs._rms(x, nw, EPS), w))


def test_fused_config_takes_a_split_k_1_record_and_never_a_split_one():
    L.clear_tuned()
    rec = dict(device=-1, dtype="bfloat16", m=8, n=4096, k=4096, bias=False)
    cpu = torch.device("cpu")
    try:
        L.load_tuned([dict(rec, block_n=32, block_k=256, split_k=1, num_warps=4, num_stages=5)])
        assert L.fused_config(8, 4096, 4096, BF, cpu, 132) == L.Config(32, 256, 1, 4, 5)
        L.load_tuned([dict(rec, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=5)])
        c = L.fused_config(8, 4096, 4096, BF, cpu, 132)  # the split_k 1 heuristic: enough programs unsplit
        assert c.split_k == 1 and c in L.candidates(8, 4096, 4096, 132) and c.block_n == 32
    finally:
        L.clear_tuned()


@pytest.mark.parametrize("m,n,k,swiglu", [(m, n, k, s) for m in (1, 8, 16) for n, k, s in
                                           ((6144, 4096, 0), (4096, 4096, 0), (24576, 4096, 0), (4096, 12288, 1),
                                            (2048, 2048, 0), (48, 64, 1))])
def test_fused_config_is_split_k_1_and_fits_shared_memory(m, n, k, swiglu):
    c = L.fused_config(m, n, k, BF, torch.device("cpu"), 132, bool(swiglu))
    assert c.split_k == 1 and L._fused_smem(c, m, 2, bool(swiglu)) <= L.SMEM_BYTES


def test_fused_linear_rejects_what_it_cannot_fuse():
    x, w = _t((8, 64), 1), _t((16, 64), 2)
    with pytest.raises(ValueError):
        L.fused_linear(x, w, norm_weight=_norm_w(64, 3), swiglu=True)
    with pytest.raises(ValueError):
        L.fused_linear(x, w, residual=_t((8, 17), 4))
    with pytest.raises(ValueError):
        L.fused_linear(x, w, config=L.Config(32, 64, 2, 4, 2))


def test_without_the_kernel_it_is_the_reference(monkeypatch):
    monkeypatch.setattr(L, "available", lambda t: False)
    gu, w, r = _t((8, 128), 1), _t((16, 64), 2), _t((8, 16), 3)
    assert torch.equal(L.fused_linear(gu, w, swiglu=True, residual=r),
                       L.fused_linear_reference(gu, w, swiglu=True, residual=r))


@pytest.mark.parametrize("variant,tile", [((True, False, False), (32, 256, 4, 4)), ((False, False, True), (32, 256, 4, 5)),
                                          ((False, True, True), (64, 256, 4, 4)), ((True, False, False), (64, 256, 4, 4))])
def test_fused_kernel_compiles_for_hopper_with_a_multi_buffered_pipeline(variant, tile):
    """Offline compile for sm_90 (no GPU needed), model-weight alignment: every tile load of the K loop
    (weight, x, gate and up, norm weight) becomes a num_stages-deep cp.async pipeline, within
    _fused_smem's bound."""
    if L.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    norm, swiglu, residual = variant
    sig = {"X": "*bf16", "NW": "*bf16", "W": "*bf16", "R": "*bf16", "Y": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_wn": "i32", "stride_rm": "i32", "eps": "fp32"}
    names = list(sig) + ["BLOCK_M", "BLOCK_N", "BLOCK_K", "NORM", "SWIGLU", "RESIDUAL", "EVEN_N", "EVEN_K", "UPCAST",
                         "PRECISION", "RNE_BF16", "PRE_K"]
    sig.update({n: "constexpr" for n in names[len(sig):]})
    aligned = ("X", "NW", "W", "R", "Y", "N", "K", "stride_xm", "stride_wn", "stride_rm")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    bn, bk, warps, stages = tile
    consts = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, NORM=norm, SWIGLU=swiglu, RESIDUAL=residual, EVEN_N=True,
                  EVEN_K=True, UPCAST=False, PRECISION="tf32", RNE_BF16=False,
                  PRE_K=L.NORM_PRE_K)
    k = L.triton.compile(ASTSource(L._fused_linear_fwd, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages))
    loads = 2 + norm + swiglu  # w, x (gate), norm weight, up
    assert k.asm["ttgir"].count("async_copy_global") == loads * stages
    assert k.metadata.shared <= L._fused_smem(L.Config(bn, bk, 1, warps, stages), 16, 2, swiglu)
