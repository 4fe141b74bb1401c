"""Shared harness for drive-node tests (no tests here): synthetic sensor stream, an in-process rig (drive
node + probe node in one private rclpy context and domain), and engine doubles for the tests that are about
the node's reaction to a misbehaving engine.

Engine choice: the bad-input tests are about the node, so they use the kinematic double (the real tiny
engine needs seconds per window on a loaded 2-core CPU); the process-level integration test runs the real
tiny engine (``base_engine``) whenever it is importable.
"""
from __future__ import annotations

import io
import math
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from flashdrive_ros.nodes import ros_env

ROS_REASON = ros_env.unavailable_reason()
EPOCH_US = 1_700_000_000_000_000
H, W = 72, 128
CAMS = 4


def real_engine_available() -> bool:
    try:
        from flashdrive_ros.engine import DriveEngine  # noqa: F401
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------- synthetic sensors
def ego_pose(t_s: float, speed: float = 8.0, yaw_rate: float = 0.1):
    """Constant speed / yaw-rate drive in the odom frame: (xyz, quaternion xyzw)."""
    yaw = 0.3 + yaw_rate * t_s
    r = speed / yaw_rate
    xyz = (r * (math.sin(yaw) - math.sin(0.3)), -r * (math.cos(yaw) - math.cos(0.3)), 0.0)
    return xyz, (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))


def camera_image(cam: int, t_s: float, h: int = H, w: int = W) -> np.ndarray:
    """A moving pattern per camera so frames differ in time and between cameras."""
    y, x = np.mgrid[0:h, 0:w]
    shift = int(t_s * 40)
    img = np.stack([(x + shift) * 3 % 256, (y * 4 + cam * 50) % 256, ((x + y + shift) * 2) % 256], -1)
    return img.astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image
    b = io.BytesIO()
    Image.fromarray(img).save(b, format="JPEG", quality=quality)
    return b.getvalue()


