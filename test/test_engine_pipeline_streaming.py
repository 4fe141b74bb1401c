"""Streaming pipeline vs baseline on the tiny random model (CPU, float32).

A synthetic clip: per camera a sequence of random 128x128 frames (16 tokens per image, no resize);
window t holds frames t..t+3 of every camera, t0 = 1.7 s + t * 0.1 s. The adaptive flow schedule
(4 expert evaluations) keeps the tests fast; the schedule is irrelevant to what they check.
"""

import numpy as np
import pytest
import torch

from flashdrive_ros.engine.engine import DriveEngine
from flashdrive_ros.engine.loader import TINY_DIR, create_tiny
from flashdrive_ros.engine.tokens import load_tokenizer

H, W = 128, 128
T0 = 1_700_000
STRIDE = 100_000
MAX_NEW = 4


@pytest.fixture(scope="module")
def parts():
    model = create_tiny(0)
    tokenizer = load_tokenizer(TINY_DIR, model.cfg.traj_token_start_idx, model.cfg.traj_vocab_size)
    return model, tokenizer


def make_engine(parts, **kw):
    model, tokenizer = parts
    kw.setdefault("max_new_tokens", MAX_NEW)
    kw.setdefault("flow_schedule", "adaptive")
    return DriveEngine(model, tokenizer, **kw)


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(7)
    n = 6
    frames = rng.integers(0, 256, (4, n + 3, H, W, 3), dtype=np.uint8)
    return frames


def window(clip, t):
    frames = np.ascontiguousarray(clip[:, t:t + 4])
    xyz = np.zeros((16, 3))
    xyz[:, 0] = np.linspace(-12.0 - 0.3 * t, 0.0, 16)  # history changes per window
    xyz[:, 1] = 0.02 * np.arange(-15, 1) * (1 + 0.1 * t)
    rot = np.tile(np.eye(3), (16, 1, 1))
    return frames, T0 + t * STRIDE, xyz, rot


def test_first_window_of_streaming_equals_baseline(parts, clip):
    stream = make_engine(parts, streaming=True, num_samples=2)
    base = make_engine(parts, streaming=False, num_samples=2)
    a = stream.step(*window(clip, 0))
    b = base.step(*window(clip, 0))
    assert a.full_prefill and b.full_prefill
    assert a.token_ids == b.token_ids
    assert a.reasoning == b.reasoning
    np.testing.assert_array_equal(a.xyz, b.xyz)
    np.testing.assert_array_equal(a.rot, b.rot)
    assert a.xyz.shape == (2, 64, 3) and a.yaw.shape == (2, 64) and a.rot.shape == (2, 64, 3, 3)


def snapshot_before_shift(engine):
    """Record the prompt K/V of each step right before the slot shift (test instrumentation)."""
    shots = []
    original = engine.cache.shift

    def shift(src, dst):
        n = engine.layout.prefill_len
        shots.append((engine.cache.k[:, :, :, :n].clone(), engine.cache.v[:, :, :, :n].clone()))
        original(src, dst)

    engine.cache.shift = shift
    return shots


def layer_cosine(a, b):
    """Per-layer cosine between two [layers, B, heads, n, d] caches, averaged over slots."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)  # [layers, B, heads, n]
    return cos.mean(dim=(1, 2, 3))


def test_streaming_kv_stays_close_to_fresh_prefill(parts, clip):
    stream = make_engine(parts, streaming=True)
    stream.step(*window(clip, 0))
    shots = snapshot_before_shift(stream)
    fresh = make_engine(parts, streaming=False)
    worst = 1.0
    for t in range(1, 4):
        r = stream.step(*window(clip, t))
        assert not r.full_prefill
        fresh.step(*window(clip, t))
        n = stream.layout.prefill_len
        k_s, v_s = shots[-1]
        k_f, v_f = fresh.cache.k[:, :, :, :n], fresh.cache.v[:, :, :, :n]
        # Layer 0 K/V depend on the token embedding only: shift + re-prefill must put every frame's
        # K/V exactly where a fresh prefill puts it (catches wrong slots, wrong shift, wrong images).
        torch.testing.assert_close(k_s[0], k_f[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v_s[0], v_f[0], rtol=1e-4, atol=1e-5)
        k_cos, v_cos = layer_cosine(k_s, k_f), layer_cosine(v_s, v_f)
        print(f"window {t}: K cosine per layer {[round(x, 4) for x in k_cos.tolist()]}, "
              f"V cosine {[round(x, 4) for x in v_cos.tolist()]}")
        worst = min(worst, float(k_cos.min()), float(v_cos.min()))
    # Deeper layers differ because reused frames keep K/V computed under older context. Random tiny
    # weights: measured worst layer ~0.99 after 3-4 windows; a wrong position or an unmasked stale
    # key drops it far below.
    assert worst > 0.97


def test_garbage_in_unused_cache_slots_does_not_change_output(parts, clip):
    clean = make_engine(parts, streaming=True)
    dirty = make_engine(parts, streaming=True)
    clean.step(*window(clip, 0))
    dirty.step(*window(clip, 0))
    # Everything past the prompt (old decode / <|traj_future_start|> K/V) becomes large garbage,
    # and so do the newest-frame slots that the streaming prefill overwrites.
    g = torch.Generator().manual_seed(3)
    n = dirty.layout.prefill_len
    stale = torch.cat([torch.arange(n, dirty.cache.max_len), dirty.layout.new_frame_slots()])
    for t_ in (dirty.cache.k, dirty.cache.v, dirty.cache.k_rot):
        t_[:, :, :, stale] = 1e3 * torch.randn(t_[:, :, :, stale].shape, generator=g)
    a = clean.step(*window(clip, 1))
    b = dirty.step(*window(clip, 1))
    assert not b.full_prefill
    assert a.token_ids == b.token_ids
    np.testing.assert_array_equal(a.xyz, b.xyz)


def test_reset_makes_next_step_equal_a_fresh_engine(parts, clip):
    used = make_engine(parts, streaming=True, num_samples=2)
    for t in range(2):
        used.step(*window(clip, t))
    used.reset()
    a = used.step(*window(clip, 2))
    b = make_engine(parts, streaming=True, num_samples=2).step(*window(clip, 2))
    assert a.full_prefill and b.full_prefill
    assert a.token_ids == b.token_ids
    np.testing.assert_array_equal(a.xyz, b.xyz)


def test_stream_breaks_reset_to_full_prefill(parts, clip):
    eng = make_engine(parts, streaming=True)
    assert eng.step(*window(clip, 0)).full_prefill
    assert not eng.step(*window(clip, 1)).full_prefill
    # a 0.2 s / 0.3 s gap now continues the stream with 2 / 3 new frames per view
    # (test_engine_streaming_gaps.py); 4 strides share no frame and reset
    assert eng.step(*window(clip, 5)).full_prefill  # 0.4 s gap
    assert eng.step(*window(clip, 2)).full_prefill  # t0 went backwards
    frames, t0, xyz, rot = window(clip, 3)
    small = np.ascontiguousarray(frames[:, :, :96, :])  # another image-token count -> layout change
    assert eng.step(small, t0, xyz, rot).full_prefill
    frames, t0, xyz, rot = window(clip, 4)
    assert not eng.step(np.ascontiguousarray(frames[:, :, :96, :]), t0, xyz, rot).full_prefill


def test_baseline_never_streams(parts, clip):
    eng = make_engine(parts, streaming=False)
    assert all(eng.step(*window(clip, t)).full_prefill for t in range(2))
