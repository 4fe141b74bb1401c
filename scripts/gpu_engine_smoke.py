"""GPU smoke check of the engine's CUDA-graph fast path: the tiny engine with cuda_graphs on (the CUDA
default) vs off, same windows, streaming; prints token equality, trajectory difference and timings.
Then the same with speculative decoding (the shipped trained tiny drafter, greedy): graphed draft /
verify / tail vs the eager loop — tokens, verify passes, tokens per pass, per-stage ms, host reads.

    python scripts/gpu_engine_smoke.py [--windows 6] [--dtype float32] [--no-speculative]
"""
import argparse
import json
import statistics
import time

import numpy as np
import torch

from flashdrive_ros.engine import DriveEngine

STAGES = ("preprocess", "encode", "prefill", "decode", "action", "total")


def windows(n, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (4, 7, 270, 480, 3), dtype=np.uint8)
    hist = np.zeros((16, 3), np.float32)
    hist[:, 0] = np.linspace(-15.0, 0.0, 16)
    rot = np.broadcast_to(np.eye(3, dtype=np.float32), (16, 3, 3)).copy()
    for i in range(n):
        yield base[:, i % 4:i % 4 + 4], 1_700_000 + i * 100_000, hist, rot


def run(args, graphs, **kw):
    eng = DriveEngine.from_pretrained("tiny", device=args.device, dtype=args.dtype, streaming=True,
                                      flow_schedule="adaptive", cuda_graphs=graphs, **kw)
    res = []
    t = time.perf_counter()
    for frames, t0, hx, hr in windows(args.windows):
        res.append(eng.step(frames, t0, hx, hr))
    wall = time.perf_counter() - t
    reads = eng._fast.host_reads if eng._fast is not None else None
    return res, wall, reads


def stage_medians(res, skip=2):
    """Median ms per stage over the windows after the first `skip` (graph builds, first full prefill)."""
    rows = res[skip:] or res
    return {s: round(statistics.median(r.timings_ms[s] for r in rows), 2) for s in STAGES}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-speculative", action="store_true")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
           "torch": torch.__version__}
    runs = {graphs: run(args, graphs) for graphs in (False, True)}
    eager, graphed = runs[False][0], runs[True][0]
    out["tokens_equal"] = [list(a.token_ids) == list(b.token_ids) for a, b in zip(eager, graphed)]
    out["max_xyz_diff_m"] = [float(np.abs(a.xyz - b.xyz).max()) for a, b in zip(eager, graphed)]
    out["full_prefill"] = [b.full_prefill for b in graphed]
    out["decode_forwards_graphed"] = [b.decode_forwards for b in graphed]
    for name, (res, _, _) in (("eager", runs[False]), ("graphed", runs[True])):
        out[f"{name}_total_ms_per_window"] = [round(r.timings_ms["total"], 1) for r in res]
        out[f"{name}_stage_median_ms"] = stage_medians(res)
    if not args.no_speculative:
        spec = {graphs: run(args, graphs, speculative=True) for graphs in (False, True)}
        se, sg = spec[False][0], spec[True][0]
        out["spec"] = {
            "tokens_equal_eager_spec": [list(a.token_ids) == list(b.token_ids) for a, b in zip(se, sg)],
            "tokens_equal_greedy": [list(a.token_ids) == list(b.token_ids) for a, b in zip(graphed, sg)],
            "num_tokens": [r.num_tokens for r in sg],
            "verify_passes_eager": [r.verify_passes for r in se],
            "verify_passes_graphed": [r.verify_passes for r in sg],
            "tokens_per_pass_graphed": [round(r.tokens_per_pass, 2) for r in sg],
            # target forwards of the decode stage, the closing one included (= verify passes: closed in block)
            "decode_forwards_eager": [r.decode_forwards for r in se],
            "decode_forwards_graphed": [r.decode_forwards for r in sg],
            "max_xyz_diff_m": [float(np.abs(a.xyz - b.xyz).max()) for a, b in zip(se, sg)],
            "host_reads_graphed": spec[True][2],
            "eager_total_ms_per_window": [round(r.timings_ms["total"], 1) for r in se],
            "graphed_total_ms_per_window": [round(r.timings_ms["total"], 1) for r in sg],
            "eager_stage_median_ms": stage_medians(se),
            "graphed_stage_median_ms": stage_medians(sg),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
