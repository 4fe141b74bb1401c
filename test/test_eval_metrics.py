"""ADE / minADE / ADE@t against a hand-computed example (alpamayo.md §11)."""
import numpy as np
import pytest

from flashdrive_ros.evaluation import metrics as M


def hand_example():
    """Ground truth drives straight at 10 m/s; three samples with known XY errors.

    sample 0: 1 m lateral everywhere, plus 5 m in z (must be ignored)  -> ADE 1 at every horizon
    sample 1: exact for 1 s, then 2 m off                               -> ADE 108/64
    sample 2: (3, 4) m off (5 m) for 1 s, then exact                    -> ADE 50/64, the best overall
    """
    t = np.arange(1, 65, dtype=np.float64)
    gt = np.stack([t, np.zeros(64), np.zeros(64)], axis=1)
    s0 = gt + [0.0, 1.0, 5.0]
    s1 = gt.copy()
    s1[10:, 1] += 2.0
    s2 = gt.copy()
    s2[:10, :2] += [3.0, 4.0]
    return np.stack([s0, s1, s2]), gt


def test_ade_is_mean_xy_distance_per_sample():
    pred, gt = hand_example()
    np.testing.assert_allclose(M.ade(pred, gt), [1.0, 108 / 64, 50 / 64])
    np.testing.assert_allclose(M.ade(pred, gt, steps=10), [1.0, 0.0, 5.0])


def test_window_metrics_match_hand_computation():
    pred, gt = hand_example()
    m = M.trajectory_metrics(pred, gt)
    assert m.ade == pytest.approx(1.0)               # first sample, not the best one
    assert m.fde == pytest.approx(1.0)
    assert m.ade_at == pytest.approx({"1s": 1.0, "3s": 1.0, "5s": 1.0})
    assert m.best_sample == 2
    assert m.min_ade == pytest.approx(50 / 64)
    assert m.num_samples == 3


def test_short_horizon_min_ade_uses_the_full_horizon_argmin_sample():
    pred, gt = hand_example()
    m = M.trajectory_metrics(pred, gt)
    # Sample 2 (the full-horizon argmin) at 1 s is 5 m off even though sample 1 is exact there:
    # minADE@1s is ADE_{k*}@1s, not min_k ADE_k@1s.
    assert m.min_ade_at["1s"] == pytest.approx(5.0)
    assert m.min_ade_at["3s"] == pytest.approx(50 / 30)
    assert m.min_ade_at["5s"] == pytest.approx(1.0)


def test_single_trajectory_and_shape_errors():
    pred, gt = hand_example()
    m = M.trajectory_metrics(pred[1], gt)  # [T,3] is one sample
    assert m.num_samples == 1 and m.min_ade == pytest.approx(m.ade) == pytest.approx(108 / 64)
    with pytest.raises(ValueError):
        M.ade(pred[:, :32], gt)
    with pytest.raises(ValueError):
        M.ade(pred, gt, steps=65)


def test_horizon_steps_at_10hz():
    assert [M.horizon_steps(h) for h in (0.5, 1.0, 3.0, 5.0, 6.4)] == [5, 10, 30, 50, 64]


def test_constant_velocity_extrapolates_last_history_step():
    # 16 poses at 0.1 s, moving +1 m in x and -0.2 m in y per step, ending at the origin.
    k = np.arange(-15, 1, dtype=np.float64)[:, None]
    history = k * np.array([[1.0, -0.2, 0.0]])
    pred = M.constant_velocity_prediction(history)
    assert pred.shape == (1, 64, 3)
    np.testing.assert_allclose(pred[0, 0], [1.0, -0.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(pred[0, -1], [64.0, -12.8, 0.0], atol=1e-4)
    gt = np.arange(1, 65)[:, None] * np.array([[1.0, -0.2, 0.0]])
    assert M.trajectory_metrics(pred, gt).ade == pytest.approx(0.0, abs=1e-5)


def test_mean_sem_and_percentiles_skip_missing_values():
    s = M.mean_sem([1.0, 2.0, 3.0, float("nan"), None])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0)
    assert s["sem"] == pytest.approx(1.0 / np.sqrt(3))
    assert np.isnan(M.mean_sem([4.0])["sem"])
    assert M.mean_sem([])["n"] == 0
    p = M.percentiles(list(range(101)))
    assert p["p50"] == pytest.approx(50) and p["p99"] == pytest.approx(99) and p["mean"] == pytest.approx(50)
