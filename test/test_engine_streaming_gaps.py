"""Streaming across dropped windows: a t0 gap of k = 2 or 3 strides reuses frames k..3 of the previous
window as frames 0..3-k and encodes only the newest k frames per view.

Layout tests use the synthetic 4 views x 4 frames x 3-slot layout of test_engine_streaming_layout.py
(rebuilt here); engine tests use the tiny random model (eager) and the trained tiny checkpoint
(cuda_graphs=True forced on CPU vs eager), CPU float32.
"""

import numpy as np
import pytest
import torch

from flashdrive_ros.engine.engine import DriveEngine
from flashdrive_ros.engine.loader import TINY_DIR, create_tiny, load_model
from flashdrive_ros.engine.streaming import StreamingLayout
from flashdrive_ros.engine.tokens import load_tokenizer
from test_engine_streaming_layout import classify  # slot kind from the ranges only

torch.set_num_threads(2)

TEXT, VS, VE, IMG = 0, 1, 2, 3
N_VIEWS, N_FRAMES, PREFIX, TAIL = 4, 4, 2, 3


# ------------------------------------------------------------------------------ synthetic layout
def synthetic_ids() -> list[int]:
    ids = [TEXT] * PREFIX
    for _v in range(N_VIEWS):
        for f in range(N_FRAMES):
            ids += [TEXT] * (2 if f == 0 else 1)
            ids += [VS, IMG, VE]
    return ids + [TEXT] * TAIL


@pytest.fixture
def layout() -> StreamingLayout:
    return StreamingLayout.from_ids(synthetic_ids(), VS, VE, N_VIEWS, N_FRAMES, prefix_len=PREFIX)


def expected_visible(q_slot: int, k_slot: int, layout: StreamingLayout, k: int) -> bool:
    """The rule of the brief, written per cell class (independent of the mask code)."""
    qk, qv, qf, qo = classify(q_slot, layout)
    kk, kv, kf, ko = classify(k_slot, layout)
    first_new = layout.n_frames - k
    if kk == "beyond":
        return False  # stale decode / action slots
    if kk == "prefix":
        return True  # system prefix
    if qk == "tail":
        return kk in ("label", "frame") or ko <= qo  # every view slot, the tail causally
    assert qk == "frame" and qf >= first_new  # only new frames are query rows
    if kk == "tail" or kv > qv:
        return False
    if kv < qv:
        return True  # all slots of earlier views
    if kk == "label":
        return kf <= qf  # labels of its view up to the one in front of its own frame
    if kf < first_new:
        return True  # reused frames of its view
    if kf < qf:
        return True  # an earlier new frame of its view, completely
    if kf == qf:
        return ko <= qo  # its own new frame causally
    return False  # a later new frame


@pytest.mark.parametrize("k", [1, 2, 3])
def test_query_slots_are_last_k_frames_of_each_view_then_tail(layout, k):
    expected = []
    for v in range(N_VIEWS):
        for f in range(N_FRAMES - k, N_FRAMES):  # oldest first
            expected += list(range(*layout.frame_slots[v][f]))
    expected += list(range(*layout.tail))
    assert layout.streaming_query_slots(k).tolist() == expected
    assert layout.new_frame_slots(k).tolist() == expected[: N_VIEWS * k * 3]


@pytest.mark.parametrize("k", [2, 3])
def test_streaming_mask_cell_by_cell(layout, k):
    max_len = layout.prefill_len + 10
    mask = layout.streaming_mask(max_len, k=k)
    q_slots = layout.streaming_query_slots(k).tolist()
    assert mask.shape == (1, 1, N_VIEWS * k * 3 + TAIL, max_len)
    neg = torch.finfo(torch.float32).min
    for row, q_slot in enumerate(q_slots):
        for k_slot in range(max_len):
            want = 0.0 if expected_visible(q_slot, k_slot, layout, k) else neg
            assert mask[0, 0, row, k_slot].item() == want, (k, row, classify(q_slot, layout), classify(k_slot, layout))


def test_k1_is_todays_layout(layout):
    """k = 1 gives exactly the default (single-frame) indices and mask."""
    n = layout.prefill_len + 10
    assert torch.equal(layout.streaming_query_slots(1), layout.streaming_query_slots())
    assert torch.equal(layout.streaming_mask(n, k=1), layout.streaming_mask(n))
    for a, b in zip(layout.shift_indices(k=1), layout.shift_indices()):
        assert torch.equal(a, b)
    mask = layout.streaming_mask(n)[0, 0]  # and the general rule at k = 1 is today's rule
    for row, q in enumerate(layout.streaming_query_slots().tolist()):
        for s in range(n):
            assert bool(mask[row, s] == 0) == expected_visible(q, s, layout, 1), (row, s)


