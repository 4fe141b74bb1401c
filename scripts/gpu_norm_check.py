"""Device check of engine/norm_kernels.py (bf16, CUDA; well under a minute).

    python scripts/gpu_norm_check.py [--out norm.json] [--replays 50] [--budget-s 40] [--sweep-warps]

1. Correctness at rows 1, 8, 64, 799 x H 2048, 4096 (x, a ~ 4 * randn, w ~ 1 + 0.2 * randn, [1, rows, H]):
   the kernels against the eager graphs._rms math (fused_*.eager) and against the torch.compile'd chains the
   fast path ran so far (graphs._compiled_*): differing elements of rms_norm, of add_rms_norm's sum and of
   its norm. Expected: sums bitwise everywhere; norms vs eager bitwise or a last-bit flip on a tiny
   fraction (fp32 summation order of the mean of squares); vs compiled a few one-ulp differences at most
   (inductor may keep the bf16 intermediate in fp32). Also: graphs.fused_* dispatch to the kernels on CUDA.
   The compiled comparisons come last and stop at --budget-s (each shape is a fresh inductor compile).
2. Timing inside CUDA graphs (scripts/gpu_timing: capture + replay_ms, median of --replays):
   chain     36 x add_rms_norm, each feeding the next (x, h = norm(x, h)): compiled chain vs the Triton
             kernel with attention_kernel.PDL off / on; us per norm.
   boundary  36 x [slot_attention (+ split merge) -> add_rms_norm -> next layer's q = the norm's output],
             the attention shapes of decode / verify / action (8 kv heads of 128, 3 057 of 3 136 keys seen),
             {compiled, Triton} norm x PDL {off, on}; us per layer. Outputs with PDL off / on must be equal.
   --sweep-warps adds the chain with norm_kernels.NUM_WARPS forced to 2, 4, 8, 16 (PDL on).
Exit status 1 if a correctness expectation fails (the compiled comparison is reported, never fails).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdrive_ros.engine import attention_kernel as A  # noqa: E402
from flashdrive_ros.engine import graphs as G  # noqa: E402
from flashdrive_ros.engine import norm_kernels as NK  # noqa: E402
from gpu_timing import capture, replay_ms  # noqa: E402 (scripts/, beside this file)

DEV = "cuda"
BF16 = torch.bfloat16
EPS = 1e-6
# (rows, H) of the correctness checks, the engine's shapes first (verify, decode, action expert, streaming
# prefill): the compiled comparisons run in this order until --budget-s
SHAPES = ((8, 4096), (1, 4096), (64, 2048), (799, 4096), (1, 2048), (8, 2048), (64, 4096), (799, 2048))
LAYERS = 36
KV, D, SLOTS, SEEN = 8, 128, 3136, 3057
# name: (rows = queries, hidden size); q heads = H / D, folded attention rows R = heads / KV * rows
STAGES = {"decode": (1, 4096), "verify": (8, 4096), "action": (64, 2048)}
MAX_EAGER_FLIPS = 1e-3  # norms vs eager: fraction of elements a summation-order flip may touch


def inputs(rows: int, h: int, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(1, rows, h, generator=g, device=DEV) * 4).to(BF16)
    a = (torch.randn(1, rows, h, generator=g, device=DEV) * 4).to(BF16)
    w = (torch.randn(h, generator=g, device=DEV) * 0.2 + 1).to(BF16)
    return x, a, w


def n_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).sum())


# ------------------------------------------------------------------------------------ correctness

def kernels_taken_by_graphs(x, a, w) -> bool:
    """Whether graphs.fused_rms_norm / fused_add_rms_norm call norm_kernels for these CUDA tensors."""
    calls = []
    rms, add = NK.rms_norm, NK.add_rms_norm
    NK.rms_norm = lambda *args: calls.append("rms") or rms(*args)
    NK.add_rms_norm = lambda *args: calls.append("add") or add(*args)
    try:
        G.fused_rms_norm(x, w, EPS)
        G.fused_add_rms_norm(x, a, w, EPS)
    finally:
        NK.rms_norm, NK.add_rms_norm = rms, add
    return calls == ["rms", "add"]


def check_eager(rows: int, h: int) -> dict:
    x, a, w = inputs(rows, h, seed=rows * 7 + h)
    norm = NK.rms_norm(x, w, EPS)
    total, norm_of_sum = NK.add_rms_norm(x, a, w, EPS)
    e_norm = G.fused_rms_norm.eager(x, w, EPS)
    e_total, e_norm_of_sum = G.fused_add_rms_norm.eager(x, a, w, EPS)
    r = {"rows": rows, "H": h, "n": x.numel(),
         "rms_vs_eager": n_diff(norm, e_norm), "sum_vs_eager": n_diff(total, e_total),
         "add_norm_vs_eager": n_diff(norm_of_sum, e_norm_of_sum),
         "max_abs_vs_eager": float(max((norm.float() - e_norm.float()).abs().max(),
                                       (norm_of_sum.float() - e_norm_of_sum.float()).abs().max())),
         "graphs_dispatch": kernels_taken_by_graphs(x, a, w)}
    r["ok"] = (r["sum_vs_eager"] == 0 and r["graphs_dispatch"]
               and max(r["rms_vs_eager"], r["add_norm_vs_eager"]) <= MAX_EAGER_FLIPS * r["n"])
    return r


def check_compiled(r: dict) -> None:
    x, a, w = inputs(r["rows"], r["H"], seed=r["rows"] * 7 + r["H"])
    norm = NK.rms_norm(x, w, EPS)
    total, norm_of_sum = NK.add_rms_norm(x, a, w, EPS)
    c_total, c_norm_of_sum = G._compiled_add_rms_norm(x, a, w, EPS)
    c_norm = G._compiled_rms_norm(x, w, EPS)
    r.update(rms_vs_compiled=n_diff(norm, c_norm), sum_vs_compiled=n_diff(total, c_total),
             add_norm_vs_compiled=n_diff(norm_of_sum, c_norm_of_sum))


# ----------------------------------------------------------------------------------------- timing

def norm_chain(rows: int, h: int, add_rms_norm):
    """36 dependent add + norms: x, h = add_rms_norm(x, h, w_i)."""
    x0, a0, _ = inputs(rows, h, seed=1)
    ws = [inputs(1, h, seed=100 + i)[2] for i in range(LAYERS)]

    def run():
        x, hn = x0, a0
        for w in ws:
            x, hn = add_rms_norm(x, hn, w, EPS)
        return hn
    return run


def layer_chain(rows: int, h: int, add_rms_norm):
    """36 x [attention -> add_rms_norm -> the norm's output as the next layer's folded q]: every kernel
    boundary of a decoder layer's attention side (the projections left out)."""
    g = torch.Generator(device=DEV).manual_seed(2)
    ks = [torch.randn(1, KV, SLOTS, D, generator=g, device=DEV).to(BF16) for _ in range(2)]
    vs = [torch.randn(1, KV, SLOTS, D, generator=g, device=DEV).to(BF16) for _ in range(2)]
    x0, a0, _ = inputs(rows, h, seed=3)
    ws = [inputs(1, h, seed=200 + i)[2] for i in range(LAYERS)]
    limit = torch.full((rows,), SEEN, dtype=torch.int32, device=DEV)
    folded = h // D // KV * rows

    def run():
        x, hn = x0, a0
        for i, w in enumerate(ws):
            q = hn.reshape(1, KV, folded, D)
            out = A.slot_attention(q, ks[i % 2], vs[i % 2], limit, heads_last=True)  # [1, Q, heads, D]
            x, hn = add_rms_norm(x, out.reshape(1, rows, h), w, EPS)
        return hn
    return run


