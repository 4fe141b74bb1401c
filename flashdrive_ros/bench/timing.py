"""Per-stage timing: CUDA events on a GPU (no host sync inside a step), perf_counter on the CPU."""

from __future__ import annotations

import time

import torch


class Clock:
    """`mark()` returns a time point; `ms(a, b)` the milliseconds between two, after `sync()`."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1000.0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(steps: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{stage: {median, p90}} over steps (each step a {stage: ms} dict)."""
    stages = list(steps[0].keys())
    return {s: {"median": percentile([st[s] for st in steps], 50.0), "p90": percentile([st[s] for st in steps], 90.0)}
            for s in stages}
