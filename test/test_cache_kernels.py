"""cache_kernels: the Triton KV-cache kernels do what the eager cache code of graphs.py does.

Specification: `qk_norm_rope_store` = graphs.fused_qk_prep + the three cache writes of lm_forward's
attend() (bitwise in bf16 up to the fp32 summation order of the RMS, within 1e-6 in fp32), leaving
every other slot and, for the action stage, the pre-RoPE keys untouched; `shift_slots` =
graphs.cache_shift (bitwise) for overlapping, unsorted and cyclic index sets, in its default
(temporary) mode, per layer pass, and in place by the waves `shift_waves` plans.

The kernels run on the CPU through Triton's interpreter. TRITON_INTERPRET=1 must be set before
triton.jit decorates them, so they run in a fresh subprocess (this file run as a script), which
writes their outputs to a file; the references are computed here, in the pytest process.
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

from flashdrive_ros.engine import cache_kernels as ck  # noqa: E402
from flashdrive_ros.engine.kv_cache import StaticKVCache  # noqa: E402

EPS = 1e-6
MAX_LEN = 64
SECTIONS = {32: (6, 5, 5), 16: (4, 2, 2)}


# --------------------------------------------------------------------------------- case inputs

def _positions() -> torch.Tensor:
    """Genuinely 3-D slot positions (t, h, w differ), so every axis of M-RoPE is exercised."""
    s = torch.arange(MAX_LEN)
    return torch.stack([s, s // 3 + 2, s % 5 + 7])


def _poisoned_cache(dtype, batch: int, kv: int, head_dim: int, seed: int, layers: int = 2) -> StaticKVCache:
    c = StaticKVCache(layers, batch, kv, MAX_LEN, head_dim, _positions(), 5e6, SECTIONS[head_dim], dtype)
    g = torch.Generator().manual_seed(seed)
    for t in (c.k, c.v, c.k_rot):  # unrelated garbage in k_rot too: a missed write would show
        t.copy_(torch.randn(t.shape, generator=g) * 3 + 5)
    return c


def _projection(dtype, b, q, h, kv, d, seed):
    """q/k/v exactly as graphs._qkv returns them: views of one [B, Q, (H+2KV)*D] projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(b, q, (h + 2 * kv) * d, generator=g) * 2).to(dtype)
    qq, kk, vv = qkv.split([h * d, kv * d, kv * d], dim=-1)
    qw = (torch.randn(d, generator=g) * 0.2 + 1).to(dtype)
    kw = (torch.randn(d, generator=g) * 0.2 + 1).to(dtype)
    return (qq.view(b, q, h, d), kk.view(b, q, kv, d), vv.view(b, q, kv, d).transpose(1, 2), qw, kw)


# name: (dtype, B, Q, H, KV, D, layer, slots, store_pre_rope)
STORE_CASES = {
    "fp32_b2_scattered": (torch.float32, 2, 10, 4, 2, 32, 1, [37, 3, 50, 12, 13, 61, 0, 29, 8, 44], True),
    "bf16_b1_scattered": (torch.bfloat16, 1, 12, 4, 2, 32, 0, [5, 63, 17, 16, 40, 2, 33, 9, 58, 21, 47, 30], True),
    "bf16_b2_prefix": (torch.bfloat16, 2, 16, 4, 2, 32, 1, list(range(16)), True),
    "bf16_b1_slots_strided": (torch.bfloat16, 1, 5, 4, 2, 32, 0, [60, 6, 31, 2, 19], True),
    "fp32_partial_head_blocks": (torch.float32, 1, 6, 6, 3, 16, 1, [9, 1, 33, 60, 27, 14], True),
    "bf16_action_scratch": (torch.bfloat16, 2, 8, 4, 2, 32, 1, list(range(56, 64)), False),
}


