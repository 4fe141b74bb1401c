"""clip_to_bag: a synthetic PhysicalAI-AV clip, read through the devkit, becomes a rosbag2 MCAP bag whose
topics, counts, stamps, images, odometry and ground truth match the clip (docs/DESIGN.md, ROS interfaces)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from flashdrive_ros.nodes import bag_topics as bt
from flashdrive_ros.nodes import clip_to_bag

W, H, SECONDS = 96, 64, 8.2
EPOCH_NS = bt.DEFAULT_EPOCH_NS


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from flashdrive_ros.data.writer import write_dataset
    cache_dir, revision = write_dataset(tmp_path_factory.mktemp("ds"), 1, SECONDS, W, H, seed=3, log=lambda *_: None)
    devkit, _ = clip_to_bag.open_devkit(cache_dir, revision)
    import pandas as pd
    clip_id = str(pd.read_parquet(next(Path(cache_dir).rglob("clip_index.parquet"))).index[0])
    return cache_dir, revision, clip_id, devkit


@pytest.fixture(scope="module")
def bag(dataset, tmp_path_factory):
    cache_dir, revision, clip_id, _ = dataset
    out = tmp_path_factory.mktemp("bags") / "clip"
    rc = clip_to_bag.main(["--dataset", str(cache_dir), "--revision", revision, "--clip", clip_id,
                           "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def read_all(bag_path):
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore
    out = {}
    with AnyReader([Path(bag_path)], default_typestore=get_typestore(Stores.EMPTY)) as reader:
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, reader.deserialize(raw, conn.msgtype)))
    return out


@pytest.fixture(scope="module")
def messages(bag):
    return read_all(bag)


def test_bag_is_mcap_with_clip_metadata(bag, dataset):
    assert list(bag.glob("*.mcap")), "storage must be MCAP"
    custom = __import__("flashdrive_ros.nodes.replay_node", fromlist=["x"]).bag_custom_data(bag)
    assert custom[bt.META_CLIP_ID] == dataset[2]
    assert int(custom[bt.META_EPOCH_NS]) == EPOCH_NS


def test_mcap_follows_the_ros2_profile(bag, messages):
    """Checked with the independent `mcap` reader: what rosbag2's MCAP storage plugin expects."""
    from mcap.reader import make_reader
    [path] = bag.glob("*.mcap")
    with open(path, "rb") as fh:
        reader = make_reader(fh)
        assert reader.get_header().profile == "ros2"
        summary = reader.get_summary()
    channels = {c.topic: c for c in summary.channels.values()}
    assert set(channels) == set(bt.bag_topic_types())
    for topic, ch in channels.items():
        schema = summary.schemas[ch.schema_id]
        assert (ch.message_encoding, schema.encoding, schema.name) == ("cdr", "ros2msg", bt.bag_topic_types()[topic])
    assert summary.statistics.message_count == sum(len(v) for v in messages.values())


def test_all_topics_present_with_declared_types(bag):
    from rosbags.highlevel import AnyReader
    with AnyReader([bag]) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
    assert types == bt.bag_topic_types()


def test_every_camera_frame_once_with_true_stamps(messages, dataset):
    devkit, clip_id = dataset[3], dataset[2]
    for cam in bt.CAMERA_NAMES:
        frame_ts = np.asarray(devkit.get_clip_feature(clip_id, cam).timestamps, dtype=np.int64)
        imgs = messages[bt.camera_topic(cam)]
        infos = messages[bt.camera_info_topic(cam)]
        assert len(imgs) == len(frame_ts) == len(infos)
        expected = EPOCH_NS + frame_ts * 1000
        stamps = np.array([bt.stamp_to_ns(m.header.stamp) for _, m in imgs])
        np.testing.assert_array_equal(stamps, expected)
        np.testing.assert_array_equal([t for t, _ in imgs], expected)          # log time == stamp
        assert {m.header.frame_id for _, m in imgs} == {cam}
        assert {m.format for _, m in imgs} == {"jpeg"}
        assert all(m.width == W and m.height == H and m.distortion_model == "ftheta" for _, m in infos)


