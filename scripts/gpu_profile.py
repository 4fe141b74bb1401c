"""Where the time of the fast path goes at a named shape (device run, random bf16 weights: timing only).

    python scripts/gpu_profile.py --shape full --out DIR
    python scripts/gpu_profile.py --from-json DIR/profile.json      # the summary table again (no GPU)

1. Per-stage CUDA-graph replay time of the "all (τ=5.6)" path: encode, prefill, one verify pass, one
   draft pass, action (adaptive flow), each replayed alone (median of 20).
2. Kernel breakdown of each stage: the stage function run eagerly on the graph's own buffers under
   torch.profiler, kernels grouped by name and by kind (GEMM, attention, Triton-fused, index, other).
3. Micro-benchmarks of the shapes inside: copy bandwidth, the projection GEMMs at M = 1/8/64/800,
   attention for 4/32/128/3196 folded query rows over the cache (SDPA with mask, SDPA without mask,
   GEMM attention).
Writes DIR/profile.json and prints a short table per part.
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flashdrive_ros.bench.ours import Mode, OursPipeline
from flashdrive_ros.bench.shapes import get_shape
from flashdrive_ros.bench.timing import Clock
from flashdrive_ros.engine import graphs as G


def time_cuda(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


# The engine's own Triton GEMMs (engine/linear_kernel.py) and their split reduces count as GEMM time.
OUR_GEMMS = ("_skinny_linear_fwd", "_skinny_swiglu_fwd", "_balanced_linear_fwd", "_reduce_splits", "_reduce_balanced",
             "_reduce_swiglu_splits")


def kind_of(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "nvjet", "xmma", "cutlass", "gemv", "splitk")) and "fmha" not in n \
            or n.startswith(OUR_GEMMS):
        return "gemm"
    if any(s in n for s in ("fmha", "flash", "attention", "efficient")):
        return "attention"
    if n.startswith("triton") or "triton" in n:
        return "triton"
    if any(s in n for s in ("index", "scatter", "gather")):
        return "index"
    if "copy" in n or "memcpy" in n or "cat" in n:
        return "copy"
    if "reduce" in n or "argmax" in n or "softmax" in n:
        return "reduce"
    return "elementwise/other"


def kernel_profile(fn, reps=3):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        r = rows.setdefault(ev.name, [0.0, 0])
        r[0] += ev.time_range.elapsed_us() / 1000.0 / reps  # ms per call
        r[1] += 1
    kernels = sorted(((k, v[0], v[1] / reps) for k, v in rows.items()), key=lambda t: -t[1])
    kinds = {}
    for name, ms, cnt in kernels:
        k = kinds.setdefault(kind_of(name), [0.0, 0.0])
        k[0] += ms
        k[1] += cnt
    return {"total_kernel_ms": sum(k[1] for k in kernels), "launches": sum(k[2] for k in kernels),
            "kinds": {k: {"ms": v[0], "launches": v[1]} for k, v in sorted(kinds.items(), key=lambda t: -t[1][0])},
            "ours_counted": True,  # OUR_GEMMS already in "gemm"
            "top": [{"name": n[:160], "ms": ms, "launches": c} for n, ms, c in kernels[:25]]}


def micro(dev, dtype, out):
    res = {}
    x = torch.empty(2**30 // 2, dtype=dtype, device=dev).normal_()
    y = torch.empty_like(x)
    ms = time_cuda(lambda: y.copy_(x), reps=10)
    res["copy_TBps"] = 2 * x.numel() * 2 / ms / 1e9
    del x, y
    gemms = {"lm_qkv 4096->6144": (4096, 6144), "lm_o 4096->4096": (4096, 4096), "lm_gate_up 4096->24576": (4096, 24576),
             "lm_down 12288->4096": (12288, 4096), "ex_qkv 2048->4096": (2048, 4096), "ex_o 2048->2048": (2048, 2048),
             "ex_gate_up 2048->16512": (2048, 16512), "ex_down 8256->2048": (8256, 2048),
             "lm_head 4096->155697": (4096, 155697)}
    res["gemm"] = []
    for name, (k, n) in gemms.items():
        ws = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(3)]  # rotate: beat the L2
        for m in (1, 8, 64, 800):
            xs = torch.randn(m, k, device=dev, dtype=dtype)
            i = [0]

            def f():
                i[0] = (i[0] + 1) % 3
                return F.linear(xs, ws[i[0]])
            t = time_cuda(f, reps=30)
            byts = n * k * 2 + m * (k + n) * 2
            res["gemm"].append({"gemm": name, "M": m, "us": t * 1000, "TBps": byts / t / 1e9,
                                "TFLOPs": 2 * m * n * k / t / 1e9})
        del ws
    res["attention"] = []
    kv, d, nk = 8, 128, 3136
    ks = torch.randn(1, kv, nk, d, device=dev, dtype=dtype)
    vs = torch.randn(1, kv, nk, d, device=dev, dtype=dtype)
    for rows in (4, 32, 128, 3196):
        q = torch.randn(1, kv, rows, d, device=dev, dtype=dtype)
        valid = 3057
        mask = torch.zeros(1, 1, rows if rows > 1 else 1, nk, device=dev, dtype=dtype)
        mask[..., valid:] = torch.finfo(dtype).min
        cases = {"sdpa+mask": lambda: F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask),
                 "sdpa exact keys, no mask": lambda: F.scaled_dot_product_attention(q, ks[:, :, :valid], vs[:, :, :valid]),
                 "gemm attention": lambda: G._attn_math(q, ks, vs, mask)}
        for name, fn in cases.items():
            t = time_cuda(fn, reps=30)
            byts = 2 * kv * nk * d * 2
            res["attention"].append({"case": name, "rows": rows, "us": t * 1000, "kv_TBps": byts / t / 1e9})
    out["micro"] = res
    print(f"copy bandwidth {res['copy_TBps']:.2f} TB/s")
    print(f"{'gemm':<24}{'M':>5}{'us':>9}{'TB/s':>7}{'TFLOP/s':>9}")
    for r in res["gemm"]:
        print(f"{r['gemm']:<24}{r['M']:>5}{r['us']:>9.1f}{r['TBps']:>7.2f}{r['TFLOPs']:>9.1f}")
    print(f"{'attention':<28}{'rows':>6}{'us':>9}{'KV TB/s':>9}")
    for r in res["attention"]:
        print(f"{r['case']:<28}{r['rows']:>6}{r['us']:>9.1f}{r['kv_TBps']:>9.2f}")


def summary_table(out: dict) -> str:
    """The per-stage summary (Markdown) of a profile: replay time, GEMM / attention / other kernel ms."""
    lines = ["| stage | graph replay ms | GEMM ms | attention ms (incl. split merge) | other kernels ms | launches |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, k in out["kernels"].items():
        if label not in out["replay_ms"]:
            continue
        merge = sum(r["ms"] for r in k["top"] if "merge_splits" in r["name"])
        gemm = k["kinds"].get("gemm", {}).get("ms", 0.0)
        if "ours_counted" not in k:
            # profiles saved before OUR_GEMMS was counted as GEMM: move those kernels over from "other"
            gemm += sum(r["ms"] for r in k["top"] if r["name"].startswith(OUR_GEMMS))
        attn = k["kinds"].get("attention", {}).get("ms", 0.0) + merge
        lines.append(f"| {label} | {out['replay_ms'][label]:.2f} | {gemm:.2f} | {attn:.2f} | "
                     f"{k['total_kernel_ms'] - gemm - attn:.2f} | {k['launches']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="full")
    ap.add_argument("--tau", type=float, default=5.6)
    ap.add_argument("--out", default="profile_out")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--draft-vocab", default="auto", help="rows of the drafter stand-in's head (bench --draft-vocab); 0 = all")
    ap.add_argument("--from-json", default=None, help="print the summary table of a saved profile.json and exit")
    args = ap.parse_args()
    if args.from_json:
        print(summary_table(json.loads(Path(args.from_json).read_text())))
        return
    dev, dtype = torch.device("cuda"), torch.bfloat16
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": args.shape}
    t0 = time.time()
    pipe = OursPipeline(get_shape(args.shape), dev, dtype,
                        draft_vocab=args.draft_vocab if args.draft_vocab == "auto" else (int(args.draft_vocab) or None))
    out["draft_vocab"] = pipe.draft_vocab_size
    print(f"drafter stand-in head: {pipe.draft_vocab_size} rows")
    pipe.reference_tokens()
    pipe.full_prefill_window()
    mode = Mode(streaming=True, tau=args.tau, flow="adaptive", graphs=True)
    clock = Clock(dev)
    for _ in range(3):
        pipe.step(mode, clock)
    steps = [pipe.step(mode, clock) for _ in range(10)]
    out["step_ms"] = {k: statistics.median(s[k] for s in steps) for k in ("encode", "prefill", "decode", "action", "total")}
    print("graphed step (median of 10):", {k: round(v, 2) for k, v in out["step_ms"].items()}, f"build {time.time() - t0:.0f}s")

    stages = {"encode": "encode1", "prefill": "prefill1", "verify": "verify", "draft": "draft", "action": "action_adaptive"}
    out["replay_ms"], out["kernels"] = {}, {}
    state0 = pipe._g["verify"].buffers["state"].clone()
    for label, key in stages.items():
        sg = pipe._g[key]
        if label == "verify":  # the pass advances its own state: restart it before each replay
            def replay(sg=sg):
                sg.buffers["state"].copy_(state0)
                sg.graph.replay()
        else:
            replay = sg.graph.replay
        out["replay_ms"][label] = time_cuda(replay)
        if label == "verify":
            sg.buffers["state"].copy_(state0)
        out["kernels"][label] = kernel_profile(lambda: sg.fn(**sg.buffers))
    try:
        out["kernels"]["verify_graph_replay"] = kernel_profile(lambda: pipe._g["verify"].graph.replay())
    except Exception as e:  # noqa: BLE001
        out["kernels"]["verify_graph_replay"] = {"error": repr(e)}
    print(f"{'stage':<10}{'replay ms':>10}{'eager kernel ms':>17}{'launches':>10}")
    for label in stages:
        k = out["kernels"][label]
        print(f"{label:<10}{out['replay_ms'][label]:>10.2f}{k['total_kernel_ms']:>17.2f}{k['launches']:>10.0f}")
    for label in stages:
        k = out["kernels"][label]
        print(f"--- {label}: by kind " + ", ".join(f"{n} {v['ms']:.2f} ms/{v['launches']:.0f}" for n, v in k["kinds"].items()))
        for r in k["top"][:12]:
            print(f"   {r['ms']:8.3f} ms {r['launches']:5.0f}x  {r['name'][:110]}")
    print(summary_table(out))
    vr = out["kernels"]["verify_graph_replay"]
    print("verify graph replay seen by the profiler:", vr.get("total_kernel_ms"), vr.get("launches"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile.json").write_text(json.dumps(out, indent=1))
    if not args.skip_micro:
        del pipe
        torch.cuda.empty_cache()
        micro(dev, dtype, out)
        (Path(args.out) / "profile.json").write_text(json.dumps(out, indent=1))
    print(f"wall {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
