"""speculative=True (DFlash draft + verify) inside the engine: greedy output is the autoregressive output."""

import numpy as np
import pytest

from flashdrive_ros.engine.engine import DriveEngine
from flashdrive_ros.engine.loader import TINY_DIR, create_tiny
from flashdrive_ros.engine.tokens import load_tokenizer

speculative = pytest.importorskip("flashdrive_ros.engine.speculative")


def window(t, rng=np.random.default_rng(11), clip={}):
    if "frames" not in clip:
        clip["frames"] = rng.integers(0, 256, (4, 8, 128, 128, 3), dtype=np.uint8)
    xyz = np.zeros((16, 3))
    xyz[:, 0] = np.linspace(-10.0 - t, 0.0, 16)
    return np.ascontiguousarray(clip["frames"][:, t:t + 4]), 3_000_000 + 100_000 * t, xyz, np.tile(np.eye(3), (16, 1, 1))


def test_greedy_speculative_equals_autoregressive_in_streaming_and_full_windows():
    model = create_tiny(0)
    tok = load_tokenizer(TINY_DIR, model.cfg.traj_token_start_idx, model.cfg.traj_vocab_size)
    drafter = speculative.Drafter.for_target(model, seed=1)  # random drafter: few accepts, same output
    kw = dict(max_new_tokens=12, flow_schedule="adaptive", streaming=True)
    spec = DriveEngine(model, tok, speculative=True, drafter=drafter, **kw)
    plain = DriveEngine(model, tok, **kw)
    for t in range(2):
        a, b = spec.step(*window(t)), plain.step(*window(t))
        assert a.full_prefill == b.full_prefill == (t == 0)
        assert a.token_ids == b.token_ids
        assert a.num_tokens == b.num_tokens
        np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-4, atol=1e-4)
        assert 1 <= a.verify_passes <= a.num_tokens and 1.0 <= a.tokens_per_pass <= 8.0
        assert b.verify_passes == b.num_tokens and b.tokens_per_pass == 1.0


def test_speculative_needs_a_drafter():
    model = create_tiny(0)
    tok = load_tokenizer(TINY_DIR, model.cfg.traj_token_start_idx, model.cfg.traj_vocab_size)
    with pytest.raises(ValueError, match="needs a drafter"):
        DriveEngine(model, tok, speculative=True)
