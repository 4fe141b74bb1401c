"""Ego history from odometry (pure numpy, no ROS).

Alpamayo's history input is 16 poses at 10 Hz (t0 - 1.5 s .. t0) expressed in the ego frame at t0:
xyz_local = R_t0^T (xyz - xyz_t0), R_local = R_t0^T R (dataset loader convention). Odometry arrives at
50-100 Hz and is interpolated: translation linearly, rotation by slerp (small steps, so linear-in-angle is
what the dataset's spline+slerp gives to within noise). Times are integer microseconds.
"""
from __future__ import annotations

import bisect
from typing import Optional

import numpy as np

NUM_HISTORY = 16
HISTORY_STEP_US = 100_000


class EgoHistoryError(ValueError):
    """The odometry buffer cannot give a trustworthy history for this t0 (reason in the message)."""


def quat_to_matrix(q) -> np.ndarray:
    """(x, y, z, w) quaternion -> 3x3 rotation matrix (normalised first)."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _log_so3(r: np.ndarray) -> np.ndarray:
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-9:
        return np.zeros(3)
    w = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    if np.pi - angle < 1e-6:
        # near 180 deg the antisymmetric part vanishes; take the axis from the symmetric part
        axis = np.sqrt(np.maximum((np.diag(r) + 1.0) / 2.0, 0.0))
        axis *= np.sign(w + (w == 0))
        return axis / np.linalg.norm(axis) * angle
    return w / (2.0 * np.sin(angle)) * angle


def _exp_so3(v: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(v)
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def interpolate_pose(t: int, t_a: int, p_a, r_a, t_b: int, p_b, r_b):
    """Pose at t on the segment a->b (f outside [0, 1] extrapolates at constant velocity)."""
    f = 0.0 if t_b == t_a else (t - t_a) / (t_b - t_a)
    p = p_a + f * (p_b - p_a)
    r = r_a @ _exp_so3(f * _log_so3(r_a.T @ r_b))
    return p, r


class OdometryBuffer:
    """Ring buffer of odometry poses (world/odom frame) with validation on the way in.

    add() rejects NaN/inf poses, degenerate quaternions and out-of-order stamps (returning a reason);
    a stamp further back than ``time_jump_us`` is a clock reset: the buffer is cleared and it is accepted.
    history() interpolates the 16 history poses and raises EgoHistoryError when the data is stale, too
    short or has holes longer than ``max_gap_us`` (shorter holes, e.g. a paused odometry source, are
    bridged linearly so the first window after it recovers).
    """

    def __init__(self, capacity: int = 400, max_staleness_us: int = 100_000, max_gap_us: int = 1_500_000,
                 time_jump_us: int = 1_000_000):
        self.capacity = capacity
        self.max_staleness_us = int(max_staleness_us)
        self.max_gap_us = int(max_gap_us)
        self.time_jump_us = int(time_jump_us)
        self.clear()

    def clear(self) -> None:
        self._t: list[int] = []
        self._p: list[np.ndarray] = []
        self._r: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._t)

    @property
    def newest_stamp(self) -> Optional[int]:
        return self._t[-1] if self._t else None

    def add(self, stamp_us: int, position, quaternion_xyzw) -> Optional[str]:
        """Store one pose. Returns None when accepted, 'time_jump' when accepted after clearing, or a
        rejection reason."""
        p = np.asarray(position, dtype=np.float64).reshape(3)
        q = np.asarray(quaternion_xyzw, dtype=np.float64).reshape(4)
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))):
            return "non-finite odometry pose"
        n = np.linalg.norm(q)
        if not 0.5 < n < 1.5:
            return f"invalid odometry quaternion (norm {n:.3g})"
        stamp_us = int(stamp_us)
        status = None
        if self._t and stamp_us <= self._t[-1]:
            if self._t[-1] - stamp_us > self.time_jump_us:
                self.clear()
                status = "time_jump"
            else:
                return "out-of-order odometry stamp"
        self._t.append(stamp_us)
        self._p.append(p)
        self._r.append(quat_to_matrix(q / n))
        if len(self._t) > self.capacity:
            del self._t[0], self._p[0], self._r[0]
        return status

    def pose_at(self, t: int):
        """Interpolated (position, rotation) in the odometry frame at time t (microseconds)."""
        ts = self._t
        if not ts:
            raise EgoHistoryError("no odometry received")
        if t > ts[-1]:
            age = t - ts[-1]
            if age > self.max_staleness_us:
                raise EgoHistoryError(f"odometry stale: newest pose {age / 1000:.0f} ms before t0 "
                                      f"(limit {self.max_staleness_us / 1000:.0f} ms)")
            if len(ts) == 1:
                return self._p[-1], self._r[-1]
            # short extrapolation at constant velocity: odometry lags cameras by up to one period
            return interpolate_pose(t, ts[-2], self._p[-2], self._r[-2], ts[-1], self._p[-1], self._r[-1])
        if t < ts[0]:
            raise EgoHistoryError(f"odometry history too short: need {(ts[0] - t) / 1000:.0f} ms more "
                                  "before the oldest pose")
        i = bisect.bisect_left(ts, t)
        if ts[i] == t:
            return self._p[i], self._r[i]
        if ts[i] - ts[i - 1] > self.max_gap_us:
            raise EgoHistoryError(f"odometry gap of {(ts[i] - ts[i - 1]) / 1000:.0f} ms inside the history")
        return interpolate_pose(t, ts[i - 1], self._p[i - 1], self._r[i - 1], ts[i], self._p[i], self._r[i])

    def history(self, t0_us: int, num: int = NUM_HISTORY, step_us: int = HISTORY_STEP_US):
        """(xyz [num, 3] float32, rot [num, 3, 3] float32) at t0 - (num-1)*step .. t0 in the t0 ego frame;
        the last entry is exactly the origin / identity."""
        t0_us = int(t0_us)
        p0, r0 = self.pose_at(t0_us)
        xyz = np.empty((num, 3))
        rot = np.empty((num, 3, 3))
        for j in range(num):
            t = t0_us - (num - 1 - j) * step_us
            p, r = (p0, r0) if j == num - 1 else self.pose_at(t)
            xyz[j] = r0.T @ (p - p0)
            rot[j] = r0.T @ r
        xyz[-1] = 0.0
        rot[-1] = np.eye(3)
        if not (np.all(np.isfinite(xyz)) and np.all(np.isfinite(rot))):
            raise EgoHistoryError("non-finite ego history")
        return xyz.astype(np.float32), rot.astype(np.float32)
