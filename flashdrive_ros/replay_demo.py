"""The main job, end to end on this machine: a synthetic PhysicalAI-AV clip -> rosbag2 -> replay node ->
drive node (tiny engine, streaming) -> trajectory / reasoning / latency topics, printed as they arrive.

    python -m flashdrive_ros.replay_demo [--seconds 10] [--rate 0.5] [--model tiny] [--out runs/demo]

Both nodes run as separate processes on a private ROS domain, exactly as `ros2 launch flashdrive_ros
replay.launch.py` would start them on a ROS host; this script only adds the data preparation and a listener.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare_bag(out: Path, seconds: float, width: int, height: int, seed: int) -> Path:
    """Generate (once) a synthetic clip in the real dataset layout and convert it to an MCAP bag."""
    import pandas as pd

    from flashdrive_ros.data.writer import write_dataset
    from flashdrive_ros.nodes import clip_to_bag

    bag = out / f"bag_{seconds:g}s_{width}x{height}_seed{seed}"
    if (bag / "metadata.yaml").is_file():
        print(f"[demo] reusing bag {bag}")
        return bag
    dataset = out / f"dataset_seed{seed}"
    print(f"[demo] rendering a {seconds:g} s synthetic clip ({width}x{height}, 4 cameras) into {dataset}")
    cache_dir, revision = write_dataset(dataset, 1, seconds, width, height, seed=seed)
    clip_id = str(pd.read_parquet(next(Path(cache_dir).rglob("clip_index.parquet"))).index[0])
    print(f"[demo] converting clip {clip_id} to a rosbag2 MCAP bag")
    if bag.exists():  # a half-written bag from an interrupted run
        import shutil
        shutil.rmtree(bag)
    rc = clip_to_bag.main(["--dataset", str(cache_dir), "--revision", revision, "--clip", clip_id,
                           "--out", str(bag)])
    if rc != 0:
        raise SystemExit(f"[demo] clip_to_bag failed with exit code {rc}")
    return bag


class Listener:
    """Subscribes to the drive node's outputs and prints one line block per window."""

    def __init__(self, domain_id: int, node_name: str = "drive_node"):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile

        from flashdrive_ros.nodes import ros_env
        msgs = ros_env.load_messages()
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.node = rclpy.create_node("demo_listener", context=self.ctx)
        self.lock = threading.Lock()
        self.by_stamp: dict[int, dict] = {}
        self.printed = 0
        self.windows: list[dict] = []
        qos = QoSProfile(depth=100)
        for key, typ in (("trajectory", msgs.Trajectory), ("reasoning", msgs.Reasoning),
                         ("latency", msgs.StageLatency)):
            self.node.create_subscription(typ, f"/{node_name}/{key}", lambda m, k=key: self._add(k, m), qos)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        try:
            self.executor.spin()
        except Exception:  # noqa: BLE001 - the context is shut down at exit
            pass

    def _add(self, key, msg):
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self.lock:
            entry = self.by_stamp.setdefault(stamp, {})
            entry[key] = msg
            if len(entry) == 3:
                self._print(stamp, self.by_stamp.pop(stamp))

    def _print(self, stamp_ns: int, entry: dict):
        traj, reasoning, lat = entry["trajectory"], entry["reasoning"], entry["latency"]
        poses = traj.samples[0].poses
        pts = [(poses[k].position.x, poses[k].position.y) for k in (9, 29, 63) if k < len(poses)]
        self.printed += 1
        self.windows.append({"t0_ns": stamp_ns, "total_ms": lat.total_ms, "full_prefill": lat.full_prefill,
                             "dropped": lat.dropped_frames, "text": reasoning.text})
        kind = "full prefill" if lat.full_prefill else "streaming"
        print(f"window {self.printed:3d}  t0={stamp_ns / 1e9:.1f} s  ({kind}, dropped so far {lat.dropped_frames})")
        print(f"  reasoning : {reasoning.text!r} ({reasoning.num_tokens} tokens)")
        print("  trajectory: " + "  ".join(f"{s} s -> ({x:+.1f}, {y:+.1f}) m"
                                           for s, (x, y) in zip(("1.0", "3.0", "6.4"), pts)))
        print(f"  latency ms: preprocess {lat.preprocess_ms:.0f} | encode {lat.encode_ms:.0f} | "
              f"prefill {lat.prefill_ms:.0f} | decode {lat.decode_ms:.0f} | action {lat.action_ms:.0f} | "
              f"other {lat.other_ms:.0f} | total {lat.total_ms:.0f} | pipeline {lat.pipeline_latency_ms:.0f}",
              flush=True)

    def close(self):
        self.executor.shutdown(timeout_sec=1.0)
        self.thread.join(timeout=2.0)  # the spin thread must be gone before the context is destroyed
        self.node.destroy_node()
        self.ctx.try_shutdown()


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def run(args) -> int:
    from flashdrive_ros.nodes import ros_env

    reason = ros_env.unavailable_reason()
    if reason is not None:
        print(f"[demo] cannot run the ROS demo: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bag = prepare_bag(out, args.seconds, args.width, args.height, args.seed)

    domain = args.domain_id if args.domain_id >= 0 else random.randint(101, 200)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env = ros_env.subprocess_env(domain_id=domain)
    listener = Listener(domain)
    drive_cmd = [sys.executable, "-m", "flashdrive_ros.nodes.drive_node", "--ros-args",
                 "--params-file", str(REPO / "config" / "drive.yaml"), "-p", "use_sim_time:=true",
                 "-p", f"model:={args.model}", "-p", f"flow_schedule:={args.flow}",
                 "-p", f"streaming:={'true' if args.streaming else 'false'}"]
    print(f"[demo] starting drive node (model {args.model}) and replay node (rate {args.rate}) on ROS domain {domain}")
    drive = subprocess.Popen(drive_cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    # The delay gives the drive node time to load the model and subscribe before the first frame.
    replay = subprocess.Popen([sys.executable, "-m", "flashdrive_ros.nodes.replay_node", str(bag),
                               "--rate", str(args.rate), "--delay", str(args.delay)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + args.timeout
        while replay.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(args.drain)  # let the last windows finish inference
    except KeyboardInterrupt:
        pass
    finally:
        replay_log = _stop(replay)
        drive_log = _stop(drive)
        listener.close()
    if args.verbose:
        print("---- replay node log ----\n" + replay_log + "---- drive node log ----\n" + drive_log)
    n = len(listener.windows)
    if n == 0:
        print("[demo] no output received from the drive node. Its log:\n" + drive_log[-4000:], file=sys.stderr)
        return 1
    totals = sorted(w["total_ms"] for w in listener.windows if not w["full_prefill"]) or \
        sorted(w["total_ms"] for w in listener.windows)
    print(f"[demo] {n} windows published; median total latency {totals[len(totals) // 2]:.0f} ms "
          f"(CPU, {args.model} model); frames dropped while busy: {listener.windows[-1]['dropped']}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "runs" / "demo"), help="work dir for the clip and the bag")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length (s)")
    ap.add_argument("--width", type=int, default=480)
    ap.add_argument("--height", type=int, default=270)
    ap.add_argument("--seed", type=int, default=7, help="scenario seed of the synthetic clip")
    ap.add_argument("--rate", type=float, default=0.4, help="replay rate (1.0 = real time)")
    ap.add_argument("--delay", type=float, default=3.0, help="seconds before replay starts (model load)")
    ap.add_argument("--model", default="tiny", help="'tiny' or a checkpoint directory")
    ap.add_argument("--flow", default="uniform", choices=("uniform", "adaptive"))
    ap.add_argument("--no-streaming", dest="streaming", action="store_false")
    ap.add_argument("--timeout", type=float, default=300.0, help="max seconds to wait for the replay")
    ap.add_argument("--drain", type=float, default=3.0, help="seconds to wait after the replay ends")
    ap.add_argument("--domain-id", type=int, default=-1, help="ROS domain (default: random 101-200)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print both node logs at the end")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