def to_stamp(t_us: int):
    from builtin_interfaces.msg import Time
    return Time(sec=t_us // 1_000_000, nanosec=(t_us % 1_000_000) * 1000)


def stamp_us(stamp) -> int:
    return stamp.sec * 1_000_000 + stamp.nanosec // 1000


# ----------------------------------------------------------------------------- engine doubles
@dataclass
class FakeResult:
    xyz: np.ndarray
    yaw: np.ndarray
    rot: np.ndarray
    reasoning: str
    num_tokens: int
    timings_ms: dict
    full_prefill: bool
    verify_passes: int
    tokens_per_pass: float
    t0_us: int


class KinematicEngine:
    """Engine double with the DriveEngine API: extrapolates the ego history at constant velocity."""

    def __init__(self, num_samples: int = 1, **_):
        self.num_samples = num_samples
        self._fresh = True
        self.steps = 0

    @classmethod
    def from_pretrained(cls, model, **kwargs):
        return cls(**kwargs)

    def reset(self):
        self._fresh = True

    def step(self, frames, t0_us, ego_history_xyz, ego_history_rot):
        # the node hands over 4 lists of 4 decoded [H, W, 3] frames (DriveEngine.step takes those too)
        assert len(frames) == 4 and all(len(cam) == 4 for cam in frames)
        assert all(str(im.dtype) in ("uint8", "torch.uint8") and im.ndim == 3 and im.shape[-1] == 3
                   for cam in frames for im in cam)
        assert len({tuple(im.shape) for cam in frames for im in cam}) == 1
        assert ego_history_xyz.shape == (16, 3) and ego_history_rot.shape == (16, 3, 3)
        t = time.perf_counter()
        v = (ego_history_xyz[-1] - ego_history_xyz[-2]) / 0.1
        k = np.arange(1, 65, dtype=np.float32)[:, None] * 0.1
        xyz = np.repeat((k * v[None, :])[None], self.num_samples, 0).astype(np.float32)
        rot = np.broadcast_to(np.eye(3, dtype=np.float32), (self.num_samples, 64, 3, 3)).copy()
        full, self._fresh = self._fresh, False
        self.steps += 1
        ms = (time.perf_counter() - t) * 1000 + 1.0
        timings = {"preprocess": ms * 0.1, "encode": ms * 0.2, "prefill": ms * 0.3, "decode": ms * 0.2,
                   "action": ms * 0.1, "total": ms}
        return FakeResult(xyz=xyz, yaw=np.zeros((self.num_samples, 64), np.float32), rot=rot,
                          reasoning="Keep lane at constant speed.", num_tokens=6, timings_ms=timings,
                          full_prefill=full, verify_passes=6, tokens_per_pass=1.0, t0_us=int(t0_us))


def base_engine(model="tiny", **kwargs):
    if real_engine_available():
        from flashdrive_ros.engine import DriveEngine
        return DriveEngine.from_pretrained(model, **kwargs)
    return KinematicEngine.from_pretrained(model, **kwargs)


class FaultyEngine:
    """Wraps an engine; at the t0s listed in FAULTS (clip-relative us) it raises or returns NaNs."""

    def __init__(self, inner, faults: dict):
        self.inner, self.faults = inner, faults
        self.resets = 0

    def reset(self):
        self.resets += 1
        self.inner.reset()

    def step(self, frames, t0_us, xyz, rot):
        fault = self.faults.get(int(t0_us) - EPOCH_US)
        if fault == "raise":
            raise RuntimeError("injected engine failure")
        result = self.inner.step(frames, t0_us, xyz, rot)
        if fault == "nan":
            result.xyz = np.full_like(np.asarray(result.xyz), np.nan)
        return result


FAULTS: dict = {}


class GatedEngine(KinematicEngine):
    """Kinematic double whose step() is paced by the test instead of the wall clock.

    Every step announces its window (clip-relative t0 in us, read with ``wait_step``) and then blocks until
    ``release`` lets it finish, so the test knows the worker is busy on exactly that window while it
    publishes newer ones: which windows the node skips is decided by the test, not by how fast the machine
    is. ``open`` lets every step through (teardown, or a failed test that left the worker blocked)."""

    def __init__(self, timeout_s: float = 60.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout_s = timeout_s
        self._entered: queue.Queue = queue.Queue()
        self._go = threading.Semaphore(0)
        self._open = threading.Event()

    def step(self, frames, t0_us, ego_history_xyz, ego_history_rot):
        self._entered.put(int(t0_us) - EPOCH_US)
        if not self._open.is_set() and not self._go.acquire(timeout=self.timeout_s):
            raise TimeoutError(f"GatedEngine: step for t0={int(t0_us) - EPOCH_US} us was never released")
        return super().step(frames, t0_us, ego_history_xyz, ego_history_rot)

    def wait_step(self, timeout: float = 30.0) -> int:
        """Clip-relative t0 of the next step the worker entered (it is now blocked in it)."""
        try:
            return self._entered.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("GatedEngine: the worker did not start another step") from None

    def release(self) -> None:
        """Let the blocked step (or the next one) finish."""
        self._go.release()

    def open(self) -> None:
        self._open.set()
        self._go.release()


def faulty_engine_factory(model, **kwargs):
    """For the `engine_factory` parameter: 'test_node_harness:faulty_engine_factory' (kinematic inside:
    these tests are about the node's reaction, and the real engine takes seconds per window on CI CPUs)."""
    return FaultyEngine(KinematicEngine.from_pretrained(model, **kwargs), FAULTS)


# ----------------------------------------------------------------------------- in-process rig
@dataclass
class Outputs:
    trajectory: list = field(default_factory=list)
    path: list = field(default_factory=list)
    markers: list = field(default_factory=list)
    reasoning: list = field(default_factory=list)
    latency: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)

    def stamps(self, name):
        msgs = getattr(self, name)
        if name == "markers":
            return [stamp_us(m.markers[0].header.stamp) - EPOCH_US for m in msgs]
        return [stamp_us(m.header.stamp) - EPOCH_US for m in msgs]

    def diag_texts(self):
        out = []
        for arr in self.diagnostics:
            for s in arr.status:
                out.append(s.message + " | " + " ".join(f"{kv.key}={kv.value}" for kv in s.values))
        return out

    def last_diag(self):
        return {kv.key: kv.value for kv in self.diagnostics[-1].status[0].values}


_LIVE_DOMAINS: set = set()   # domains of this process's open rigs (a module-scoped rig outlives others)


def _free_domain() -> int:
    """A random domain no open rig of this process uses: two rigs on one domain see each other's inputs
    and outputs (two drive nodes answering one probe)."""
    free = [d for d in range(110, 231) if d not in _LIVE_DOMAINS]
    d = random.choice(free)
    _LIVE_DOMAINS.add(d)
    return d


class Rig:
    """Drive node + probe node in a private rclpy context on a random domain, spun in a thread.

    tick(t) publishes odometry for (t-0.1, t] at 50 Hz and one frame per camera at t (clip seconds), the
    way a replay does; wait_window(t) blocks until the node's worker has finished the window t0 = t."""

    def __init__(self, engine_factory=None, engine_factory_param: str = "", **params):
        import rclpy
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.node import Node
        from rclpy.parameter import Parameter
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        ros_env.load_messages()
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import Odometry, Path
        from sensor_msgs.msg import CompressedImage, Image
        from visualization_msgs.msg import MarkerArray

        from flashdrive_ros.msg import Reasoning, StageLatency, Trajectory
        from flashdrive_ros.nodes.drive_node import DriveNode

        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        self.ctx = rclpy.Context()
        self.domain_id = _free_domain()
        rclpy.init(context=self.ctx, domain_id=self.domain_id)
        if engine_factory_param:
            params["engine_factory"] = engine_factory_param
        params.setdefault("max_frame_age_ms", 0.0)  # stamps are 2023 while the node clock is wall time
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        self.node = DriveNode(engine_factory=engine_factory, context=self.ctx, parameter_overrides=overrides)
        self.probe = Node("probe", context=self.ctx)
        self.raw = params.get("image_transport") == "raw"
        self.Image, self.CompressedImage, self.Odometry = Image, CompressedImage, Odometry
        rel = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        topics = self.node.params.camera_topics
        self.cam_pubs = [self.probe.create_publisher(Image if self.raw else CompressedImage, t, rel) for t in topics]
        self.odom_pub = self.probe.create_publisher(Odometry, self.node.params.odom_topic, rel)
        from rclpy.qos import DurabilityPolicy
        from flashdrive_ros.msg import ClipBoundary
        self.ClipBoundary = ClipBoundary
        self.boundary_pub = self.probe.create_publisher(
            ClipBoundary, self.node.params.clip_boundary_topic,
            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.out = Outputs()
        lock = threading.Lock()

        def collect(name):
            def cb(msg):
                with lock:
                    getattr(self.out, name).append(msg)
            return cb
        for name, typ, topic in (("trajectory", Trajectory, "/drive_node/trajectory"),
                                 ("path", Path, "/drive_node/path"),
                                 ("markers", MarkerArray, "/drive_node/markers"),
                                 ("reasoning", Reasoning, "/drive_node/reasoning"),
                                 ("latency", StageLatency, "/drive_node/latency"),
                                 ("diagnostics", DiagnosticArray, "/diagnostics")):
            self.probe.create_subscription(typ, topic, collect(name), rel)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.ctx)
        self.executor.add_node(self.node)
        self.executor.add_node(self.probe)
        self._spin = threading.Thread(target=self._spin_loop, daemon=True)
        self._spin.start()
        self._wait(lambda: self.node.model_state != "loading", 120, "model load")
        self._wait(lambda: all(p.get_subscription_count() > 0 for p in self.cam_pubs + [self.odom_pub]), 10,
                   "discovery")
        self._wait(lambda: self.probe.count_publishers("/drive_node/latency") > 0, 10, "output discovery")

    def _spin_loop(self):
        try:
            self.executor.spin()
        except Exception:
            pass

    @staticmethod
    def _wait(cond, timeout, what):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.01)
        raise TimeoutError(f"timed out waiting for {what}")

    # ---- publishing
    def odom(self, t_us: int, xyz=None, quat=None):
        m = self.Odometry()
        m.header.stamp = to_stamp(EPOCH_US + t_us)
        m.header.frame_id, m.child_frame_id = "odom", "base_link"
        p, q = ego_pose(t_us / 1e6)
        xyz, quat = xyz or p, quat or q
        m.pose.pose.position.x, m.pose.pose.position.y, m.pose.pose.position.z = map(float, xyz)
        o = m.pose.pose.orientation
        o.x, o.y, o.z, o.w = map(float, quat)
        self.odom_pub.publish(m)

    def image_msg(self, cam: int, t_us: int, img=None, data=None, encoding=None):
        img = camera_image(cam, t_us / 1e6) if img is None else img
        if self.raw:
            m = self.Image(height=img.shape[0], width=img.shape[1], encoding=encoding or "rgb8",
                           step=img.shape[1] * 3, data=img.tobytes() if data is None else data)
        else:
            m = self.CompressedImage(format="jpeg", data=jpeg(img) if data is None else data)
        m.header.stamp = to_stamp(EPOCH_US + t_us)
        m.header.frame_id = f"camera{cam}"
        return m

    def boundary(self, t_us: int, reason: str = "next_bag"):
        m = self.ClipBoundary(clip_id="synthetic", loop_index=0, bag_index=1, reason=reason)
        m.header.stamp = to_stamp(EPOCH_US + t_us)
        self.boundary_pub.publish(m)

    def preroll(self, t0_us: int = 0, seconds: float = 1.6):
        """Odometry history before the first camera frame."""
        n = int(seconds * 50)
        for i in range(n, 4, -1):  # tick(t0) publishes the last 5 samples
            self.odom(t0_us - i * 20_000)
            if i % 10 == 0:  # best-effort subscriber: do not outrun its queue
                self.wait_odom(t0_us - i * 20_000)

    def wait_odom(self, t_us: int):
        lo = EPOCH_US + t_us  # upper bound too: after a clock reset the old timeline is far ahead
        self._wait(lambda: lo <= (self.node.odom.newest_stamp or 0) < lo + 1_000_000, 5, f"odometry {t_us}")

    def tick(self, t_us: int, skip_cams=(), replace: dict | None = None, odom=True):
        if odom:
            for i in range(4, -1, -1):
                self.odom(t_us - i * 20_000)
            # odometry and cameras travel on different topics; a replay interleaves them in real time,
            # here we make the order explicit so every window sees its odometry
            self.wait_odom(t_us)
        for c in range(CAMS):
            if c in skip_cams:
                continue
            msg = (replace or {}).get(c) or self.image_msg(c, t_us)
            self.cam_pubs[c].publish(msg)

    def wait_window(self, t_us: int, timeout: float = 60.0, settle_s: float = 1.0):
        self._wait(lambda: self.node.last_done_t0 is not None and self.node.last_done_t0 - EPOCH_US >= t_us,
                   timeout, f"window t0={t_us} us")
        # The worker has published (or refused) this window; its messages reach the probe asynchronously,
        # which takes longer on a loaded machine. Wait for the last-published topic, bounded for refusals.
        end = time.monotonic() + settle_s
        while time.monotonic() < end and t_us not in self.out.stamps("latency"):
            time.sleep(0.01)
        time.sleep(0.05)  # the other topics of the same window

    def wait_ready(self, t_us: int, timeout: float = 10.0):
        """Block until the node's camera sync has handed the window t0 = t to the worker (pending, in
        progress or done); a later window handed over instead also ends the wait."""
        target = EPOCH_US + t_us

        def ready():
            with self.node._lock:   # the hand-over (and its drop count) happens under this lock
                last = self.node.sync._last_emitted
            return last is not None and last >= target
        self._wait(ready, timeout, f"window t0={t_us} us handed to the worker")

    def run(self, t_from_us: int, t_to_us: int, step_us: int = 100_000, **tick_kw):
        """Tick [t_from, t_to] and wait for each window t >= 0.3 s."""
        t = t_from_us
        while t <= t_to_us:
            self.tick(t, **tick_kw)
            if t - t_from_us >= 300_000:
                self.wait_window(t)
            t += step_us

    def segment(self, gap_s: float = 5.0) -> int:
        """Start a fresh stretch of timeline after the previous one (odometry preroll + 0.6 s of clean
        ticks, windows at +0.3 .. +0.5 s published); returns the next tick time."""
        start = getattr(self, "_cursor", 0)
        start = start + int(gap_s * 1e6) if start else 0
        self.preroll(start)
        self.run(start, start + 500_000)
        assert start + 500_000 in self.out.stamps("trajectory"), "clean prefix did not publish"
        self._cursor = start + 600_000
        return start + 600_000

    def advance(self, t_us: int):
        self._cursor = max(getattr(self, "_cursor", 0), t_us)

    def close(self):
        import rclpy
        self.node.shutdown()
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.probe.destroy_node()
        rclpy.shutdown(context=self.ctx)
        _LIVE_DOMAINS.discard(self.domain_id)
