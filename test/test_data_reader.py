"""WindowReader: Alpamayo windows and ground truth from a PhysicalAI-AV dataset through the devkit."""
import io
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest

from flashdrive_ros.data import CAMERA_NAMES, DatasetFileError, WindowReader, open_dataset, synthetic_dataset
from flashdrive_ros.data import scenario as sc
from flashdrive_ros.data.writer import snapshot_dir

W, H, SECONDS = 192, 108, 10.0


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("pai"), n_clips=1, seconds=SECONDS, width=W, height=H, seed=1)


@pytest.fixture(scope="module")
def reader(generated):
    return WindowReader(*generated)


@pytest.fixture(scope="module")
def clip(reader):
    return reader.clip_ids()[0]


@pytest.fixture(scope="module")
def scene(reader, clip):
    row = reader.ds.data_collection.loc[clip]
    return sc.build_scene(row["scenario"], int(row["seed"]), SECONDS)


def _stamps(generated, clip, cam):
    """Frame timestamps read straight from the chunk zip, independently of the devkit."""
    root = snapshot_dir(*generated)
    with zipfile.ZipFile(root / f"camera/{cam}/{cam}.chunk_0000.zip") as zf:
        return pd.read_parquet(io.BytesIO(zf.read(f"{clip}.{cam}.timestamps.parquet")))["timestamp"].to_numpy()


def test_window_has_four_cameras_by_four_frames_in_alpamayo_order(reader, clip):
    w = reader.read_window(clip, 3_100_000)
    assert w.frames.shape == (4, 4, H, W, 3) and w.frames.dtype == np.uint8
    assert w.camera_names == CAMERA_NAMES
    assert w.frame_timestamps_us.shape == (4, 4)
    assert w.ego_history_xyz.shape == (16, 3) and w.ego_history_rot.shape == (16, 3, 3)
    assert w.ego_future_xyz.shape == (64, 3) and w.ego_future_rot.shape == (64, 3, 3)
    assert w.clip_id == clip and w.t0_us == 3_100_000


def test_frames_are_the_last_at_or_before_t0_minus_300_200_100_0_ms(generated, reader, clip):
    t0 = 3_100_000
    w = reader.read_window(clip, t0)
    video = reader.ds.get_clip_feature(clip, CAMERA_NAMES[0])
    for c, cam in enumerate(CAMERA_NAMES):
        stamps = _stamps(generated, clip, cam)
        for k, request in enumerate((t0 - 300_000, t0 - 200_000, t0 - 100_000, t0)):
            expected = stamps[stamps <= request].max()
            assert w.frame_timestamps_us[c, k] == expected
            assert request - 33_334 < expected <= request
    # Pixel content: the same frames the devkit decodes for those times.
    decoded, _ = video.decode_images_from_timestamps(t0 - np.array([300_000, 200_000, 100_000, 0]))
    np.testing.assert_array_equal(w.frames[0], decoded)


def test_history_and_future_are_the_scripted_poses_in_the_t0_ego_frame(reader, clip, scene):
    t0 = 3_000_000
    w = reader.read_window(clip, t0)
    i0 = t0 // 10_000
    idx_hist = i0 - 10 * np.arange(15, -1, -1)
    idx_fut = i0 + 10 * np.arange(1, 65)
    x0, y0, yaw0 = scene.ego_x[i0], scene.ego_y[i0], scene.ego_yaw[i0]

    def local(idx):  # hand-written 2D change of frame: rotate by -yaw0 about the t0 pose
        dx, dy = scene.ego_x[idx] - x0, scene.ego_y[idx] - y0
        return np.cos(yaw0) * dx + np.sin(yaw0) * dy, -np.sin(yaw0) * dx + np.cos(yaw0) * dy, scene.ego_yaw[idx] - yaw0

    for xyz, rot, idx in ((w.ego_history_xyz, w.ego_history_rot, idx_hist), (w.ego_future_xyz, w.ego_future_rot, idx_fut)):
        lx, ly, lyaw = local(idx)
        np.testing.assert_allclose(xyz[:, 0], lx, atol=1e-6)
        np.testing.assert_allclose(xyz[:, 1], ly, atol=1e-6)
        np.testing.assert_allclose(xyz[:, 2], 0.0, atol=1e-9)
        np.testing.assert_allclose(rot[:, 0, 0], np.cos(lyaw), atol=1e-6)
        np.testing.assert_allclose(rot[:, 1, 0], np.sin(lyaw), atol=1e-6)
    np.testing.assert_array_equal(w.ego_history_xyz[-1], 0.0)
    np.testing.assert_array_equal(w.ego_history_rot[-1], np.eye(3))


class _StraightNorthEgomotion:
    """Wraps a devkit interface, replacing the egomotion with a hand-made drive: 10 m/s along +y
    (yaw 90 deg) from (5, -20), sampled at 100 Hz."""

    def __init__(self, ds):
        import physical_ai_av.egomotion as em

        self._ds = ds
        t = np.arange(0, int(SECONDS * 1e6) + 1, 10_000)
        n = len(t)
        df = pd.DataFrame({"timestamp": t, "qx": 0.0, "qy": 0.0, "qz": np.sin(np.pi / 4), "qw": np.cos(np.pi / 4),
                           "x": 5.0, "y": -20.0 + 10.0 * t * 1e-6, "z": 0.0, "vx": 0.0, "vy": 10.0, "vz": 0.0,
                           "ax": 0.0, "ay": 0.0, "az": 0.0, "curvature": 0.0}, index=range(n))
        self._ego = em.EgomotionState.from_egomotion_df(df).create_interpolator(t)

    def __getattr__(self, name):
        return getattr(self._ds, name)

    def get_clip_feature(self, clip_id, feature, maybe_stream=False):
        return self._ego if feature == "egomotion" else self._ds.get_clip_feature(clip_id, feature)


