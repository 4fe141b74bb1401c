"""Speculative action drafting with fallback for streaming windows (after Realtime-VLA FLASH, flashdrive.md §10).

The action stage runs the expert once per flow evaluation (4 with the adaptive schedule, 10 uniform), each
reading all expert weights. Windows 0.1 s apart mostly plan alike, so the previous window's action is a
draft of this one's, and checking a draft costs one evaluation:

  draft     the previous window's normalized action advanced by the k strides between the windows. The
            controls (acceleration, curvature) are ego-relative and sampled at the stride (dt = 0.1 s),
            so advancing is an index shift; the last control is held for the k new steps.
  check     one expert evaluation at the point x_c = c * draft + (1 - c) * noise of the straight path
            from this window's noise to the draft (flow.one_step_estimate): x_c + (1 - c) * v(x_c, c) is
            the model's own estimate of the action given that point. A model that would produce the
            draft lands on it; one that would plan differently lands elsewhere.
  accept    both are integrated from the current speed; the draft is used when the two trajectories
            stay within `tolerance_m` of each other over the whole 6.4 s horizon, for every sample.
  fallback  otherwise the full flow runs: 1 + schedule evaluations on a miss, 1 on a hit.

Phase-aware fallback (no draft is even checked): no previous action (first window, after a reset or a
full prefill), the stream did not continue, the reasoning differs from the previous window's (the model
describes the scene differently: a new phase), or `max_reuse` windows in a row already used a draft
(so the full flow runs at least every max_reuse + 1 windows).

Unlike the temporal draft of the reasoning (speculative.temporal_draft) this is *lossy*: an accepted
draft replaces the flow's output by a plan within tolerance_m of the model's one-step estimate. It is
off by default (tolerance_m = 0); how it changes accuracy is measured on trained weights
(`python -m flashdrive_ros.evaluation ... --action-draft-m`, docs/SPECULATIVE.md "Action draft").

Public API
----------
advance(actions [K, N, 2], k) -> [K, N, 2]
trajectory_gap_m(space, a [K, N, 2], b [K, N, 2], v0) -> [K] largest xy distance between the two plans
ActionDraftPolicy(tolerance_m, check_time=0.5, max_reuse=4)
ActionDrafter(policy): .propose(k, reasoning_ids) -> draft or None; .judge(space, draft, estimate, v0);
    .record(actions, reasoning_ids, drafted); .reset(); .last_reason
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .action_space import UnicycleActionSpace, integrate_unicycle


def advance(actions: torch.Tensor, k: int) -> torch.Tensor:
    """The plan k steps later: steps k.. of `actions` [K, N, 2], the last step held for the k new ones."""
    if actions.dim() != 3 or actions.shape[-1] != 2:
        raise ValueError(f"actions must be [K, N, 2], got {tuple(actions.shape)}")
    n = actions.shape[1]
    if not 0 <= k < n:
        raise ValueError(f"can advance an action of {n} steps by 0..{n - 1}, got {k}")
    if k == 0:
        return actions.clone()
    return torch.cat([actions[:, k:], actions[:, -1:].expand(-1, k, -1)], dim=1)


def trajectory_gap_m(space: UnicycleActionSpace, a: torch.Tensor, b: torch.Tensor, v0) -> torch.Tensor:
    """Largest distance [m] in the ground plane between the trajectories of normalized actions a and b
    [K, N, 2], both rolled out from speed v0 at the origin: [K] (float64)."""
    if a.shape != b.shape:
        raise ValueError(f"actions {tuple(a.shape)} and {tuple(b.shape)} differ in shape")
    both = space.denormalize(torch.stack([a, b]).to(torch.float64))
    x, y, _, _ = integrate_unicycle(both[..., 0], both[..., 1], torch.as_tensor(v0, dtype=torch.float64), space.dt)
    return torch.hypot(x[0] - x[1], y[0] - y[1]).amax(dim=-1)


@dataclass(frozen=True)
class ActionDraftPolicy:
    """tolerance_m: accept a draft within this many metres of the model's estimate (> 0; 0 disables the
    drafter in the engine). check_time: c of the check point, in [0, 1). max_reuse: drafted windows in a row
    before the full flow must run again (>= 1)."""

    tolerance_m: float
    check_time: float = 0.5
    max_reuse: int = 4

    def __post_init__(self) -> None:
        if not self.tolerance_m > 0:
            raise ValueError(f"tolerance_m must be > 0 metres, got {self.tolerance_m}")
        if not 0.0 <= self.check_time < 1.0:
            raise ValueError(f"check_time must be in [0, 1), got {self.check_time}")
        if self.max_reuse < 1:
            raise ValueError(f"max_reuse must be >= 1, got {self.max_reuse}")


class ActionDrafter:
    """The previous window's action and the bookkeeping of the fallback rules (module docstring)."""

    def __init__(self, policy: ActionDraftPolicy):
        self.policy = policy
        self.reset()

    def reset(self) -> None:
        self._actions: torch.Tensor | None = None  # [K, N, 2] normalized, CPU
        self._reasoning: list[int] | None = None
        self._streak = 0  # windows in a row that used a draft
        self.last_reason = "no previous action"

    def propose(self, k: int, reasoning_ids: list[int], num_samples: int) -> torch.Tensor | None:
        """The draft for a window k strides after the previous one (k = 0: the stream did not continue),
        or None with `last_reason` saying why the full flow runs without a check."""
        reason = None
        if self._actions is None:
            reason = "no previous action"
        elif k < 1:
            reason = "the stream did not continue"
        elif self._actions.shape[0] != num_samples:
            reason = "the number of samples changed"
        elif list(reasoning_ids) != self._reasoning:
            reason = "the reasoning changed"
        elif self._streak >= self.policy.max_reuse:
            reason = f"{self._streak} drafted windows in a row"
        elif k >= self._actions.shape[1]:
            reason = "the previous plan is over"
        self.last_reason = reason or "checked"
        return None if reason else advance(self._actions, k)

    def judge(self, space: UnicycleActionSpace, draft: torch.Tensor, estimate: torch.Tensor, v0) -> tuple[bool, float]:
        """(accepted, gap in metres: the largest over samples) of a checked draft."""
        gap = float(trajectory_gap_m(space, draft, estimate.detach().to("cpu", torch.float64), v0).max())
        accepted = gap <= self.policy.tolerance_m  # NaN compares False: a broken estimate never accepts
        self.last_reason = "accepted" if accepted else f"rejected: {gap:.2f} m > {self.policy.tolerance_m:g} m"
        return accepted, gap

    def record(self, actions: torch.Tensor, reasoning_ids: list[int], drafted: bool) -> None:
        """Remember this window's action (what it published) and reasoning for the next window's draft."""
        self._actions = actions.detach().to("cpu", torch.float64).clone()
        self._reasoning = list(reasoning_ids)
        self._streak = self._streak + 1 if drafted else 0