def test_jpeg_decodes_to_the_clip_frame(messages, dataset):
    from PIL import Image
    devkit, clip_id = dataset[3], dataset[2]
    cam = "camera_front_wide_120fov"
    reader = devkit.get_clip_feature(clip_id, cam)
    k = 45
    ref = reader.decode_images_from_frame_indices(np.array([k]))[0]
    _, msg = messages[bt.camera_topic(cam)][k]
    img = np.asarray(Image.open(io.BytesIO(bytes(msg.data))).convert("RGB"))
    assert img.shape == (H, W, 3)
    assert np.abs(img.astype(int) - ref.astype(int)).mean() < 6.0     # JPEG q90 of the same frame


def test_odometry_follows_egomotion(messages, dataset):
    devkit, clip_id = dataset[3], dataset[2]
    ego = devkit.get_clip_feature(clip_id, "egomotion")
    odom = messages[bt.ODOM_TOPIC]
    lo, hi = ego.time_range
    assert abs(len(odom) - ((hi - lo) / 20_000 + 1)) <= 1                  # 50 Hz over the egomotion range
    stamps = np.array([bt.stamp_to_ns(m.header.stamp) for _, m in odom])
    assert np.all(np.diff(stamps) == 20_000_000)
    t_us = (stamps - EPOCH_NS) // 1000
    state = ego(t_us)
    pos = np.array([[m.pose.pose.position.x, m.pose.pose.position.y, m.pose.pose.position.z] for _, m in odom])
    quat = np.array([[m.pose.pose.orientation.x, m.pose.pose.orientation.y, m.pose.pose.orientation.z,
                      m.pose.pose.orientation.w] for _, m in odom])
    np.testing.assert_allclose(pos, state.pose.translation, atol=1e-9)
    ref_q = state.pose.rotation.as_quat()
    assert np.all(np.abs(np.abs(np.sum(quat * ref_q, axis=1)) - 1) < 1e-9)  # same rotation (q ~ -q)
    assert {m.header.frame_id for _, m in odom} == {bt.ODOM_FRAME}
    assert {m.child_frame_id for _, m in odom} == {bt.BASE_FRAME}
    # Body-frame speed equals the egomotion speed (frame-independent norm), mid-clip away from the ends.
    mid = slice(10, -10)
    speed = np.linalg.norm([[m.twist.twist.linear.x, m.twist.twist.linear.y, m.twist.twist.linear.z]
                            for _, m in odom[mid]], axis=1)
    np.testing.assert_allclose(speed, np.linalg.norm(state.velocity[mid], axis=1), atol=0.05)
    # Angular velocity about base_link z equals the yaw rate seen between consecutive poses.
    from scipy.spatial.transform import Rotation
    yaw = np.unwrap(Rotation.from_quat(quat).as_euler("zyx")[:, 0])
    yaw_rate = np.gradient(yaw, 0.02)
    assert np.abs(yaw_rate).max() > 0.05, "seed 3 is a lane change: the clip must turn for this check"
    w_z = np.array([m.twist.twist.angular.z for _, m in odom])
    np.testing.assert_allclose(w_z[mid], yaw_rate[mid], atol=0.01)


