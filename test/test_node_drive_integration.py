"""Process-level integration: replay_node and drive_node run as separate processes on a synthetic clip bag
(real tiny engine); an rclpy probe in the test checks every output topic and that a replay loop resets the
streaming state. Private random ROS domain, bounded waits, both processes stopped with SIGINT."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flashdrive_ros.nodes import ros_env

REASON = ros_env.unavailable_reason()
pytestmark = [pytest.mark.ros, pytest.mark.skipif(REASON is not None, reason=f"ROS messages unavailable: {REASON}")]
REPO = Path(__file__).resolve().parents[1]
ANCHOR_TOPIC = "/flashdrive/camera/camera_front_wide_120fov/image_raw/compressed"
CLIP_S = 4.0          # bag length: windows need 1.5 s of odometry history, so 2.5 s of each pass drive
RATE = 0.5            # replay rate: one pass = 8 s wall


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    import pandas as pd

    from flashdrive_ros.data.writer import write_dataset
    from flashdrive_ros.nodes import clip_to_bag
    cache_dir, revision = write_dataset(tmp_path_factory.mktemp("ds"), 1, 8.2, 160, 90, seed=3,
                                        log=lambda *_: None)
    clip_id = str(pd.read_parquet(next(Path(cache_dir).rglob("clip_index.parquet"))).index[0])
    out = tmp_path_factory.mktemp("bags") / "clip"
    assert clip_to_bag.main(["--dataset", str(cache_dir), "--revision", revision, "--clip", clip_id, "--out",
                             str(out), "--duration-s", str(CLIP_S), "--no-progress"]) == 0
    return out


def anchor_stamps(bag) -> set:
    from rosbags.highlevel import AnyReader
    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == ANCHOR_TOPIC]
        return {t // 1000 for _, t, _ in reader.messages(connections=conns)}


class Probe:
    """rclpy node recording every drive-node output (reliable, deep queues)."""

    def __init__(self, domain_id: int):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import Path as PathMsg
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile
        from visualization_msgs.msg import MarkerArray
        msgs = ros_env.load_messages()
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.node = rclpy.create_node("drive_probe", context=self.ctx)
        self.lock = threading.Lock()
        self.got = {k: [] for k in ("trajectory", "path", "markers", "reasoning", "latency", "diagnostics")}
        for key, typ, topic in (("trajectory", msgs.Trajectory, "/drive_node/trajectory"),
                                ("path", PathMsg, "/drive_node/path"),
                                ("markers", MarkerArray, "/drive_node/markers"),
                                ("reasoning", msgs.Reasoning, "/drive_node/reasoning"),
                                ("latency", msgs.StageLatency, "/drive_node/latency"),
                                ("diagnostics", DiagnosticArray, "/diagnostics")):
            self.node.create_subscription(typ, topic, lambda m, k=key: self._add(k, m), QoSProfile(depth=200))
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        try:
            self.executor.spin()
        except Exception:  # noqa: BLE001 - context shut down at teardown
            pass

    def _add(self, key, msg):
        with self.lock:
            self.got[key].append(msg)

    def msgs(self, key):
        with self.lock:
            return list(self.got[key])

    def diag(self):
        """key/values of every drive-node diagnostics status received, oldest first."""
        return [{kv.key: kv.value for kv in s.values} | {"_message": s.message, "_level": s.level}
                for arr in self.msgs("diagnostics") for s in arr.status if s.name.startswith("drive_node")]

    def wait_for(self, predicate, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.1)
        return predicate()

    def close(self):
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.ctx.try_shutdown()


def stop(proc, timeout=15):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def us(stamp) -> int:
    return stamp.sec * 1_000_000 + stamp.nanosec // 1000


def test_replay_and_drive_processes_produce_sane_outputs_and_a_loop_resets(bag):
    domain = random.randint(101, 200)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env = ros_env.subprocess_env(domain_id=domain)
    probe = Probe(domain)
    drive = subprocess.Popen(
        [sys.executable, "-m", "flashdrive_ros.nodes.drive_node", "--ros-args",
         "--params-file", str(REPO / "config" / "drive.yaml"), "-p", "use_sim_time:=true"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    replay = subprocess.Popen(
        [sys.executable, "-m", "flashdrive_ros.nodes.replay_node", str(bag), "--loop", "--rate", str(RATE),
         "--delay", "1.0"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs = {}
    try:
        # 1. outputs on every topic (model load + first windows)
        ok = probe.wait_for(lambda: all(len(probe.msgs(k)) >= 2 for k in
                                        ("trajectory", "path", "markers", "reasoning", "latency")), 90)
        assert ok, f"no outputs; diagnostics: {probe.diag()[-1:] if probe.diag() else 'none'}"
        first = probe.diag()[-1]
        resets0 = int(first["resets"])
        # 2. a replay loop resets the engine (clip boundary and/or backwards stamps), visible in diagnostics
        looped = probe.wait_for(lambda: any(("loop" in d["last_reset_reason"] or "time_jump" in d["last_reset_reason"])
                                            and int(d["resets"]) > resets0 for d in probe.diag()),
                                CLIP_S / RATE * 2 + 20)
        assert looped, f"no loop reset seen; last diagnostics: {probe.diag()[-1]}"
        n_after_loop = len(probe.msgs("latency"))
        probe.wait_for(lambda: len(probe.msgs("latency")) > n_after_loop, 20)
    finally:
        for name, proc in (("replay", replay), ("drive", drive)):
            outs[name] = stop(proc)
        probe.close()
    rc, log = outs["drive"]
    assert rc == 0, f"drive node did not exit cleanly ({rc}):\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]

    t0s = anchor_stamps(bag)
    traj, path, markers = probe.msgs("trajectory"), probe.msgs("path"), probe.msgs("markers")
    reasoning, latency = probe.msgs("reasoning"), probe.msgs("latency")
    # every output stamped with the t0 of its input window = an anchor camera frame stamp of the bag
    stamps = {name: [us(m.header.stamp) for m in msgs] for name, msgs in
              (("trajectory", traj), ("path", path), ("reasoning", reasoning), ("latency", latency))}
    stamps["markers"] = [us(m.markers[0].header.stamp) for m in markers]
    for name, s in stamps.items():
        assert set(s) <= t0s, f"{name} stamps are not input t0s: {sorted(set(s) - t0s)[:3]}"
    assert stamps["trajectory"] == stamps["path"] == stamps["reasoning"] == stamps["latency"] == stamps["markers"]
    for m in traj:
        assert m.header.frame_id == "base_link" and abs(m.time_step - 0.1) < 1e-6
        assert len(m.time_from_start) == 64 and m.samples
        xyz = np.array([[p.position.x, p.position.y, p.position.z] for p in m.samples[0].poses])
        assert xyz.shape == (64, 3) and np.all(np.isfinite(xyz))
        assert np.all(np.abs(xyz) < 1000)
    for m in path:
        assert len(m.poses) == 64
        assert us(m.poses[0].header.stamp) == us(m.header.stamp) + 100_000
    for m in markers:
        assert any(mk.type == mk.TEXT_VIEW_FACING and mk.text for mk in m.markers)
        assert any(mk.type == mk.LINE_STRIP and len(mk.points) == 64 for mk in m.markers)
    for m in reasoning:
        assert isinstance(m.text, str) and m.num_tokens >= 0
    for m in latency:
        parts = [m.preprocess_ms, m.encode_ms, m.prefill_ms, m.decode_ms, m.action_ms, m.other_ms]
        assert all(p >= 0 for p in parts) and m.total_ms > 0
        assert sum(parts[:5]) > 0
        assert abs(sum(parts) - m.total_ms) <= 1e-3 * m.total_ms + 1e-3
        assert m.pipeline_latency_ms >= m.total_ms * 0.9  # t0 -> publish includes the step itself
        assert m.num_samples == 1 and m.streaming
    assert latency[0].full_prefill
    diag = probe.diag()
    assert diag[-1]["model_loaded"] == "true"
    assert all(int(diag[-1][f"cameras_seen.{c}"]) > 0 for c in (
        "camera_cross_left_120fov", "camera_front_wide_120fov", "camera_cross_right_120fov",
        "camera_front_tele_30fov"))
