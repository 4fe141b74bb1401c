"""Unicycle accel/curvature action space (alpamayo.md §9)."""

import math

import pytest
import torch

from flashdrive_ros.engine.action_space import (
    UnicycleActionSpace, integrate_unicycle, rot_from_yaw, unwrap, yaw_from_rot,
)

DT = 0.1


def _history(speed=10.0, yaw_rate=0.0, n=16):
    """Constant speed and yaw rate, ending at the origin with heading 0 (ego frame at t0)."""
    t = -DT * torch.arange(n - 1, -1, -1, dtype=torch.float64)
    yaw = yaw_rate * t
    if yaw_rate == 0:
        x, y = speed * t, torch.zeros_like(t)
    else:
        r = speed / yaw_rate
        x, y = r * torch.sin(yaw), r * (1 - torch.cos(yaw))
    return torch.stack([x, y, torch.zeros_like(t)], -1).float(), rot_from_yaw(yaw).float()


def test_normalisation_uses_config_stats():
    space = UnicycleActionSpace()
    raw = torch.tensor([[0.02902694707164455, 0.0002692167976330542]]).expand(64, 2)
    assert torch.allclose(space.normalize(raw), torch.zeros(64, 2), atol=1e-6)
    one_sigma = torch.tensor([[0.02902694707164455 + 0.6810426736454882,
                               0.0002692167976330542 + 0.026148280660833106]]).expand(64, 2)
    assert torch.allclose(space.normalize(one_sigma), torch.ones(64, 2), atol=1e-5)
    x = torch.randn(3, 64, 2)
    torch.testing.assert_close(space.normalize(space.denormalize(x)), x)


def test_bf16_stats_and_config_object():
    assert UnicycleActionSpace(bf16_stats=True).accel_std == 0.6796875
    assert UnicycleActionSpace(bf16_stats=True).curvature_mean == 0.0002689361572265625

    class Cfg:
        accel_mean, accel_std, dt = 1.0, 2.0, 0.2

    space = UnicycleActionSpace(Cfg(), curvature_std=0.5)
    assert (space.accel_mean, space.accel_std, space.dt, space.curvature_std) == (1.0, 2.0, 0.2, 0.5)
    assert space.curvature_mean == 0.0002692167976330542  # default for fields the cfg lacks
    with pytest.raises(ValueError, match="unknown action space option 'acel_std'"):
        UnicycleActionSpace(acel_std=1.0)


def test_yaw_helpers():
    yaw = torch.tensor([0.3, -2.0, 3.0])
    torch.testing.assert_close(yaw_from_rot(rot_from_yaw(yaw)), yaw)
    wrapped = torch.tensor([3.0, -3.1, 2.9, -3.0])
    unwrapped = unwrap(wrapped)
    assert (torch.diff(unwrapped).abs() < math.pi).all()
    # Same directions, only multiples of 2 pi added.
    torch.testing.assert_close(torch.cos(unwrapped), torch.cos(wrapped))
    torch.testing.assert_close(torch.sin(unwrapped), torch.sin(wrapped))
    assert unwrapped[0] == wrapped[0] and unwrapped[1] > 3.0


@pytest.mark.parametrize("speed", [0.0, 3.0, 10.0, 25.0])
def test_straight_constant_speed_history_gives_that_speed(speed):
    xyz, rot = _history(speed)
    v0 = UnicycleActionSpace().estimate_v0(xyz, rot)
    assert v0.shape == () and abs(float(v0) - speed) < 1e-3 * max(speed, 1.0)


def test_curved_history_speed_and_batching():
    xyz, rot = zip(*[_history(8.0, 0.3), _history(15.0, -0.2), _history(5.0)])
    v0 = UnicycleActionSpace().estimate_v0(torch.stack(xyz), torch.stack(rot))
    assert v0.shape == (3,)
    torch.testing.assert_close(v0, torch.tensor([8.0, 15.0, 5.0]), atol=5e-3, rtol=0)


def test_constant_curvature_integrates_to_the_circle():
    v0, kappa = 10.0, 0.02
    x, y, yaw, v = integrate_unicycle(torch.zeros(64, dtype=torch.float64),
                                      torch.full((64,), kappa, dtype=torch.float64), v0, DT)
    theta = kappa * v0 * DT * torch.arange(1, 65, dtype=torch.float64)
    torch.testing.assert_close(yaw, theta)
    # Trapezoidal positions stay within a few mm of the arc over 64 m.
    assert (x - torch.sin(theta) / kappa).abs().max() < 5e-3
    assert (y - (1 - torch.cos(theta)) / kappa).abs().max() < 5e-3
    assert torch.allclose(v, torch.full((64,), v0, dtype=torch.float64))