def test_ground_truth_matches_a_hand_computed_straight_drive(reader, clip):
    w = WindowReader(_StraightNorthEgomotion(reader.ds)).read_window(clip, 3_000_000)
    # Driving straight ahead at 1 m per 0.1 s: in the ego frame poses lie on the x axis.
    np.testing.assert_allclose(w.ego_future_xyz, np.stack([np.arange(1, 65), np.zeros(64), np.zeros(64)], 1), atol=1e-9)
    np.testing.assert_allclose(w.ego_history_xyz, np.stack([np.arange(-15, 1), np.zeros(16), np.zeros(16)], 1), atol=1e-9)
    np.testing.assert_allclose(w.ego_future_rot, np.broadcast_to(np.eye(3), (64, 3, 3)), atol=1e-12)


def test_label_is_the_sentence_written_for_that_t0(generated, reader, clip):
    labels = pd.read_parquet(snapshot_dir(*generated) / f"labels/coc/{clip}.coc.parquet")
    assert set(labels.columns) >= {"t0_us", "coc"} and np.all(np.diff(labels["t0_us"]) == 100_000)
    for t0 in (2_000_000, 3_500_000):
        expected = labels.loc[labels["t0_us"] == t0, "coc"].item()
        assert reader.read_window(clip, t0).label == expected
    assert reader.label(clip, 3_550_000) == labels.loc[labels["t0_us"] == 3_500_000, "coc"].item()


def test_valid_t0_range_and_out_of_range_requests(reader, clip):
    lo, hi = reader.valid_t0_range(clip)
    assert lo >= 1_500_000 and hi == int(SECONDS * 1e6) - 6_400_000
    grid = reader.t0_grid(clip)
    assert grid[0] == 1_700_000 and grid[-1] == 3_600_000 and np.all(np.diff(grid) == 100_000)
    with pytest.raises(ValueError, match="outside the valid range"):
        reader.read_window(clip, hi + 1)
    with pytest.raises(ValueError, match="outside the valid range"):
        reader.read_window(clip, 1_000_000)
    with pytest.raises(KeyError, match="unknown clip"):
        reader.read_window("not-a-clip", 2_000_000)


def test_a_sliding_pass_reads_each_clip_file_once(generated, clip):
    ds = open_dataset(*generated)
    calls = []
    original = ds.get_clip_feature
    ds.get_clip_feature = lambda c, f, **kw: calls.append(f) or original(c, f, **kw)
    reader = WindowReader(ds)
    windows = [reader.read_window(clip, t0) for t0 in reader.t0_grid(clip)]
    assert sorted(calls) == sorted(["egomotion", *CAMERA_NAMES])
    # Consecutive 10 Hz windows share three frames per camera.
    np.testing.assert_array_equal(windows[1].frames[:, :3], windows[0].frames[:, 1:])


def _copy(generated, tmp_path):
    cache_dir, revision = generated
    shutil.copytree(cache_dir, tmp_path / "cache")
    return tmp_path / "cache", revision, snapshot_dir(tmp_path / "cache", revision)


def test_missing_or_truncated_clip_files_raise_errors_naming_the_file(generated, clip, tmp_path):
    cache, revision, root = _copy(generated, tmp_path)
    (root / "labels/egomotion/egomotion.chunk_0000.zip").unlink()
    with pytest.raises(DatasetFileError, match="labels/egomotion/egomotion.chunk_0000.zip"):
        WindowReader(cache, revision).read_window(clip, 2_000_000)

    cache, revision, root = _copy(generated, tmp_path / "b")
    cam_zip = root / "camera/camera_front_wide_120fov/camera_front_wide_120fov.chunk_0000.zip"
    cam_zip.write_bytes(cam_zip.read_bytes()[: cam_zip.stat().st_size // 2])
    with pytest.raises(DatasetFileError, match="camera_front_wide_120fov.chunk_0000.zip"):
        WindowReader(cache, revision).read_window(clip, 2_000_000)


def test_missing_or_truncated_metadata_raise_errors_naming_the_file(generated, tmp_path):
    cache, revision, root = _copy(generated, tmp_path / "a")
    index = root / "clip_index.parquet"
    index.write_bytes(index.read_bytes()[:50])
    with pytest.raises(DatasetFileError, match="clip_index.parquet"):
        WindowReader(cache, revision)
    cache, revision, root = _copy(generated, tmp_path / "b")
    (root / "metadata/data_collection.parquet").unlink()
    with pytest.raises(DatasetFileError, match="metadata/data_collection.parquet"):
        WindowReader(cache, revision)
    with pytest.raises(ValueError, match="revision"):
        WindowReader(cache, "not-a-revision")


def test_without_a_labels_file_the_label_is_none_as_on_the_real_dataset(generated, clip, tmp_path):
    cache, revision, root = _copy(generated, tmp_path)
    shutil.rmtree(root / "labels/coc")
    assert WindowReader(cache, revision).read_window(clip, 2_000_000).label is None


def test_a_reader_without_cameras_serves_ground_truth_only(reader, clip):
    poses_only = WindowReader(reader.ds, cameras=())
    assert poses_only.valid_t0_range(clip) == (1_500_000, int(SECONDS * 1e6) - 6_400_000)
    expected = reader.trajectory(clip, 2_500_000)
    for got, want in zip(poses_only.trajectory(clip, 2_500_000), expected):
        np.testing.assert_array_equal(got, want)
    assert poses_only.read_window(clip, 2_500_000).frames.shape[0] == 0
