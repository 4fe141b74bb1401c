"""Dataset writer: argument checks, determinism, synthetic_dataset reuse."""
import hashlib

import pytest

from flashdrive_ros.data import synthetic_dataset
from flashdrive_ros.data.writer import frame_timestamps, snapshot_dir, write_dataset


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def test_generation_is_deterministic_from_the_seed(tmp_path):
    a = synthetic_dataset(tmp_path / "a", n_clips=1, seconds=8.2, width=64, height=36, seed=4)
    b = synthetic_dataset(tmp_path / "b", n_clips=1, seconds=8.2, width=64, height=36, seed=4)
    assert a[1] == b[1]
    files_a, files_b = _digest(snapshot_dir(*a)), _digest(snapshot_dir(*b))
    assert files_a == files_b and any(name.endswith(".zip") for name in files_a)
    # A second call reuses the finished dataset instead of generating again.
    zip_path = next(snapshot_dir(*a).rglob("egomotion.chunk_0000.zip"))
    before = zip_path.stat().st_mtime_ns
    assert synthetic_dataset(tmp_path / "a", n_clips=1, seconds=8.2, width=64, height=36, seed=4) == a
    assert zip_path.stat().st_mtime_ns == before


def test_bad_generation_arguments_are_rejected_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_dataset(tmp_path, 1, 9.0, 321, 180, 0)
    with pytest.raises(ValueError, match="longer than 8.1 s"):
        write_dataset(tmp_path, 1, 5.0, 320, 180, 0)
    with pytest.raises(ValueError, match="n_clips"):
        write_dataset(tmp_path, 0, 9.0, 320, 180, 0)


def test_frame_timestamps_tick_at_30_fps_from_the_camera_offset():
    stamps = frame_timestamps(1_000_000, 5_000)
    assert stamps[0] == 5_000 and stamps[1] == 38_333 and stamps[3] == 105_000
    assert stamps[-1] <= 1_000_000 and stamps[-1] + 33_333 > 1_000_000
