"""Device check and tuning of engine/cublaslt.py: the heuristic's other algorithms at the engine's GEMM shapes.

    python scripts/gpu_cublaslt_check.py [--out results.json] [--records cublaslt_<gpu>.json]
                                         [--candidates 24] [--only encode|prefill|action]

For every shape (vision tower at 2 880 rows, its mergers at 720, the streaming prefill at 799, the action
expert's cuBLAS GEMMs at 64; the epilogue each runs in the engine):
1. what the engine runs today (F.linear, or torch._addmm_activation for the GELU epilogue) is timed;
2. each of the first --candidates algorithms cuBLASLt's heuristic offers is checked against that output
   (rel L2 < 1e-2, output memory poisoned with NaN first) and timed the same way;
3. the fastest is checked again through a CUDA graph replayed on new inputs.
Timing: CUDA graphs of back-to-back calls, median of replays; weights rotate COPIES copies so the
memory-bound shapes read HBM as in the model.
--records writes the records graphs.dense loads (engine/tuned/cublaslt_<gpu>.json): per shape the
fastest algorithm with its time and the engine's current time (lt_us / torch_us) and the cuBLASLt version
they hold for. Records are shipped only where lt_us < torch_us; graphs.dense applies its own margin.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdrive_ros.engine import cublaslt  # noqa: E402
from gpu_timing import graph_ms, warm_up  # noqa: E402 (scripts/, beside this file)

DTYPE = torch.bfloat16
COPIES = 3

SHAPES = [  # (group, name, M, N, K, epilogue)
    ("encode", "vision patch embed", 2880, 1152, 1536, "bias"),
    ("encode", "vision qkv", 2880, 3456, 1152, "bias"),
    ("encode", "vision proj", 2880, 1152, 1152, "bias"),
    ("encode", "vision fc1+gelu", 2880, 4304, 1152, "gelu_bias"),
    ("encode", "vision fc2", 2880, 1152, 4304, "bias"),
    ("encode", "merger fc1", 720, 4608, 4608, "bias"),
    ("encode", "merger fc2", 720, 4096, 4608, "bias"),
    ("prefill", "lm qkv M=799", 799, 6144, 4096, "none"),
    ("prefill", "lm o M=799", 799, 4096, 4096, "none"),
    ("prefill", "lm gate|up M=799", 799, 24576, 4096, "none"),
    ("prefill", "lm down M=799", 799, 4096, 12288, "none"),
    ("action", "expert qkv", 64, 4096, 2048, "none"),
    ("action", "expert o", 64, 2048, 2048, "none"),
]


def torch_call(x, w, b, epilogue):
    if epilogue == "gelu_bias":
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    return F.linear(x, w, b)


def rel_l2(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_calls(call, n_calls, replays):
    warm_up(lambda: [call(i) for i in range(COPIES)])
    return 1000.0 * graph_ms(lambda: [call(i) for i in range(n_calls)], replays, warm=0) / n_calls


def check_shape(name, m, n, k, epilogue, n_candidates):
    dev = torch.cuda.current_device()
    xs = [torch.randn(m, k, device="cuda", dtype=DTYPE) for _ in range(COPIES)]
    ws = [torch.randn(n, k, device="cuda", dtype=DTYPE) / k ** 0.5 for _ in range(COPIES)]
    bs = [torch.randn(n, device="cuda", dtype=DTYPE) if epilogue != "none" else None for _ in range(COPIES)]
    outs = [torch.empty(m, n, device="cuda", dtype=DTYPE) for _ in range(COPIES)]
    n_calls = max(4, min(40, int(2e9 / max(1, m * n * k * 2 / 1e3))))  # ~ a few hundred us of work per graph
    replays = 15
    ref = torch_call(xs[0], ws[0], bs[0], epilogue)
    torch_us = time_calls(lambda i: torch_call(xs[i % COPIES], ws[i % COPIES], bs[i % COPIES], epilogue), n_calls,
                          replays)
    plan = cublaslt.Plan(m, n, k, epilogue, DTYPE, dev)
    rows = []
    for c in plan.candidates(n_candidates):
        outs[0].fill_(float("nan"))
        try:
            y = plan(xs[0], ws[0], bs[0], c.algo_hex, out=outs[0])
            torch.cuda.synchronize()
        except cublaslt.CublasLtError as e:
            rows.append({"rank": c.rank, "describe": c.describe(), "error": str(e)})
            continue
        err = rel_l2(y, ref)
        if not err < 1e-2:
            rows.append({"rank": c.rank, "describe": c.describe(), "rel_l2": err, "error": "wrong output"})
            continue
        us = time_calls(lambda i, c=c: plan(xs[i % COPIES], ws[i % COPIES], bs[i % COPIES], c.algo_hex,
                                            out=outs[i % COPIES]), n_calls, replays)
        rows.append({"rank": c.rank, "describe": c.describe(), "rel_l2": err, "us": round(us, 2),
                     "algo": c.algo_hex, "workspace": c.workspace})
    timed = [r for r in rows if "us" in r]
    best = min(timed, key=lambda r: r["us"]) if timed else None
    result = {"name": name, "m": m, "n": n, "k": k, "epilogue": epilogue, "torch_us": round(torch_us, 2),
              "candidates": rows, "best": best}
    if best is not None:  # the winner through a graph replayed on new inputs
        sx = xs[0].clone()
        out = torch.empty(m, n, device="cuda", dtype=DTYPE)
        warm_up(lambda: plan(sx, ws[0], bs[0], best["algo"], out=out))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            plan(sx, ws[0], bs[0], best["algo"], out=out)
        sx.copy_(xs[1])
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        result["best_graph_rel_l2"] = rel_l2(out, torch_call(xs[1], ws[0], bs[0], epilogue))
        result["supports"] = plan.supports(best["algo"])
    flops = 2.0 * m * n * k
    line = f"{name:22s} M{m:5d} N{n:6d} K{k:6d} {epilogue:9s} torch {torch_us:8.2f} us ({flops / torch_us / 1e6:6.1f} TF)"
    if best:
        line += (f"  best Lt {best['us']:8.2f} us ({flops / best['us'] / 1e6:6.1f} TF) {best['describe']}"
                 f"  x{torch_us / best['us']:.3f}  graph rel_l2 {result['best_graph_rel_l2']:.1e}")
    print(line, flush=True)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--records")
    ap.add_argument("--candidates", type=int, default=24)
    ap.add_argument("--only", choices=["encode", "prefill", "action"])
    args = ap.parse_args()
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}, cuBLASLt {cublaslt.version()}", flush=True)
    results = [check_shape(name, m, n, k, ep, args.candidates)
               for group, name, m, n, k, ep in SHAPES if args.only in (None, group)]
    print("\nper shape (us): torch | best Lt | candidates timed, fastest first")
    for r in results:
        timed = sorted((c for c in r["candidates"] if "us" in c), key=lambda c: c["us"])
        print(f"{r['name']:22s} {r['torch_us']:8.2f} | " + " ".join(f"{c['us']:.1f}(#{c['rank']})" for c in timed[:8]))
    total_torch = sum(r["torch_us"] for r in results)
    print(f"sum of one call each: torch {total_torch:.1f} us, best Lt "
          f"{sum(min(r['torch_us'], r['best']['us']) if r['best'] else r['torch_us'] for r in results):.1f} us")
    meta = {"gpu": gpu, "software": f"torch {torch.__version__}", "lt_version": cublaslt.version(),
            "command": "python scripts/gpu_cublaslt_check.py --records PATH"}
    if args.out:
        Path(args.out).write_text(json.dumps(dict(meta, results=results), indent=1))
    if args.records:
        records = [{"name": r["name"], "dtype": "bfloat16", "m": r["m"], "n": r["n"], "k": r["k"],
                    "epilogue": r["epilogue"], "algo": r["best"]["algo"], "describe": r["best"]["describe"],
                    "lt_us": r["best"]["us"], "torch_us": r["torch_us"]}
                   for r in results if r["best"] and r["best"]["us"] < r["torch_us"] and r.get("supports")
                   and r["best_graph_rel_l2"] < 1e-2]
        Path(args.records).write_text(json.dumps(dict(meta, records=records), indent=1))
        print(f"{len(records)} records written to {args.records}")


if __name__ == "__main__":
    main()
