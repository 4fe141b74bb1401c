"""Speculative action drafting with fallback (engine/action_draft.py): the previous window's plan, advanced
by the stride, is checked by one expert evaluation and replaces the flow when the model's estimate stays
within tolerance; otherwise, or whenever a phase rule says so, the full flow runs."""

import math

import numpy as np
import pytest
import torch

from flashdrive_ros.engine import DriveEngine
from flashdrive_ros.engine.action_draft import ActionDraftPolicy, ActionDrafter, advance, trajectory_gap_m
from flashdrive_ros.engine.action_space import UnicycleActionSpace
from flashdrive_ros.engine.flow import one_step_estimate
from stream_windows import random_clip, window

SPACE = UnicycleActionSpace()


def plan(seed: int = 0, k: int = 1) -> torch.Tensor:
    return 0.3 * torch.randn(k, 64, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- pieces
def test_advance_drops_the_elapsed_steps_and_holds_the_last_control():
    a = torch.arange(64 * 2, dtype=torch.float64).reshape(1, 64, 2)
    b = advance(a, 3)
    assert torch.equal(b[:, :61], a[:, 3:]) and torch.equal(b[:, 61:], a[:, -1:].expand(-1, 3, -1))
    assert torch.equal(advance(a, 0), a) and advance(a, 0) is not a
    with pytest.raises(ValueError, match="advance"):
        advance(a, 64)
    with pytest.raises(ValueError, match="K, N, 2"):
        advance(a[0], 1)


def test_trajectory_gap_is_the_largest_ground_distance_between_the_two_rollouts():
    a = plan(1)
    assert float(trajectory_gap_m(SPACE, a, a.clone(), 8.0)[0]) == 0.0
    # same curvature, acceleration higher by one std: straight-line distance 0.5 * da * t^2 at 6.4 s
    straight = torch.zeros(1, 64, 2, dtype=torch.float64)
    straight[..., 0] = -SPACE.accel_mean / SPACE.accel_std
    straight[..., 1] = -SPACE.curvature_mean / SPACE.curvature_std  # kappa = 0
    faster = straight.clone()
    faster[..., 0] += 1.0
    gap = float(trajectory_gap_m(SPACE, straight, faster, 5.0)[0])
    assert gap == pytest.approx(0.5 * SPACE.accel_std * 6.4 ** 2, rel=1e-9)
    two = torch.cat([straight, straight])
    assert trajectory_gap_m(SPACE, two, torch.cat([straight, faster]), 5.0).tolist() == pytest.approx([0.0, gap])


def test_one_step_estimate_lands_on_the_action_a_single_target_model_would_produce():
    target = plan(2)
    noise = torch.randn(1, 64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def velocity(x, t):  # the exact velocity field of a model whose only outcome is `target`
        return (target - x) / (1 - t[:, None, None])

    for c in (0.0, 0.5, 0.9):
        for guess in (target, plan(4)):
            assert torch.allclose(one_step_estimate(velocity, noise, guess, c), target, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        one_step_estimate(velocity, noise, target, 1.0)


def test_policy_rejects_meaningless_settings():
    with pytest.raises(ValueError, match="tolerance_m"):
        ActionDraftPolicy(0.0)
    with pytest.raises(ValueError, match="check_time"):
        ActionDraftPolicy(1.0, check_time=1.0)
    with pytest.raises(ValueError, match="max_reuse"):
        ActionDraftPolicy(1.0, max_reuse=0)


# ---------------------------------------------------------------- fallback rules
def test_drafter_only_proposes_for_a_continuing_stream_with_the_same_reasoning():
    d = ActionDrafter(ActionDraftPolicy(1.0, max_reuse=2))
    reasoning = [5, 6, 7]
    assert d.propose(1, reasoning, 1) is None and d.last_reason == "no previous action"
    d.record(plan(0), reasoning, drafted=False)
    assert torch.equal(d.propose(1, reasoning, 1), advance(plan(0), 1)) and d.last_reason == "checked"
    assert torch.equal(d.propose(2, reasoning, 1), advance(plan(0), 2))  # a dropped window: two strides
    assert d.propose(0, reasoning, 1) is None and d.last_reason == "the stream did not continue"
    assert d.propose(1, [5, 6, 8], 1) is None and d.last_reason == "the reasoning changed"
    assert d.propose(1, reasoning, 6) is None and d.last_reason == "the number of samples changed"
    # max_reuse = 2 drafted windows in a row, then the full flow must run once
    d.record(plan(1), reasoning, drafted=True)
    assert d.propose(1, reasoning, 1) is not None
    d.record(plan(1), reasoning, drafted=True)
    assert d.propose(1, reasoning, 1) is None and d.last_reason == "2 drafted windows in a row"
    d.record(plan(2), reasoning, drafted=False)
    assert d.propose(1, reasoning, 1) is not None
    d.reset()
    assert d.propose(1, reasoning, 1) is None and d.last_reason == "no previous action"


def test_judge_accepts_within_tolerance_and_never_a_broken_estimate():
    d = ActionDrafter(ActionDraftPolicy(0.5))
    draft = plan(3)
    near = draft.clone()
    near[..., 0] += 0.01  # ~0.14 m after 6.4 s
    ok, gap = d.judge(SPACE, draft, near.float(), 10.0)
    assert ok and 0 < gap < 0.5 and d.last_reason == "accepted"
    far = draft.clone()
    far[..., 0] += 0.1
    ok, gap = d.judge(SPACE, draft, far, 10.0)
    assert not ok and gap > 0.5 and d.last_reason.startswith("rejected: ")
    ok, gap = d.judge(SPACE, draft, torch.full_like(draft, float("nan")), 10.0)
    assert not ok and math.isnan(gap)


# ---------------------------------------------------------------- engine
def still_clip(n_windows: int) -> np.ndarray:
    clip = random_clip(n_windows)
    clip[:] = clip[:, :1]  # one frame for every time step: a still scene, so the plan barely changes
    return clip


def run(n_windows: int, **kw):
    eng = DriveEngine.from_pretrained("tiny", flow_schedule="adaptive", **kw)
    clip = still_clip(n_windows)
    results, previous = [], []
    for t in range(n_windows):
        before = None if eng._action_drafter is None or eng._action_drafter._actions is None \
            else eng._action_drafter._actions.clone()
        results.append(eng.step(*window(clip, t)))
        previous.append(before)
    return results, previous


@pytest.fixture(scope="module")
def off():
    return run(8)[0]


def test_off_by_default_the_flow_runs_every_window(off):
    assert all(r.action_draft == "off" and r.flow_evaluations == 4 and math.isnan(r.action_draft_gap_m) for r in off)


@pytest.mark.parametrize("graphs", [False, True])
def test_engine_uses_the_checked_draft_only_when_the_phase_rules_allow_it(off, graphs):
    res, prev = run(8, action_draft_m=1e6, action_draft_max_reuse=2, cuda_graphs=graphs)
    assert res[0].action_draft == "no previous action" and res[0].flow_evaluations == 4
    streak = 0
    for t in range(1, 8):
        r, same = res[t], res[t].token_ids == res[t - 1].token_ids
        # the reasoning (and so the decode) never depends on the action drafter
        assert r.token_ids == off[t].token_ids
        if not same:
            assert r.action_draft == "the reasoning changed" and r.flow_evaluations == 4
            streak = 0
        elif streak == 2:
            assert r.action_draft == "2 drafted windows in a row" and r.flow_evaluations == 4
            streak = 0
        else:
            # the huge tolerance accepts every checked draft: one evaluation, the previous plan advanced
            assert r.action_draft == "accepted" and r.flow_evaluations == 1 and r.action_draft_gap_m >= 0
            hist = window(still_clip(8), t)
            expect = SPACE.action_to_trajectory(advance(prev[t], 1), torch.from_numpy(hist[2]),
                                                torch.from_numpy(hist[3]))
            np.testing.assert_allclose(r.xyz[0], expect.xyz[0].numpy(), atol=1e-4)
            streak += 1
        if r.flow_evaluations == 4:  # the flow ran: the same trajectory as without the drafter
            np.testing.assert_allclose(r.xyz, off[t].xyz, atol=1e-5)
    assert sum(r.action_draft == "accepted" for r in res) >= 2  # the scenario exercises the accepted path


def test_a_tight_tolerance_rejects_and_then_runs_the_full_flow(off):
    res, _ = run(8, action_draft_m=1e-6)
    checked = [t for t, r in enumerate(res) if r.action_draft.startswith("rejected")]
    assert checked  # same scenario as above: some windows keep the reasoning
    for t in checked:
        assert res[t].flow_evaluations == 5 and res[t].action_draft_gap_m > 1e-6
        np.testing.assert_allclose(res[t].xyz, off[t].xyz, atol=1e-5)


def test_graphed_and_eager_checks_agree():
    eager, _ = run(8, action_draft_m=0.5)
    graphed, _ = run(8, action_draft_m=0.5, cuda_graphs=True)
    for a, b in zip(eager, graphed):
        assert a.action_draft == b.action_draft and a.flow_evaluations == b.flow_evaluations
        np.testing.assert_allclose(a.xyz, b.xyz, atol=1e-4)
        if not math.isnan(a.action_draft_gap_m):
            assert a.action_draft_gap_m == pytest.approx(b.action_draft_gap_m, abs=1e-4)


def test_reset_forgets_the_previous_plan():
    eng = DriveEngine.from_pretrained("tiny", flow_schedule="adaptive", action_draft_m=1e6)
    clip = still_clip(3)
    eng.step(*window(clip, 0))
    eng.reset()
    assert eng.step(*window(clip, 1)).action_draft == "no previous action"


def test_negative_tolerance_is_refused():
    with pytest.raises(ValueError, match="action_draft_m"):
        DriveEngine.from_pretrained("tiny", action_draft_m=-1.0)


def test_the_check_runs_in_the_noise_dtype_whatever_the_model_dtype():
    """The flow state is float32 noise on every model dtype; the draft (float64 on the host) follows it."""
    noise = torch.randn(1, 64, 2)
    est = one_step_estimate(lambda x, t: torch.zeros_like(x), noise, plan(5), 0.5)
    assert est.dtype == torch.float32
    eng = DriveEngine.from_pretrained("tiny", dtype=torch.bfloat16, flow_schedule="adaptive", action_draft_m=1e6)
    clip = still_clip(3)
    outcomes = [eng.step(*window(clip, t)).action_draft for t in range(3)]
    assert outcomes[0] == "no previous action" and all(o in ("accepted", "the reasoning changed") for o in outcomes[1:])
