"""Temporal draft: the previous window's reasoning, verified inside the streaming prefill, is lossless.

The streaming prefill appends the first 8 ids of the previous window's reasoning behind the prompt and
returns the logits of the last prompt row and of each draft row; those are verified like a DFlash block
whose anchor is the last prompt token (speculative.first_block_outcome). Greedy output must be exactly
the output without it, on the eager engine and on the graphed stages, while windows whose reasoning
repeats need fewer verify passes.
"""

import numpy as np
import pytest
import torch
from stream_windows import random_clip, window

from flashdrive_ros.engine.engine import DriveEngine
from flashdrive_ros.engine.speculative import first_block_outcome, temporal_draft

torch.set_num_threads(2)
COT, TFS = 90, 91
N_WINDOWS = 5


def outcome(draft, target, max_new=64):
    out = first_block_outcome(torch.tensor(draft), torch.tensor(target), max_new, COT, TFS)
    return {k: int(v) for k, v in out.items()}


def test_draft_is_the_previous_reasoning_padded_and_closed():
    assert temporal_draft(None, 8, COT, TFS) is None
    assert temporal_draft([], 8, COT, TFS) is None
    assert temporal_draft(list(range(1, 12)), 8, COT, TFS).tolist() == list(range(1, 9))
    # a short reasoning: <|traj_future_start|> after its <|cot_end|>, then padding
    assert temporal_draft([5, 6, COT], 8, COT, TFS).tolist() == [5, 6, COT, TFS, TFS, TFS, TFS, TFS]


def test_full_partial_and_empty_acceptance():
    # target[j] is the target's id after row j (row 0 = last prompt row, row j = draft j - 1)
    full = outcome([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert (full["a"], full["emitted"], full["kept"], full["pending"], full["stop"]) == (8, 9, 8, 1, 0)
    assert full["last"] == 9
    part = outcome([1, 2, 7, 7, 7, 7, 7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert (part["a"], part["emitted"], part["kept"], part["last"]) == (2, 3, 2, 3)
    none = outcome([4, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9])
    # nothing accepted: the prefill's own first token, as without a draft block
    assert (none["a"], none["emitted"], none["kept"], none["last"], none["pending"]) == (0, 1, 0, 1, 1)


def test_accepted_cot_end_closes_the_reasoning_in_the_block():
    out = outcome([1, COT, TFS, TFS, TFS, TFS, TFS, TFS], [1, COT, TFS, 0, 0, 0, 0, 0, 0])
    assert out["stop"] and out["closed"]
    assert out["emitted"] == 2 and out["last"] == COT
    assert out["kept"] == 3            # both closing ids stay: no closing forward needed
    assert out["pending"] == 0


def test_budget_stops_inside_the_block():
    out = outcome([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9], max_new=3)
    assert out["stop"] and out["emitted"] == 3 and out["kept"] == 3 and not out["closed"]


@pytest.fixture(scope="module")
def clip():
    return random_clip(N_WINDOWS)


def run(clip, **kw):
    engine = DriveEngine.from_pretrained("tiny", max_new_tokens=24, flow_schedule="adaptive", speculative=True, **kw)
    return [engine.step(*window(clip, t)) for t in range(N_WINDOWS)]


@pytest.fixture(scope="module")
def without(clip):
    return run(clip, temporal_draft=0)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphed"])
def test_same_reasoning_and_trajectory_with_fewer_verify_passes(clip, without, graphs):
    with_ = run(clip, temporal_draft=24, cuda_graphs=graphs)
    for a, b in zip(with_, without):
        assert a.token_ids == b.token_ids
        assert a.reasoning == b.reasoning
        np.testing.assert_allclose(a.xyz, b.xyz, atol=1e-3)
        assert b.prefill_tokens == 1
    assert with_[0].prefill_tokens == 1  # full prefill: there is no previous window
    # on this clip the tiny model's reasoning repeats from window 2 on: the prefill accepts drafts
    assert max(r.prefill_tokens for r in with_[1:]) > 1
    assert sum(r.verify_passes for r in with_) < sum(r.verify_passes for r in without)
    for r in with_:
        assert r.prefill_tokens + r.tokens_per_pass * r.verify_passes == pytest.approx(r.num_tokens)


def test_sampling_and_reset_have_no_temporal_block(clip):
    sampled = run(clip, temporal_draft=True, temperature=0.7)
    assert all(r.prefill_tokens == 1 for r in sampled)
    engine = DriveEngine.from_pretrained("tiny", max_new_tokens=24, speculative=True)
    engine.step(*window(clip, 0))
    engine.reset()
    assert engine._previous_reasoning is None
    assert engine.step(*window(clip, 1)).prefill_tokens == 1
