"""DriveEngine's fast path (cuda_graphs=True: fused projections + graphs.StageGraph per stage) against
the eager engine, on the tiny random model (CPU, float32). On the CPU StageGraph runs the stage
functions eagerly on its static buffers, so this is the same code path as on CUDA minus the capture.

The trained tiny checkpoint (assets/tiny). Two separate model instances: fusion swaps module classes in place, the eager engine must stay unfused.
"""

import numpy as np
import pytest
import torch

from flashdrive_ros.engine import graphs as G
from flashdrive_ros.engine.engine import DriveEngine
from flashdrive_ros.engine.loader import TINY_DIR, create_tiny, load_model, save_model
from flashdrive_ros.engine.tokens import load_tokenizer

torch.set_num_threads(2)

H, W = 128, 128
T0 = 1_700_000
STRIDE = 100_000
MAX_NEW = 4


def _parts():
    # the shipped trained tiny checkpoint: random weights make the 10-step flow chaotic (float32 rounding
    # of 1e-7 per velocity grows to 1e-2 over the steps), trained ones keep it smooth
    model = load_model(TINY_DIR, torch.float32, torch.device("cpu"))
    tokenizer = load_tokenizer(TINY_DIR, model.cfg.traj_token_start_idx, model.cfg.traj_vocab_size)
    return model, tokenizer


@pytest.fixture(scope="module")
def eager_parts():
    return _parts()


@pytest.fixture(scope="module")
def fast_parts():
    return _parts()


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(11)
    n = 4
    return rng.integers(0, 256, (4, n + 3, H, W, 3), dtype=np.uint8)


def window(clip, t):
    frames = np.ascontiguousarray(clip[:, t:t + 4])
    xyz = np.zeros((16, 3))
    xyz[:, 0] = np.linspace(-12.0 - 0.3 * t, 0.0, 16)
    xyz[:, 1] = 0.02 * np.arange(-15, 1) * (1 + 0.1 * t)
    rot = np.tile(np.eye(3), (16, 1, 1))
    return frames, T0 + t * STRIDE, xyz, rot


def make(parts, graphs, **kw):
    model, tokenizer = parts
    kw.setdefault("max_new_tokens", MAX_NEW)
    return DriveEngine(model, tokenizer, cuda_graphs=graphs, **kw)


def assert_same(a, b):
    assert a.token_ids == b.token_ids
    assert a.reasoning == b.reasoning
    assert a.num_tokens == b.num_tokens and a.verify_passes == b.verify_passes
    assert a.full_prefill == b.full_prefill
    np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.yaw, b.yaw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.rot, b.rot, rtol=1e-4, atol=1e-4)
    assert set(a.timings_ms) == set(b.timings_ms)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("flow,k", [("uniform", 1), ("adaptive", 6)])
def test_fast_path_equals_eager(eager_parts, fast_parts, clip, streaming, flow, k):
    eager = make(eager_parts, False, streaming=streaming, flow_schedule=flow, num_samples=k)
    fast = make(fast_parts, True, streaming=streaming, flow_schedule=flow, num_samples=k)
    assert eager._fast is None and fast._fast is not None
    assert isinstance(fast.model.language_model.layers[0].self_attn, G.FusedAttention)
    assert not isinstance(eager.model.language_model.layers[0].self_attn, G.FusedAttention)
    for t in range(4):
        a, b = fast.step(*window(clip, t)), eager.step(*window(clip, t))
        assert a.full_prefill == (t == 0 or not streaming)
        assert_same(a, b)
    assert a.xyz.shape == (k, 64, 3)
    # graphs are built once per stage and shape, then reused across windows
    stages = {key[0] for key in fast._fast.graphs}
    expected = {"encode", "full_prefill", "decode", "close", "action"} | ({"stream_prefill", "shift"} if streaming else set())
    assert stages == expected
    built = fast._fast.builds
    fast.step(*window(clip, 0 if not streaming else 3))  # streaming: t0 not +0.1 s -> full prefill again
    assert fast._fast.builds == built


def test_fast_path_mixed_flow_and_reset(eager_parts, fast_parts, clip):
    """K=1 adaptive and K=6 uniform; a reset in the middle of a stream; cache rebuilt on a new budget."""
    for flow, k in (("adaptive", 1), ("uniform", 6)):
        eager = make(eager_parts, False, streaming=True, flow_schedule=flow, num_samples=k)
        fast = make(fast_parts, True, streaming=True, flow_schedule=flow, num_samples=k)
        for t in range(3):
            if t == 2:
                eager.reset()
                fast.reset()
            assert_same(fast.step(*window(clip, t)), eager.step(*window(clip, t)))


def test_fast_path_budget_exhausted_and_sampling(eager_parts, fast_parts, clip):
    """max_new_tokens=1 forces <|cot_end|>; temperature > 0 samples outside the graph (same generator)."""
    for kw in ({"max_new_tokens": 1}, {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 6}):
        eager = make(eager_parts, False, streaming=True, flow_schedule="adaptive", **kw)
        fast = make(fast_parts, True, streaming=True, flow_schedule="adaptive", **kw)
        for t in range(3):
            assert_same(fast.step(*window(clip, t)), eager.step(*window(clip, t)))


def test_default_is_off_on_cpu_and_from_pretrained_flag():
    e = DriveEngine.from_pretrained("tiny", device="cpu")
    assert e.cuda_graphs is False and e._fast is None
    assert not any(isinstance(m, G.FusedAttention) for m in e.model.modules())
    f = DriveEngine.from_pretrained("tiny", device="cpu", cuda_graphs=True, max_new_tokens=2)
    assert f.cuda_graphs is True and f._fast is not None
    assert any(isinstance(m, G.FusedAttention) for m in f.model.modules())


def test_fused_model_save_load_roundtrip(tmp_path):
    model = create_tiny(3)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    assert G.fuse_projections(model) > 0
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", torch.float32, torch.device("cpu"))
    state = loaded.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    # the fused model itself is unchanged by saving (still shares storage with its fused buffers)
    attn = model.language_model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()


def test_speculative_with_fast_prefill_and_action(clip):
    """Speculative decoding stays eager (on the fused modules); its prefill (with the drafter context),
    encode and action go through the graphs and give the eager engine's tokens and trajectories."""
    kw = dict(speculative=True, streaming=True, flow_schedule="adaptive", max_new_tokens=6)
    eager = DriveEngine.from_pretrained("tiny", device="cpu", cuda_graphs=False, **kw)
    fast = DriveEngine.from_pretrained("tiny", device="cpu", cuda_graphs=True, **kw)
    for t in range(3):
        assert_same(fast.step(*window(clip, t)), eager.step(*window(clip, t)))
    assert "stream_prefill" in {key[0] for key in fast._fast.graphs}
    assert "decode" not in {key[0] for key in fast._fast.graphs}