def test_constant_accel_and_curvature_closed_form():
    v0, a, kappa = 5.0, 0.8, -0.01
    t = DT * torch.arange(1, 65, dtype=torch.float64)
    x, y, yaw, v = integrate_unicycle(torch.full((64,), a, dtype=torch.float64),
                                      torch.full((64,), kappa, dtype=torch.float64), v0, DT)
    torch.testing.assert_close(v, v0 + a * t)
    torch.testing.assert_close(yaw, kappa * (v0 * t + 0.5 * a * t * t))  # arc length times curvature
    # Straight line (kappa = 0): x = v0 t + a t^2 / 2 exactly (trapezoid on linear v).
    x0, y0, _, _ = integrate_unicycle(torch.full((64,), a, dtype=torch.float64),
                                      torch.zeros(64, dtype=torch.float64), v0, DT)
    torch.testing.assert_close(x0, v0 * t + 0.5 * a * t * t)
    assert (y0 == 0).all()


def test_action_to_trajectory_shapes_and_frame():
    space = UnicycleActionSpace()
    xyz, rot = _history(10.0)
    xyz[:, 2] += 0.7  # history z at t0 carries over
    action = torch.zeros(4, 64, 2)
    traj = space.action_to_trajectory(action, xyz, rot)
    assert traj.xyz.shape == (4, 64, 3) and traj.yaw.shape == (4, 64) and traj.rot.shape == (4, 64, 3, 3)
    assert torch.allclose(traj.xyz[..., 2], torch.full((4, 64), 0.7))
    torch.testing.assert_close(traj.rot, rot_from_yaw(traj.yaw))
    # Normalized zero = mean accel and curvature: nearly straight ahead at ~10 m/s.
    assert abs(float(traj.xyz[0, 9, 0]) - 10.0) < 0.1
    assert (traj.xyz[..., 0].diff(dim=-1) > 0).all()


def test_a_precomputed_start_speed_gives_the_same_trajectory():
    """The engine fits v0 from the history while the expert runs and passes it in: same result."""
    space = UnicycleActionSpace()
    xyz, rot = _history(7.0, yaw_rate=0.2)
    action = torch.randn(3, 64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    own = space.action_to_trajectory(action, xyz, rot)
    given = space.action_to_trajectory(action, xyz, rot, v0=space.estimate_v0(xyz, rot))
    assert torch.equal(own.xyz, given.xyz) and torch.equal(own.yaw, given.yaw)
    faster = space.action_to_trajectory(action, xyz, rot, v0=space.estimate_v0(xyz, rot) + 1.0)
    assert (faster.xyz[:, -1, 0] > own.xyz[:, -1, 0]).all()  # v0 is used, not recomputed


def test_trajectory_to_action_round_trip():
    space = UnicycleActionSpace()
    hist_xyz, hist_rot = _history(10.0)
    tt = torch.linspace(0, 1, 64)
    raw = torch.stack([torch.sin(2 * math.pi * 1.5 * tt), 0.03 * torch.cos(2 * math.pi * tt)], -1)
    action = space.normalize(raw).unsqueeze(0)
    traj = space.action_to_trajectory(action, hist_xyz, hist_rot)
    back = space.trajectory_to_action(traj.xyz, traj.rot, hist_xyz[None], hist_rot[None])
    err = space.denormalize(back) - raw
    assert err[..., 0].abs().max() < 0.1 and err[..., 0].abs().mean() < 0.01  # m/s^2
    assert err[..., 1].abs().max() < 1e-3  # 1/m
    again = space.action_to_trajectory(back, hist_xyz, hist_rot)
    assert (again.xyz - traj.xyz).norm(dim=-1).max() < 0.05  # metres over 6.4 s


def test_bad_shapes_are_named():
    space = UnicycleActionSpace()
    xyz, rot = _history()
    with pytest.raises(ValueError, match=r"action must be \[..., 64, 2\]"):
        space.action_to_trajectory(torch.zeros(1, 32, 2), xyz, rot)
    with pytest.raises(ValueError, match="history rot"):
        space.estimate_v0(xyz, rot[:-1])
    with pytest.raises(ValueError, match="NaN"):
        space.estimate_v0(xyz * float("nan"), rot)
    with pytest.raises(ValueError, match="future must be"):
        space.trajectory_to_action(torch.zeros(64, 2), torch.zeros(64, 3, 3), xyz, rot)
