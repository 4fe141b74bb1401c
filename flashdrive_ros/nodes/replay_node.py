"""Replay node: plays rosbag2 bags (from clip_to_bag) through rclpy, mirroring `ros2 bag play`.

    ros2 run flashdrive_ros replay_node --ros-args -p bags:="['/data/clip.bag']" -p rate:=2.0 -p loop:=true
    replay_node /data/clip.bag --rate 2 --loop          # same, plain CLI (flashdrive-replay)

- Timing as rosbag2's player: message m is published when steady time reaches
  t_wall0 + delay + (t_m - t_first - start_offset) / rate (t = bag log time).
- /clock (rosgraph_msgs/Clock) at `clock_frequency` Hz and just before every message, so nodes with
  use_sim_time see sim time == the stamp of the newest input. Never goes backwards within a clip.
- Clip boundaries: before the first message of every bag pass a flashdrive_ros/ClipBoundary is published
  on /flashdrive/replay/clip_boundary (reliable, transient_local) with reason start | loop | next_bag.
- Messages are published as the bag's CDR bytes (no deserialisation); topics whose message package
  cannot be imported here (e.g. tf2_msgs on a wheel-only install) are skipped with one warning.
- Works on any rosbag2 bag `rosbags` reads (MCAP or sqlite3), not only ours.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flashdrive_ros.nodes import bag_topics as bt

# name, default, description: the one place the node's parameters are declared.
PARAMS = (
    ("bags", [""], "Bag directories (or .mcap/.db3 files) played one after the other."),
    ("rate", 1.0, "Playback rate factor (> 0), like `ros2 bag play --rate`."),
    ("loop", False, "Start again from the first bag after the last one."),
    ("start_offset", 0.0, "Seconds skipped at the start of every bag pass (>= 0)."),
    ("delay", 0.0, "Seconds to wait before the first message (lets subscribers discover us)."),
    ("clock_frequency", 100.0, "Hz of /clock between messages; 0 = only just before each message."),
    ("topics", [""], "Only these topics ([''] = all)."),
    ("exclude_topics", [""], "Never these topics."),
    ("wait_for_subscribers", 0,
     "Before playing, wait until /clock and every played topic have this many subscribers (0 = don't; "
     "gives up after 30 s with a warning). With `topics` it makes a replay lossless from the first message."),
    ("exit_when_done", True, "Shut down after the last bag when not looping (like ros2 bag play)."),
)


@dataclass
class ReplayParams:
    bags: list
    rate: float
    loop: bool
    start_offset: float
    delay: float
    clock_frequency: float
    topics: list
    exclude_topics: list
    wait_for_subscribers: int
    exit_when_done: bool

    def validate(self) -> "ReplayParams":
        self.bags = [b for b in self.bags if b]
        self.topics = [t for t in self.topics if t]
        self.exclude_topics = [t for t in self.exclude_topics if t]
        problems = []
        if not self.bags:
            problems.append("parameter 'bags' is empty: give at least one bag path")
        for b in self.bags:
            if not Path(b).exists():
                problems.append(f"bag {b!r} does not exist")
        if not self.rate > 0:
            problems.append(f"rate must be > 0, got {self.rate}")
        if self.start_offset < 0:
            problems.append(f"start_offset must be >= 0, got {self.start_offset}")
        if self.delay < 0:
            problems.append(f"delay must be >= 0, got {self.delay}")
        if self.clock_frequency < 0:
            problems.append(f"clock_frequency must be >= 0, got {self.clock_frequency}")
        if self.wait_for_subscribers < 0:
            problems.append(f"wait_for_subscribers must be >= 0, got {self.wait_for_subscribers}")
        if problems:
            raise ValueError("replay_node: " + "; ".join(problems))
        return self


def bag_custom_data(path: str | Path) -> dict:
    """custom_data of a rosbag2 metadata.yaml (rosbags has no accessor); {} if absent."""
    meta = Path(path) / "metadata.yaml"
    if not meta.is_file():
        return {}
    import yaml
    info = (yaml.safe_load(meta.read_text()) or {}).get("rosbag2_bagfile_information", {})
    return dict(info.get("custom_data") or {})


def import_message_class(msgtype: str):
    """'pkg/msg/Name' -> the rclpy message class, or None if the package is not importable here."""
    pkg, kind, name = msgtype.split("/")
    if pkg == "flashdrive_ros":
        from flashdrive_ros.nodes import ros_env
        try:
            ros_env.load_messages()
        except RuntimeError:
            return None
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError):
        return None


class Player:
    """The playback loop, independent of how parameters arrive. Publishing goes through `node`."""

    def __init__(self, node, params: ReplayParams, stop: threading.Event):
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock

        self.node, self.p, self.stop = node, params, stop
        self.log = node.get_logger()
        self._QoSProfile, self._Rel, self._Dur = QoSProfile, ReliabilityPolicy, DurabilityPolicy
        self.clock_pub = node.create_publisher(Clock, bt.CLOCK_TOPIC, self._qos(bt.CLOCK_TOPIC))
        self._Clock = Clock
        self.boundary_cls = import_message_class(bt.CLIP_BOUNDARY)
        self.boundary_pub = None
        if self.boundary_cls is None:
            self.log.error("flashdrive_ros/msg/ClipBoundary is not importable (build with scripts/build_ros.sh);"
                           f" {bt.CLIP_BOUNDARY_TOPIC} will not be published")
        else:
            self.boundary_pub = node.create_publisher(self.boundary_cls, bt.CLIP_BOUNDARY_TOPIC,
                                                      self._qos(bt.CLIP_BOUNDARY_TOPIC))
        self.pubs: dict = {}          # topic -> publisher or None (skipped)
        self.counts: dict = {}
        self.last_clock_ns = None
        self.next_clock_wall = 0.0     # steady time of the next periodic /clock
        self.boundaries = 0

    def _qos(self, topic: str):
        q = bt.qos_for(topic)
        return self._QoSProfile(depth=q.depth, reliability=self._Rel.RELIABLE,
                                durability=self._Dur.TRANSIENT_LOCAL if q.transient_local else self._Dur.VOLATILE)

    def _publisher(self, topic: str, msgtype: str):
        if topic not in self.pubs:
            cls = import_message_class(msgtype)
            if cls is None:
                self.log.warning(f"skipping {topic}: message type {msgtype} is not importable here")
                self.pubs[topic] = None
            else:
                self.pubs[topic] = self.node.create_publisher(cls, topic, self._qos(topic))
        return self.pubs[topic]

    def _wanted(self, topic: str) -> bool:
        if topic == bt.CLOCK_TOPIC:      # recorded clocks would fight ours (ros2 bag play --clock does the same)
            return False
        if self.p.topics and topic not in self.p.topics:
            return False
        return topic not in self.p.exclude_topics

    def publish_clock(self, ns: int) -> None:
        if self.last_clock_ns is not None and ns <= self.last_clock_ns:
            return
        msg = self._Clock()
        msg.clock.sec, msg.clock.nanosec = bt.ns_to_sec_nanosec(ns)
        self.clock_pub.publish(msg)
        self.last_clock_ns = ns

    def publish_boundary(self, stamp_ns: int, clip_id: str, loop_index: int, bag_index: int, reason: str):
        self.boundaries += 1
        self.log.info(f"clip boundary: {reason} clip={clip_id} loop={loop_index} bag={bag_index}")
        if self.boundary_pub is None:
            return
        msg = self.boundary_cls()
        msg.header.stamp.sec, msg.header.stamp.nanosec = bt.ns_to_sec_nanosec(stamp_ns)
        msg.header.frame_id = ""
        msg.clip_id, msg.loop_index, msg.bag_index, msg.reason = clip_id, loop_index, bag_index, reason
        self.boundary_pub.publish(msg)

    def _sleep_until(self, due: float, t_wall0: float, seg_start_ns: int, next_ns: int) -> bool:
        """Wait for steady time `due`, publishing /clock on its period meanwhile. False if stopped."""
        period = 1.0 / self.p.clock_frequency if self.p.clock_frequency > 0 else None
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= due:
                return True
            wake = due
            if period is not None:
                if now >= self.next_clock_wall:
                    sim = seg_start_ns + int((now - t_wall0) * self.p.rate * 1e9)
                    self.publish_clock(min(sim, next_ns))
                    self.next_clock_wall = now + period
                wake = min(due, self.next_clock_wall)
            self.stop.wait(max(0.0, wake - now))
        return False

    def play_bag(self, index: int, path: str, loop_index: int, reason: str) -> bool:
        from rosbags.highlevel import AnyReader

        custom = bag_custom_data(path)
        clip_id = custom.get(bt.META_CLIP_ID, Path(path).stem)
        with AnyReader([Path(path)]) as reader:
            conns = [c for c in reader.connections if self._wanted(c.topic)]
            if not conns:
                self.log.warning(f"bag {path}: no topics to play after filtering")
                return True
            seg_start_ns = reader.start_time + int(self.p.start_offset * 1e9)
            if seg_start_ns >= reader.end_time:
                raise ValueError(f"start_offset {self.p.start_offset} s is past the end of bag {path}")
            t_wall0 = None
            for conn, t_ns, raw in reader.messages(connections=conns, start=seg_start_ns):
                if t_wall0 is None:
                    # Sim time jumps to the clip's first stamp, then consumers learn of the new clip.
                    self.last_clock_ns = None
                    self.publish_clock(t_ns)
                    self.publish_boundary(t_ns, clip_id, loop_index, index, reason)
                    t_wall0 = time.monotonic()
                    seg_start_ns = t_ns
                due = t_wall0 + (t_ns - seg_start_ns) / 1e9 / self.p.rate
                if not self._sleep_until(due, t_wall0, seg_start_ns, t_ns):
                    return False
                pub = self._publisher(conn.topic, conn.msgtype)
                if pub is None:
                    continue
                self.publish_clock(t_ns)
                pub.publish(bytes(raw))
                self.counts[conn.topic] = self.counts.get(conn.topic, 0) + 1
        return True

    def flush(self, timeout_s: float = 1.0) -> None:
        """Give reliable subscribers the chance to receive the last messages before we go away."""
        from rclpy.duration import Duration
        for pub in [p for p in self.pubs.values() if p is not None] + [self.clock_pub]:
            try:
                pub.wait_for_all_acked(Duration(seconds=timeout_s))
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass

    def prepare(self) -> None:
        """Create every publisher before playing: a publisher made at its first message would lose the
        first messages while subscribers discover it (`delay` gives discovery its time)."""
        from rosbags.highlevel import AnyReader
        for path in self.p.bags:
            with AnyReader([Path(path)]) as reader:
                for conn in reader.connections:
                    if self._wanted(conn.topic):
                        self._publisher(conn.topic, conn.msgtype)

    def wait_for_subscribers(self, n: int, timeout_s: float = 30.0) -> bool:
        pubs = [p for p in self.pubs.values() if p is not None] + [self.clock_pub]
        end = time.monotonic() + timeout_s
        while not self.stop.is_set():
            waiting = [p.topic_name for p in pubs if p.get_subscription_count() < n]
            if not waiting:
                return True
            if time.monotonic() > end:
                self.log.warning(f"playing although these topics have < {n} subscribers: {waiting}")
                return True
            self.stop.wait(0.05)
        return False

    def run(self) -> bool:
        """Play all bags (looping if asked). Returns False if stopped early."""
        started = time.monotonic()
        self.prepare()
        if self.p.wait_for_subscribers > 0 and not self.wait_for_subscribers(self.p.wait_for_subscribers):
            return False
        remaining = self.p.delay - (time.monotonic() - started)
        if remaining > 0 and self.stop.wait(remaining):
            return False
        loop_index = 0
        while not self.stop.is_set():
            for i, path in enumerate(self.p.bags):
                reason = "start" if (i == 0 and loop_index == 0) else ("next_bag" if i > 0 else "loop")
                if not self.play_bag(i, path, loop_index, reason):
                    return False
            if not self.p.loop:
                return True
            loop_index += 1
        return False


def _parse_cli(argv):
    """Plain CLI flags (for use outside `ros2 run`) -> parameter overrides."""
    ap = argparse.ArgumentParser(prog="replay_node", description="Play flashdrive bags through rclpy.")
    ap.add_argument("bags", nargs="*", help="bag paths (same as -p bags:=[...])")
    ap.add_argument("--rate", type=float)
    ap.add_argument("--loop", action="store_true", default=None)
    ap.add_argument("--start-offset", type=float)
    ap.add_argument("--delay", type=float)
    ap.add_argument("--clock-frequency", type=float)
    ap.add_argument("--topics", nargs="+")
    ap.add_argument("--exclude-topics", nargs="+")
    ap.add_argument("--wait-for-subscribers", type=int)
    ap.add_argument("--no-exit", action="store_true", help="keep the node alive after the last bag")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in dict(
        bags=args.bags or None, rate=args.rate, loop=args.loop, start_offset=args.start_offset,
        delay=args.delay, clock_frequency=args.clock_frequency, topics=args.topics,
        exclude_topics=args.exclude_topics, wait_for_subscribers=args.wait_for_subscribers,
        exit_when_done=False if args.no_exit else None).items()
        if v is not None}
    return overrides


def main(argv=None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rcl_interfaces.msg import ParameterDescriptor

    argv = list(sys.argv if argv is None else [sys.argv[0], *argv])
    cli = rclpy.utilities.remove_ros_args(argv)[1:]
    overrides = _parse_cli(cli)
    rclpy.init(args=argv)
    node = Node("replay_node", parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    for name, default, desc in PARAMS:
        # dynamic typing: `-p rate:=2` (an int) must not abort start-up; values are coerced below.
        node.declare_parameter(name, default, ParameterDescriptor(description=desc, dynamic_typing=True))
    try:
        if node.get_parameter("use_sim_time").value:
            raise ValueError("replay_node: use_sim_time must be false: this node is the /clock source")
        params = ReplayParams(**{name: _coerce(name, default, node.get_parameter(name).value)
                                 for name, default, _ in PARAMS}).validate()
    except ValueError as exc:
        node.get_logger().fatal(str(exc))
        node.destroy_node()
        rclpy.try_shutdown()
        return 2

    stop = threading.Event()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spin = threading.Thread(target=lambda: _spin(executor, stop), daemon=True)
    spin.start()
    player = Player(node, params, stop)
    node.get_logger().info(f"replaying {len(params.bags)} bag(s) at rate {params.rate}"
                           f"{' (loop)' if params.loop else ''}")
    rc = 0
    try:
        finished = player.run()
        total = sum(player.counts.values())
        node.get_logger().info(f"published {total} messages on {len(player.counts)} topics, "
                               f"{player.boundaries} clip boundaries" + ("" if finished else " (stopped)"))
        if finished and not params.exit_when_done:
            while rclpy.ok() and not stop.is_set():
                time.sleep(0.2)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ValueError as exc:              # e.g. start_offset past the end of a bag
        node.get_logger().fatal(str(exc))
        rc = 2
    except Exception:
        # SIGINT/SIGTERM shut the context down under us, so a publish can fail mid-playback: a normal
        # stop. With the context still valid it is a real error.
        if rclpy.ok():
            raise
    finally:
        stop.set()
        if rclpy.ok():
            player.flush()
        executor.shutdown(timeout_sec=1.0)
        spin.join(timeout=2.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return rc


def _coerce(name, default, value):
    """Parameter value -> the type of its default, with a clear error."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or int(value) != value:
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return [value]
            return [str(v) for v in value]
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"replay_node: parameter {name!r} should look like {default!r}, got {value!r}")


def _spin(executor, stop: threading.Event):
    from rclpy.executors import ExternalShutdownException
    try:
        executor.spin()
    except (ExternalShutdownException, KeyboardInterrupt):
        pass
    finally:
        stop.set()           # the context is gone (signal): end playback


if __name__ == "__main__":
    sys.exit(main())