def timed(make, pdl: bool, replays: int):
    """(us of one replay of make()'s function captured as a CUDA graph, the graph's output after the
    replays) with attention_kernel.PDL set to pdl (read at launch time, so also at capture)."""
    before, A.PDL = A.PDL, pdl
    try:
        g, out = capture(make(), warm=3)
        us = replay_ms(g, replays) * 1e3
        out = out.clone()
        del g
        return us, out
    finally:
        A.PDL = before


NORMS = {"compiled": G._compiled_add_rms_norm, "triton": G.fused_add_rms_norm}


def time_chains(replays: int) -> list:
    rows_out = []
    for stage, (rows, h) in STAGES.items():
        r = {"kind": "chain", "stage": stage, "rows": rows, "H": h}
        outs = {}
        for label, norm, pdl in (("compiled", "compiled", True), ("triton pdl off", "triton", False),
                                 ("triton pdl on", "triton", True)):
            us, outs[label] = timed(lambda: norm_chain(rows, h, NORMS[norm]), pdl, replays)
            r[label] = round(us / LAYERS, 2)
        r["equal_pdl_on_off"] = bool(torch.equal(outs["triton pdl off"], outs["triton pdl on"]))
        rows_out.append(r)
        print(f"chain    {stage:6s} rows {rows:3d} H {h}: us per add_rms_norm  compiled {r['compiled']:6.2f}  "
              f"triton PDL off {r['triton pdl off']:6.2f}  on {r['triton pdl on']:6.2f}", flush=True)
    return rows_out


