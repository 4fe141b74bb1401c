"""DriveEngine API: input validation, StepResult contents, timings, K samples, flow schedules, sampling."""

import numpy as np
import pytest
import torch

from flashdrive_ros.engine import CAMERA_NAMES, DriveEngine, StepResult
from flashdrive_ros.engine.loader import TINY_DIR, create_tiny
from flashdrive_ros.engine.tokens import load_tokenizer

H, W = 128, 128
T0 = 2_000_000


@pytest.fixture(scope="module")
def parts():
    model = create_tiny(0)
    tokenizer = load_tokenizer(TINY_DIR, model.cfg.traj_token_start_idx, model.cfg.traj_vocab_size)
    return model, tokenizer


def make_engine(parts, **kw):
    kw.setdefault("max_new_tokens", 4)
    kw.setdefault("flow_schedule", "adaptive")
    return DriveEngine(*parts, **kw)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (4, 4, H, W, 3), dtype=np.uint8)
    xyz = np.zeros((16, 3))
    xyz[:, 0] = np.linspace(-15.0, 0.0, 16)  # 10 m/s straight ahead
    rot = np.tile(np.eye(3), (16, 1, 1))
    return frames, T0, xyz, rot


def test_step_result_contents(parts):
    eng = make_engine(parts, num_samples=1)
    r = eng.step(*inputs())
    assert isinstance(r, StepResult)
    assert r.xyz.shape == (1, 64, 3) and r.xyz.dtype == np.float32
    assert r.yaw.shape == (1, 64) and r.rot.shape == (1, 64, 3, 3)
    assert np.isfinite(r.xyz).all()
    assert isinstance(r.reasoning, str)
    assert 1 <= r.num_tokens <= 4 and r.t0_us == T0 and r.full_prefill
    assert r.verify_passes >= r.num_tokens and r.tokens_per_pass > 0
    # The trajectory starts from the history speed (10 m/s): first waypoint about 1 m ahead.
    assert 0.5 < r.xyz[0, 0, 0] < 1.5
    # The decoded ids end with <|cot_end|> (emitted or forced at the token budget).
    assert r.token_ids[-1] == eng.ids.cot_end
    assert len(CAMERA_NAMES) == 4


def test_timings_cover_all_stages_and_sum_below_total(parts):
    eng = make_engine(parts)
    for t in range(2):
        frames, t0, xyz, rot = inputs(t)
        r = eng.step(frames, t0 + t * 100_000, xyz, rot)
        assert set(r.timings_ms) == {"preprocess", "encode", "prefill", "decode", "action", "total"}
        assert all(v >= 0 for v in r.timings_ms.values())
        stages = sum(v for k, v in r.timings_ms.items() if k != "total")
        assert stages <= r.timings_ms["total"] + 1e-6
        assert r.timings_ms["encode"] > 0 and r.timings_ms["action"] > 0


def test_six_samples_in_one_expert_batch_and_adaptive_uses_four_evaluations(parts):
    eng = make_engine(parts, num_samples=6, flow_schedule="adaptive")
    batches = []
    hook = eng.model.expert.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        r = eng.step(*inputs())
    finally:
        hook.remove()
    assert batches == [6, 6, 6, 6]  # 4 function evaluations, all 6 samples in each
    assert r.xyz.shape == (6, 64, 3)
    flat = r.xyz.reshape(6, -1)
    for i in range(6):
        for j in range(i + 1, 6):
            assert not np.allclose(flat[i], flat[j]), f"samples {i} and {j} are identical"


def test_uniform_flow_uses_ten_evaluations(parts):
    eng = make_engine(parts, num_samples=2, flow_schedule="uniform")
    calls = []
    hook = eng.model.expert.register_forward_hook(lambda m, args, out: calls.append(1))
    try:
        eng.step(*inputs())
    finally:
        hook.remove()
    assert len(calls) == 10


def test_same_seed_same_window_same_result_and_seed_matters(parts):
    a = make_engine(parts, temperature=1.0, top_p=0.98, seed=5).step(*inputs())
    b = make_engine(parts, temperature=1.0, top_p=0.98, seed=5).step(*inputs())
    c = make_engine(parts, temperature=1.0, top_p=0.98, seed=6).step(*inputs())
    assert a.token_ids == b.token_ids
    np.testing.assert_array_equal(a.xyz, b.xyz)
    assert not np.allclose(a.xyz, c.xyz)  # other noise seed -> other trajectory


def test_token_budget_forces_cot_end(parts):
    eng = make_engine(parts, max_new_tokens=1)
    r = eng.step(*inputs())
    assert r.num_tokens == 1
    assert r.token_ids[-1] == eng.ids.cot_end


@pytest.mark.parametrize("change, message", [
    (lambda f, x, r: (f.astype(np.float32), x, r), "uint8"),
    (lambda f, x, r: (f[:3], x, r), "3 cameras"),
    (lambda f, x, r: (f[:, :3], x, r), "3 frames per camera"),
    (lambda f, x, r: (f[..., :2], x, r), r"\[n_cams=4, 4, H, W, 3\]"),
    (lambda f, x, r: (f, np.where(np.arange(48).reshape(16, 3) == 5, np.nan, x), r), "ego_history_xyz contains NaN"),
    (lambda f, x, r: (f, x[:15], r), r"ego_history_xyz must be \[16, 3\]"),
    (lambda f, x, r: (f, x, r[:, :2]), r"ego_history_rot must be \[16, 3, 3\]"),
    (lambda f, x, r: (f, x, np.where(r == 1.0, np.inf, r)), "ego_history_rot contains NaN or inf"),
])
def test_bad_inputs_raise_clear_errors(parts, change, message):
    eng = make_engine(parts)
    frames, t0, xyz, rot = inputs()
    f, x, r = change(frames, xyz, rot)
    with pytest.raises(ValueError, match=message):
        eng.step(f, t0, x, r)


