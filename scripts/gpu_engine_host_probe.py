"""Where the engine's preprocess and action stages spend their time outside the GPU graphs.

The benchmark times the graphed stages alone; `DriveEngine.step` also prepares inputs on the host and turns
the flow output into a trajectory. This wraps those pieces of a graphed tiny engine (fast to build; the host
work does not depend on the model's size) with a device sync on both sides and prints the median wall time
of each, next to the stage times the engine itself reports. The syncs serialise what a plain step overlaps
(the start-speed fit runs beside the prefill), so the stage times printed here include them.

    python scripts/gpu_engine_host_probe.py [--windows 12] [--device cuda]
"""
import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdrive_ros.engine import engine as engine_module  # noqa: E402
from flashdrive_ros.engine import DriveEngine  # noqa: E402


def timed(store: dict, name: str, fn, device):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        store.setdefault(name, []).append(1e3 * (time.perf_counter() - t))
        return out
    return wrapper


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--height", type=int, default=540)
    ap.add_argument("--width", type=int, default=960)
    args = ap.parse_args()
    device = torch.device(args.device)
    eng = DriveEngine.from_pretrained("tiny", device=args.device, dtype="float32", streaming=True,
                                      flow_schedule="adaptive")
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (4, args.windows + args.warmup + 3, args.height, args.width, 3), dtype=np.uint8)
    hist = np.zeros((16, 3), np.float32)
    hist[:, 0] = np.linspace(-15.0, 0.0, 16)
    rot = np.broadcast_to(np.eye(3, dtype=np.float32), (16, 3, 3)).copy()

    pieces: dict[str, list[float]] = {}
    eng._action = timed(pieces, "action: whole (noise + graph + trajectory)", eng._action, device)
    eng._trajectory = timed(pieces, "action: trajectory (D2H + integration)", eng._trajectory, device)
    if eng._fast is not None:
        eng._fast.action = timed(pieces, "action: graph replay", eng._fast.action, device)
    engine_module.preprocess_images = timed(pieces, "preprocess: preprocess_images", engine_module.preprocess_images,
                                            device)
    engine_module.encode_history = timed(pieces, "preprocess: encode_history", engine_module.encode_history, device)
    engine_module.validate_inputs = timed(pieces, "step: validate_inputs", engine_module.validate_inputs, device)
    eng._prompt = timed(pieces, "preprocess: prompt ids", eng._prompt, device)
    # fitted while the device runs the prefill (the sync here makes it show; in a plain step it overlaps)
    eng.action_space.estimate_v0 = timed(pieces, "after prefill (overlapped): estimate_v0",
                                         eng.action_space.estimate_v0, device)

    stages = []
    for i in range(args.warmup + args.windows):
        r = eng.step(np.ascontiguousarray(clip[:, i:i + 4]), 1_700_000 + i * 100_000, hist, rot)
        if i == args.warmup - 1:
            pieces.clear()
        if i >= args.warmup:
            stages.append(r.timings_ms)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "graphed": eng._fast is not None, "windows": args.windows,
           "image": f"{args.height}x{args.width}",
           "stage_median_ms": {s: round(statistics.median(t[s] for t in stages), 3) for s in stages[0]},
           "piece_median_ms": {k: round(statistics.median(v), 3) for k, v in pieces.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
