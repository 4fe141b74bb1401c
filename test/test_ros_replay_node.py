"""replay_node plays a clip_to_bag bag through rclpy like `ros2 bag play`: every message in order at the
requested rate, /clock for use_sim_time, start offset, and a ClipBoundary before every clip pass."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flashdrive_ros.nodes import bag_topics as bt
from flashdrive_ros.nodes import clip_to_bag, ros_env

REASON = ros_env.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"ROS messages unavailable: {REASON}")

CAM = "camera_front_wide_120fov"
START_S, DURATION_S = 2.0, 1.5


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    from flashdrive_ros.data.writer import write_dataset
    import pandas as pd
    cache_dir, revision = write_dataset(tmp_path_factory.mktemp("ds"), 1, 8.2, 64, 48, seed=5, log=lambda *_: None)
    clip_id = str(pd.read_parquet(next(Path(cache_dir).rglob("clip_index.parquet"))).index[0])
    out = tmp_path_factory.mktemp("bags") / "clip"
    assert clip_to_bag.main(["--dataset", str(cache_dir), "--revision", revision, "--clip", clip_id, "--out",
                             str(out), "--start-s", str(START_S), "--duration-s", str(DURATION_S),
                             "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def bag_stamps(bag):
    """topic -> header stamps (ns) in the bag, in log-time order."""
    from rosbags.highlevel import AnyReader
    out = {}
    with AnyReader([bag]) as reader:
        for conn, t, _ in reader.messages():
            out.setdefault(conn.topic, []).append(t)
    return out


class Recorder:
    """An rclpy node in its own context and domain, recording (arrival time, stamp) per topic."""

    def __init__(self, domain_id: int):
        import rclpy
        from nav_msgs.msg import Odometry
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import CompressedImage
        msgs = ros_env.load_messages()
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.node = rclpy.create_node("replay_test_recorder", context=self.ctx)
        self.lock = threading.Lock()
        self.got = {"image": [], "odom": [], "clock": [], "boundary": []}
        deep = QoSProfile(depth=500)
        self.node.create_subscription(CompressedImage, bt.camera_topic(CAM),
                                      lambda m: self._add("image", bt.stamp_to_ns(m.header.stamp)), deep)
        self.node.create_subscription(Odometry, bt.ODOM_TOPIC,
                                      lambda m: self._add("odom", bt.stamp_to_ns(m.header.stamp)), deep)
        self.node.create_subscription(Clock, bt.CLOCK_TOPIC, lambda m: self._add("clock", bt.stamp_to_ns(m.clock)),
                                      deep)
        self.node.create_subscription(
            msgs.ClipBoundary, bt.CLIP_BOUNDARY_TOPIC,
            lambda m: self._add("boundary", (m.reason, m.loop_index, m.bag_index, m.clip_id,
                                             bt.stamp_to_ns(m.header.stamp))),
            QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        try:
            self.executor.spin()
        except Exception:  # noqa: BLE001 - context shut down at teardown
            pass

    def _add(self, key, value):
        with self.lock:
            self.got[key].append((time.monotonic(), value))

    def values(self, key):
        with self.lock:
            return [v for _, v in self.got[key]]

    def wait_for(self, predicate, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def close(self):
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.ctx.try_shutdown()


@pytest.fixture
def recorder():
    dom = ros_env.isolated_domain_id()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    rec = Recorder(dom)
    rec.domain_id = dom
    yield rec
    rec.close()


def start_replay(domain_id, *args):
    return subprocess.Popen([sys.executable, "-m", "flashdrive_ros.nodes.replay_node", *map(str, args)],
                            env=ros_env.subprocess_env(domain_id=domain_id), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=30):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"replay_node did not exit:\n{out}")
    return proc.returncode, out


def test_plays_every_message_in_order_at_rate_with_clock(bag, bag_stamps, recorder):
    rate = 5.0
    proc = start_replay(recorder.domain_id, bag, "--rate", rate, "--wait-for-subscribers", 1,
                        "--topics", bt.camera_topic(CAM), bt.ODOM_TOPIC)
    rc, out = finish(proc)
    assert rc == 0, out
    n_img, n_odom = len(bag_stamps[bt.camera_topic(CAM)]), len(bag_stamps[bt.ODOM_TOPIC])
    assert recorder.wait_for(lambda: len(recorder.values("image")) >= n_img
                             and len(recorder.values("odom")) >= n_odom, 5), out
    imgs, odom = recorder.values("image"), recorder.values("odom")
    assert imgs == bag_stamps[bt.camera_topic(CAM)]               # all, once, in order, same stamps
    assert odom == bag_stamps[bt.ODOM_TOPIC]
    # Timing: the arrival span follows the stamp span divided by the rate.
    arrivals = [a for a, _ in recorder.got["image"]]
    expected = (imgs[-1] - imgs[0]) / 1e9 / rate
    assert 0.6 * expected < arrivals[-1] - arrivals[0] < 1.5 * expected + 0.2
    # /clock: monotonic sim time covering the bag, periodic in between (100 Hz wall default).
    clock = recorder.values("clock")
    assert clock == sorted(clock) and clock[0] <= imgs[0] and clock[-1] >= imgs[-1]
    assert len(clock) >= expected * 100 * 0.5
    boundaries = recorder.values("boundary")
    assert [b[:3] for b in boundaries] == [("start", 0, 0)]
    assert boundaries[0][4] == min(min(v) for v in bag_stamps.values())   # stamp = first message of the clip


def test_start_offset_skips_the_beginning(bag, bag_stamps, recorder):
    proc = start_replay(recorder.domain_id, bag, "--rate", 8, "--wait-for-subscribers", 1, "--start-offset", "1.0",
                        "--topics", bt.camera_topic(CAM))
    rc, out = finish(proc)
    assert rc == 0, out
    all_imgs = bag_stamps[bt.camera_topic(CAM)]
    first_allowed = min(min(v) for v in bag_stamps.values()) + 1_000_000_000
    want = [s for s in all_imgs if s >= first_allowed]
    assert recorder.wait_for(lambda: len(recorder.values("image")) >= len(want), 5), out
    assert recorder.values("image") == want
    assert recorder.values("odom") == []                             # --topics filter


def test_loop_and_bag_change_signal_clip_boundaries(bag, bag_stamps, recorder):
    proc = start_replay(recorder.domain_id, bag, bag, "--loop", "--rate", 10, "--wait-for-subscribers", 1,
                        "--topics", bt.camera_topic(CAM))
    try:
        ok = recorder.wait_for(lambda: len(recorder.values("boundary")) >= 3, 30)
    finally:
        proc.send_signal(signal.SIGINT)
        rc, out = finish(proc)
    assert ok, out
    assert rc == 0 and "Traceback" not in out, out             # SIGINT mid-playback is a clean stop
    b = recorder.values("boundary")
    assert [x[:3] for x in b[:3]] == [("start", 0, 0), ("next_bag", 0, 1), ("loop", 1, 0)]
    assert len({x[3] for x in b}) == 1 and b[0][3]                  # the clip id from the bag metadata
    # After each boundary, the images start again from the clip's first frame: stamps jump back.
    imgs = np.array(recorder.values("image"))
    jumps = np.nonzero(np.diff(imgs) < 0)[0]
    assert len(jumps) >= 2 and imgs[jumps[0] + 1] == bag_stamps[bt.camera_topic(CAM)][0]


@pytest.mark.parametrize("change, message", [
    (dict(rate=0.0), "rate must be > 0"),
    (dict(start_offset=-1.0), "start_offset must be >= 0"),
    (dict(clock_frequency=-5.0), "clock_frequency must be >= 0"),
    (dict(bags=[""]), "'bags' is empty"),
    (dict(bags=["/no/such/bag"]), "does not exist"),
    (dict(wait_for_subscribers=-1), "wait_for_subscribers must be >= 0"),
])
def test_parameter_validation_messages(bag, change, message):
    from flashdrive_ros.nodes.replay_node import PARAMS, ReplayParams
    values = {name: default for name, default, _ in PARAMS}
    values["bags"] = [str(bag)]
    values.update(change)
    with pytest.raises(ValueError, match=message):
        ReplayParams(**values).validate()


def test_bad_parameter_exits_with_code_2_and_says_why(tmp_path):
    proc = start_replay(ros_env.isolated_domain_id(), tmp_path / "missing_bag", "--rate", "2")
    rc, out = finish(proc)
    assert rc == 2
    assert "missing_bag' does not exist" in out
