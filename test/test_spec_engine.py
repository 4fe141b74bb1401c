"""DriveEngine(speculative=True) == DriveEngine(speculative=False) for greedy reasoning, window by window.

Uses whatever `DriveEngine.from_pretrained("tiny")` loads (the trained tiny checkpoint once it ships,
random weights before), with the shipped drafter (assets/tiny_dflash) if present and with an untrained
random drafter: losslessness must not depend on draft quality. Streaming windows of random 128x128
frames (16 image tokens each), as in test_engine_pipeline_streaming.py.
"""

import numpy as np
import pytest
import torch
from stream_windows import random_clip, window

from flashdrive_ros.engine.engine import DriveEngine
from flashdrive_ros.engine.speculative import Drafter

torch.set_num_threads(2)
MAX_NEW = 24
N_WINDOWS = 4


@pytest.fixture(scope="module")
def clip():
    return random_clip(N_WINDOWS)


def run(engine, clip):
    return [engine.step(*window(clip, t)) for t in range(N_WINDOWS)]


@pytest.fixture(scope="module")
def reference(clip):
    base = DriveEngine.from_pretrained("tiny", max_new_tokens=MAX_NEW, flow_schedule="adaptive")
    return base, run(base, clip)


@pytest.mark.parametrize("which", ["default", "random"])
def test_speculative_greedy_reasoning_identical_to_autoregressive(clip, reference, which):
    base, ref = reference
    kw = dict(max_new_tokens=MAX_NEW, flow_schedule="adaptive", speculative=True)
    if which == "random":
        kw["drafter"] = Drafter.for_target(base.model, seed=99)
    spec = DriveEngine.from_pretrained("tiny", **kw)
    out = run(spec, clip)
    for a, b in zip(out, ref):
        assert a.token_ids == b.token_ids
        assert a.reasoning == b.reasoning
        assert a.num_tokens == b.num_tokens
        assert a.full_prefill == b.full_prefill
        # no verify pass only when the prefill emitted the whole reasoning (its first id, or the
        # previous window's reasoning accepted as a temporal draft block)
        assert a.verify_passes >= 1 or a.num_tokens == a.prefill_tokens
        # the expert sees the same context (up to 8-row vs 1-row float rounding) -> same trajectory
        np.testing.assert_allclose(a.xyz, b.xyz, atol=1e-3)
        assert a.tokens_per_pass >= 1.0 or a.verify_passes == 0


def test_speculative_stats_and_drafter_path(clip, reference, tmp_path):
    from flashdrive_ros.engine.speculative import save_drafter

    base, ref = reference
    save_drafter(Drafter.for_target(base.model, seed=5), tmp_path / "d")
    spec = DriveEngine.from_pretrained("tiny", max_new_tokens=MAX_NEW, flow_schedule="adaptive",
                                       speculative=True, drafter=str(tmp_path / "d"))
    r = spec.step(*window(clip, 0))
    assert r.token_ids == ref[0].token_ids
    assert str(tmp_path / "d") in spec.weights_description
    assert 1 <= r.verify_passes <= r.num_tokens
    assert 1.0 <= r.tokens_per_pass <= 8.0