def test_mask_spot_checks_k2(layout):
    mask = layout.streaming_mask(layout.prefill_len + 4, k=2)[0, 0]
    q = layout.streaming_query_slots(2).tolist()
    v1_f2 = q.index(layout.frame_slots[1][2][0])  # first row of view 1's older new frame
    v1_f3 = q.index(layout.frame_slots[1][3][0])
    assert mask[v1_f2, layout.frame_slots[1][1][1] - 1] == 0  # sees reused F1 of its view
    assert mask[v1_f2, layout.frame_slots[1][3][0]] < 0  # not the newer new frame
    assert mask[v1_f3, layout.frame_slots[1][2][1] - 1] == 0  # the newer sees the whole older new frame
    assert mask[v1_f3, layout.label_slots[1][3][0]] == 0  # and its own label
    assert mask[v1_f3, layout.frame_slots[1][3][0] + 1] < 0  # not its own later token
    assert mask[v1_f2, layout.frame_slots[0][3][1] - 1] == 0  # all of view 0
    assert mask[v1_f3, layout.frame_slots[2][0][0]] < 0  # not view 2


@pytest.mark.parametrize("k", [2, 3])
def test_shift_by_k_moves_frames_k_slots_left_per_view(layout, k):
    src, dst = layout.shift_indices(k=k)
    assert src.shape == dst.shape == (N_VIEWS * (N_FRAMES - k) * 3,)
    cache = torch.arange(layout.prefill_len + 5)
    before = cache.clone()
    cache[dst] = cache[src]  # one index copy
    for v in range(N_VIEWS):
        for f in range(N_FRAMES):
            got = cache[slice(*layout.frame_slots[v][f])].tolist()
            src_f = f + k if f + k < N_FRAMES else f  # frames 4-k..3 keep (stale) contents
            assert got == before[slice(*layout.frame_slots[v][src_f])].tolist(), (v, f)
            lab = slice(*layout.label_slots[v][f])
            assert cache[lab].tolist() == before[lab].tolist()
    assert cache[:PREFIX].tolist() == before[:PREFIX].tolist()
    assert cache[layout.tail[0]:].tolist() == before[layout.tail[0]:].tolist()


def test_shift_one_then_k_minus_one_equals_shift_k(layout):
    """The engine's cache invariant: end-of-step shift by 1, then k - 1 at the next window's start."""
    for k in (2, 3):
        a = torch.arange(layout.prefill_len)
        b = a.clone()
        for kk in (1, k - 1):
            s, d = layout.shift_indices(k=kk)
            a[d] = a[s]
        s, d = layout.shift_indices(k=k)
        b[d] = b[s]
        reused = torch.cat([torch.arange(*layout.frame_slots[v][f])
                            for v in range(N_VIEWS) for f in range(N_FRAMES - k)])
        assert torch.equal(a[reused], b[reused])


def test_bad_k_rejected(layout):
    for k in (0, 4):
        with pytest.raises(ValueError, match="new frames per view"):
            layout.streaming_query_slots(k)
        with pytest.raises(ValueError, match="new frames per view"):
            layout.shift_indices(k=k)


# ------------------------------------------------------------------------------ engine
H, W = 128, 128
T0 = 1_700_000
STRIDE = 100_000


@pytest.fixture(scope="module")
def parts():
    model = create_tiny(0)
    tokenizer = load_tokenizer(TINY_DIR, model.cfg.traj_token_start_idx, model.cfg.traj_vocab_size)
    return model, tokenizer


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (4, 11 + 3, H, W, 3), dtype=np.uint8)  # windows 0..10


def window(clip, t):
    frames = np.ascontiguousarray(clip[:, t:t + 4])
    xyz = np.zeros((16, 3))
    xyz[:, 0] = np.linspace(-12.0 - 0.3 * t, 0.0, 16)
    xyz[:, 1] = 0.02 * np.arange(-15, 1) * (1 + 0.1 * t)
    rot = np.tile(np.eye(3), (16, 1, 1))
    return frames, T0 + t * STRIDE, xyz, rot


def make_engine(parts, **kw):
    model, tokenizer = parts
    kw.setdefault("max_new_tokens", 4)
    kw.setdefault("flow_schedule", "adaptive")
    return DriveEngine(model, tokenizer, **kw)


def test_gap_to_k_rule(parts, clip):
    eng = make_engine(parts, streaming=True)
    eng.step(*window(clip, 0))
    last = eng._last_t0
    cases = {49_999: 0, 50_000: 1, 100_000: 1, 150_000: 1, 150_001: 2, 200_000: 2, 250_000: 2,
             250_001: 3, 300_000: 3, 350_000: 3, 350_001: 0, 400_000: 0, 0: 0, -100_000: 0}
    got = {gap: eng._continues_stream(last + gap) for gap in cases}
    assert got == cases
    assert make_engine(parts, streaming=False)._continues_stream(last + STRIDE) == 0


