"""Next-token choice: greedy, temperature + top-p, trajectory ids masked after top-p (alpamayo.md §6)."""

import pytest
import torch

from flashdrive_ros.engine.sampling import choose_next_token, top_p_filter

TRAJ, NTRAJ = 10, 6  # a toy vocabulary of 20 with trajectory ids 10..15


def test_greedy_never_picks_a_trajectory_id():
    logits = torch.zeros(2, 20)
    logits[0, 12] = 9.0  # most likely overall is a trajectory id
    logits[0, 3] = 5.0
    logits[1, 17] = 2.0
    assert choose_next_token(logits, TRAJ, NTRAJ).tolist() == [3, 17]


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_p_filter(probs.log(), 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    # The most likely token survives any top_p.
    assert torch.isfinite(top_p_filter(probs.log(), 0.01)).tolist() == [[True, False, False, False]]


def test_top_p_mass_is_computed_before_masking():
    # Trajectory id 12 holds 60 % of the mass: with top_p 0.9 the nucleus is {12, 1} (0.6 + 0.35),
    # masking 12 afterwards leaves only token 1. Masking first would renormalize and admit token 2.
    p = torch.full((20,), 1e-6)
    p[12], p[1], p[2] = 0.6, 0.35, 0.05
    logits = p.log().expand(64, 20).contiguous()
    g = torch.Generator().manual_seed(0)
    picks = choose_next_token(logits, TRAJ, NTRAJ, temperature=1.0, top_p=0.9, generator=g)
    assert set(picks.tolist()) == {1}


def test_sampling_is_seeded_and_follows_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0] + [0.0] * 17]).expand(4000, 20).contiguous()
    a = choose_next_token(logits, TRAJ, NTRAJ, 1.0, 1.0, torch.Generator().manual_seed(5))
    b = choose_next_token(logits, TRAJ, NTRAJ, 1.0, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not ((a >= TRAJ) & (a < TRAJ + NTRAJ)).any()
    # Frequencies follow softmax(logits / T) over the non-trajectory ids.
    allowed = torch.ones(20, dtype=torch.bool)
    allowed[TRAJ:TRAJ + NTRAJ] = False
    expected = torch.softmax(logits[0].masked_fill(~allowed, float("-inf")), -1)
    freq = torch.bincount(a, minlength=20).float() / a.numel()
    assert (freq - expected).abs().max() < 0.03
    cold = choose_next_token(logits, TRAJ, NTRAJ, 0.05, 1.0, torch.Generator().manual_seed(5))
    assert (cold == 0).all()


def test_nucleus_of_only_trajectory_ids_falls_back_to_best_text_token():
    logits = torch.full((1, 20), -5.0)
    logits[0, 11] = 20.0
    logits[0, 4] = 1.0
    pick = choose_next_token(logits, TRAJ, NTRAJ, 0.6, 0.98, torch.Generator().manual_seed(0))
    assert pick.tolist() == [4]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"logits must be \[B, V\]"):
        choose_next_token(torch.zeros(20), TRAJ, NTRAJ)
    with pytest.raises(ValueError, match="top_p"):
        choose_next_token(torch.zeros(1, 20), TRAJ, NTRAJ, 1.0, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        choose_next_token(torch.zeros(1, 20), TRAJ, NTRAJ, -1.0)
    with pytest.raises(ValueError, match="exceed vocab"):
        choose_next_token(torch.zeros(1, 12), TRAJ, NTRAJ)


@pytest.mark.parametrize("top_p, scale", [(0.98, 1.0), (0.5, 1.0), (0.98, 8.0), (0.9, 0.1), (1.0, 1.0)])
def test_fast_nucleus_is_the_top_p_filter_set(top_p, scale):
    from flashdrive_ros.engine.sampling import nucleus

    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1)) * scale
    vals, ids, keep = nucleus(logits.softmax(-1), top_p)
    for row in range(3):
        fast = set(ids[row][keep[row]].tolist())
        reference = set(torch.nonzero(torch.isfinite(top_p_filter(logits[row:row + 1], top_p)[0])).flatten().tolist())
        # Floating-point cumsum order may move the single boundary token; nothing else differs.
        assert len(fast ^ reference) <= 1
        assert len(fast) > 0