def run_store(impl, name: str):
    dtype, b, q, h, kv, d, layer, slots, pre = STORE_CASES[name]
    qq, kk, vv, qw, kw = _projection(dtype, b, q, h, kv, d, seed=len(name))
    cache = _poisoned_cache(dtype, b, kv, d, seed=7)
    slots = torch.tensor(slots)
    if name.endswith("strided"):  # a view with stride 2: the kernel must not assume contiguous slots
        slots = torch.stack([slots, torch.zeros_like(slots)], 1)[:, 0]
    cos, sin = cache.cos[slots].to(dtype), cache.sin[slots].to(dtype)
    q_rot = impl.qk_norm_rope_store(qq, kk, vv, qw, kw, EPS, cos, sin, cache, layer, slots, store_pre_rope=pre)
    return {"q_rot": q_rot, "k": cache.k, "v": cache.v, "k_rot": cache.k_rot}


def _stream_layout(views=2, frames=4, img=6, label=1, prefix=4):
    """Slot ranges of a miniature streaming prompt: prefix, then per view `frames` x (label, image)."""
    rng, s = [], prefix
    for _ in range(views):
        row = []
        for _ in range(frames):
            s += label
            row.append((s, s + img))
            s += img
        rng.append(row)
    assert s <= MAX_LEN
    return rng


def _stream_shift(k: int):
    """layout.shift_indices('vision_only', k): frames k..3 onto 0..3-k of every view, view-major."""
    src, dst = [], []
    for row in _stream_layout():
        for f in range(len(row) - k):
            src.append(torch.arange(*row[f + k]))
            dst.append(torch.arange(*row[f]))
    return torch.cat(src), torch.cat(dst)


def _shift_indices(kind: str):
    if kind == "stream_k1":
        return _stream_shift(1)
    if kind == "stream_k2":
        return _stream_shift(2)
    if kind == "stream_k1_shuffled":
        src, dst = _stream_shift(1)
        p = torch.randperm(src.numel(), generator=torch.Generator().manual_seed(3))
        return src[p], dst[p]
    if kind == "stream_k1_reversed":  # last frame first: an in-place copy would write F2 before reading it
        src, dst = _stream_shift(1)
        return src.flip(0), dst.flip(0)
    if kind == "stream_k2_strided":  # index views with stride 2
        src, dst = _stream_shift(2)
        return torch.stack([src, dst], 1)[:, 0], torch.stack([dst, src], 1)[:, 0]
    if kind == "swap_cycle":  # a 3-cycle and a swap: no in-place order exists
        return torch.tensor([10, 11, 12, 40, 41]), torch.tensor([11, 12, 10, 41, 40])
    raise KeyError(kind)


# name: (dtype, B, index kind, mode) with mode "temp" | "per_layer" | "waves"
SHIFT_CASES = {
    "fp32_b2_stream_k1_temp": (torch.float32, 2, "stream_k1", "temp"),
    "bf16_b1_stream_k1_temp": (torch.bfloat16, 1, "stream_k1", "temp"),
    "bf16_b2_stream_k1_per_layer": (torch.bfloat16, 2, "stream_k1", "per_layer"),
    "bf16_b2_stream_k1_shuffled_temp": (torch.bfloat16, 2, "stream_k1_shuffled", "temp"),
    "bf16_b2_stream_k1_waves": (torch.bfloat16, 2, "stream_k1", "waves"),
    "fp32_b1_stream_k1_shuffled_waves": (torch.float32, 1, "stream_k1_shuffled", "waves"),
    "bf16_b1_stream_k2_waves": (torch.bfloat16, 1, "stream_k2", "waves"),
    "fp32_b2_stream_k1_reversed_temp": (torch.float32, 2, "stream_k1_reversed", "temp"),
    "bf16_b1_stream_k1_reversed_waves": (torch.bfloat16, 1, "stream_k1_reversed", "waves"),
    "fp32_b2_stream_k2_strided_temp": (torch.float32, 2, "stream_k2_strided", "temp"),
    "fp32_b2_swap_cycle_temp": (torch.float32, 2, "swap_cycle", "temp"),
}