def time_boundaries(replays: int) -> list:
    rows_out = []
    for stage, (rows, h) in STAGES.items():
        r = {"kind": "boundary", "stage": stage, "rows": rows, "H": h}
        outs = {}
        for norm in ("compiled", "triton"):
            for pdl in (False, True):
                label = f"{norm} pdl {'on' if pdl else 'off'}"
                us, outs[label] = timed(lambda: layer_chain(rows, h, NORMS[norm]), pdl, replays)
                r[label] = round(us / LAYERS, 2)
        r["equal_pdl_on_off"] = bool(torch.equal(outs["triton pdl off"], outs["triton pdl on"])
                                     and torch.equal(outs["compiled pdl off"], outs["compiled pdl on"]))
        rows_out.append(r)
        print(f"boundary {stage:6s} rows {rows:3d} H {h}: us per layer  compiled PDL off {r['compiled pdl off']:6.2f} "
              f"on {r['compiled pdl on']:6.2f}  triton PDL off {r['triton pdl off']:6.2f} on {r['triton pdl on']:6.2f}",
              flush=True)
    return rows_out


def sweep_warps(replays: int) -> list:
    rows_out = []
    for stage, (rows, h) in STAGES.items():
        r = {"kind": "warps", "stage": stage, "rows": rows, "H": h}
        for warps in (2, 4, 8, 16):
            NK.NUM_WARPS = warps
            try:
                us, _ = timed(lambda: norm_chain(rows, h, G.fused_add_rms_norm), True, replays)
            finally:
                NK.NUM_WARPS = None
            r[f"{warps} warps"] = round(us / LAYERS, 2)
        rows_out.append(r)
        print(f"warps    {stage:6s} rows {rows:3d} H {h}: us per add_rms_norm (PDL on) "
              + "  ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith("warps")), flush=True)
    return rows_out


# ------------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=40.0, help="skip the remaining compiled comparisons past this")
    ap.add_argument("--sweep-warps", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not NK.available(torch.empty(1, device=DEV)):
        print("needs CUDA and triton")
        return 2
    t0 = time.time()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "pdl_default": A.PDL,
           "pdl_here": A.pdl_enabled(torch.empty(1, device=DEV)), "layers": LAYERS}
    print(f"device {res['gpu']}, torch {res['torch']}, PDL usable: {res['pdl_here']}", flush=True)

    checks = [check_eager(rows, h) for rows, h in SHAPES]
    print(f"eager comparison done ({time.time() - t0:.0f} s)", flush=True)
    res["timing"] = time_chains(args.replays) + time_boundaries(args.replays)
    if args.sweep_warps:
        res["timing"] += sweep_warps(args.replays)
    print(f"timing done ({time.time() - t0:.0f} s)", flush=True)
    for r in checks:  # one inductor compile per shape and function: as many as the budget allows
        if time.time() - t0 > args.budget_s:
            r["compiled"] = "skipped (--budget-s)"
            continue
        check_compiled(r)
        print(f"compiled comparison rows {r['rows']} H {r['H']} done ({time.time() - t0:.0f} s)", flush=True)
    res["correctness"] = checks
    ok = all(r["ok"] for r in checks) and all(r["equal_pdl_on_off"] for r in res["timing"] if "equal_pdl_on_off" in r)
    res["ok"] = ok

    print(f"\n{'rows':>4s} {'H':>5s} | {'differing elements vs eager':^29s} | {'vs compiled':^29s} | dispatch")
    print(f"{'':>4s} {'':>5s} | {'rms':>9s} {'sum':>9s} {'add+rms':>9s} | {'rms':>9s} {'sum':>9s} {'add+rms':>9s} |")
    for r in checks:
        comp = (f"{r['rms_vs_compiled']:9d} {r['sum_vs_compiled']:9d} {r['add_norm_vs_compiled']:9d}"
                if "rms_vs_compiled" in r else f"{'skipped':>29s}")
        print(f"{r['rows']:4d} {r['H']:5d} | {r['rms_vs_eager']:9d} {r['sum_vs_eager']:9d} {r['add_norm_vs_eager']:9d} | "
              f"{comp} | {'kernel' if r['graphs_dispatch'] else 'NOT the kernel'}")
    print(f"\n{'timing (us)':28s} " + " ".join(f"{s:>8s}" for s in STAGES))
    for kind, labels in (("chain", ("compiled", "triton pdl off", "triton pdl on")),
                         ("boundary", ("compiled pdl off", "compiled pdl on", "triton pdl off", "triton pdl on"))):
        for label in labels:
            vals = [r[label] for r in res["timing"] if r["kind"] == kind]
            print(f"{kind + ' ' + label:28s} " + " ".join(f"{v:8.2f}" for v in vals))
    print("chain: us per add_rms_norm; boundary: us per layer (attention + merge + add_rms_norm)")
    print(f"\ncorrectness: {'OK' if ok else 'FAILED'}   ({time.time() - t0:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