def test_ground_truth_is_the_future_in_the_ego_frame(messages, dataset):
    devkit, clip_id = dataset[3], dataset[2]
    ego = devkit.get_clip_feature(clip_id, "egomotion")
    anchor_ts = np.asarray(devkit.get_clip_feature(clip_id, clip_to_bag.GT_ANCHOR_CAMERA).timestamps)
    gt = messages[bt.GROUND_TRUTH_TOPIC]
    lo, hi = ego.time_range
    valid = anchor_ts[(anchor_ts + 6_400_000 <= hi) & (anchor_ts - 1_500_000 >= lo)]
    assert len(gt) == len(valid) > 0
    t, path = gt[len(gt) // 2]
    t0_us = (bt.stamp_to_ns(path.header.stamp) - EPOCH_NS) // 1000
    assert t == bt.stamp_to_ns(path.header.stamp) and path.header.frame_id == bt.BASE_FRAME
    assert len(path.poses) == 64
    assert [bt.stamp_to_ns(p.header.stamp) for p in path.poses] == [t + (k + 1) * 100_000_000 for k in range(64)]
    xyz = np.array([[p.pose.position.x, p.pose.position.y, p.pose.position.z] for p in path.poses])
    # Distances from the t0 pose are frame-independent: compare them with the raw egomotion.
    p0 = ego(np.array([t0_us])).pose.translation[0]
    pk = ego(t0_us + 100_000 * np.arange(1, 65)).pose.translation
    np.testing.assert_allclose(np.linalg.norm(xyz, axis=1), np.linalg.norm(pk - p0, axis=1), atol=1e-6)
    assert xyz[-1, 0] > 1.0, "the synthetic ego drives forward: the future ends ahead (x > 0)"


def test_ground_truth_equals_the_window_readers_future(messages, dataset):
    from flashdrive_ros.data import WindowReader
    devkit, clip_id = dataset[3], dataset[2]
    _, path = messages[bt.GROUND_TRUTH_TOPIC][0]
    t0_us = (bt.stamp_to_ns(path.header.stamp) - EPOCH_NS) // 1000
    _, _, fut_xyz, _ = WindowReader(devkit).trajectory(clip_id, int(t0_us))
    xyz = np.array([[p.pose.position.x, p.pose.position.y, p.pose.position.z] for p in path.poses])
    np.testing.assert_allclose(xyz, fut_xyz, atol=1e-9)


def test_camera_names_match_the_repo_convention():
    from flashdrive_ros.data.camera import CAMERA_NAMES
    assert bt.CAMERA_NAMES == tuple(CAMERA_NAMES)


def test_tf_static_holds_camera_extrinsics(messages, dataset):
    devkit, clip_id = dataset[3], dataset[2]
    extr = devkit.get_clip_feature(clip_id, "sensor_extrinsics")
    [(t, tf)] = messages[bt.TF_STATIC_TOPIC]
    assert t <= min(ts for topic, msgs in messages.items() for ts, _ in msgs)  # first in the bag
    by_child = {x.child_frame_id: x for x in tf.transforms}
    assert set(by_child) == set(bt.CAMERA_NAMES)
    for cam, x in by_child.items():
        assert x.header.frame_id == bt.BASE_FRAME
        tr = x.transform.translation
        np.testing.assert_allclose([tr.x, tr.y, tr.z], extr.sensor_poses[cam].translation, atol=1e-6)


def test_log_time_order_and_window_options(dataset, tmp_path):
    cache_dir, revision, clip_id, _ = dataset
    out = tmp_path / "window"
    epoch_s = "1234567890.5"
    rc = clip_to_bag.main(["--dataset", str(cache_dir), "--revision", revision, "--clip", clip_id, "--out",
                           str(out), "--start-s", "2.0", "--duration-s", "1.0", "--epoch-s", epoch_s,
                           "--odom-hz", "25", "--no-progress"])
    assert rc == 0
    msgs = read_all(out)
    epoch_ns = 1_234_567_890_500_000_000
    cam = msgs[bt.camera_topic("camera_front_wide_120fov")]
    clip_us = np.array([(bt.stamp_to_ns(m.header.stamp) - epoch_ns) // 1000 for _, m in cam])
    assert clip_us.min() >= 2_000_000 and clip_us.max() <= 3_000_000 and 28 <= len(cam) <= 31
    assert len(msgs[bt.ODOM_TOPIC]) == 26                                    # 25 Hz over [2, 3] s
    from rosbags.highlevel import AnyReader
    with AnyReader([out]) as reader:
        log_times = [t for _, t, _ in reader.messages()]
    assert log_times == sorted(log_times)


def test_bad_input_gives_clear_errors(dataset, bag, tmp_path):
    cache_dir, revision, clip_id, _ = dataset
    base = ["--dataset", str(cache_dir), "--revision", revision, "--no-progress"]
    with pytest.raises(SystemExit, match="already exists"):
        clip_to_bag.main(base + ["--clip", clip_id, "--out", str(bag)])
    with pytest.raises(SystemExit, match="not in the dataset index|not in the local cache"):
        clip_to_bag.main(base + ["--clip", "no-such-clip", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="does not exist"):
        clip_to_bag.main(["--dataset", str(tmp_path / "nowhere"), "--clip", clip_id, "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="empty time window"):
        clip_to_bag.main(base + ["--clip", clip_id, "--out", str(tmp_path / "z"), "--start-s", "100"])
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "z")