def run_shift(impl, name: str):
    dtype, b, kind, mode = SHIFT_CASES[name]
    cache = _poisoned_cache(dtype, b, 2, 32, seed=11)
    src, dst = _shift_indices(kind)
    if mode == "waves":
        src, dst, waves = ck.shift_waves(src, dst)
        impl.shift_slots(cache, src, dst, waves=waves)
    else:
        impl.shift_slots(cache, src, dst, layers_per_pass=1 if mode == "per_layer" else None)
    return {"k": cache.k, "v": cache.v, "k_rot": cache.k_rot}


KERNELS = SimpleNamespace(qk_norm_rope_store=ck.qk_norm_rope_store, shift_slots=ck.shift_slots)


def _ref_shift(cache, src, dst, waves=None, layers_per_pass=None):
    ck.shift_slots_reference(cache, src, dst)  # one step, all sources read first: the specification


REFERENCE = SimpleNamespace(qk_norm_rope_store=ck.qk_norm_rope_store_reference, shift_slots=_ref_shift)


# -------------------------------------------------------------- the interpreter subprocess

@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory):
    """Outputs of every case computed by the Triton kernels under the interpreter."""
    pytest.importorskip("triton", reason="triton is installed by scripts/setup.sh; its interpreter runs the kernels")
    return run_interpreted(__file__, tmp_path_factory.mktemp("cache_kernels") / "out.pt")


