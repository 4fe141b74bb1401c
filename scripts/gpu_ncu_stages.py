"""Hardware counters of the fast path's kernels, stage by stage (device run, random bf16 weights).

    python scripts/gpu_ncu_stages.py --out DIR [--stages encode,prefill,verify,draft,action] [--count N]
    python scripts/gpu_ncu_stages.py --parse DIR/ncu.csv --out DIR     # the tables again (no GPU)
    python scripts/gpu_ncu_stages.py --parse docs/bench/ncu_verify_action_h100_session12.csv.gz \
        --stages verify,action --out /tmp/ncu                            # session 12's H100 run

docs/ROOFLINE.md infers from timings that the few-row passes (verify, action) are bound by per-kernel
latency rather than by bytes; this asks Nsight Compute. The script starts itself under `ncu` (kernel
replay of each CUDA-graph node, clocks left alone, caches flushed before each kernel so that every
weight byte comes from HBM as it does in the model), replays each stage's graph of the "all (τ=5.6)"
path once between profiler start/stop, and separates the stages by a marker kernel (torch.cuda._sleep).
Per stage and per kernel name it reports launches, the summed standalone duration, DRAM bytes read /
written against what the kernel must move, L2 bytes, and DRAM / SM / tensor-pipe utilisation.

Durations under ncu are each kernel alone (no PDL overlap with its neighbours, cold L2), so they add up
to more than a graph replay; the byte counts are what matters here.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

MARK = "spin_kernel"  # torch.cuda._sleep's kernel: separates the stages in the kernel list
STAGES = ("encode", "prefill", "verify", "draft", "action")
GRAPH_KEYS = {"encode": "encode1", "prefill": "prefill1", "verify": "verify", "draft": "draft", "action": "action_adaptive"}
# Wanted metrics; the ones this ncu does not know are dropped (checked with --query-metrics first). Few, so
# that one pass collects them: this set profiled 700 kernels in ~2 min on the H100; adding DRAM / SM
# throughput and tensor-pipe percentages (several passes, each kernel's memory saved and restored, in a
# process holding ~41 GB) did not finish ~800 kernels in 7 min.
METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "lts__t_bytes.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
)  # launch__grid_size / launch__registers_per_thread come with the raw page anyway


# ------------------------------------------------------------------------------------------ device side

def run_stages(stages: list[str], tau: float) -> None:
    """Build the full-shape pipeline, warm it up, then replay each stage's graph once inside the
    profiled range (cudaProfilerStart / Stop), a marker kernel before each."""
    import torch

    from flashdrive_ros.bench.ours import Mode, OursPipeline
    from flashdrive_ros.bench.shapes import get_shape
    from flashdrive_ros.bench.timing import Clock

    dev = torch.device("cuda")
    t0 = time.time()
    pipe = OursPipeline(get_shape("full"), dev, torch.bfloat16, draft_vocab="auto")
    pipe.reference_tokens()
    pipe.full_prefill_window()
    mode = Mode(streaming=True, tau=tau, flow="adaptive", graphs=True)
    clock = Clock(dev)
    for _ in range(3):
        pipe.step(mode, clock)
    torch.cuda.synchronize()
    print(f"built and warmed up in {time.time() - t0:.0f}s; profiling {stages}", flush=True)
    state0 = pipe._g["verify"].buffers["state"].clone()
    torch.cuda.cudart().cudaProfilerStart()
    for name in stages:
        sg = pipe._g[GRAPH_KEYS[name]]
        torch.cuda._sleep(1000)
        if name == "verify":  # the pass advances its own state: restart it first
            sg.buffers["state"].copy_(state0)
        sg.graph.replay()
        torch.cuda.synchronize()
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"done in {time.time() - t0:.0f}s", flush=True)


def known_metrics(ncu: str) -> list[str]:
    out = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True).stdout
    bases = {line.split()[0] for line in out.splitlines() if line.strip() and not line.startswith(("-", "Device"))}
    keep = []
    for m in METRICS:
        base = m.split(".")[0]
        if base in bases or m in bases:
            keep.append(m)
        else:
            print(f"ncu does not know {m}: left out", flush=True)
    return keep if len(keep) > 2 else list(METRICS)  # the query failed: let ncu name what it rejects


# ------------------------------------------------------------------------------------------ parsing

def _num(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def read_rows(path: Path) -> list[dict]:
    """ncu --csv --page raw: a header row, a units row, then one row per profiled kernel."""
    if path.suffix == ".gz":
        import gzip
        text = gzip.decompress(path.read_bytes()).decode(errors="replace")
    else:
        text = path.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.reader(lines))
    if len(rows) < 2:
        return []
    head, body = rows[0], rows[2:] if rows[1] and rows[1][0] == "" else rows[1:]
    return [dict(zip(head, r)) for r in body if len(r) == len(head)]


def split_stages(rows: list[dict], stages: list[str]) -> dict[str, list[dict]]:
    """Kernels between the i-th and (i+1)-th marker belong to stages[i]."""
    out: dict[str, list[dict]] = {s: [] for s in stages}
    idx = -1
    for r in rows:
        if MARK in r.get("Kernel Name", ""):
            idx += 1
            continue
        if 0 <= idx < len(stages):
            out[stages[idx]].append(r)
    return out


def summarize(stage_rows: dict[str, list[dict]]) -> dict:
    res = {}
    for stage, rows in stage_rows.items():
        by = defaultdict(lambda: defaultdict(float))
        tot = defaultdict(float)
        for r in rows:
            name = r.get("Kernel Name", "?").split("(")[0][:70]
            grid = _num(r.get("launch__grid_size", ""))
            # one row per kernel and grid size: the same kernel at different shapes stays apart
            g = by[(name, grid)]
            g["launches"] += 1
            dur = _num(r.get("gpu__time_duration.sum", ""))
            for key, col, scale in (("us", "gpu__time_duration.sum", 1e-3), ("dram_read_MB", "dram__bytes_read.sum", 1e-6),
                                    ("dram_write_MB", "dram__bytes_write.sum", 1e-6), ("l2_MB", "lts__t_bytes.sum", 1e-6)):
                v = _num(r.get(col, ""))
                if v is not None:
                    g[key] += v * scale
                    tot[key] += v * scale
            for key, col in (("dram_pct", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
                             ("sm_pct", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
                             ("hmma_pct", "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed"),
                             ("gmma_pct", "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed"),
                             ("tensor_pct", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed"),
                             ("occupancy_pct", "sm__warps_active.avg.pct_of_peak_sustained_active")):
                v = _num(r.get(col, ""))
                if v is not None and dur is not None:  # duration-weighted mean
                    g[key + "_w"] += v * dur
                    g["_wdur_" + key] += dur
            for key, col in (("grid", "launch__grid_size"), ("regs", "launch__registers_per_thread")):
                v = _num(r.get(col, ""))
                if v is not None:
                    g[key] = v
        kernels = []
        for (name, _), g in by.items():
            k = {"name": name, "launches": int(g["launches"])}
            for key in ("us", "dram_read_MB", "dram_write_MB", "l2_MB", "grid", "regs"):
                if key in g:
                    k[key] = round(g[key], 3)
            for key in ("dram_pct", "sm_pct", "hmma_pct", "gmma_pct", "tensor_pct", "occupancy_pct"):
                if g.get("_wdur_" + key):
                    k[key] = round(g[key + "_w"] / g["_wdur_" + key], 1)
            if k.get("us"):
                k["us_per_launch"] = round(k["us"] / k["launches"], 2)
                k["dram_TBps"] = round((k.get("dram_read_MB", 0) + k.get("dram_write_MB", 0)) / k["us"], 3)
            kernels.append(k)
        kernels.sort(key=lambda k: -k.get("us", 0))
        res[stage] = {"kernels": kernels, "launches": len(rows), **{k: round(v, 3) for k, v in tot.items()}}
    return res


def table(summary: dict) -> str:
    lines = []
    for stage, s in summary.items():
        lines.append(f"\n### {stage}: {s['launches']} kernels, {s.get('us', 0) / 1000:.2f} ms standalone, "
                     f"DRAM read {s.get('dram_read_MB', 0):.0f} MB / write {s.get('dram_write_MB', 0):.0f} MB, "
                     f"L2 {s.get('l2_MB', 0):.0f} MB")
        lines.append(f"{'kernel':<48}{'n':>5}{'us/launch':>10}{'DRAM MB':>9}{'L2 MB':>8}{'TB/s':>6}{'DRAM%':>6}{'SM%':>5}"
                     f"{'TC%':>5}{'occ%':>5}{'grid':>7}{'regs':>5}")

        def pct(v):  # a metric this run did not collect shows as '-'
            return "-" if v is None else f"{v:.0f}"
        for k in s["kernels"][:16]:
            n = k["launches"]
            tc = next((k[t] for t in ("tensor_pct", "gmma_pct", "hmma_pct") if t in k), None)
            lines.append(f"{k['name'][:47]:<48}{n:>5}{k.get('us_per_launch', 0):>10.2f}"
                         f"{(k.get('dram_read_MB', 0) + k.get('dram_write_MB', 0)) / n:>9.2f}{k.get('l2_MB', 0) / n:>8.2f}"
                         f"{k.get('dram_TBps', 0):>6.2f}{pct(k.get('dram_pct')):>6}{pct(k.get('sm_pct')):>5}"
                         f"{pct(tc):>5}{pct(k.get('occupancy_pct')):>5}{k.get('grid', 0):>7.0f}{k.get('regs', 0):>5.0f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="ncu_out")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--tau", type=float, default=5.6)
    ap.add_argument("--count", type=int, default=4000, help="ncu --launch-count: kernels profiled at most")
    ap.add_argument("--parse", default=None, help="an ncu.csv written by an earlier run: print its tables")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # the process ncu profiles
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    out = Path(args.out)
    if args.inner:
        run_stages(stages, args.tau)
        return
    if args.parse is None:
        ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
        metrics = known_metrics(ncu)
        out.mkdir(parents=True, exist_ok=True)
        csv_path = out / "ncu.csv"
        cmd = [ncu, "--profile-from-start", "off", "--graph-profiling", "node", "--clock-control", "none",
               "--cache-control", "all", "--replay-mode", "kernel", "--launch-count", str(args.count),
               "--metrics", ",".join(metrics), "--csv", "--page", "raw", "--print-units", "base", "--log-file", str(csv_path),
               sys.executable, __file__, "--inner", "--stages", ",".join(stages), "--tau", str(args.tau)]
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        rc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        print(f"ncu exited {rc} after {time.time() - t0:.0f}s", flush=True)
    else:
        csv_path = Path(args.parse)
    rows = read_rows(csv_path)
    summary = summarize(split_stages(rows, stages))
    text = table(summary)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ncu_summary.json").write_text(json.dumps({"stages": stages, "summary": summary}, indent=1))
    (out / "ncu_summary.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
