"""slot_attention (engine/attention_kernel.py): attention over cache key slots, query q seeing keys j < limit[q].

The Triton kernel runs on the CPU through Triton's interpreter. TRITON_INTERPRET=1 must be set before
triton's jit decorators run, so every kernel case below is built here, run once in one fresh process
(test/attention_interp.py) and compared here with the PyTorch specification `slot_attention_reference`.
Inputs are fp32: the interpreter computes tl.dot on 16-bit inputs wrongly, so the kernel upcasts those
when interpreting (one bf16 case checks the loads, casts and stores around the dots). Small shapes and
blocks (16 keys) so that a key axis spans several blocks and splits.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from dataclasses import replace
import torch

from flashdrive_ros.engine import attention_kernel as A
from flashdrive_ros.engine import graphs

HERE = Path(__file__).resolve().parent
TOL = dict(rtol=1e-4, atol=1e-5)
D = 32
SMALL = dict(block_m=16, block_n=16, num_warps=4, num_stages=2)


def _cache(layers, batch, kv, slots, seed):
    """[layers, B, KV, S, D] like StaticKVCache.k_rot / .v."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, batch, kv, slots, D, generator=g), torch.randn(layers, batch, kv, slots, D, generator=g)


def _queries(batch, kv, groups, n_q, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, kv, groups * n_q, D, generator=g).to(dtype)


def _case_decode():
    # One query, 4 query heads per kv head, keys a slice [:150] of a 160-slot cache (layer 1):
    # 150 is not a multiple of the block; the row sees its 137 valid slots.
    k, v = _cache(2, 1, 2, 160, 1)
    return _queries(1, 2, 4, 1, 2), k[1, :, :, :150], v[1, :, :, :150], torch.tensor([137]), None


def _case_verify():
    # 8 verify rows at slots 90..97 of a batch-1 cache expanded over B = 2 (stride 0): causal, valid length 96.
    k, v = _cache(1, 1, 2, 120, 3)
    slots = torch.arange(90, 98)
    limit = torch.clamp(slots + 1, max=96)
    return (_queries(2, 2, 4, 8, 4), k[0].expand(2, -1, -1, -1), v[0].expand(2, -1, -1, -1), limit,
            dict(SMALL, splits=3))


def _case_action():
    # 64 action tokens (2 query heads per kv head) see the 70 context slots and their own 64 slots
    # after them: one limit for all, 134 of 150 key slots.
    k, v = _cache(2, 1, 2, 150, 5)
    limit = torch.full((64,), 70 + 64)
    return _queries(1, 2, 2, 64, 6), k[0], v[0], limit, dict(SMALL, block_m=32, block_n=32, splits=3)


def _prefill_limits():
    # 40 query slots scattered over 100 key slots (streaming prefill: frozen slots, not in order),
    # causal with valid length 90.
    slots = torch.randperm(100, generator=torch.Generator().manual_seed(7))[:40]
    return torch.clamp(slots + 1, max=90)


def _case_prefill(splits):
    def build():
        k, v = _cache(1, 2, 2, 100, 8)
        return _queries(2, 2, 4, 40, 9), k[0], v[0], _prefill_limits(), dict(SMALL, block_m=32, splits=splits)
    return build


def _case_edge_limits(splits):
    # Rows with limit 0 (nothing visible), 1, a full block, and beyond N (clamped to N).
    def build():
        k, v = _cache(1, 1, 2, 50, 10)
        limit = torch.tensor([0, 1, 16, 0, 49, 50, 77, 3])
        return _queries(1, 2, 4, 8, 11), k[0], v[0], limit, dict(SMALL, splits=splits)
    return build


def _case_bf16():
    k, v = _cache(1, 1, 2, 120, 12)
    limit = torch.clamp(torch.arange(90, 98) + 1, max=96)
    return (_queries(1, 2, 4, 8, 13, torch.bfloat16), k[0].bfloat16(), v[0].bfloat16(), limit,
            dict(SMALL, splits=3))


def _case_default_plan(n_q):
    # No config: the automatic plan (few rows -> splits, many rows -> one program per row tile).
    def build():
        k, v = _cache(1, 1, 2, 130, 14)
        limit = torch.clamp(torch.arange(n_q) + 60, max=120)
        return _queries(1, 2, 4, n_q, 15), k[0], v[0], limit, None
    return build


def _variant(build, **fields):
    """The same inputs with some Config fields changed (fused_merge, merge_group, splits)."""
    def variant():
        q, k, v, limit, cfg = build()
        return q, k, v, limit, dict(cfg or SMALL, **fields)
    return variant


