"""The engine's three ways of taking a window's frames give the same steps on CUDA; their preprocess times.

One graphed tiny engine per way, the same synthetic streaming windows: (a) one [4, 4, H, W, 3] numpy array,
(b) 4 lists of 4 numpy frames (what the drive node hands over; FrameUploader's pinned path), (c) 4 lists of
4 uint8 CUDA tensors holding the same pixels (what jpeg_decoder 'nvjpeg' hands over). Checks equal tokens
and bitwise-equal trajectories, and prints the median 'preprocess' stage time of each.

    python scripts/gpu_frames_check.py [--windows 8] [--height 1080 --width 1920]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdrive_ros.engine import DriveEngine  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (4, args.windows + 3, args.height, args.width, 3), dtype=np.uint8)
    hist = np.zeros((16, 3), np.float32)
    hist[:, 0] = np.linspace(-15.0, 0.0, 16)
    rot = np.broadcast_to(np.eye(3, dtype=np.float32), (16, 3, 3)).copy()
    on_device = torch.from_numpy(clip).to(args.device)

    ways = {
        "array [4, 4, H, W, 3]": lambda i: np.ascontiguousarray(clip[:, i:i + 4]),
        "lists of numpy frames": lambda i: [[clip[c, i + k] for k in range(4)] for c in range(4)],
        "lists of CUDA tensors": lambda i: [[on_device[c, i + k] for k in range(4)] for c in range(4)],
    }
    results = {}
    for name, frames in ways.items():
        eng = DriveEngine.from_pretrained("tiny", device=args.device, dtype="float32", streaming=True,
                                          flow_schedule="adaptive")
        steps = [eng.step(frames(i), 1_700_000 + i * 100_000, hist, rot) for i in range(args.windows)]
        results[name] = steps
    ref = results["array [4, 4, H, W, 3]"]
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    out = {"device": name, "image": f"{args.width}x{args.height}",
           "windows": args.windows, "ways": {}}
    for name, steps in results.items():
        out["ways"][name] = {
            "tokens_equal": [a.token_ids == b.token_ids for a, b in zip(ref, steps)],
            "xyz_bitwise_equal": [bool(np.array_equal(a.xyz, b.xyz)) for a, b in zip(ref, steps)],
            "preprocess_median_ms (streaming windows)": round(statistics.median(
                s.timings_ms["preprocess"] for s in steps[1:]), 3),
        }
    print(json.dumps(out, indent=1))
    ok = all(all(v["tokens_equal"]) and all(v["xyz_bitwise_equal"]) for v in out["ways"].values())
    print("all ways equal:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