def test_bad_t0_and_options(parts):
    eng = make_engine(parts)
    frames, _, xyz, rot = inputs()
    with pytest.raises(ValueError, match="t0_us must be an integer"):
        eng.step(frames, 1.5, xyz, rot)
    with pytest.raises(ValueError, match="num_samples"):
        make_engine(parts, num_samples=0)
    with pytest.raises(ValueError, match="flow schedule"):
        make_engine(parts, flow_schedule="heun")
    with pytest.raises(ValueError, match="top_p"):
        make_engine(parts, top_p=0.0)


def test_from_pretrained_tiny():
    eng = DriveEngine.from_pretrained("tiny", device="cpu", dtype="float32", max_new_tokens=2,
                                      flow_schedule="adaptive", streaming=True)
    assert eng.weights_description
    r = eng.step(*inputs())
    assert r.xyz.shape == (1, 64, 3) and r.full_prefill
    assert next(eng.model.parameters()).dtype == torch.float32


def _nested(frames):
    """The same window as 4 lists of 4 [H, W, 3] arrays (how the drive node hands over decoded frames)."""
    return [[frames[c, k] for k in range(4)] for c in range(4)]


def test_nested_frames_give_the_same_steps_as_one_array(parts):
    """A window given as per-camera lists of frames is the same input as the [4, 4, H, W, 3] array: full
    prefill, then streaming windows, equal tokens and trajectories."""
    a, b = make_engine(parts), make_engine(parts)
    for w in range(3):
        frames, t0, xyz, rot = inputs(w)
        ra = a.step(frames, t0 + w * 100_000, xyz, rot)
        rb = b.step(_nested(frames), t0 + w * 100_000, xyz, rot)
        assert ra.full_prefill == rb.full_prefill == (w == 0)
        assert ra.token_ids == rb.token_ids
        np.testing.assert_array_equal(ra.xyz, rb.xyz)


def test_streaming_step_reads_only_the_newest_frame_of_each_camera(parts):
    """The three older frames of every camera are in the cache already: a streaming step must not need them."""
    eng = make_engine(parts)
    frames, t0, xyz, rot = inputs(0)
    eng.step(frames, t0, xyz, rot)
    frames2 = inputs(1)[0]
    ref = make_engine(parts)
    ref.step(frames, t0, xyz, rot)
    r_ref = ref.step(frames2, t0 + 100_000, xyz, rot)
    nested = _nested(frames2)
    for cam in nested:
        for k in range(3):
            cam[k] = np.full_like(cam[k], 255)  # anything: a streaming step does not look at it
    r = eng.step(nested, t0 + 100_000, xyz, rot)
    assert not r.full_prefill and r.token_ids == r_ref.token_ids
    np.testing.assert_array_equal(r.xyz, r_ref.xyz)


@pytest.mark.parametrize("change, message", [
    (lambda n: n[:3], "3 cameras"),
    (lambda n: [cam[:3] for cam in n], "3 frames per camera"),
    (lambda n: [[im.astype(np.float32) for im in cam] for cam in n], r"uint8 RGB, got dtype float32 at \[0\]\[0\]"),
    (lambda n: [n[0][:3] + [n[0][3][:64]]] + n[1:], r"frames\[0\]\[3\] is 128x64, frames\[0\]\[0\] is 128x128"),
    (lambda n: [n[0], n[1], n[2], n[3][:3] + [n[3][3][..., :1]]], r"frames\[3\]\[3\] must be \[H, W, 3\] RGB"),
    (lambda n: [n[0], n[1], [None] * 4, n[3]], r"frames\[2\]\[0\] must be a numpy array or torch tensor, got NoneType"),
    (lambda n: [n[0], 7, n[2], n[3]], r"frames\[1\] must be a sequence of 4 frames, got int"),
    (lambda n: {"front": n}, "got dict"),
])
def test_bad_nested_frames_raise_clear_errors(parts, change, message):
    eng = make_engine(parts)
    frames, t0, xyz, rot = inputs()
    with pytest.raises(ValueError, match=message):
        eng.step(change(_nested(frames)), t0, xyz, rot)


def test_frames_may_be_torch_tensors(parts):
    """Frames decoded straight to torch tensors (the node's nvJPEG path) are the same input as numpy frames."""
    frames, t0, xyz, rot = inputs(0)
    ra = make_engine(parts).step(frames, t0, xyz, rot)
    nested = [[torch.from_numpy(frames[c, k].copy()) for k in range(4)] for c in range(4)]
    rb = make_engine(parts).step(nested, t0, xyz, rot)
    assert ra.token_ids == rb.token_ids
    np.testing.assert_array_equal(ra.xyz, rb.xyz)