def _case_dead_splits():
    # Limits far below the key count (early in an episode): of 6 splits of 32 keys only the first one
    # or two hold visible keys; the fused merge skips the others. Limit 0 rows included.
    k, v = _cache(1, 1, 2, 180, 16)
    limit = torch.tensor([0, 5, 40, 33, 1, 0, 17, 40])
    return _queries(1, 2, 4, 8, 17), k[0], v[0], limit, dict(SMALL, splits=6)


def _case_repeat(seed, limit):  # fused merge: the counters are what repeated calls exercise
    # Calls in a row on the same counters (same shape: 2 row tiles x B=2 x KV=2 counters), with
    # different inputs: the merging program must leave its counter at 0 for the next call.
    def build():
        k, v = _cache(1, 1, 2, 100, seed)
        return (_queries(2, 2, 4, 8, seed + 1), k[0].expand(2, -1, -1, -1), v[0].expand(2, -1, -1, -1),
                limit, dict(SMALL, splits=4, fused_merge=True))
    return build


def _case_vision(splits, fused=False):
    # The vision tower: 3 images of 20 patches, 2 heads of 24 (no power of two: padded lanes in the
    # kernel), q/k/v strided views of one [tokens, 3, heads, 24] qkv buffer, every patch sees its image.
    def build():
        n_img, L, H, d = 3, 20, 2, 24
        qkv = torch.randn(n_img * L, 3, H, d, generator=torch.Generator().manual_seed(30))
        q, k, v = (t.reshape(n_img, L, H, d).transpose(1, 2) for t in qkv.unbind(1))
        return q, k, v, torch.full((L,), L), dict(SMALL, splits=splits, fused_merge=fused)
    return build


def _case_padded_verify(fused):
    # Verify-like causal rows at head dim 40 (padded to 64 lanes), split over the keys.
    def build():
        g = torch.Generator().manual_seed(31)
        k, v = torch.randn(1, 2, 120, 40, generator=g), torch.randn(1, 2, 120, 40, generator=g)
        limit = torch.clamp(torch.arange(90, 98) + 1, max=96)
        return torch.randn(1, 2, 32, 40, generator=g), k, v, limit, dict(SMALL, splits=3, fused_merge=fused)
    return build


# ------------------------------------------------------------------ TMA kernel (Config(tma=True))
TMA = dict(SMALL, splits=1, tma=True)


def _sliced_cache(batch, kv, n, seed, d=D, dtype=torch.float32):
    """Key / value slices [:, :, :n] of a [B, KV, n + 16, d] cache whose slots from n on hold NaN: a
    kernel that read keys past the slice (instead of masking them or TMA's zero fill) returns NaN."""
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(batch, kv, n + 16, d, generator=g).to(dtype) for _ in range(2))
    for t in (k, v):
        t[:, :, n:] = float("nan")
    return k[:, :, :n], v[:, :, :n]


def _streaming_limits(n_q, n_keys):
    # A streaming window's queries: the newest frame of two views (runs of slots in the middle of the
    # cache) and the tail up to the last slot, causal. Row tiles of one run share most of their keys
    # (unmasked blocks); the last slot sees all n_keys, so with n_keys % block_n its last key block
    # runs past the key slice.
    run = n_q // 3
    slots = torch.cat([torch.arange(n_keys // 4, n_keys // 4 + run), torch.arange(n_keys // 2, n_keys // 2 + run),
                       torch.arange(n_keys - (n_q - 2 * run), n_keys)])
    return slots + 1


def _case_tma_streaming():
    # B = 2 with a real batch stride, 90 keys (not a multiple of the 16-key block), 32-row tiles.
    k, v = _sliced_cache(2, 2, 90, 40)
    return _queries(2, 2, 4, 40, 41), k, v, _streaming_limits(40, 90), dict(TMA, block_m=32)


def _case_tma_causal():
    # Full prefill: 70 queries at slots 0..69 over their 70 keys, limit = slot + 1, 2 query heads per kv
    # head: 140 folded rows, so the last 16-row tile runs past the rows (its padding rows read zeros).
    k, v = _sliced_cache(1, 2, 70, 43)
    return _queries(1, 2, 2, 70, 44), k, v, torch.arange(70) + 1, TMA


def _case_tma_edge():
    # Rows with limit 0 (nothing visible), 1, a full block, the 50 keys, and beyond (clamped).
    k, v = _sliced_cache(1, 2, 50, 45)
    return _queries(1, 2, 4, 8, 46), k, v, torch.tensor([0, 1, 16, 0, 49, 50, 77, 3]), TMA


def _case_tma_shared_batch():
    # A batch-1 cache expanded over B = 2 (batch stride 0), as graphs._store_and_attend passes it.
    k, v = _sliced_cache(1, 2, 70, 47)
    return (_queries(2, 2, 4, 24, 48), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
            _streaming_limits(24, 70), dict(TMA, block_n=32))


def _case_tma_bf16():
    k, v = _sliced_cache(1, 2, 90, 50, dtype=torch.bfloat16)
    return (_queries(1, 2, 4, 40, 51, torch.bfloat16), k, v, _streaming_limits(40, 90),
            dict(TMA, block_m=32, block_n=32))


def _case_tma_head_dim_64():
    g = torch.Generator().manual_seed(53)
    k, v = _sliced_cache(1, 2, 75, 54, d=64)
    return torch.randn(1, 2, 2 * 30, 64, generator=g), k, v, _streaming_limits(30, 75), TMA


def _case_tma_verify_split():
    # The verify pass through TMA with a key split (few rows): 8 causal rows at slots 90..97 over a key
    # slice of 100 with NaN after it, 4 query heads per kv head (32 rows, two 16-row tiles), a batch-1
    # cache expanded over B = 2, 3 splits merged by _merge_splits.
    k, v = _sliced_cache(1, 2, 100, 55)
    limit = torch.clamp(torch.arange(90, 98) + 1, max=96)
    return (_queries(2, 2, 4, 8, 56), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), limit,
            dict(TMA, splits=3, fused_merge=False))


