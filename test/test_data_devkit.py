"""The official devkit (physical_ai_av) reads a generated dataset offline and sees what the renderer meant."""
import io
import zipfile

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from flashdrive_ros.data import CAMERA_NAMES, enable_offline_mode, synthetic_dataset
from flashdrive_ros.data import scenario as sc
from flashdrive_ros.data.camera import default_rig
from flashdrive_ros.data.render import CameraRenderer, GroundTexture, scene_boxes, texture_resolution
from flashdrive_ros.data.writer import snapshot_dir

W, H, SECONDS = 320, 180, 8.5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    cache_dir, revision = synthetic_dataset(tmp_path_factory.mktemp("pai"), n_clips=1, seconds=SECONDS,
                                            width=W, height=H, seed=0)
    enable_offline_mode()
    import physical_ai_av

    ds = physical_ai_av.PhysicalAIAVDatasetInterface(revision=revision, cache_dir=str(cache_dir))
    clip = ds.clip_index.index[0]
    row = ds.data_collection.loc[clip]
    scene = sc.build_scene(row["scenario"], int(row["seed"]), SECONDS)
    return ds, clip, scene


def test_devkit_opens_the_dataset_offline_with_all_features(dataset):
    ds, clip, _ = dataset
    import huggingface_hub

    assert huggingface_hub.constants.HF_HUB_OFFLINE and ds.is_offline_mode
    assert ds.features.CAMERA.ALL == set(CAMERA_NAMES)
    assert {"egomotion"} <= ds.features.LABELS.ALL
    assert ds.features.CALIBRATION.ALL == {"camera_intrinsics", "sensor_extrinsics", "vehicle_dimensions"}
    assert bool(ds.feature_presence.loc[clip].all())
    dims = ds.get_clip_feature(clip, "vehicle_dimensions")
    assert dims.length == sc.EGO_DIMENSIONS["length"] and dims.wheelbase == sc.EGO_DIMENSIONS["wheelbase"]


def test_egomotion_pose_at_t_is_the_scripted_pose(dataset):
    ds, clip, scene = dataset
    ego = ds.get_clip_feature(clip, "egomotion")
    assert tuple(ego.time_range) == (0, int(SECONDS * 1e6))
    times = scene.t_us[::7]
    state = ego(times)
    np.testing.assert_allclose(state.pose.translation[:, 0], scene.ego_x[::7], atol=1e-9)
    np.testing.assert_allclose(state.pose.translation[:, 1], scene.ego_y[::7], atol=1e-9)
    np.testing.assert_allclose(state.pose.translation[:, 2], 0.0, atol=1e-12)
    yaw = state.pose.rotation.as_euler("ZYX")[:, 0]
    np.testing.assert_allclose(np.angle(np.exp(1j * (yaw - scene.ego_yaw[::7]))), 0.0, atol=1e-9)
    # Between samples the devkit's spline stays on the scripted path (linear interpolation of 100 Hz).
    mid = scene.t_us[100:700:50] + 5_000
    np.testing.assert_allclose(ego(mid).pose.translation[:, 0], np.interp(mid, scene.t_us, scene.ego_x), atol=2e-3)
    # Speed in the parquet agrees with the simulated speed.
    speed = np.hypot(state.velocity[:, 0], state.velocity[:, 1])
    np.testing.assert_allclose(speed[1:-1], scene.ego_v[::7][1:-1], atol=0.05)


def test_frame_timestamps_are_monotone_at_30_fps(dataset):
    ds, clip, _ = dataset
    for cam in CAMERA_NAMES:
        video = ds.get_clip_feature(clip, cam)
        stamps = video.timestamps
        assert video.fps == 30
        assert set(np.diff(stamps)) <= {33_333, 33_334}
        assert 0 <= stamps[0] < 33_334 and SECONDS * 1e6 - 33_334 < stamps[-1] <= SECONDS * 1e6
        frames, got = video.decode_images_from_timestamps(stamps[[0, 100, -1]])
        assert frames.shape == (3, H, W, 3) and frames.dtype == np.uint8
        np.testing.assert_array_equal(got, stamps[[0, 100, -1]])


def test_decoded_frames_are_the_rendered_frames(dataset):
    ds, clip, scene = dataset
    rig = default_rig(W, H)
    texture = GroundTexture.build(scene, texture_resolution(W))
    for cam in ("camera_front_wide_120fov", "camera_cross_left_120fov"):
        video = ds.get_clip_feature(clip, cam)
        stamps = video.timestamps[[10, 150, 240]]
        decoded, _ = video.decode_images_from_timestamps(stamps)
        renderer = CameraRenderer(rig[cam], texture)
        for img, t in zip(decoded, stamps):
            expected = renderer.render(scene, int(t), scene_boxes(scene, int(t)))
            assert np.abs(img.astype(int) - expected).mean() < 4.0  # h264 loss only


