"""Window reader: (dataset, clip id, t0) -> the Alpamayo model input and ground truth.

Mirrors Alpamayo's loader (dataset.md §8): per camera the last frame at or before t0-0.3, -0.2, -0.1,
0 s; egomotion interpolated at t0-1.5 .. t0 (16 history poses) and t0+0.1 .. t0+6.4 (64 future poses),
expressed in the ego frame at t0. Everything goes through the official devkit (`physical_ai_av`), so
the same code reads the real dataset from a Hugging Face cache.

Offline use: huggingface_hub reads HF_HUB_OFFLINE once, at import. `open_dataset` sets it before the
first import; if huggingface_hub was already imported online, it flips the module constant instead
(the devkit and the hub both read it through `huggingface_hub.constants`).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import re
import sys

import numpy as np
import pandas as pd

from .camera import CAMERA_NAMES
from .writer import COC_PATH, REPO_ID

N_FRAMES = 4
FRAME_STEP_US = 100_000
N_HISTORY = 16
N_FUTURE = 64
POSE_STEP_US = 100_000
HISTORY_SPAN_US = (N_HISTORY - 1) * POSE_STEP_US  # 1.5 s
FUTURE_SPAN_US = N_FUTURE * POSE_STEP_US  # 6.4 s
FRAMES_SPAN_US = (N_FRAMES - 1) * FRAME_STEP_US  # 0.3 s


class DatasetFileError(RuntimeError):
    """A dataset file is missing, truncated or malformed; the message names the file."""


@dataclasses.dataclass
class Window:
    clip_id: str
    t0_us: int
    frames: np.ndarray  # uint8 [n_cams, 4, H, W, 3], cameras in CAMERA_NAMES order, oldest first
    frame_timestamps_us: np.ndarray  # int64 [n_cams, 4]
    ego_history_xyz: np.ndarray  # float64 [16, 3], ego frame at t0 (last = origin)
    ego_history_rot: np.ndarray  # [16, 3, 3] (last = identity)
    ego_future_xyz: np.ndarray  # [64, 3], pose at t0 + (k+1)*0.1 s
    ego_future_rot: np.ndarray  # [64, 3, 3]
    label: str | None  # reasoning sentence for this t0, when the dataset has one
    camera_names: tuple[str, ...] = CAMERA_NAMES


def enable_offline_mode() -> None:
    """Make huggingface_hub (and so the devkit) work from the local cache only."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


_REQUIRED_METADATA = ("features.csv", "clip_index.parquet", "metadata/feature_presence.parquet",
                      "metadata/data_collection.parquet")


def open_dataset(cache_dir: str | pathlib.Path, revision: str, repo_id: str = REPO_ID):
    """PhysicalAIAVDatasetInterface over a local HF cache, offline, with a clear error per bad file."""
    enable_offline_mode()
    import huggingface_hub
    import physical_ai_av

    if not re.fullmatch(r"[0-9a-f]{40}", revision or ""):
        ref = pathlib.Path(cache_dir) / ("datasets--" + repo_id.replace("/", "--")) / "refs" / str(revision)
        if not ref.is_file():
            raise ValueError(f"revision must be a 40-hex commit or a ref cached under {ref.parent}, got {revision!r}")
    for name in _REQUIRED_METADATA:
        path = huggingface_hub.try_to_load_from_cache(repo_id, name, cache_dir=str(cache_dir), revision=revision,
                                                      repo_type="dataset")
        if not isinstance(path, str):
            raise DatasetFileError(f"{name}: not found in the cache at {cache_dir} for revision {revision}")
        try:
            pd.read_csv(path) if name.endswith(".csv") else pd.read_parquet(path)
        except Exception as err:  # truncated or corrupt: say which file
            raise DatasetFileError(f"{name}: unreadable ({path}): {err}") from err
    return physical_ai_av.PhysicalAIAVDatasetInterface(revision=revision, repo_id=repo_id, cache_dir=str(cache_dir))