def _case_tma_action_split():
    # The action's shape through TMA with a key split: 64 tokens, 2 query heads per kv head (128 rows,
    # 32-row tiles), one limit 134 of 150 keys; 4 splits of 48 keys (3 blocks), the last one cut short.
    k, v = _sliced_cache(1, 2, 150, 57)
    return (_queries(1, 2, 2, 64, 58), k, v, torch.full((64,), 134),
            dict(TMA, block_m=32, splits=4, fused_merge=False))


def _case_tma_edge_split():
    # Edge limits (0, 1, a block, N, past N) with 3 splits: splits past a tile's largest limit read
    # nothing and write an empty partial, which the merge weighs 0.
    k, v = _sliced_cache(1, 2, 50, 59)
    return (_queries(1, 2, 4, 8, 60), k, v, torch.tensor([0, 1, 16, 0, 49, 50, 77, 3]),
            dict(TMA, splits=3, fused_merge=False))


CASES_TMA = {
    "tma_streaming": _case_tma_streaming,
    "tma_causal": _case_tma_causal,
    "tma_edge": _case_tma_edge,
    "tma_shared_batch": _case_tma_shared_batch,
    "tma_bf16": _case_tma_bf16,
    "tma_head_dim_64": _case_tma_head_dim_64,
}
# Config(tma=True) with a key split: the TMA kernel, then _merge_splits
CASES_TMA_SPLIT = {
    "tma_verify_split": _case_tma_verify_split,
    "tma_action_split": _case_tma_action_split,
    "tma_edge_split": _case_tma_edge_split,
}
# Config(tma=True) where TMA does not apply: the pointer kernel runs (a fused merge; padded head dims)
TMA_FALLBACK = {
    "tma_split_falls_back": _variant(_case_tma_streaming, splits=3, fused_merge=True),
    "tma_padded_falls_back": _variant(_case_vision(splits=1), tma=True),
}

CASES = {
    "vision_no_split": _case_vision(splits=1),
    "vision_split": _case_vision(splits=2),
    "padded_verify_two_kernel": _case_padded_verify(fused=False),
    "padded_verify_fused": _case_padded_verify(fused=True),
    "decode": _variant(_case_decode, fused_merge=True),
    "verify": _variant(_case_verify, fused_merge=True),
    "action": _variant(_case_action, fused_merge=True),
    "prefill_split": _variant(_case_prefill(splits=4), fused_merge=True),
    "prefill_no_split": _case_prefill(splits=1),
    "edge_split": _variant(_case_edge_limits(splits=3), fused_merge=True),
    "edge_no_split": _case_edge_limits(splits=1),
    "bf16": _variant(_case_bf16, fused_merge=True),
    "default_few_rows": _case_default_plan(2),
    "default_many_rows": _case_default_plan(64),
    # the two-kernel path (_merge_splits) kept for comparison
    "verify_two_kernel": _variant(_case_verify, fused_merge=False),
    "action_two_kernel": _variant(_case_action, fused_merge=False),
    "edge_split_two_kernel": _variant(_case_edge_limits(splits=3), fused_merge=False),
    # fused merge: explicit merge groups (1 split per step; a group wider than the live splits)
    "action_group1": _variant(_case_action, fused_merge=True, merge_group=1),
    "verify_group4": _variant(_case_verify, fused_merge=True, merge_group=4),
    "dead_splits": _variant(_case_dead_splits, fused_merge=True),
    "dead_splits_two_kernel": _variant(_case_dead_splits, fused_merge=False),
    "repeat_1": _case_repeat(20, torch.tensor([100, 99, 64, 1, 50, 33, 100, 80])),
    "repeat_2": _case_repeat(22, torch.tensor([0, 7, 16, 17, 48, 49, 70, 3])),
    "repeat_3": _case_repeat(24, torch.full((8,), 90)),
    **CASES_TMA,
    **CASES_TMA_SPLIT,
    **TMA_FALLBACK,
}
FUSED = ["decode", "verify", "action", "edge_split", "bf16", "action_group1", "verify_group4",
         "dead_splits", "repeat_1", "repeat_2", "repeat_3", "prefill_split"]
