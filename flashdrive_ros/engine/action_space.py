"""Unicycle acceleration/curvature action space (alpamayo.md §9).

An action is 64 steps x (acceleration a [m/s^2], curvature kappa [1/m]) at dt = 0.1 s, stored
normalized: a_hat = (a - mu_a) / sigma_a, kappa_hat = (kappa - mu_k) / sigma_k.

Decoding (action -> trajectory), all in the ego frame at t0 (x forward, y left, z up):
  v_0 from the ego history (smoothed least squares, below); theta_0 = 0; x_0 = y_0 = 0
  v_{k+1} = v_k + a_k dt
  theta_{k+1} = theta_k + kappa_k v_k dt + 1/2 kappa_k a_k dt^2
  x_{k+1} = x_k + dt/2 (v_k cos theta_k + v_{k+1} cos theta_{k+1})   (y likewise with sin)
  outputs k = 1..64: xyz (z = history z at t0), yaw theta_k and rotation Rz(theta_k).

Velocity from poses: with headings u_j = (cos theta_j, sin theta_j), consecutive poses satisfy
  2 (p_{j+1} - p_j) / dt = v_j u_j + v_{j+1} u_{j+1}
which is solved for all v_j by least squares plus Tikhonov smoothing of the third differences
(weight lambda / dt^6) and a ridge term. v_0 of the action is the last history velocity.

The inverse (trajectory -> action, for training) chains smoothed least-squares fits:
headings (third-difference smoothing, theta_lambda/theta_ridge), velocities over history + future
(v_lambda/v_ridge), accelerations from velocity differences and curvatures from heading
differences (first-difference smoothing, a_lambda/a_ridge and kappa_lambda/kappa_ridge).
The smoothing orders for theta, a and kappa are this implementation's choice.

Public API
----------
yaw_from_rot(rot [..., 3, 3]) -> [...];  rot_from_yaw(yaw [...]) -> [..., 3, 3]
integrate_unicycle(accel [..., N], curvature [..., N], v0 [...], dt) -> (x, y, yaw, v) each [..., N]
smoothed_lstsq(A, b, lam, ridge, order, dt) -> x      (batched normal equations, float64)
velocities_from_poses(xy [..., T, 2], yaw [..., T], dt, lam, ridge) -> v [..., T]
UnicycleActionSpace(cfg=None, bf16_stats=False, **overrides)
    .normalize(action) / .denormalize(action_norm)
    .estimate_v0(hist_xyz [..., T, 3], hist_rot [..., T, 3, 3]) -> [...]
    .action_to_trajectory(action_norm [..., 64, 2], hist_xyz, hist_rot) -> Trajectory(xyz, yaw, rot)
    .trajectory_to_action(fut_xyz [..., 64, 3], fut_rot [..., 64, 3, 3], hist_xyz, hist_rot) -> action_norm
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Config field names (config.ActionSpaceConfig) and their defaults (the checkpoint values).
_DEFAULTS = dict(
    accel_mean=0.02902694707164455, accel_std=0.6810426736454882,
    curvature_mean=0.0002692167976330542, curvature_std=0.026148280660833106,
    dt=0.1, n_waypoints=64,
    theta_lambda=1e-6, theta_ridge=1e-8, v_lambda=1e-6, v_ridge=1e-4,
    a_lambda=1e-4, a_ridge=1e-4, kappa_lambda=1e-4, kappa_ridge=1e-4,
)


@dataclass
class Trajectory:
    """Decoded future: xyz [..., N, 3], yaw [..., N], rot [..., N, 3, 3] (ego frame at t0)."""

    xyz: torch.Tensor
    yaw: torch.Tensor
    rot: torch.Tensor


# ---------------------------------------------------------------- geometry
def yaw_from_rot(rot: torch.Tensor) -> torch.Tensor:
    """Heading angle of rotation matrices [..., 3, 3] (rotation about z)."""
    if rot.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must be [..., 3, 3], got shape {tuple(rot.shape)}")
    return torch.atan2(rot[..., 1, 0], rot[..., 0, 0])


def rot_from_yaw(yaw: torch.Tensor) -> torch.Tensor:
    """Rz(yaw) matrices [..., 3, 3]."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    return torch.stack([torch.stack([c, -s, zero], -1),
                        torch.stack([s, c, zero], -1),
                        torch.stack([zero, zero, one], -1)], -2)


