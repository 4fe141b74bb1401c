"""GPU smoke check of the engine's CUDA-graph fast path: the tiny engine with cuda_graphs on (the CUDA
default) vs off, same windows, streaming; prints token equality, trajectory difference and timings.

    python scripts/gpu_engine_smoke.py [--windows 6] [--dtype float32]
"""
import argparse
import json
import time

import numpy as np
import torch

from flashdrive_ros.engine import DriveEngine


def windows(n, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (4, 7, 270, 480, 3), dtype=np.uint8)
    hist = np.zeros((16, 3), np.float32)
    hist[:, 0] = np.linspace(-15.0, 0.0, 16)
    rot = np.broadcast_to(np.eye(3, dtype=np.float32), (16, 3, 3)).copy()
    for i in range(n):
        yield base[:, i % 4:i % 4 + 4], 1_700_000 + i * 100_000, hist, rot


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
           "torch": torch.__version__}
    runs = {}
    for graphs in (False, True):
        eng = DriveEngine.from_pretrained("tiny", device=args.device, dtype=args.dtype, streaming=True,
                                          flow_schedule="adaptive", cuda_graphs=graphs)
        res = []
        t = time.perf_counter()
        for frames, t0, hx, hr in windows(args.windows):
            res.append(eng.step(frames, t0, hx, hr))
        runs[graphs] = (res, time.perf_counter() - t)
    eager, graphed = runs[False][0], runs[True][0]
    out["tokens_equal"] = [list(a.token_ids) == list(b.token_ids) for a, b in zip(eager, graphed)]
    out["max_xyz_diff_m"] = [float(np.abs(a.xyz - b.xyz).max()) for a, b in zip(eager, graphed)]
    out["full_prefill"] = [b.full_prefill for b in graphed]
    for name, (res, _) in (("eager", runs[False]), ("graphed", runs[True])):
        out[f"{name}_total_ms_per_window"] = [round(r.timings_ms["total"], 1) for r in res]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