TWO_KERNEL = ["verify_two_kernel", "action_two_kernel", "edge_split_two_kernel", "dead_splits_two_kernel"]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """name -> (inputs, kernel output, k strides seen by the kernel); one interpreter process for all."""
    if A.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("attention_interp")
    inputs = {name: build() for name, build in CASES.items()}
    torch.save(inputs, d / "cases.pt")
    proc = subprocess.run([sys.executable, str(HERE / "attention_interp.py"), str(d / "cases.pt"), str(d / "out.pt")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(d / "out.pt", weights_only=False)
    out = {name: (inputs[name], *results[name]) for name in CASES}
    out["__heads_last__"] = results["__heads_last__"]
    out["__kernels__"] = results["__kernels__"]
    out["__counters__"] = results["__counters__"]
    return out


def test_two_kernel_merge_with_several_rows_per_program_equals_the_reference(tmp_path):
    """The merge kernel's launch (A.MERGE: rows per program, warps) does not change the result, also when
    the rows are no multiple of the rows per program (decode: 4 folded rows, 8 per program)."""
    if A.triton is None:
        pytest.skip("triton is not installed (scripts/setup.sh installs it)")
    cases = {n: CASES[n]() for n in TWO_KERNEL}
    cases["decode_two_kernel"] = _variant(_case_decode, fused_merge=False, splits=3)()
    names = list(cases)
    torch.save(cases, tmp_path / "cases.pt")
    for merge in ("2,2", "8,4"):
        proc = subprocess.run([sys.executable, str(HERE / "attention_interp.py"), str(tmp_path / "cases.pt"),
                               str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=240,
                              env={**__import__("os").environ, "ATTN_MERGE": merge})
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = torch.load(tmp_path / "out.pt", weights_only=False)
        for n in names:
            q, k, v, limit, _ = torch.load(tmp_path / "cases.pt", weights_only=False)[n]
            torch.testing.assert_close(out[n][0], A.slot_attention_reference(q, k, v, limit), **TOL)


def _plan_of(kernel, name):
    (q, k, _, _, cfg), *_ = kernel[name]
    return A.plan(q.shape[0] * q.shape[1], q.shape[2], k.shape[2], 4, None if cfg is None else A.Config(**cfg), D)


def _check(kernel, name, **tol):
    (q, k, v, limit, _), out, _ = kernel[name]
    ref = A.slot_attention_reference(q, k, v, limit)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **(tol or TOL))
    return out


# ------------------------------------------------------------------------- kernel == specification

def test_decode_row_attends_to_its_valid_slots_in_a_sliced_cache(kernel):
    _check(kernel, "decode")
    (_, k, *_), _, strides = kernel["decode"]
    assert not k.is_contiguous() and strides == k.stride()  # the kernel really read a strided view


def test_verify_rows_are_causal_over_a_cache_expanded_over_the_batch(kernel):
    _check(kernel, "verify")
    assert kernel["verify"][2][0] == 0  # batch stride 0 reached the kernel


def test_action_tokens_share_one_limit(kernel):
    _check(kernel, "action")


@pytest.mark.parametrize("name", ["prefill_split", "prefill_no_split"])
def test_prefill_rows_with_scattered_limits_in_both_regimes(kernel, name):
    _check(kernel, name)


@pytest.mark.parametrize("name", ["edge_split", "edge_no_split"])
def test_limit_zero_gives_zeros_and_limits_past_the_keys_are_clamped(kernel, name):
    out = _check(kernel, name)
    (q, k, v, limit, _), *_ = kernel[name]
    rows_without_keys = (limit == 0).repeat(q.shape[2] // limit.shape[0])
    assert (out[:, :, rows_without_keys] == 0).all()
    clamped = limit.clamp(max=k.shape[2])
    torch.testing.assert_close(out, A.slot_attention_reference(q, k, v, clamped), **TOL)


def test_both_regimes_give_the_same_result(kernel):
    torch.testing.assert_close(kernel["prefill_split"][1], kernel["prefill_no_split"][1], **TOL)
    torch.testing.assert_close(kernel["edge_split"][1], kernel["edge_no_split"][1], **TOL)


def test_bf16_inputs_give_bf16_output_close_to_the_fp32_softmax(kernel):
    _check(kernel, "bf16", rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["default_few_rows", "default_many_rows"])
def test_default_plan(kernel, name):
    _check(kernel, name)


@pytest.mark.parametrize("name", ["vision_no_split", "vision_split", "padded_verify_two_kernel",
                                  "padded_verify_fused"])
def test_head_dims_that_are_no_power_of_two_run_padded_and_equal_the_reference(kernel, name):
    (q, *_), out, _ = kernel[name]
    assert q.shape[-1] in (24, 40)
    _check(kernel, name)


def test_vision_heads_last_output_is_the_projection_layout(kernel):
    (q, k, v, limit, _), *_ = kernel["vision_no_split"]
    ref = A.slot_attention_reference(q, k, v, limit)  # [n_img, H, L, d]
    torch.testing.assert_close(kernel["__heads_last__"]["vision_no_split"], ref.transpose(1, 2), **TOL)


@pytest.mark.parametrize("d", [8, 20, 264])
def test_head_dims_must_be_multiples_of_8_from_16_to_256(d):
    with pytest.raises(ValueError, match="multiple of 8"):
        A.check_head_dim(d)
    for ok in (16, 72, 128, 256):
        A.check_head_dim(ok)


# ---------------------------------------------------------------------- fused merge (split regime)

@pytest.mark.parametrize("name", FUSED)
def test_fused_merge_equals_the_reference(kernel, name):
    """One kernel: the last program of each row tile merges the splits (decode, verify with B = 2
    and an expanded cache, action over several row tiles, limits 0 / past N, bf16, heads_last below)."""
    assert _plan_of(kernel, name).fused_merge and _plan_of(kernel, name).splits > 1, name
    _check(kernel, name, **(dict(rtol=1e-2, atol=1e-2) if name == "bf16" else {}))


@pytest.mark.parametrize("name", TWO_KERNEL)
def test_two_kernel_merge_is_still_available_and_agrees(kernel, name):
    p = _plan_of(kernel, name)
    assert not p.fused_merge and p.splits > 1
    out = _check(kernel, name)
    fused = name.replace("_two_kernel", "")
    torch.testing.assert_close(out, kernel[fused][1], **TOL)


def test_fused_merge_skips_splits_past_the_largest_limit(kernel):
    out = _check(kernel, "dead_splits")
    (q, *_, limit, _), *_ = kernel["dead_splits"]
    assert (out[:, :, (limit == 0).repeat(q.shape[2] // limit.shape[0])] == 0).all()
    p = _plan_of(kernel, "dead_splits")
    assert p.splits == 6 and p.chunk == 32  # 2 of the 6 splits live


def test_repeated_calls_on_the_same_counters_stay_correct_and_leave_them_zero(kernel):
    """Every interpreted call of the module ran on the same eager counters (one process), the three
    repeat_* calls back to back with different inputs and limits; afterwards every counter is 0."""
    for name in ("repeat_1", "repeat_2", "repeat_3"):
        _check(kernel, name)
    counters = kernel["__counters__"]
    assert counters is not None and counters.dtype == torch.int32 and counters.numel() >= A.COUNTERS_EAGER
    assert int(counters.count_nonzero()) == 0


def test_default_few_rows_plan_uses_the_two_kernel_merge_and_fused_is_a_config():
    """The fused merge measured slower on an H100 (docs/bench/attention_check_h100_run2.json): the default
    plan splits and merges in a second kernel; Config(fused_merge=True) selects the fused one."""
    sms, bh, n = 132, 8, 3136
    assert not A.FUSED_MERGE
    for rows in (4, 32, 128):  # decode, verify, action
        assert not A.plan(bh, rows, n, sms).fused_merge and A.plan(bh, rows, n, sms).splits > 1
        p = A.plan(bh, rows, n, sms, replace(A.plan(bh, rows, n, sms).config, fused_merge=True))
        assert p.fused_merge and p.splits > 1
        assert p.merge_group & (p.merge_group - 1) == 0
        assert p.merge_group == 1 or \
            p.merge_group * p.config.block_m * 128 <= A.MERGE_FP32_PER_THREAD * 32 * p.config.num_warps
    fused = replace(A.FEW_ROWS, block_m=16, fused_merge=True)
    assert A.plan(bh, 4, n, sms, fused).merge_group == 2  # block_m 16, 4 warps
    assert not A.plan(bh, 4, n, sms, A.Config(16, 64, 4, 2, splits=7, fused_merge=False)).fused_merge
    assert not A.plan(bh, 3196, n, sms).fused_merge  # no split, nothing to merge
    assert A.plan(bh, 4, n, sms, A.Config(16, 64, 4, 2, splits=7, fused_merge=True, merge_group=3)).merge_group == 4


def test_split_counters_are_persistent_and_grow_outside_capture():
    dev = torch.device("cpu")
    a = A.split_counters(dev, 16)
    assert a.dtype == torch.int32 and int(a.count_nonzero()) == 0
    assert A.split_counters(dev, 16).data_ptr() == a.data_ptr()  # the same counters, call after call
    big = A.split_counters(dev, A.COUNTERS_EAGER + 1)
    assert big.numel() == A.COUNTERS_EAGER + 1 and int(big.count_nonzero()) == 0
    assert A.split_counters(dev, 16).data_ptr() == big.data_ptr()  # the grown buffer from now on
    assert any(t.data_ptr() == a.data_ptr() for t in A._RETIRED)  # the old one kept alive


# ------------------------------------------------------------------------ specification (in process)

def _mask_from_limits(limit: torch.Tensor, n_keys: int) -> torch.Tensor:
    visible = torch.arange(n_keys)[None, :] < limit[:, None]
    return torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]


def test_every_mask_of_the_fast_path_is_a_key_limit():
    n, valid = 120, 96
    slots = torch.tensor([3, 90, 95, 96, 100, 7])  # decode / verify / streaming slots, some past valid
    assert torch.equal(graphs.causal_slot_mask(slots, n, torch.float32, torch.tensor(valid)),
                       _mask_from_limits(torch.clamp(slots + 1, max=valid), n))
    assert torch.equal(graphs.causal_slot_mask(slots, n, torch.float32), _mask_from_limits(slots + 1, n))
    n_ctx, t = torch.tensor(50), 64  # action: context + own slots right after it
    act = graphs.action_mask(n_ctx, n_ctx + torch.arange(t), n, torch.float32)
    assert torch.equal(act[0, 0], _mask_from_limits(torch.full((1,), 50 + t), n)[0, 0])


def test_reference_equals_graphs_attention_with_the_equivalent_additive_mask():
    g, n_q, n = 4, 6, 70
    q = torch.randn(2, 8, n_q, D)  # [B, H, Q, D], H = KV * g
    k, v = torch.randn(2, 2, n, D), torch.randn(2, 2, n, D)
    slots = torch.tensor([40, 5, 63, 64, 22, 69])
    limit = torch.clamp(slots + 1, max=65)
    fmask = graphs.fold_mask(graphs.causal_slot_mask(slots, n, torch.float32, torch.tensor(65)), g)
    qf = q.reshape(2, 2, g * n_q, D)
    ref = A.slot_attention_reference(qf, k, v, limit)
    torch.testing.assert_close(ref, graphs._attn_math(qf, k, v, fmask), **TOL)
    torch.testing.assert_close(ref, graphs._attn_sdpa(qf, k, v, fmask), **TOL)
    torch.testing.assert_close(ref.reshape(q.shape), graphs.gqa_attention(q, k, v, fmask), **TOL)


def test_reference_row_without_keys_is_zero():
    q, k, v = torch.randn(1, 1, 2, D), torch.randn(1, 1, 5, D), torch.randn(1, 1, 5, D)
    out = A.slot_attention_reference(q, k, v, torch.tensor([0, 3]))
    assert (out[0, 0, 0] == 0).all() and not out.isnan().any()


def test_few_rows_plans_fill_one_wave_with_the_swept_tiles():
    """Decode / verify take 16-row tiles, the action's 128 rows 64-row tiles with a 4-deep pipeline; the
    key axis is split so that all programs fit in one wave (H200 sweep, attention_kernel.py)."""
    sms, bh, n = 132, 8, 3136
    for rows, block_m, splits in ((4, 16, 13), (32, 16, 7), (128, 64, 7)):
        p = A.plan(bh, rows, n, sms)
        assert (p.config.block_m, p.splits) == (block_m, splits)
        assert p.splits * p.row_tiles * bh <= sms
    assert A.plan(bh, 128, n, sms).config == A.FEW_ROWS_TALL


def test_plan_is_static_and_splits_only_few_rows():
    sms, bh, n = 132, 8, 3136
    for rows in (4, 32, 128):  # decode, verify, action
        p = A.plan(bh, rows, n, sms)
        assert p.splits > 1 and p.config.block_m <= max(16, rows)
        assert p.chunk % p.config.block_n == 0 and (p.splits - 1) * p.chunk < n <= p.splits * p.chunk
        assert p == A.plan(bh, rows, n, sms)
    for rows in (3196, 12140):  # streaming and full prefill
        p = A.plan(bh, rows, n, sms)
        assert p.splits == 1 and p.row_tiles * bh >= sms
    forced = A.plan(bh, 4, n, sms, A.Config(16, 64, 4, 2, splits=7))
    assert forced.splits == 7 and forced.chunk == 448


def test_available_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not A.available(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert A.available(torch.zeros(1)) == (A.triton is not None)


def test_without_triton_on_the_cpu_slot_attention_is_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = torch.randn(1, 2, 8, D), torch.randn(1, 2, 20, D), torch.randn(1, 2, 20, D)
    limit = torch.tensor([0, 5, 20, 13])
    assert torch.equal(A.slot_attention(q, k, v, limit), A.slot_attention_reference(q, k, v, limit))


def test_heads_last_output_is_the_same_values_in_the_output_projection_layout(kernel):
    """heads_last=True: [B, Q, KV * g, D] with query head h = kv * g + j (what o_proj reads after a
    view), written directly by the kernel in both regimes."""
    for name in CASES:
        (q, k, v, limit, _), _, _ = kernel[name]
        out = kernel["__heads_last__"][name]
        b, n_kv, rows, d = q.shape
        n_q = limit.shape[0]
        assert out.shape == (b, n_q, rows // n_q * n_kv, d), name
        ref = A._to_heads_last(A.slot_attention_reference(q, k, v, limit), n_q)
        tol = dict(rtol=2e-2, atol=2e-2) if q.dtype == torch.bfloat16 else TOL
        torch.testing.assert_close(out, ref, **tol, msg=name)
    # the layout helper: head h = kv * g + j of query q is folded row j * Q + q of kv head kv
    x = torch.randn(1, 2, 3 * 4, D)
    hl = A._to_heads_last(x, 4)
    assert torch.equal(hl[0, 1, 1 * 3 + 2], x[0, 1, 2 * 4 + 1])  # q = 1, kv = 1, j = 2


def test_many_rows_under_two_waves_of_big_tiles_use_smaller_tiles():
    """Streaming prefill (3196 folded rows x 8 kv heads = 200 tiles of 128 on 132 SMs) balances better
    with 64-row tiles; the full prefill (760 tiles) keeps 128-row tiles."""
    sms, bh, n = 132, 8, 3136
    assert A.plan(bh, 3196, n, sms).config == A.MANY_ROWS_SHORT
    assert A.plan(bh, 12140, n, sms).config == A.MANY_ROWS


def test_programmatic_dependent_launch_only_on_cuda(monkeypatch):
    """PDL (inline PTX, sm_90+) is a launch option of the CUDA kernels only: never on CPU tensors (the
    interpreter), whatever the switch says, and the switch turns it off everywhere."""
    from flashdrive_ros.engine import cache_kernels as C

    monkeypatch.setattr(A, "PDL", True)
    assert not A.pdl_enabled(torch.zeros(1))
    assert C._pdl_options(torch.zeros(1)) == {}
    monkeypatch.setattr(A, "PDL", False)
    assert not A.pdl_enabled(torch.zeros(1))


# ----------------------------------------------------------------- TMA kernel (Config(tma=True))

def _slot_after_slice(t):
    """The cache slot right after the key slice t = cache[:, :, :n]: what a read past the slice sees."""
    b, h, n, d = t.shape
    return t.as_strided((b, h, n + 1, d), t.stride(), t.storage_offset())[:, :, n]


@pytest.mark.parametrize("name", list(CASES_TMA))
def test_tma_kernel_equals_the_reference(kernel, name):
    """Q, K and V through TMA descriptors: streaming and causal limits, key slices that are no multiple
    of the block with NaN in the cache slot after them (the last block must be padded by TMA's zero
    fill, not read from the cache), a last row tile past the rows, a real and a stride-0 batch, bf16,
    head dim 64; heads_last too (test_heads_last_output_... covers every case)."""
    assert kernel["__kernels__"][name] == ["_slot_attention_tma_fwd"] * 2  # heads_last False, True
    (q, k, v, _, _), *_ = kernel[name]
    assert _slot_after_slice(k).isnan().all() and _slot_after_slice(v).isnan().all()
    _check(kernel, name, **(dict(rtol=1e-2, atol=1e-2) if q.dtype == torch.bfloat16 else {}))


def test_tma_rows_that_see_no_key_are_zero(kernel):
    (q, _, _, limit, _), out, _ = kernel["tma_edge"]
    assert (out[:, :, (limit == 0).repeat(q.shape[2] // limit.shape[0])] == 0).all()


@pytest.mark.parametrize("name", list(CASES_TMA_SPLIT))
def test_tma_kernel_with_a_key_split_equals_the_reference(kernel, name):
    """The few-rows regime through TMA: each split program writes its partial, _merge_splits combines
    them; verify rows over a stride-0 batch, the action's 128 rows, edge limits with splits that see
    nothing; the key slice ends in a NaN slot that only a wrong read would reach."""
    assert kernel["__kernels__"][name] == ["_slot_attention_tma_fwd", "_merge_splits"] * 2
    (_, k, v, _, _), *_ = kernel[name]
    assert _slot_after_slice(k).isnan().all() and _slot_after_slice(v).isnan().all()
    _check(kernel, name)


def test_tma_split_rows_that_see_no_key_are_zero(kernel):
    (q, _, _, limit, _), out, _ = kernel["tma_edge_split"]
    assert (out[:, :, (limit == 0).repeat(q.shape[2] // limit.shape[0])] == 0).all()


@pytest.mark.parametrize("name", list(TMA_FALLBACK))
def test_tma_config_where_tma_does_not_apply_runs_the_pointer_kernel(kernel, name):
    """Config(tma=True) with a fused merge or a padded head dim: the pointer kernel, same results."""
    launched = kernel["__kernels__"][name]
    assert launched[0] == "_slot_attention_fwd" and "_slot_attention_tma_fwd" not in launched
    _check(kernel, name)


def test_tma_and_pointer_kernels_agree(kernel):
    torch.testing.assert_close(kernel["tma_streaming"][1], kernel["tma_split_falls_back"][1], **TOL)


def test_tma_applies_to_plans_without_a_fused_merge_over_tensors_a_descriptor_addresses(monkeypatch):
    if A.TensorDescriptor is None:
        pytest.skip("this triton has no host-side tensor descriptors")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # TMA-capable "hardware": the interpreter
    cache = torch.randn(2, 1, 2, 80, D)  # [layers, B, KV, slots, D], like StaticKVCache
    k = cache[1, :, :, :60]
    q = torch.randn(1, 2, 32, D)
    tma = A.Config(16, 16, 4, 2, splits=1, tma=True)
    on = A.plan(2, 32, 60, 4, tma, D)
    assert A.tma_applies(on, q, k, k)
    q3, k3 = torch.randn(3, 2, 32, D), k.expand(3, -1, -1, -1)  # the cache shared over B = 3 (stride 0)
    assert A.tma_applies(A.plan(6, 32, 60, 4, tma, D), q3, k3, k3)
    assert A._descriptor_layout(k3) == ([1, 2, 60, D], [2 * 80 * D, 80 * D, D, 1])

    assert not A.tma_applies(A.plan(2, 32, 60, 4, replace(tma, tma=False), D), q, k, k)
    assert A.tma_applies(A.plan(2, 32, 60, 4, replace(tma, splits=3, fused_merge=False), D), q, k, k)
    assert not A.tma_applies(A.plan(2, 32, 60, 4, replace(tma, splits=3, fused_merge=True), D), q, k, k)
    q24, k24 = torch.randn(1, 2, 32, 24), torch.randn(1, 2, 60, 24)  # padded head lanes (24 -> 32)
    assert not A.tma_applies(A.plan(2, 32, 60, 4, tma, 32), q24, k24, k24)
    misaligned = torch.randn(1 + 2 * 60 * D)[1:].view(1, 2, 60, D)  # base 4 bytes past an allocation
    narrow_rows = torch.randn(1, 2, 60, D + 2)[..., :D]  # row stride 136 bytes: no multiple of 16
    heads_expanded = k[:, :1].expand(1, 2, -1, -1)  # stride 0 over 2 heads
    for bad in (misaligned, narrow_rows, heads_expanded):
        assert A._descriptor_layout(bad) is None
        assert not A.tma_applies(on, q, bad, k) and not A.tma_applies(on, q, k, bad)

    monkeypatch.delenv("TRITON_INTERPRET")  # CPU tensors without the interpreter: no TMA
    assert not A.tma_applies(on, q, k, k)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(A, "TensorDescriptor", None)  # a triton without host-side descriptors
    assert not A.tma_applies(on, q, k, k)
