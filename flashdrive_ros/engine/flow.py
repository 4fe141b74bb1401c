"""Flow-matching Euler sampler with step schedules (alpamayo.md §9, flashdrive.md §5).

Convention: x_t = t * x_data + (1 - t) * noise, so x at t = 0 is noise and x at t = 1 is the
normalized action; the model predicts v = x_data - noise and each step is x <- x + dt * v(x, t).

Schedules
  uniform(n)   t_i = i / n, one velocity evaluation per step (baseline: n = 10).
  adaptive()   FlashDrive: 8 uniform steps (dt = 0.125); velocities are computed at steps 0, 1, 2, 7
               and the velocity of step 2 is reused at steps 3..6 -> 4 evaluations instead of 10.

Public API
----------
FlowSchedule(times, dts, sources)     sources[i] = step whose velocity step i uses (i: computed)
    .uniform(n=10), .adaptive(num_steps=8, reuse_steps=(3, 4, 5, 6)), .from_name("uniform"|"adaptive")
    .computed_steps, .num_evaluations
sample(velocity_fn, noise, schedule, return_velocities=False) -> x (and the list of velocities used)
    velocity_fn(x [K, 64, 2], t [K]) -> v [K, 64, 2]
one_step_estimate(velocity_fn, noise, guess, t) -> the model's estimate of the action from the point
    x_t = t * guess + (1 - t) * noise of the straight path to a guessed action, in one evaluation
    (the check of a drafted action, engine/action_draft.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowSchedule:
    """Euler steps: step i starts at times[i], advances by dts[i] with the velocity of step sources[i]."""

    times: tuple[float, ...]
    dts: tuple[float, ...]
    sources: tuple[int, ...]
    name: str = "custom"

    def __post_init__(self):
        n = len(self.times)
        if n == 0 or len(self.dts) != n or len(self.sources) != n:
            raise ValueError(f"times, dts and sources must be non-empty and equally long, got "
                             f"{len(self.times)}, {len(self.dts)}, {len(self.sources)}")
        for i, s in enumerate(self.sources):
            # A step may use its own velocity or one computed at an earlier step.
            if not (0 <= s <= i) or self.sources[s] != s:
                raise ValueError(f"step {i} uses the velocity of step {s}, which is not an earlier computed step")
        if abs(sum(self.dts) - 1.0) > 1e-6:
            raise ValueError(f"step sizes must integrate from t=0 to t=1, they sum to {sum(self.dts)}")

    @property
    def computed_steps(self) -> tuple[int, ...]:
        """Steps at which velocity_fn is called."""
        return tuple(i for i, s in enumerate(self.sources) if s == i)

    @property
    def num_evaluations(self) -> int:
        return len(self.computed_steps)

    @property
    def num_steps(self) -> int:
        return len(self.times)

    @classmethod
    def uniform(cls, num_steps: int = 10) -> "FlowSchedule":
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return cls(times=tuple(i / num_steps for i in range(num_steps)), dts=(1.0 / num_steps,) * num_steps,
                   sources=tuple(range(num_steps)), name=f"uniform-{num_steps}")

    @classmethod
    def adaptive(cls, num_steps: int = 8, reuse_steps: Sequence[int] = (3, 4, 5, 6)) -> "FlowSchedule":
        """Uniform grid where each step in reuse_steps uses the last computed velocity before it."""
        base = cls.uniform(num_steps)
        reuse = set(reuse_steps)
        bad = [s for s in reuse if not 1 <= s < num_steps]
        if bad:
            raise ValueError(f"reuse step {bad[0]} outside 1..{num_steps - 1}")
        sources, last = [], 0
        for i in range(num_steps):
            if i not in reuse:
                last = i
            sources.append(last)
        return cls(times=base.times, dts=base.dts, sources=tuple(sources),
                   name=f"adaptive-{num_steps}-reuse{sorted(reuse)}")

    @classmethod
    def from_name(cls, name: str, num_steps: int | None = None) -> "FlowSchedule":
        """'uniform' (default 10 steps) or 'adaptive' (FlashDrive 8-step, reuse 3..6)."""
        if name == "uniform":
            return cls.uniform(num_steps or 10)
        if name == "adaptive":
            if num_steps not in (None, 8):
                raise ValueError("the adaptive schedule is defined for 8 steps")
            return cls.adaptive()
        raise ValueError(f"unknown flow schedule {name!r}; use 'uniform' or 'adaptive'")


def sample(velocity_fn: VelocityFn, noise: torch.Tensor, schedule: FlowSchedule,
           return_velocities: bool = False):
    """Integrate from noise (t = 0) to the normalized action (t = 1).

    noise: [K, ...] (e.g. [K, 64, 2], draw it with the diffusion temperature applied).
    velocity_fn(x, t) gets t as a [K] tensor of x's dtype/device.
    Returns x, or (x, velocities) with the velocity used at every step when return_velocities.
    """
    if noise.dim() < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must be [K, ...] with K >= 1, got shape {tuple(noise.shape)}")
    x = noise
    k = noise.shape[0]
    computed: dict[int, torch.Tensor] = {}
    used = []
    for i, (t, dt, src) in enumerate(zip(schedule.times, schedule.dts, schedule.sources)):
        if src == i:
            v = velocity_fn(x, torch.full((k,), t, dtype=x.dtype, device=x.device))
            if v.shape != x.shape:
                raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(x.shape)}")
            computed[i] = v
        v = computed[src]
        x = torch.add(x, v, alpha=dt)  # x + dt * v as one kernel
        if return_velocities:
            used.append(v)
    return (x, used) if return_velocities else x


def one_step_estimate(velocity_fn: VelocityFn, noise: torch.Tensor, guess: torch.Tensor, t: float) -> torch.Tensor:
    """x_t + (1 - t) * v(x_t, t) with x_t = t * guess + (1 - t) * noise: one Euler step from the point at
    time t of the straight path noise -> guess to t = 1.

    If the guess is what the model would produce from this noise, v(x_t, t) points along that path and
    the estimate lands on the guess; the further the model would go elsewhere, the further the estimate
    lands from it (by (1 - t) times the difference, for a model whose prediction is one action).
    """
    if not 0.0 <= t < 1.0:
        raise ValueError(f"the check time must be in [0, 1), got {t}")
    if guess.shape != noise.shape:
        raise ValueError(f"guess {tuple(guess.shape)} and noise {tuple(noise.shape)} differ in shape")
    x_t = torch.lerp(noise, guess.to(noise.dtype), t)  # the flow state keeps the noise's dtype, as in sample()
    v = velocity_fn(x_t, torch.full((noise.shape[0],), t, dtype=x_t.dtype, device=x_t.device))
    if v.shape != x_t.shape:
        raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(x_t.shape)}")
    return torch.add(x_t, v, alpha=1.0 - t)
