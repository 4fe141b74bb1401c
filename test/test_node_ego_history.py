"""Ego history from odometry (pure): 16 poses at 10 Hz ending at t0, in the t0 ego frame, interpolated
from 50 Hz odometry; stale, short, NaN and out-of-order odometry are refused with a reason."""

import math

import numpy as np
import pytest

from flashdrive_ros.nodes.ego_history import EgoHistoryError, OdometryBuffer, quat_to_matrix


def yaw_quat(yaw):
    return (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))


def circle_pose(t_s, speed=10.0, yaw_rate=0.2, x0=100.0, y0=-50.0, yaw0=0.7):
    """Constant speed and yaw rate: closed-form pose in the odom frame."""
    yaw = yaw0 + yaw_rate * t_s
    r = speed / yaw_rate
    x = x0 + r * (math.sin(yaw) - math.sin(yaw0))
    y = y0 - r * (math.cos(yaw) - math.cos(yaw0))
    return (x, y, 1.5), yaw


def filled_buffer(t_end_s=3.0, hz=50, **kw):
    buf = OdometryBuffer(**kw)
    for i in range(int(t_end_s * hz) + 1):
        t = i / hz
        p, yaw = circle_pose(t)
        assert buf.add(int(round(t * 1e6)), p, yaw_quat(yaw)) is None
    return buf


def test_history_is_16_poses_in_the_t0_ego_frame_matching_the_closed_form():
    buf = filled_buffer()
    t0 = 2_500_000
    xyz, rot = buf.history(t0)
    assert xyz.shape == (16, 3) and rot.shape == (16, 3, 3)
    assert xyz.dtype == np.float32
    np.testing.assert_array_equal(xyz[-1], 0.0)
    np.testing.assert_array_equal(rot[-1], np.eye(3))
    p0, yaw0 = circle_pose(2.5)
    r0 = quat_to_matrix(yaw_quat(yaw0))
    for j in range(16):
        t = 2.5 - (15 - j) * 0.1
        p, yaw = circle_pose(t)
        expect = r0.T @ (np.array(p) - np.array(p0))
        np.testing.assert_allclose(xyz[j], expect, atol=0.02)  # interpolation error of 50 Hz chords
        np.testing.assert_allclose(rot[j], r0.T @ quat_to_matrix(yaw_quat(yaw)), atol=1e-5)
    # driving forward: the past lies behind (negative x), monotonically
    assert np.all(np.diff(xyz[:, 0]) > 0) and xyz[0, 0] < -10


def test_interpolates_between_odometry_samples():
    buf = OdometryBuffer(max_gap_us=3_000_000)
    buf.add(0, (0, 0, 0), yaw_quat(0.0))
    buf.add(2_000_000, (20, 0, 0), yaw_quat(0.2))
    p, r = buf.pose_at(500_000)
    np.testing.assert_allclose(p, (5, 0, 0))
    np.testing.assert_allclose(r, quat_to_matrix(yaw_quat(0.05)), atol=1e-9)


def test_short_extrapolation_when_odometry_lags_t0_but_not_when_stale():
    buf = filled_buffer(t_end_s=2.0, max_staleness_us=100_000)
    xyz, _ = buf.history(2_060_000)  # newest pose 60 ms before t0: allowed
    assert np.all(np.isfinite(xyz))
    with pytest.raises(EgoHistoryError, match="stale"):
        buf.history(2_200_000)


def test_too_short_history_is_refused():
    buf = filled_buffer(t_end_s=1.0)
    with pytest.raises(EgoHistoryError, match="too short"):
        buf.history(1_000_000)  # needs poses back to -0.5 s


def test_hole_in_odometry_is_refused():
    buf = OdometryBuffer(max_gap_us=300_000)
    for t in list(range(0, 1_000_000, 20_000)) + list(range(1_600_000, 2_000_001, 20_000)):
        buf.add(t, (t / 1e5, 0, 0), yaw_quat(0))
    with pytest.raises(EgoHistoryError, match="gap"):
        buf.history(2_000_000)


@pytest.mark.parametrize("pos,quat", [((math.nan, 0, 0), (0, 0, 0, 1)), ((0, 0, 0), (0, 0, math.inf, 1)),
                                      ((0, 0, 0), (0, 0, 0, 0))])
def test_nan_or_degenerate_poses_are_rejected_and_not_stored(pos, quat):
    buf = filled_buffer(t_end_s=2.0)
    n = len(buf)
    assert buf.add(2_100_000, pos, quat) is not None
    assert len(buf) == n
    assert np.all(np.isfinite(buf.history(2_000_000)[0]))


def test_out_of_order_rejected_and_far_backwards_stamp_clears():
    buf = filled_buffer(t_end_s=3.0, time_jump_us=1_000_000)
    assert "out-of-order" in buf.add(2_900_000, (0, 0, 0), (0, 0, 0, 1))
    assert buf.newest_stamp == 3_000_000
    assert buf.add(0, (0, 0, 0), (0, 0, 0, 1)) == "time_jump"
    assert len(buf) == 1 and buf.newest_stamp == 0