def unwrap(angle: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Remove 2 pi jumps between consecutive angles along `dim` (numpy.unwrap)."""
    d = torch.diff(angle, dim=dim)
    wrapped = torch.remainder(d + math.pi, 2 * math.pi) - math.pi
    # Keep +pi steps as +pi (remainder maps them to -pi).
    wrapped = torch.where((wrapped == -math.pi) & (d > 0), torch.full_like(wrapped, math.pi), wrapped)
    correction = torch.cumsum(wrapped - d, dim=dim)
    first = angle.narrow(dim, 0, 1)
    return torch.cat([first, angle.narrow(dim, 1, angle.shape[dim] - 1) + correction], dim=dim)


# ---------------------------------------------------------------- forward model
def integrate_unicycle(accel: torch.Tensor, curvature: torch.Tensor, v0: torch.Tensor | float, dt: float):
    """Roll the unicycle forward N steps from the origin with heading 0 and speed v0.

    accel, curvature [..., N]; v0 broadcastable to [...]. Returns (x, y, yaw, v), each [..., N],
    the states after steps 1..N.
    """
    if accel.shape != curvature.shape:
        raise ValueError(f"accel {tuple(accel.shape)} and curvature {tuple(curvature.shape)} differ in shape")
    v0 = torch.as_tensor(v0, dtype=accel.dtype, device=accel.device)
    v0 = torch.broadcast_to(v0, accel.shape[:-1]).unsqueeze(-1)
    v_next = v0 + torch.cumsum(accel * dt, dim=-1)  # v_1..v_N
    v_prev = torch.cat([v0, v_next[..., :-1]], dim=-1)  # v_0..v_{N-1}
    dtheta = curvature * v_prev * dt + 0.5 * curvature * accel * dt * dt
    yaw = torch.cumsum(dtheta, dim=-1)
    yaw_prev = torch.cat([torch.zeros_like(yaw[..., :1]), yaw[..., :-1]], dim=-1)
    x = torch.cumsum(0.5 * dt * (v_prev * torch.cos(yaw_prev) + v_next * torch.cos(yaw)), dim=-1)
    y = torch.cumsum(0.5 * dt * (v_prev * torch.sin(yaw_prev) + v_next * torch.sin(yaw)), dim=-1)
    return x, y, yaw, v_next


# ---------------------------------------------------------------- least squares
def _difference_matrix(n: int, order: int, dtype, device) -> torch.Tensor:
    """[n - order, n] matrix of `order`-th forward differences (empty when n <= order)."""
    d = torch.eye(n, dtype=dtype, device=device)
    for _ in range(order):
        d = d[1:] - d[:-1]
    return d


def smoothed_lstsq(A: torch.Tensor, b: torch.Tensor, lam: float, ridge: float, order: int, dt: float):
    """argmin_x |A x - b|^2 + lam / dt^(2 order) |D_order x|^2 + ridge |x|^2, batched.

    A [..., M, n], b [..., M]; solved in float64 via the normal equations (n is small).
    """
    A64, b64 = A.to(torch.float64), b.to(torch.float64)
    n = A.shape[-1]
    d = _difference_matrix(n, order, torch.float64, A.device)
    lhs = A64.transpose(-1, -2) @ A64 + (lam / dt ** (2 * order)) * (d.T @ d) \
        + ridge * torch.eye(n, dtype=torch.float64, device=A.device)
    rhs = (A64.transpose(-1, -2) @ b64.unsqueeze(-1)).squeeze(-1)
    return torch.linalg.solve(lhs, rhs)


def velocities_from_poses(xy: torch.Tensor, yaw: torch.Tensor, dt: float, lam: float, ridge: float):
    """Speeds v_j [..., T] (float64) at T poses from positions [..., T, 2] and headings [..., T]."""
    t = xy.shape[-2]
    if t < 2:
        raise ValueError(f"need at least 2 poses to estimate a speed, got {t}")
    xy = xy.to(torch.float64)
    u = torch.stack([torch.cos(yaw), torch.sin(yaw)], dim=-1).to(torch.float64)  # [..., T, 2]
    # For axis c the rows read: u_j[c] * v_j + u_{j+1}[c] * v_{j+1} = 2 (p_{j+1} - p_j)[c] / dt.
    blocks = [F.pad(torch.diag_embed(u[..., :-1, c]), (0, 1)) + F.pad(torch.diag_embed(u[..., 1:, c]), (1, 0))
              for c in range(2)]
    A = torch.cat(blocks, dim=-2)  # [..., 2 (T-1), T]
    b = 2.0 * (xy[..., 1:, :] - xy[..., :-1, :]) / dt
    b = torch.cat([b[..., 0], b[..., 1]], dim=-1)
    return smoothed_lstsq(A, b, lam, ridge, order=3, dt=dt)


# ---------------------------------------------------------------- the action space
class UnicycleActionSpace:
    """Normalisation, v0 estimation and the action <-> trajectory maps.

    cfg: object with the config.ActionSpaceConfig fields (accel_mean, ..., kappa_ridge, dt,
    n_waypoints); keyword overrides win over cfg; missing values take the checkpoint defaults.
    bf16_stats: round the four normalisation stats to bfloat16, as they are in effect when the
    reference loads the model in bf16 (use it to reproduce reference outputs).
    """

    def __init__(self, cfg=None, bf16_stats: bool = False, **overrides):
        unknown = set(overrides) - set(_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown action space option {sorted(unknown)[0]!r}")
        values = {k: (overrides[k] if k in overrides else getattr(cfg, k, v)) for k, v in _DEFAULTS.items()}
        for name in ("accel_mean", "accel_std", "curvature_mean", "curvature_std"):
            if bf16_stats:
                values[name] = float(torch.tensor(values[name], dtype=torch.bfloat16))
        for k, v in values.items():
            setattr(self, k, v)
        if self.accel_std <= 0 or self.curvature_std <= 0:
            raise ValueError("accel_std and curvature_std must be positive")
        if self.dt <= 0:
            raise ValueError(f"dt must be positive, got {self.dt}")

    # ---- normalisation
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor([self.accel_mean, self.curvature_mean], dtype=like.dtype, device=like.device)
        std = torch.tensor([self.accel_std, self.curvature_std], dtype=like.dtype, device=like.device)
        return mean, std

    def _check_action(self, action: torch.Tensor) -> None:
        if action.dim() < 2 or action.shape[-1] != 2 or action.shape[-2] != self.n_waypoints:
            raise ValueError(f"action must be [..., {self.n_waypoints}, 2], got shape {tuple(action.shape)}")

    def normalize(self, action: torch.Tensor) -> torch.Tensor:
        """(a, kappa) [..., N, 2] -> normalized."""
        mean, std = self._stats(action)
        return (action - mean) / std

    def denormalize(self, action_norm: torch.Tensor) -> torch.Tensor:
        """normalized [..., N, 2] -> (a, kappa)."""
        mean, std = self._stats(action_norm)
        return action_norm * std + mean

    # ---- history
    @staticmethod
    def _check_history(hist_xyz: torch.Tensor, hist_rot: torch.Tensor) -> None:
        if hist_xyz.dim() < 2 or hist_xyz.shape[-1] != 3:
            raise ValueError(f"history xyz must be [..., T, 3], got shape {tuple(hist_xyz.shape)}")
        if hist_rot.shape != hist_xyz.shape[:-1] + (3, 3):
            raise ValueError(f"history rot must be [..., T, 3, 3] matching xyz {tuple(hist_xyz.shape)}, "
                             f"got {tuple(hist_rot.shape)}")
        if not bool(torch.isfinite(hist_xyz).all() and torch.isfinite(hist_rot).all()):
            raise ValueError("history contains NaN or inf")

    def estimate_v0(self, hist_xyz: torch.Tensor, hist_rot: torch.Tensor) -> torch.Tensor:
        """Speed at t0 [...] from the ego history (last pose = t0), in hist_xyz's dtype."""
        hist_xyz, hist_rot = torch.as_tensor(hist_xyz), torch.as_tensor(hist_rot)
        self._check_history(hist_xyz, hist_rot)
        yaw = unwrap(yaw_from_rot(hist_rot.to(torch.float64)))
        v = velocities_from_poses(hist_xyz[..., :2], yaw, self.dt, self.v_lambda, self.v_ridge)
        return v[..., -1].to(hist_xyz.dtype)

    # ---- decoding
    def action_to_trajectory(self, action_norm: torch.Tensor, hist_xyz: torch.Tensor,
                             hist_rot: torch.Tensor, v0: torch.Tensor | None = None) -> Trajectory:
        """Normalized actions [..., N, 2] -> Trajectory (xyz [..., N, 3], yaw [..., N], rot [..., N, 3, 3]).

        The history batch shape must broadcast against the action batch shape (a single history
        [T, 3] serves K sampled actions [K, N, 2]). v0: `estimate_v0(hist_xyz, hist_rot)` when the
        caller already has it (the engine fits it while the expert runs), else computed here.
        """
        self._check_action(action_norm)
        hist_xyz, hist_rot = torch.as_tensor(hist_xyz), torch.as_tensor(hist_rot)
        if v0 is None:
            v0 = self.estimate_v0(hist_xyz, hist_rot)
        v0 = torch.as_tensor(v0).to(action_norm.dtype)
        action = self.denormalize(action_norm)
        x, y, yaw, _ = integrate_unicycle(action[..., 0], action[..., 1], v0, self.dt)
        z = torch.broadcast_to(hist_xyz[..., -1, 2].to(action.dtype).unsqueeze(-1), x.shape)
        return Trajectory(xyz=torch.stack([x, y, z], dim=-1), yaw=yaw, rot=rot_from_yaw(yaw))

    # ---- encoding (training)
    def trajectory_to_action(self, fut_xyz: torch.Tensor, fut_rot: torch.Tensor, hist_xyz: torch.Tensor,
                             hist_rot: torch.Tensor) -> torch.Tensor:
        """Future poses [..., N, 3] / [..., N, 3, 3] (+ history with the same batch shape) -> normalized action."""
        fut_xyz, fut_rot = torch.as_tensor(fut_xyz), torch.as_tensor(fut_rot)
        hist_xyz, hist_rot = torch.as_tensor(hist_xyz), torch.as_tensor(hist_rot)
        self._check_history(hist_xyz, hist_rot)
        n = self.n_waypoints
        if fut_xyz.shape[-2:] != (n, 3) or fut_rot.shape != fut_xyz.shape[:-1] + (3, 3):
            raise ValueError(f"future must be xyz [..., {n}, 3] and rot [..., {n}, 3, 3], got "
                             f"{tuple(fut_xyz.shape)} and {tuple(fut_rot.shape)}")
        if fut_xyz.shape[:-2] != hist_xyz.shape[:-2]:
            raise ValueError(f"future batch {tuple(fut_xyz.shape[:-2])} != history batch {tuple(hist_xyz.shape[:-2])}")
        dt = self.dt
        # Headings over history + future, one unwrapped sequence; the future part is smoothed.
        yaw_all = unwrap(torch.cat([yaw_from_rot(hist_rot.to(torch.float64)),
                                    yaw_from_rot(fut_rot.to(torch.float64))], dim=-1))
        t_hist = hist_xyz.shape[-2]
        fut_meas = yaw_all[..., t_hist - 1:]  # theta_0 (t0) .. theta_N
        eye = torch.eye(n + 1, dtype=torch.float64, device=fut_xyz.device).expand(*fut_meas.shape[:-1], n + 1, n + 1)
        theta = smoothed_lstsq(eye, fut_meas, self.theta_lambda, self.theta_ridge, order=3, dt=dt)
        theta = theta - theta[..., :1]  # heading 0 at t0 by definition of the ego frame
        # Speeds at t0 .. t0 + N dt, fitted jointly with the history for a well-posed start.
        xy_all = torch.cat([hist_xyz[..., :2], fut_xyz[..., :2]], dim=-2).to(torch.float64)
        yaw_fit = torch.cat([yaw_all[..., :t_hist - 1], theta], dim=-1)
        v = velocities_from_poses(xy_all, yaw_fit, dt, self.v_lambda, self.v_ridge)[..., t_hist - 1:]
        # Accelerations: v_{k+1} - v_k = a_k dt (rows divided by dt to be in m/s^2).
        eye_n = torch.eye(n, dtype=torch.float64, device=fut_xyz.device).expand(*v.shape[:-1], n, n)
        accel = smoothed_lstsq(eye_n, torch.diff(v, dim=-1) / dt, self.a_lambda, self.a_ridge, order=1, dt=dt)
        # Curvatures: theta_{k+1} - theta_k = kappa_k (v_k + a_k dt / 2) dt.
        arc_speed = v[..., :-1] + 0.5 * accel * dt
        A = torch.diag_embed(arc_speed)
        kappa = smoothed_lstsq(A, torch.diff(theta, dim=-1) / dt, self.kappa_lambda, self.kappa_ridge,
                               order=1, dt=dt)
        action = torch.stack([accel, kappa], dim=-1).to(fut_xyz.dtype)
        return self.normalize(action)