class WindowReader:
    """Reads model windows from a PhysicalAI-AV dataset (real or generated) through the devkit.

    dataset: a PhysicalAIAVDatasetInterface, or the HF cache directory (then `revision` is required).
    Per clip it keeps the decoded egomotion, the devkit video readers (the mp4 bytes are read from the
    zip once per clip) and recently decoded frames, so a 10 Hz sliding pass decodes each frame once.
    """

    def __init__(self, dataset, revision: str | None = None, cameras: tuple[str, ...] = CAMERA_NAMES,
                 frame_cache_size: int = 64, max_open_clips: int = 2):
        if isinstance(dataset, (str, pathlib.Path)):
            if revision is None:
                raise ValueError("a revision (40-hex commit) is required to open a dataset directory offline")
            dataset = open_dataset(dataset, revision)
        self.ds = dataset
        self.cameras = tuple(cameras)
        self.frame_cache_size = frame_cache_size
        self.max_open_clips = max_open_clips
        self._clips: collections.OrderedDict[str, dict] = collections.OrderedDict()

    # ----------------------------------------------------------------------------- clip state
    def clip_ids(self) -> list[str]:
        return list(self.ds.clip_index.index)

    def _feature(self, clip_id: str, feature: str):
        """Devkit get_clip_feature, with failures turned into errors that name the file."""
        if clip_id not in self.ds.clip_index.index:
            raise KeyError(f"unknown clip {clip_id!r} (not in clip_index.parquet)")
        filename = self.ds.features.get_chunk_feature_filename(self.ds.get_clip_chunk(clip_id), feature)
        templates = self.ds.features.features_df.at[feature, "clip_files_in_zip"]
        members = ", ".join(t.format(clip_id=clip_id) for t in templates.values()) if isinstance(templates, dict) else ""
        where = f"{filename}" + (f" (members {members})" if members else "")
        try:
            return self.ds.get_clip_feature(clip_id, feature)
        except FileNotFoundError as err:
            raise DatasetFileError(f"{where}: not found in the dataset cache: {err}") from err
        except Exception as err:
            raise DatasetFileError(f"{where}: cannot be read (truncated or corrupt?): {type(err).__name__}: {err}") from err

    def _clip(self, clip_id: str) -> dict:
        if clip_id in self._clips:
            self._clips.move_to_end(clip_id)
            return self._clips[clip_id]
        state = {"ego": self._feature(clip_id, "egomotion"), "video": {}, "frames": {}}
        for cam in self.cameras:
            state["video"][cam] = self._feature(clip_id, cam)
            state["frames"][cam] = collections.OrderedDict()
        state["labels"] = self._load_labels(clip_id)
        self._clips[clip_id] = state
        while len(self._clips) > self.max_open_clips:
            _, old = self._clips.popitem(last=False)
            for reader in old["video"].values():
                reader.close()
        return state

    def _load_labels(self, clip_id: str) -> pd.Series | None:
        """t0_us -> sentence from labels/coc/<clip>.coc.parquet in the same snapshot, if present."""
        import huggingface_hub

        name = COC_PATH.format(clip_id=clip_id)
        path = huggingface_hub.try_to_load_from_cache(self.ds.repo_id, name, cache_dir=self.ds.cache_dir,
                                                      revision=self.ds.revision, repo_type="dataset")
        if not isinstance(path, str):
            return None
        try:
            table = pd.read_parquet(path, columns=["t0_us", "coc"])
        except Exception as err:
            raise DatasetFileError(f"{name}: unreadable ({path}): {err}") from err
        return table.set_index("t0_us")["coc"].sort_index()

    # ----------------------------------------------------------------------------- time range
    def valid_t0_range(self, clip_id: str) -> tuple[int, int]:
        """Inclusive [first, last] t0 (µs) for which a full window exists: 1.5 s of egomotion and
        0.3 s of video before t0, 6.4 s of egomotion after it. (Alpamayo additionally asks t0 > 1.6 s.)"""
        state = self._clip(clip_id)
        ego_lo, ego_hi = (int(v) for v in state["ego"].time_range)
        # With no cameras (trajectory-only readers) only the egomotion limits the range.
        cam_lo = max((int(r.timestamps[0]) for r in state["video"].values()), default=ego_lo)
        cam_hi = min((int(r.timestamps[-1]) for r in state["video"].values()), default=ego_hi)
        lo = max(ego_lo + HISTORY_SPAN_US, cam_lo + FRAMES_SPAN_US)
        hi = min(ego_hi - FUTURE_SPAN_US, cam_hi)
        if lo > hi:
            raise ValueError(f"clip {clip_id} is too short for a window: egomotion [{ego_lo}, {ego_hi}] µs, "
                             f"video [{cam_lo}, {cam_hi}] µs")
        return lo, hi

    def t0_grid(self, clip_id: str, step_us: int = 100_000, start_us: int = 1_700_000) -> np.ndarray:
        """10 Hz t0s (multiples of step_us) from start_us (FlashDrive streams 1.7 s ..) inside the valid range."""
        lo, hi = self.valid_t0_range(clip_id)
        first = max(lo, start_us)
        first = -(-first // step_us) * step_us
        return np.arange(first, hi + 1, step_us, dtype=np.int64)

    # ----------------------------------------------------------------------------- windows
    def read_window(self, clip_id: str, t0_us: int) -> Window:
        t0_us = int(t0_us)
        lo, hi = self.valid_t0_range(clip_id)
        if not lo <= t0_us <= hi:
            raise ValueError(f"t0 {t0_us} µs outside the valid range [{lo}, {hi}] µs of clip {clip_id}")
        state = self._clip(clip_id)
        request = t0_us - FRAME_STEP_US * np.arange(N_FRAMES - 1, -1, -1, dtype=np.int64)
        frames, stamps = [], []
        for cam in self.cameras:
            f, ts = self._frames(clip_id, state, cam, request)
            frames.append(f)
            stamps.append(ts)
        hist_xyz, hist_rot, fut_xyz, fut_rot = self.trajectory(clip_id, t0_us)
        if self.cameras:
            frames, stamps = np.stack(frames), np.stack(stamps)
        else:  # trajectory-only reader
            frames, stamps = np.zeros((0, N_FRAMES, 0, 0, 3), np.uint8), np.zeros((0, N_FRAMES), np.int64)
        return Window(clip_id=clip_id, t0_us=t0_us, frames=frames, frame_timestamps_us=stamps,
                      ego_history_xyz=hist_xyz, ego_history_rot=hist_rot, ego_future_xyz=fut_xyz,
                      ego_future_rot=fut_rot, label=self.label(clip_id, t0_us), camera_names=self.cameras)

    def trajectory(self, clip_id: str, t0_us: int):
        """(history xyz [16,3], history rot [16,3,3], future xyz [64,3], future rot [64,3,3]) in the ego
        frame at t0: xyz_local = R_t0^T (xyz - xyz_t0), R_local = R_t0^T R."""
        ego = self._clip(clip_id)["ego"]
        times = np.concatenate([
            t0_us - POSE_STEP_US * np.arange(N_HISTORY - 1, -1, -1, dtype=np.int64),
            t0_us + POSE_STEP_US * np.arange(1, N_FUTURE + 1, dtype=np.int64),
        ])
        try:
            pose = ego(times).pose
        except ValueError as err:
            raise ValueError(f"clip {clip_id}: egomotion does not cover t0 {t0_us} µs -1.5 s .. +6.4 s: {err}") from err
        xyz = np.asarray(pose.translation, dtype=np.float64)
        rot = np.asarray(pose.rotation.as_matrix(), dtype=np.float64)
        r0, p0 = rot[N_HISTORY - 1], xyz[N_HISTORY - 1]
        local_xyz = (xyz - p0) @ r0  # rows: R0^T (p - p0)
        local_rot = np.einsum("ji,njk->nik", r0, rot)
        local_xyz[N_HISTORY - 1] = 0.0
        local_rot[N_HISTORY - 1] = np.eye(3)
        return (local_xyz[:N_HISTORY], local_rot[:N_HISTORY], local_xyz[N_HISTORY:], local_rot[N_HISTORY:])

    def label(self, clip_id: str, t0_us: int) -> str | None:
        """The sentence at the latest labelled time <= t0 within one label step, else None."""
        labels = self._clip(clip_id)["labels"]
        if labels is None or len(labels) == 0:
            return None
        k = labels.index.searchsorted(t0_us, side="right") - 1
        if k < 0 or t0_us - labels.index[k] >= FRAME_STEP_US:
            return None
        return str(labels.iloc[k])

    def _frames(self, clip_id, state, cam, request):
        """Frames at or before each requested time, decoding only frames not cached yet.

        On a miss it also decodes the frames the next windows of a 10 Hz pass will need (one seek per
        keyframe group instead of one per window)."""
        reader, cache = state["video"][cam], state["frames"][cam]
        stamps = reader.timestamps
        if request.min() < stamps[0] or request.max() > stamps[-1]:
            raise ValueError(f"clip {clip_id} {cam}: frames requested at {request.tolist()} µs, video covers "
                             f"[{stamps[0]}, {stamps[-1]}] µs")
        index = np.searchsorted(stamps, request, side="right") - 1
        missing = [int(i) for i in index if int(i) not in cache]
        if missing:
            ahead = request[-1] + FRAME_STEP_US * np.arange(1, 16)
            ahead = ahead[ahead <= stamps[-1]]
            extra = np.searchsorted(stamps, ahead, side="right") - 1
            want = sorted(set(missing) | {int(i) for i in extra if int(i) not in cache})
            try:
                images = reader.decode_images_from_frame_indices(np.asarray(want, dtype=np.int64))
            except Exception as err:
                filename = self.ds.features.get_chunk_feature_filename(self.ds.get_clip_chunk(clip_id), cam)
                raise DatasetFileError(f"{filename} ({clip_id}.{cam}.mp4): cannot decode frames {want}: {err}") from err
            for i, img in zip(want, images):
                cache[i] = img
        frames = np.stack([cache[int(i)] for i in index])
        for i in index:
            cache.move_to_end(int(i))
        while len(cache) > self.frame_cache_size:  # least recently used first
            cache.popitem(last=False)
        return frames, stamps[index].astype(np.int64)