def _equal(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert_bitwise_equal(got, ref, what)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """fp32: 1e-6. bf16: each element equal or one bf16 rounding step apart (a last-bit difference of
    the fp32 sum of squares can flip one rounding), on at most 1% of the elements."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")
        return
    af, bf = a.float(), b.float()
    diff = a != b
    assert diff.float().mean().item() <= 0.01, f"{what}: {diff.sum().item()} of {a.numel()} elements differ"
    assert ((af - bf).abs() <= bf.abs() * 2.0 ** -7 + 1e-30).all(), f"{what}: a difference beyond one bf16 ulp"


# --------------------------------------------------------------------------------------- tests

def test_interpreter_run_reports_the_kernels_available(kernel_out):
    assert kernel_out["meta"] == {"interpreted": True, "available_cpu": True}


@pytest.mark.parametrize("name", list(STORE_CASES))
def test_store_matches_fused_qk_prep_plus_cache_writes(kernel_out, name):
    ref = run_store(REFERENCE, name)
    got = kernel_out["store"][name]
    assert got["q_rot"].is_contiguous() and got["q_rot"].shape == ref["q_rot"].shape
    for key in ("q_rot", "k", "v", "k_rot"):
        _close(got[key], ref[key], f"{name}: {key}")
    _equal(got["v"], ref["v"], f"{name}: v is a plain copy")


@pytest.mark.parametrize("name", list(STORE_CASES))
def test_store_touches_only_the_given_slots_of_the_given_layer(kernel_out, name):
    dtype, b, q, h, kv, d, layer, slots, pre = STORE_CASES[name]
    poison = _poisoned_cache(dtype, b, kv, d, seed=7)
    got = kernel_out["store"][name]
    other = torch.ones(MAX_LEN, dtype=torch.bool)
    other[torch.tensor(slots)] = False
    for key in ("k", "v", "k_rot"):
        before, after = getattr(poison, key), got[key]
        _equal(after[1 - layer], before[1 - layer], f"{name}: {key} of the other layer")
        _equal(after[layer][:, :, other], before[layer][:, :, other], f"{name}: {key} outside the slots")


def test_store_without_pre_rope_keys_leaves_cache_k_untouched(kernel_out):
    name = "bf16_action_scratch"
    dtype, b, q, h, kv, d, layer, slots, pre = STORE_CASES[name]
    assert pre is False
    poison = _poisoned_cache(dtype, b, kv, d, seed=7)
    got = kernel_out["store"][name]
    _equal(got["k"], poison.k, "cache.k with store_pre_rope=False")
    assert not torch.equal(got["k_rot"], poison.k_rot) and not torch.equal(got["v"], poison.v)


@pytest.mark.parametrize("name", list(SHIFT_CASES))
def test_shift_matches_cache_shift_bitwise(kernel_out, name):
    ref = run_shift(REFERENCE, name)
    got = kernel_out["shift"][name]
    for key in ("k", "v", "k_rot"):
        _equal(got[key], ref[key], f"{name}: {key}")


@pytest.mark.parametrize("name", list(SHIFT_CASES))
def test_shift_leaves_slots_outside_dst_unchanged(kernel_out, name):
    dtype, b, kind, _ = SHIFT_CASES[name]
    poison = _poisoned_cache(dtype, b, 2, 32, seed=11)
    _, dst = _shift_indices(kind)
    other = torch.ones(MAX_LEN, dtype=torch.bool)
    other[dst] = False
    got = kernel_out["shift"][name]
    for key in ("k", "v", "k_rot"):
        _equal(got[key][:, :, :, other], getattr(poison, key)[:, :, :, other], f"{key} outside dst")


def test_shift_waves_orders_a_streaming_shift_into_frame_waves():
    src, dst = _stream_shift(1)
    assert not ck.check_waves(src, dst, (src.numel(),))  # view-major in one go would race
    s2, d2, waves = ck.shift_waves(src, dst)
    assert waves == (12, 12, 12)  # F1->F0 of both views, then F2->F1, then F3->F2
    assert ck.check_waves(s2, d2, waves)
    assert sorted(zip(s2.tolist(), d2.tolist())) == sorted(zip(src.tolist(), dst.tolist()))
    assert ck.shift_waves(*_stream_shift(2))[2] == (24,)  # disjoint: one in-place kernel
    assert ck.shift_waves(*_shift_indices("swap_cycle")) is None
    assert ck.shift_waves(torch.tensor([1, 2]), torch.tensor([5, 5])) is None  # repeated destination


def test_without_triton_the_functions_fall_back_to_the_eager_reference():
    """In this process the kernels were not built by the interpreter: CPU tensors take the reference
    path (the same math graphs.py runs today), so callers need no branch of their own."""
    if ck.interpreted():
        pytest.skip("TRITON_INTERPRET was set for the pytest process itself")
    assert not ck.available(torch.zeros(1))
    for name in ("bf16_b1_scattered", "bf16_action_scratch"):
        a, b = run_store(KERNELS, name), run_store(REFERENCE, name)
        for key in a:
            _equal(a[key], b[key], f"fallback {name}: {key}")
    a, b = run_shift(KERNELS, "bf16_b2_stream_k1_waves"), run_shift(REFERENCE, "bf16_b2_stream_k1_waves")
    for key in a:
        _equal(a[key], b[key], f"fallback shift: {key}")


def test_shape_errors_are_raised_before_any_launch():
    qq, kk, vv, qw, kw = _projection(torch.float32, 1, 4, 4, 2, 32, seed=0)
    cache = _poisoned_cache(torch.float32, 1, 2, 32, seed=0)
    slots = torch.arange(4)
    cos, sin = cache.cos[slots], cache.sin[slots]
    with pytest.raises(ValueError):
        ck.qk_norm_rope_store(qq, kk, vv.transpose(1, 2), qw, kw, EPS, cos, sin, cache, 0, slots)
    with pytest.raises(ValueError):
        ck.qk_norm_rope_store(qq, kk, vv, qw, kw, EPS, cos, sin, cache, 0, torch.arange(5))
    with pytest.raises(ValueError):
        ck.shift_slots(cache, torch.arange(3), torch.arange(4))
    with pytest.raises(ValueError):
        ck.shift_slots(cache, torch.arange(4), torch.arange(4, 8), waves=(1, 2))


# ------------------------------------------------------------ subprocess entry (interpreter)

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the pytest fixture (needs TRITON_INTERPRET=1)"
    result = {
        "meta": {"interpreted": ck.interpreted(), "available_cpu": ck.available(torch.zeros(1))},
        "store": {name: run_store(KERNELS, name) for name in STORE_CASES},
        "shift": {name: run_shift(KERNELS, name) for name in SHIFT_CASES},
    }
    torch.save(result, sys.argv[1])
