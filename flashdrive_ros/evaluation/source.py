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


class DatasetSource:
    """Adapts WindowReader (dataset.md §8 windows) to the evaluation loop's WindowSource protocol."""

    def __init__(self, root: str | Path, revision: str | None = None, clip_ids: list[str] | None = None):
        from flashdrive_ros.data import WindowReader
        self.reader = WindowReader(root, revision) if revision is not None else WindowReader(root)
        self._clips = list(clip_ids) if clip_ids else list(self.reader.clip_ids())

    def clip_ids(self) -> list[str]:
        return list(self._clips)

    def t0_range_us(self, clip_id: str) -> tuple[int, int]:
        first, last = self.reader.valid_t0_range(clip_id)
        return int(first), int(last)

    def read(self, clip_id: str, t0_us: int, with_frames: bool = True) -> EvalWindow:
        w = self.reader.read_window(clip_id, int(t0_us), **({} if with_frames else {"frames": False}))
        return EvalWindow(clip_id=clip_id, t0_us=int(t0_us),
                          frames=np.asarray(w.frames) if with_frames else None,
                          history_xyz=_squeeze(w.ego_history_xyz, 2), history_rot=_squeeze(w.ego_history_rot, 3),
                          future_xyz=_squeeze(w.ego_future_xyz, 2), label=getattr(w, "label", None))
