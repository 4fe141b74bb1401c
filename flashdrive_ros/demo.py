"""Demo: stream a short synthetic 4-camera clip through the DriveEngine and print every window.

    python -m flashdrive_ros.demo [--windows 8] [--model tiny] [--baseline] [--flow adaptive] ...

Frames come from a generated PhysicalAI-AV style clip (flashdrive_ros.data: rendered road scene,
ego history, ground-truth reasoning label), generated once into --data (default: a temp-dir cache).
With --procedural, or when the data package cannot be used, frames are drawn procedurally here
(moving stripes and a blob per camera) with a straight constant-speed ego history.

Per window it prints: stream state (full prefill or streaming), the reasoning text, the first 3
waypoints of sample 0, and the per-stage latencies. It states whether the weights are random or
loaded from a checkpoint: "tiny" loads the trained tiny checkpoint shipped in flashdrive_ros/assets/tiny
(trained on synthetic clips only) and falls back to random weights when none ships; random weights give
gibberish reasoning and meaningless trajectories — the demo then shows only the machinery.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STRIDE_US = 100_000


# ----------------------------------------------------------------------------- window sources
def procedural_windows(n_windows: int, height: int = 180, width: int = 320, t0_us: int = 1_700_000, seed: int = 0):
    """Yield (frames [4,4,H,W,3] uint8, t0_us, history xyz [16,3], history rot [16,3,3], label None).

    Each camera sees a tilted stripe pattern scrolling with time plus a bright blob drifting across,
    so consecutive frames differ the way a moving scene does. Ego: 8 m/s straight ahead."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=4)
    colours = rng.uniform(60, 255, size=(4, 3))

    def frame(cam: int, k: int) -> np.ndarray:
        t = k * 0.1
        stripes = 0.5 + 0.5 * np.sin(0.08 * (xx + 0.5 * yy) - 6.0 * t + phases[cam])
        cx = (0.2 + 0.1 * t + 0.15 * cam) % 1.0 * width
        blob = np.exp(-(((xx - cx) / 25.0) ** 2 + ((yy - height * 0.6) / 18.0) ** 2))
        img = stripes[..., None] * colours[cam] * 0.7 + blob[..., None] * 255.0 * 0.6
        img[: height // 3] = 0.5 * img[: height // 3] + 0.5 * np.array([135, 180, 235])  # sky
        return np.clip(img, 0, 255).astype(np.uint8)

    speed = 8.0
    hist = np.zeros((16, 3))
    hist[:, 0] = speed * 0.1 * np.arange(-15, 1)
    rot = np.tile(np.eye(3), (16, 1, 1))
    for w in range(n_windows):
        frames = np.stack([np.stack([frame(c, w + f) for f in range(4)]) for c in range(4)])
        yield frames, t0_us + w * STRIDE_US, hist, rot, None


def dataset_windows(n_windows: int, data_dir: Path, seed: int):
    """Windows of the first clip of a generated dataset, at 10 Hz from its first valid t0."""
    from flashdrive_ros.data import WindowReader, synthetic_dataset

    seconds = max(8.5, 8.2 + 0.1 * n_windows)  # 1.6 s history + 6.4 s future + the windows
    cache, revision = synthetic_dataset(data_dir, n_clips=1, seconds=seconds, width=320, height=180, seed=seed)
    reader = WindowReader(cache, revision)
    clip = reader.clip_ids()[0]
    for t0 in reader.t0_grid(clip)[:n_windows]:
        w = reader.read_window(clip, int(t0))
        yield w.frames, w.t0_us, w.ego_history_xyz, w.ego_history_rot, w.label


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flashdrive_ros.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' or a checkpoint directory (default tiny)")
    ap.add_argument("--windows", type=int, default=6, help="number of 10 Hz windows to stream (default 6)")
    ap.add_argument("--baseline", action="store_true", help="full prefill every window (no streaming)")
    ap.add_argument("--flow", choices=("uniform", "adaptive"), default="adaptive")
    ap.add_argument("--samples", type=int, default=1, help="trajectory samples per window")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None,
                    help="where to generate/reuse the synthetic clip (default: a temporary directory)")
    ap.add_argument("--procedural", action="store_true", help="draw frames here instead of using flashdrive_ros.data")
    return ap


def _fmt_ms(timings: dict) -> str:
    order = ("preprocess", "encode", "prefill", "decode", "action", "total")
    return "  ".join(f"{k} {timings[k]:7.1f}" for k in order) + "  ms"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.windows < 1:
        raise SystemExit("--windows must be >= 1")
    from flashdrive_ros.engine import DriveEngine

    started = time.perf_counter()
    engine = DriveEngine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, streaming=not args.baseline, flow_schedule=args.flow,
        num_samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    print(f"model: {args.model}  weights: {engine.weights_description}")
    if "random tiny weights" in engine.weights_description:
        print("NOTE: the weights are RANDOM (untrained): reasoning text is gibberish and trajectories are not "
              "driving behaviour; this run demonstrates the streaming / decode / flow machinery and its timings.")
    print(f"pipeline: {'baseline (full prefill every window)' if args.baseline else 'streaming'}, "
          f"flow {args.flow} ({engine.schedule.num_evaluations} expert evaluations), {args.samples} sample(s), "
          f"device {engine.device}, {engine.dtype}  [loaded in {time.perf_counter() - started:.1f} s]")

    windows = None
    tmp = None
    if not args.procedural:
        try:
            data_dir = args.data
            if data_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="flashdrive_demo_")
                data_dir = Path(tmp.name)
            print(f"source: synthetic PhysicalAI-AV clip generated in {data_dir} (flashdrive_ros.data)")
            windows = list(dataset_windows(args.windows, data_dir, args.seed))
        except ImportError as exc:  # the data package is optional for the demo
            print(f"source: flashdrive_ros.data unavailable ({exc}); using procedural frames")
    if windows is None:
        if args.procedural:
            print("source: procedural frames drawn by the demo")
        windows = list(procedural_windows(args.windows, seed=args.seed))

    for i, (frames, t0, hist_xyz, hist_rot, label) in enumerate(windows):
        r = engine.step(frames, t0, hist_xyz, hist_rot)
        kind = "full prefill" if r.full_prefill else "streaming"
        print(f"\nwindow {i}  t0 = {t0 / 1e6:.1f} s  [{kind}]  {r.num_tokens} tokens")
        print(f"  reasoning: {r.reasoning!r}")
        if label:
            print(f"  label    : {label!r}")
        wp = "  ".join(f"({x:6.2f}, {y:6.2f})" for x, y in r.xyz[0, :3, :2])
        print(f"  first waypoints (x, y) m at +0.1/0.2/0.3 s: {wp}")
        print(f"  latency: {_fmt_ms(r.timings_ms)}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