def snapshot_before_shift(engine):
    """Prompt K/V at each shift call; the last call of a step is its end-of-step shift."""
    shots, original = [], engine.cache.shift

    def shift(src, dst):
        n = engine.layout.prefill_len
        shots.append((engine.cache.k[:, :, :, :n].clone(), engine.cache.v[:, :, :, :n].clone()))
        original(src, dst)

    engine.cache.shift = shift
    return shots


def count_encoded(engine):
    """Record how many images each encode call gets."""
    counts, original = [], engine.model.encode_images

    def encode(pixels, grid_thw):
        counts.append(int(grid_thw.shape[0]))
        return original(pixels, grid_thw)

    engine.model.encode_images = encode
    return counts, lambda: delattr(engine.model, "encode_images")


def layer_cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean(dim=(1, 2, 3))


def test_gaps_of_1_2_3_strides_keep_streaming_close_to_fresh(parts, clip):
    stream = make_engine(parts, streaming=True)
    fresh = make_engine(parts, streaming=False)
    counts, restore = count_encoded(stream)
    try:
        assert stream.step(*window(clip, 0)).full_prefill
        shots = snapshot_before_shift(stream)
        worst, t = 1.0, 0
        for k in (1, 2, 3, 2):  # t0 steps 0.1, 0.2, 0.3, 0.2 s
            t += k
            r = stream.step(*window(clip, t))
            assert not r.full_prefill, (t, k)
            assert counts[-1] == 4 * k  # only the newest k frames of each camera were encoded
            fresh.step(*window(clip, t))
            n = stream.layout.prefill_len
            k_s, v_s = shots[-1]
            k_f, v_f = fresh.cache.k[:, :, :, :n], fresh.cache.v[:, :, :, :n]
            # layer 0 depends on the token embedding only: every reused and new frame at its slot
            torch.testing.assert_close(k_s[0], k_f[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v_s[0], v_f[0], rtol=1e-4, atol=1e-5)
            k_cos, v_cos = layer_cosine(k_s, k_f), layer_cosine(v_s, v_f)
            print(f"window {t} (k={k}): K cosine {[round(x, 4) for x in k_cos.tolist()]}, "
                  f"V cosine {[round(x, 4) for x in v_cos.tolist()]}")
            worst = min(worst, float(k_cos.min()), float(v_cos.min()))
        assert worst > 0.97  # same bound as the k = 1 test (test_engine_pipeline_streaming.py)
    finally:
        restore()


def test_gap_of_four_strides_or_backwards_resets(parts, clip):
    eng = make_engine(parts, streaming=True)
    assert eng.step(*window(clip, 0)).full_prefill
    assert eng.step(*window(clip, 4)).full_prefill  # 0.4 s: no shared frame
    assert not eng.step(*window(clip, 7)).full_prefill  # 0.3 s
    assert eng.step(*window(clip, 5)).full_prefill  # backwards


# ------------------------------------------------------------------------------ fast path
def _trained_parts():
    model = load_model(TINY_DIR, torch.float32, torch.device("cpu"))
    tokenizer = load_tokenizer(TINY_DIR, model.cfg.traj_token_start_idx, model.cfg.traj_vocab_size)
    return model, tokenizer


def test_fast_path_k2_k3_equal_eager(clip):
    eager_parts, fast_parts = _trained_parts(), _trained_parts()  # fusion swaps modules in place
    kw = dict(streaming=True, flow_schedule="adaptive", max_new_tokens=4)
    eager = DriveEngine(*eager_parts, cuda_graphs=False, **kw)
    fast = DriveEngine(*fast_parts, cuda_graphs=True, **kw)
    for t, full in ((0, True), (2, False), (5, False), (6, False), (8, False)):  # k = -, 2, 3, 1, 2
        a, b = fast.step(*window(clip, t)), eager.step(*window(clip, t))
        assert a.full_prefill == b.full_prefill == full
        assert a.token_ids == b.token_ids and a.reasoning == b.reasoning
        np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.yaw, b.yaw, rtol=1e-4, atol=1e-4)
    stream_keys = {key[2] for key in fast._fast.graphs if key[0] == "stream_prefill"}
    assert stream_keys == {1, 2, 3}  # one streaming prefill graph per k
    built = fast._fast.builds
    a, b = fast.step(*window(clip, 10)), eager.step(*window(clip, 10))  # k = 2 again: graph reused
    assert not a.full_prefill and a.token_ids == b.token_ids
    np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-4, atol=1e-4)
    assert fast._fast.builds == built
