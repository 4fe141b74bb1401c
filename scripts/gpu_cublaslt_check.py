"""Device check and tuning of engine/cublaslt.py: the heuristic's other algorithms at the engine's GEMM shapes,
and with --exhaustive the configurations cuBLASLt's heuristic never lists.

    python scripts/gpu_cublaslt_check.py [--out results.json] [--records cublaslt_<gpu>.json]
                                         [--candidates 24] [--only encode|prefill|action] [--names qkv,fc1]
                                         [--exhaustive [LIMIT]] [--exhaustive-seconds 170]

For every shape (vision tower at 2 880 rows, its mergers at 720, the streaming prefill at 799, the action
expert's cuBLAS GEMMs at 64; the epilogue each runs in the engine):
1. what the engine runs today (F.linear, or torch._addmm_activation for the GELU epilogue) is timed;
2. each of the first --candidates algorithms cuBLASLt's heuristic offers is checked against that output
   (rel L2 < 1e-2, output memory poisoned with NaN first) and timed the same way;
3. the fastest is checked again through a CUDA graph replayed on new inputs (and with
   cublasLtMatmulAlgoCheck); where it fails, the next fastest, up to GRAPH_CHECKS of them.
Timing: CUDA graphs of back-to-back calls, median of replays; weights rotate COPIES copies so the
memory-bound shapes read HBM as in the model.

--exhaustive [LIMIT] (default LIMIT 400) adds, per shape, the configurations Plan.enumerate builds from every
algorithm id's capabilities (tile, stages, split-K, CTA swizzle, custom option, cluster shape; splitK 1
first), at most LIMIT of them past the heuristic's, and the RETILE_BASES fastest heuristic candidates with
their algorithm's other tiles x stages (config_retilings, built on the candidate's own 64 bytes; at most
RETILINGS_PER_BASE each), each checked for its output as in 2., then:
  a. a quick first pass: each correct configuration timed in a graph of a quarter of the calls, QUICK_REPLAYS
     replays (a few ms each); one whose checking call alone (timed by events) took over SLOW_FACTOR x the
     heuristic's best + SLOW_MARGIN_US is not timed (a legacy kernel at 10x would spend the budget);
  b. a second look: the swizzle / custom / cluster / split-K variations (config_variations, on the base's own
     bytes) of the REFINE_BASES fastest (algorithm, tile, stages) seen so far, VARIATIONS_PER_BASE each,
     quick-timed too;
  c. the RETIME fastest of the quick passes re-timed as in 2. (full graph, 15 replays); only these full
     timings compete with the heuristic's candidates for the best.
Enumeration, a. and b. share a time budget per shape: --exhaustive-seconds (default 170) split evenly over
the shapes run, at most 30 s each; what the budget cuts is reported (configurations stay in their
enumeration order, so a cut drops split-K and the later variations first). A full run over all SHAPES: at
most ~170 s of budget (less where LIMIT is reached first) + ~45 s of start-up, reference and heuristic
timing and re-timing: under 4 minutes on an H100; --only encode: at most ~3.3 minutes.

--records writes the records graphs.dense loads (engine/tuned/cublaslt_<gpu>.json): per shape the
fastest correct algorithm that passed the graph check and AlgoCheck, with its time and the engine's current
time (lt_us / torch_us) and the cuBLASLt version they hold for. Records are shipped only where
lt_us < torch_us; graphs.dense applies its own margin. --out is rewritten after every shape, so a run that
dies midway (a configuration that faults the device) keeps what it had.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdrive_ros.engine import cublaslt  # noqa: E402
from gpu_timing import graph_ms, warm_up  # noqa: E402 (scripts/, beside this file)

DTYPE = torch.bfloat16
COPIES = 3
REPLAYS = 15
GRAPH_CHECKS = 4           # the fastest candidates tried, in order, for the graph check
EXHAUSTIVE_LIMIT = 400     # enumerated configurations per shape, first pass (--exhaustive LIMIT)
QUICK_REPLAYS = 3          # quick pass: replays of a graph of a quarter of the calls
RETILE_BASES = 3           # the heuristic's fastest, tried with their algorithm's other tiles x stages
RETILINGS_PER_BASE = 48
REFINE_BASES = 4           # second look: variations around this many fastest (algorithm, tile, stages)
VARIATIONS_PER_BASE = 48
RETIME = 8                 # fastest quick-pass configurations re-timed in full
ENUMERATE_SHARE = 0.2      # of a shape's budget: host time for checking configurations (each enumeration)
RETILE_SHARE = 0.1         # of a shape's budget: the same for the re-tilings of the heuristic's fastest
FIRST_PASS_SHARE = 0.7     # of a shape's budget: enumeration + first quick pass; the rest: the second look
SLOW_FACTOR, SLOW_MARGIN_US = 4.0, 100.0  # one eager call slower than this x the heuristic's best + margin: not timed
MAX_SHAPE_SECONDS = 30.0

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


class Shape:
    """One GEMM shape's inputs, reference output and plan, and how its candidates are checked and timed."""

    def __init__(self, m, n, k, epilogue):
        self.m, self.n, self.k, self.epilogue = m, n, k, epilogue
        self.xs = [torch.randn(m, k, device="cuda", dtype=DTYPE) for _ in range(COPIES)]
        self.ws = [torch.randn(n, k, device="cuda", dtype=DTYPE) / k ** 0.5 for _ in range(COPIES)]
        self.bs = [torch.randn(n, device="cuda", dtype=DTYPE) if epilogue != "none" else None for _ in range(COPIES)]
        self.outs = [torch.empty(m, n, device="cuda", dtype=DTYPE) for _ in range(COPIES)]
        self.n_calls = max(4, min(40, int(2e9 / max(1, m * n * k * 2 / 1e3))))  # ~ a few hundred us per graph
        self.ref = torch_call(self.xs[0], self.ws[0], self.bs[0], epilogue)
        self.plan = cublaslt.Plan(m, n, k, epilogue, DTYPE, torch.cuda.current_device())

    def torch_us(self):
        return time_calls(lambda i: torch_call(self.xs[i % COPIES], self.ws[i % COPIES], self.bs[i % COPIES],
                                               self.epilogue), self.n_calls, REPLAYS)

    def lt_us(self, algo, quick=False):
        n_calls, replays = (max(2, self.n_calls // 4), QUICK_REPLAYS) if quick else (self.n_calls, REPLAYS)
        return time_calls(lambda i: self.plan(self.xs[i % COPIES], self.ws[i % COPIES], self.bs[i % COPIES], algo,
                                              out=self.outs[i % COPIES]), n_calls, replays)

    def check(self, c, eager_timing=False):
        """A row for candidate c, with "error" set where it fails or gives a wrong output; eager_timing: with
        the check's own call timed by events ("eager_us": launch gap included, a coarse filter only)."""
        row = {"rank": c.rank, "source": c.source, "tag": c.tag, "describe": c.describe(), "algo": c.algo_hex,
               "workspace": c.workspace}
        self.outs[0].fill_(float("nan"))
        try:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if eager_timing else None
            if events:
                events[0].record()
            y = self.plan(self.xs[0], self.ws[0], self.bs[0], c.algo_hex, out=self.outs[0])
            if events:
                events[1].record()
            torch.cuda.synchronize()
            if events:
                row["eager_us"] = round(1000.0 * events[0].elapsed_time(events[1]), 2)
        except (cublaslt.CublasLtError, RuntimeError) as e:
            row["error"] = str(e)
            return row
        row["rel_l2"] = rel_l2(y, self.ref)
        if not row["rel_l2"] < 1e-2:
            row["error"] = "wrong output"
        return row

    def time_row(self, row, quick=False):
        """row with "us" (or "quick_us") set, or "error" where the timing itself failed."""
        try:
            row["quick_us" if quick else "us"] = round(self.lt_us(row["algo"], quick), 2)
        except (cublaslt.CublasLtError, RuntimeError) as e:
            row["error"] = f"timing: {e}"
        return row

    def graph_check(self, algo):
        """rel L2 of the algorithm through a CUDA graph replayed on new inputs."""
        m, n = self.m, self.n
        sx = self.xs[0].clone()
        out = torch.empty(m, n, device="cuda", dtype=DTYPE)
        warm_up(lambda: self.plan(sx, self.ws[0], self.bs[0], algo, out=out))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.plan(sx, self.ws[0], self.bs[0], algo, out=out)
        sx.copy_(self.xs[1])
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        return rel_l2(out, torch_call(self.xs[1], self.ws[0], self.bs[0], self.epilogue))


def quick_pass(shape, candidates, rows, seen, deadline, slow_us=None):
    """Check and quick-time candidates not seen yet until the deadline, except those whose checking call
    alone took over slow_us (a legacy kernel at 10x would spend the budget on its replays); returns how
    many were timed, left out by the deadline, and left out as slow."""
    timed = left = slow = 0
    for c in candidates:
        if c.algo_hex in seen:
            continue
        if time.monotonic() > deadline:
            left += 1
            continue
        seen.add(c.algo_hex)
        row = shape.check(c, eager_timing=slow_us is not None)
        if "error" not in row and slow_us is not None and row["eager_us"] > slow_us:
            row["slow"] = True
            slow += 1
        elif "error" not in row:
            shape.time_row(row, quick=True)
            timed += "quick_us" in row
        rows.append(row)
    return timed, left, slow


def exhaustive_search(shape, rows, known, limit, seconds):
    """Enumerated configurations of the shape's plan: checked, quick-timed, the fastest re-timed in full
    (all appended to rows; known: the Candidate of every row by its algorithm). Returns a summary for the
    printout and the results file."""
    plan = shape.plan
    start = time.monotonic()
    seen = {r["algo"] for r in rows}
    # the heuristic's candidates past --candidates come along and are quick-timed like the enumerated ones
    try:
        first = plan.enumerate(limit, max_seconds=ENUMERATE_SHARE * seconds)
    except cublaslt.CublasLtError as e:  # nothing to enumerate at all: the heuristic's rows stand
        return {"error": str(e)}
    first_report = dict(plan.enumeration_report)
    caps = plan.capabilities() if first_report.get("algo_ids") else {}
    # the heuristic's fastest with its algorithm's other tiles x stages, built on its own 64 bytes: what
    # cublasLtMatmulAlgoInit leaves at a default that no configuration attribute reaches stays as it was
    retiled, retile_reports = [], []
    heuristic_fastest = sorted((r for r in rows if "us" in r and "error" not in r), key=lambda r: r["us"])
    slow_us = SLOW_FACTOR * heuristic_fastest[0]["us"] + SLOW_MARGIN_US if heuristic_fastest else None
    for r in heuristic_fastest[:RETILE_BASES]:
        c = known[r["algo"]]
        if c.algo_id in caps:
            retiled += plan.enumerate(RETILINGS_PER_BASE, cublaslt.config_retilings(c.config, caps[c.algo_id]),
                                      include_heuristic=False, base_hex=c.algo_hex,
                                      max_seconds=RETILE_SHARE * seconds / RETILE_BASES,
                                      exclude=seen | {x.algo_hex for x in first + retiled})
            retile_reports.append(dict(plan.enumeration_report))
    for c in first + retiled:
        known.setdefault(c.algo_hex, c)
    first_timed, first_left, first_slow = quick_pass(shape, first + retiled, rows, seen,
                                                     start + FIRST_PASS_SHARE * seconds, slow_us)

    # second look: variations of the fastest (algorithm, tile, stages), from full and quick timings alike
    def speed(r):
        return r.get("us", r.get("quick_us"))

    bases = []  # Candidates: their configuration and their own bytes
    for r in sorted((r for r in rows if speed(r) is not None and "error" not in r), key=speed):
        c = known[r["algo"]]
        if c.algo_id in caps and (c.algo_id, c.tile_id, c.stages_id) not in {(b.algo_id, b.tile_id, b.stages_id)
                                                                             for b in bases}:
            bases.append(c)
        if len(bases) == REFINE_BASES:
            break
    second, second_reports = [], []
    for base in bases:  # one enumeration per base: each gets its share of variations
        left = start + seconds - time.monotonic()
        if left <= 0:
            break
        second += plan.enumerate(VARIATIONS_PER_BASE, cublaslt.config_variations(base.config, caps[base.algo_id]),
                                 include_heuristic=False, base_hex=base.algo_hex,
                                 max_seconds=ENUMERATE_SHARE * left / len(bases),
                                 exclude=seen | {c.algo_hex for c in second})
        second_reports.append(dict(plan.enumeration_report))
    second_timed, second_left, second_slow = quick_pass(shape, second, rows, seen, start + seconds, slow_us)
    second_report = {key: sum(r[key] for r in second_reports) for key in ("checked", "valid", "enumerated")}

    quick = sorted((r for r in rows if "quick_us" in r and "error" not in r), key=lambda r: r["quick_us"])
    for r in quick[:RETIME]:
        shape.time_row(r)
    retile_report = {key: sum(r[key] for r in retile_reports) for key in ("checked", "valid", "enumerated")}
    return {"seconds": round(time.monotonic() - start, 1), "first": first_report, "retiled": retile_report,
            "retile_reports": retile_reports, "first_timed": first_timed, "first_left_by_budget": first_left,
            "slow_us": slow_us, "left_as_slow": first_slow + second_slow,
            "bases": [b.tag for b in bases], "second": second_report,
            "second_reports": second_reports, "second_timed": second_timed, "second_left_by_budget": second_left,
            "correct": sum(1 for r in rows if r["source"] == "enumerated" and "error" not in r),
            "retimed": min(RETIME, len(quick))}


def check_shape(name, m, n, k, epilogue, n_candidates, exhaustive=None):
    shape = Shape(m, n, k, epilogue)
    torch_us = shape.torch_us()
    rows, known = [], {}
    for c in shape.plan.candidates(n_candidates):
        known[c.algo_hex] = c
        row = shape.check(c)
        if "error" not in row:
            shape.time_row(row)
        rows.append(row)
    search = exhaustive_search(shape, rows, known, *exhaustive) if exhaustive else None
    timed = sorted((r for r in rows if "us" in r and "error" not in r), key=lambda r: r["us"])
    result = {"name": name, "m": m, "n": n, "k": k, "epilogue": epilogue, "torch_us": round(torch_us, 2),
              "candidates": rows, "best": None}
    if search:
        result["exhaustive"] = search
    graph_failures = []
    for r in timed[:GRAPH_CHECKS]:  # the fastest that also runs right through a graph and passes AlgoCheck
        graph_err = shape.graph_check(r["algo"])
        supports = shape.plan.supports(r["algo"])
        if graph_err < 1e-2 and supports:
            result.update(best=r, best_graph_rel_l2=graph_err, supports=supports)
            break
        graph_failures.append({"tag": r["tag"], "graph_rel_l2": graph_err, "supports": supports})
    if graph_failures:
        result["graph_failures"] = graph_failures
    best = result["best"]
    flops = 2.0 * m * n * k
    line = (f"{name:22s} M{m:5d} N{n:6d} K{k:6d} {epilogue:9s} torch {torch_us:8.2f} us "
            f"({flops / torch_us / 1e6:6.1f} TF)")
    if best:
        line += (f"  best Lt {best['us']:8.2f} us ({flops / best['us'] / 1e6:6.1f} TF) {best['describe']}"
                 f"  x{torch_us / best['us']:.3f}  graph rel_l2 {result['best_graph_rel_l2']:.1e}")
    print(line, flush=True)
    if graph_failures:
        print(f"    failed the graph check or AlgoCheck: {graph_failures}", flush=True)
    if search:
        print_search(search, rows, flops)
    return result


def print_search(search, rows, flops):
    if "error" in search:
        print(f"    exhaustive: nothing enumerated ({search['error']})", flush=True)
        return
    first, second = search["first"], search["second"]
    print(f"    exhaustive ({search['seconds']} s): {first.get('algo_ids')} algorithm ids, {first.get('checked')} "
          f"configurations checked, {first.get('valid')} valid, {first.get('enumerated')} new "
          f"(stopped: {first.get('stopped')}); the heuristic's fastest re-tiled: "
          f"{search['retiled']['checked']} checked, {search['retiled']['enumerated']} new; "
          f"{search['first_timed']} quick-timed"
          f" ({search['first_left_by_budget']} left by the budget); second look around {len(search['bases'])}: "
          f"{second.get('checked', 0)} checked, {second.get('enumerated', 0)} new, {search['second_timed']} "
          f"quick-timed ({search['second_left_by_budget']} left); {search['correct']} enumerated correct, "
          f"{search['retimed']} re-timed; {search['left_as_slow']} not timed as slow (one call over "
          f"{search['slow_us'] or 0:.0f} us)", flush=True)
    skipped = dict(list(first.get("skipped", {}).items())[:4])
    if skipped:
        print(f"    most common refusals: {skipped}", flush=True)
    top = sorted((r for r in rows if "us" in r and "error" not in r), key=lambda r: r["us"])[:5]
    for r in top:
        print(f"      {r['us']:8.2f} us ({flops / r['us'] / 1e6:6.1f} TF)  {r['describe']}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--records")
    ap.add_argument("--candidates", type=int, default=24)
    ap.add_argument("--only", choices=["encode", "prefill", "action"])
    ap.add_argument("--names", help="comma-separated parts of shape names to run (e.g. qkv,fc1)")
    ap.add_argument("--exhaustive", nargs="?", type=int, const=EXHAUSTIVE_LIMIT, default=None, metavar="LIMIT",
                    help=f"also time enumerated configurations, at most LIMIT per shape (default {EXHAUSTIVE_LIMIT})")
    ap.add_argument("--exhaustive-seconds", type=float, default=170.0,
                    help="enumeration + quick-pass budget of the whole run, split evenly over the shapes")
    args = ap.parse_args()
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}, cuBLASLt {cublaslt.version()}", flush=True)
    names = [p.strip().lower() for p in args.names.split(",")] if args.names else None
    shapes = [s for s in SHAPES
              if args.only in (None, s[0]) and (names is None or any(p in s[1].lower() for p in names))]
    exhaustive = None
    if args.exhaustive is not None:
        exhaustive = (args.exhaustive, min(MAX_SHAPE_SECONDS, args.exhaustive_seconds / max(1, len(shapes))))
    meta = {"gpu": gpu, "software": f"torch {torch.__version__}", "lt_version": cublaslt.version(),
            "command": "python scripts/gpu_cublaslt_check.py " + " ".join(sys.argv[1:])}
    results = []
    for group, name, m, n, k, ep in shapes:
        results.append(check_shape(name, m, n, k, ep, args.candidates, exhaustive))
        if args.out:  # after every shape: a run that dies midway keeps what it had
            Path(args.out).write_text(json.dumps(dict(meta, results=results), indent=1))
    print("\nper shape (us): torch | best Lt | candidates timed, fastest first")
    for r in results:
        timed = sorted((c for c in r["candidates"] if "us" in c and "error" not in c), key=lambda c: c["us"])
        best = f"{r['best']['us']:8.2f}" if r["best"] else "       -"
        print(f"{r['name']:22s} {r['torch_us']:8.2f} | {best} | "
              + " ".join(f"{c['us']:.1f}({c['tag']})" for c in timed[:8]))
    total_torch = sum(r["torch_us"] for r in results)
    print(f"sum of one call each: torch {total_torch:.1f} us, best Lt "
          f"{sum(min(r['torch_us'], r['best']['us']) if r['best'] else r['torch_us'] for r in results):.1f} us")
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
