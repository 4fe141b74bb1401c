"""launch_pytest version of the replay + drive scenario: `replay.launch.py` (replay_node + drive.launch.py on
sim time) plays a synthetic clip bag in a loop; an rclpy probe checks the drive node's outputs are stamped
with input t0s and that every loop is announced by a ClipBoundary and answered with a full prefill.

Needs a ROS 2 distribution (launch, launch_ros, launch_pytest) and the package built and sourced
(`colcon build` + `. install/setup.sh`). On wheel-only machines the module is skipped; the same scenario
runs there as plain subprocesses in test_node_drive_integration.py.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

launch_pytest = pytest.importorskip(
    "launch_pytest",
    reason="launch_pytest is not installed: it ships with a ROS 2 distribution (no PyPI wheel); "
           "test_node_drive_integration.py covers this scenario with subprocesses")
pytest.importorskip("launch_ros", reason="launch_ros is not installed (ROS 2 distribution needed)")

from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402

from flashdrive_ros.nodes import bag_topics as bt  # noqa: E402
from flashdrive_ros.nodes import ros_env  # noqa: E402

REASON = ros_env.unavailable_reason()
if REASON is not None:
    pytest.skip(f"flashdrive_ros messages unavailable: {REASON}", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
CLIP_S, RATE = 4.0, 0.5
ANCHOR_TOPIC = bt.camera_topic("camera_front_wide_120fov")
# The launched processes inherit this environment: a private domain, discovery on this host only.
DOMAIN_ID = ros_env.isolated_domain_id()
os.environ["ROS_DOMAIN_ID"] = str(DOMAIN_ID)
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    import pandas as pd

    from flashdrive_ros.data.writer import write_dataset
    from flashdrive_ros.nodes import clip_to_bag
    cache_dir, revision = write_dataset(tmp_path_factory.mktemp("ds"), 1, 8.2, 160, 90, seed=11,
                                        log=lambda *_: None)
    clip_id = str(pd.read_parquet(next(Path(cache_dir).rglob("clip_index.parquet"))).index[0])
    out = tmp_path_factory.mktemp("bags") / "clip"
    assert clip_to_bag.main(["--dataset", str(cache_dir), "--revision", revision, "--clip", clip_id, "--out",
                             str(out), "--duration-s", str(CLIP_S), "--no-progress"]) == 0
    return out


def _launch_file(name: str) -> str:
    """The installed launch file when the package is sourced, else the source tree's."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = Path(get_package_share_directory("flashdrive_ros")) / "launch" / name
        if path.is_file():
            return str(path)
    except Exception:  # noqa: BLE001 - not installed: fall back to the repo copy
        pass
    return str(REPO / "launch" / name)


@launch_pytest.fixture(scope="module")
def replay_and_drive(bag):
    replay = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(_launch_file("replay.launch.py")),
        launch_arguments={"bag": str(bag), "rate": str(RATE), "loop": "true", "delay": "3.0",
                          "model": "tiny", "device": "cpu"}.items())
    return LaunchDescription([replay, launch_pytest.actions.ReadyToTest()])


def _anchor_stamps_us(bag) -> set:
    from rosbags.highlevel import AnyReader
    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == ANCHOR_TOPIC]
        return {t // 1000 for _, t, _ in reader.messages(connections=conns)}


@pytest.mark.launch(fixture=replay_and_drive)
def test_replayed_clip_drives_outputs_and_loops_reset(bag):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile
    msgs = ros_env.load_messages()

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    node = rclpy.create_node("launch_probe", context=ctx)
    lock = threading.Lock()
    got = {"trajectory": [], "latency": [], "boundary": []}
    events = []          # arrival order of boundaries and latencies: ("boundary", reason) / ("latency", full)

    def add(key):
        def cb(msg):
            with lock:
                got[key].append(msg)
                if key == "boundary":
                    events.append((key, msg.reason))
                elif key == "latency":
                    events.append((key, msg.full_prefill))
        return cb

    node.create_subscription(msgs.Trajectory, "/drive_node/trajectory", add("trajectory"), QoSProfile(depth=100))
    node.create_subscription(msgs.StageLatency, "/drive_node/latency", add("latency"), QoSProfile(depth=100))
    node.create_subscription(msgs.ClipBoundary, bt.CLIP_BOUNDARY_TOPIC, add("boundary"),
                             QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    try:
        def looped_and_reset():
            # a full-prefill window arrives after the "loop" boundary: the drive node dropped its cache
            with lock:
                if ("boundary", "loop") not in events:
                    return False
                after = events[events.index(("boundary", "loop")) + 1:]
                return ("latency", True) in after
        deadline = time.monotonic() + 180.0
        while time.monotonic() < deadline and not looped_and_reset():
            time.sleep(0.2)
        with lock:
            trajs, boundaries = list(got["trajectory"]), list(got["boundary"])
        assert trajs, "drive_node published no trajectory within 180 s"
        assert [b.reason for b in boundaries][:2] == ["start", "loop"], [b.reason for b in boundaries]
        assert looped_and_reset(), "no full-prefill window after the replay looped"
        t0s = _anchor_stamps_us(bag)
        assert {bt.stamp_to_ns(m.header.stamp) // 1000 for m in trajs} <= t0s   # stamped with input t0
        assert all(m.header.frame_id == "base_link" and len(m.samples[0].poses) == 64 for m in trajs)
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        ctx.try_shutdown()
