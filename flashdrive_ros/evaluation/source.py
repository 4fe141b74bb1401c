"""Window source backed by a PhysicalAI-AV format dataset (flashdrive_ros.data.WindowReader)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .runner import EvalWindow


def _squeeze(x, ndim: int) -> np.ndarray:
    """Drop leading singleton axes ((1, 1, 16, 3) -> (16, 3)) as in the Alpamayo loader output."""
    a = np.asarray(x)
    while a.ndim > ndim and a.shape[0] == 1:
        a = a[0]
    return a


# Alpamayo asserts t0 > 1.6 s; on the 100 ms grid the first t0 is 1.7 s (FlashDrive streams 1.7 .. 13.6 s).
MIN_T0_US = 1_700_000


class DatasetSource:
    """Adapts WindowReader (dataset.md §8 windows) to the evaluation loop's WindowSource protocol."""

    def __init__(self, root: str | Path, revision: str, clip_ids: list[str] | None = None,
                 min_t0_us: int = MIN_T0_US, grid_us: int = 100_000):
        from flashdrive_ros.data import WindowReader
        self.reader = WindowReader(root, revision)
        self._clips = list(clip_ids) if clip_ids else list(self.reader.clip_ids())
        self.min_t0_us, self.grid_us = int(min_t0_us), int(grid_us)

    def clip_ids(self) -> list[str]:
        return list(self._clips)

    def t0_range_us(self, clip_id: str) -> tuple[int, int]:
        """First t0 = the first multiple of the 100 ms grid that is valid and >= 1.7 s; last = last valid."""
        lo, hi = self.reader.valid_t0_range(clip_id)
        first = max(int(lo), self.min_t0_us)
        first = -(-first // self.grid_us) * self.grid_us
        if first > hi:
            raise ValueError(f"clip {clip_id}: no window with t0 >= {self.min_t0_us} µs (valid range [{lo}, {hi}])")
        return first, int(hi)

    def read(self, clip_id: str, t0_us: int, with_frames: bool = True) -> EvalWindow:
        if not with_frames:
            # Model-free predictors: egomotion and label only, no video decoding.
            hist_xyz, hist_rot, fut_xyz, _ = self.reader.trajectory(clip_id, int(t0_us))
            return EvalWindow(clip_id, int(t0_us), None, hist_xyz, hist_rot, fut_xyz,
                              self.reader.label(clip_id, int(t0_us)))
        w = self.reader.read_window(clip_id, int(t0_us))
        return EvalWindow(clip_id=clip_id, t0_us=int(t0_us), frames=np.asarray(w.frames),
                          history_xyz=_squeeze(w.ego_history_xyz, 2), history_rot=_squeeze(w.ego_history_rot, 3),
                          future_xyz=_squeeze(w.ego_future_xyz, 2), label=w.label)
