"""Trajectory metrics (alpamayo.md §11): displacement errors on the XY plane of the ego frame at t0.

Definitions, with p̂_k(t) the k-th predicted sample and p(t) the ground truth at t0 + t·0.1 s:
  ADE_k@H      = mean over the first H·10 waypoints of ‖p̂_k(t) − p(t)‖₂ (XY only)
  ADE@6.4s     = ADE_0 over all 64 waypoints — the FIRST sample, what a vehicle would execute
  minADE_K     = min_k ADE_k@6.4s; the argmin k* is chosen on the full horizon and the shorter
                 horizons are then reported for that same sample (minADE@H = ADE_{k*}@H), as the
                 Alpamayo library does — it is NOT the per-horizon minimum.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

WAYPOINT_DT_S = 0.1
NUM_WAYPOINTS = 64
# Shorter horizons reported besides the full 6.4 s (seconds).
SHORT_HORIZONS_S = (1.0, 3.0, 5.0)


def horizon_steps(horizon_s: float, dt_s: float = WAYPOINT_DT_S) -> int:
    """Number of waypoints covering `horizon_s` seconds (1 s -> 10 at 10 Hz)."""
    steps = int(round(horizon_s / dt_s))
    if steps < 1:
        raise ValueError(f"horizon {horizon_s} s is shorter than one waypoint")
    return steps


def xy_errors(pred_xyz: np.ndarray, gt_xyz: np.ndarray) -> np.ndarray:
    """Per-sample, per-waypoint XY distance [K, T] between pred [K, T, >=2] and ground truth [T, >=2]."""
    pred = np.asarray(pred_xyz, dtype=np.float64)
    gt = np.asarray(gt_xyz, dtype=np.float64)
    if pred.ndim == 2:  # a single trajectory
        pred = pred[None]
    if pred.ndim != 3 or gt.ndim != 2 or pred.shape[1:2] != gt.shape[:1]:
        raise ValueError(f"expected pred [K,T,3] and gt [T,3], got {pred.shape} and {gt.shape}")
    return np.linalg.norm(pred[..., :2] - gt[None, :, :2], axis=-1)


def ade(pred_xyz: np.ndarray, gt_xyz: np.ndarray, steps: int | None = None) -> np.ndarray:
    """ADE of every sample [K] over the first `steps` waypoints (all when None)."""
    err = xy_errors(pred_xyz, gt_xyz)
    if steps is not None:
        if not 1 <= steps <= err.shape[1]:
            raise ValueError(f"steps={steps} outside 1..{err.shape[1]}")
        err = err[:, :steps]
    return err.mean(axis=1)


@dataclass
class TrajectoryMetrics:
    """Metrics of one window. Horizon keys are seconds formatted like '1s', '3s', '5s'."""
    ade: float                      # first sample, full horizon (ADE@6.4s)
    min_ade: float                  # min over K samples, full horizon (minADE_K@6.4s)
    best_sample: int                # argmin k* on the full-horizon ADE
    num_samples: int                # K
    ade_at: dict[str, float] = field(default_factory=dict)      # first sample at 1/3/5 s
    min_ade_at: dict[str, float] = field(default_factory=dict)  # sample k* at 1/3/5 s
    fde: float = float("nan")       # first sample, final-waypoint XY error

    def as_dict(self) -> dict:
        out = {"ade": self.ade, "min_ade": self.min_ade, "best_sample": self.best_sample,
               "num_samples": self.num_samples, "fde": self.fde}
        out.update({f"ade@{k}": v for k, v in self.ade_at.items()})
        out.update({f"min_ade@{k}": v for k, v in self.min_ade_at.items()})
        return out


def horizon_key(horizon_s: float) -> str:
    return f"{horizon_s:g}s"


def trajectory_metrics(pred_xyz: np.ndarray, gt_xyz: np.ndarray,
                       horizons_s: tuple[float, ...] = SHORT_HORIZONS_S,
                       dt_s: float = WAYPOINT_DT_S) -> TrajectoryMetrics:
    """All per-window displacement metrics for K predicted samples vs one ground-truth future."""
    err = xy_errors(pred_xyz, gt_xyz)  # [K, T]
    full = err.mean(axis=1)
    best = int(np.argmin(full))
    ade_at, min_ade_at = {}, {}
    for h in horizons_s:
        n = horizon_steps(h, dt_s)
        if n > err.shape[1]:
            continue  # horizon longer than the prediction: not reported rather than silently truncated
        ade_at[horizon_key(h)] = float(err[0, :n].mean())
        min_ade_at[horizon_key(h)] = float(err[best, :n].mean())
    return TrajectoryMetrics(ade=float(full[0]), min_ade=float(full[best]), best_sample=best,
                             num_samples=int(err.shape[0]), ade_at=ade_at, min_ade_at=min_ade_at,
                             fde=float(err[0, -1]))


def constant_velocity_prediction(history_xyz: np.ndarray, num_waypoints: int = NUM_WAYPOINTS,
                                 dt_s: float = WAYPOINT_DT_S) -> np.ndarray:
    """Constant-velocity extrapolation of the ego history: [1, num_waypoints, 3].

    The history is in the ego frame at t0 (last pose = origin), so the velocity is the last
    0.1 s displacement and waypoint k is (k+1)·dt·v. z is carried the same way.
    """
    hist = np.asarray(history_xyz, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[0] < 2:
        raise ValueError(f"need at least 2 history poses [N,3], got {hist.shape}")
    velocity = (hist[-1] - hist[-2]) / dt_s
    steps = np.arange(1, num_waypoints + 1, dtype=np.float64)[:, None] * dt_s
    return (hist[-1] + steps * velocity)[None].astype(np.float32)


# ---- aggregation -------------------------------------------------------------------------------

def mean_sem(values) -> dict:
    """Mean, standard error of the mean and count of the finite values (NaN when none)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"mean": float("nan"), "sem": float("nan"), "n": 0}
    sem = float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "sem": sem, "n": n}


def percentiles(values, qs=(50, 99)) -> dict:
    """Mean plus the requested percentiles (linear interpolation) of the finite values."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), **{f"p{q}": float("nan") for q in qs}, "n": 0}
    return {"mean": float(v.mean()), **{f"p{q}": float(np.percentile(v, q)) for q in qs}, "n": int(v.size)}