def test_a_rendered_lane_line_lands_where_the_devkit_camera_model_projects_it(dataset):
    ds, clip, scene = dataset
    ego = ds.get_clip_feature(clip, "egomotion")
    intrinsics = ds.get_clip_feature(clip, "camera_intrinsics").camera_models
    extrinsics = ds.get_clip_feature(clip, "sensor_extrinsics").sensor_poses
    road = scene.road
    rig = default_rig(W, H)
    texture = GroundTexture.build(scene, texture_resolution(W))
    checked = 0
    for cam, ahead in (("camera_front_wide_120fov", 8.0), ("camera_front_tele_30fov", 25.0)):
        video = ds.get_clip_feature(clip, cam)
        stamps = video.timestamps[30:240:40]
        frames, _ = video.decode_images_from_timestamps(stamps)
        renderer = CameraRenderer(rig[cam], texture)
        for frame, t in zip(frames, stamps):
            # Pixels where a vehicle or pedestrian hides the ground are not about the ground.
            occluded = np.any(renderer.render(scene, int(t)) != renderer.render(scene, int(t), boxes=[]), axis=-1)
            s = np.interp(t, scene.t_us, scene.ego_s) + ahead
            for d, expect_white in ((road.right_edge, True), (road.right_edge + 1.2, False)):
                x, y = road.point(s, d)  # right edge line, and a point 1.2 m inside the lane
                rig_point = ego(np.array([t])).pose.inv().apply(np.array([[x, y, 0.0]]))
                cam_point = extrinsics[cam].inv().apply(rig_point)
                u, v = np.round(intrinsics[cam].ray2pixel(cam_point)[0]).astype(int)
                assert 0 <= u < W and 0 <= v < H
                if occluded[max(0, v - 1):v + 2, max(0, u - 1):u + 2].any():
                    continue
                checked += 1
                # The ground texture has 10 cm cells at this resolution: half a cell seen 25 m away
                # through the tele lens is ~1.2 px, so look within 2 px of the projected point.
                patch = frame[max(0, v - 2):v + 3, max(0, u - 2):u + 3].astype(int).reshape(-1, 3)
                if expect_white:
                    assert patch.min(axis=1).max() > 160, f"{cam} t={t}: no white edge line near {(u, v)}"
                else:
                    assert patch.max() < 130, f"{cam} t={t}: expected asphalt around {(u, v)}, got {patch.max()}"
    assert checked >= 16


def test_calibration_is_written_as_rendered(dataset):
    ds, clip, _ = dataset
    rig = default_rig(W, H)
    intrinsics = ds.get_clip_feature(clip, "camera_intrinsics").camera_models
    extrinsics = ds.get_clip_feature(clip, "sensor_extrinsics").sensor_poses
    for cam in CAMERA_NAMES:
        model = intrinsics[cam]
        assert (model.width, model.height) == (W, H)
        np.testing.assert_allclose(model.th2r.coef, rig[cam].intrinsics.fw_poly)
        np.testing.assert_allclose(extrinsics[cam].rotation.as_matrix(), rig[cam].rotation, atol=1e-12)
        np.testing.assert_allclose(extrinsics[cam].translation, rig[cam].translation, atol=1e-6)


def test_chunk_zips_hold_the_published_member_names(dataset):
    ds, clip, _ = dataset
    root = snapshot_dir(ds.cache_dir, ds.revision)
    with zipfile.ZipFile(root / "camera/camera_front_wide_120fov/camera_front_wide_120fov.chunk_0000.zip") as zf:
        assert set(zf.namelist()) == {f"{clip}.camera_front_wide_120fov.mp4",
                                      f"{clip}.camera_front_wide_120fov.timestamps.parquet"}
    with zipfile.ZipFile(root / "labels/egomotion/egomotion.chunk_0000.zip") as zf:
        import pandas as pd

        ego = pd.read_parquet(io.BytesIO(zf.read(f"{clip}.egomotion.parquet")))
    assert list(ego.columns) == ["timestamp", "qx", "qy", "qz", "qw", "x", "y", "z", "vx", "vy", "vz",
                                 "ax", "ay", "az", "curvature"]
    assert ego["timestamp"].dtype == np.int64 and set(np.diff(ego["timestamp"])) == {10_000}
    np.testing.assert_allclose(np.linalg.norm(ego[["qx", "qy", "qz", "qw"]], axis=1), 1.0)
    Rotation.from_quat(ego[["qx", "qy", "qz", "qw"]].to_numpy())  # valid quaternions
