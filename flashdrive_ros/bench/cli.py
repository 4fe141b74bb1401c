"""`python -m flashdrive_ros.bench --shape tiny|full --steps N --out DIR` (console script: flashdrive-bench).

Builds the stock transformers pipeline and our pipeline at the named shape with random weights
created on the device, warms each row up, times every stage with CUDA events (perf_counter on the
CPU) over N steps and writes DIR/bench.json and DIR/bench.md (median and p90 per stage, GPU name,
torch / transformers versions, decoded-token count, the roofline floors). Rows run one after the
other in one process: stock first (then freed), then our modes on one model.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

from . import roofline
from .ours import Mode, OursPipeline
from .shapes import (ACCEPT_LENGTHS, DRAFT_VOCAB, SHAPES, TEMPORAL_EMITS, TEMPORAL_TAU, get_shape,
                     make_workload)
from .stock import StockPipeline
from .timing import Clock, summarize

STAGES = ("encode", "prefill", "decode", "action", "total")


def our_rows() -> list[tuple[str, Mode]]:
    rows = [("ours: baseline", Mode()), ("ours: streaming", Mode(streaming=True))]
    rows += [(f"ours: spec τ={t:g} (scripted drafter)", Mode(tau=t)) for t in ACCEPT_LENGTHS]
    rows += [("ours: adaptive flow", Mode(flow="adaptive")), ("ours: graphs+fusion", Mode(graphs=True))]
    rows += [(f"ours: all (τ={t:g})", Mode(streaming=True, tau=t, flow="adaptive", graphs=True)) for t in ACCEPT_LENGTHS]
    rows += [(f"ours: all (τ={TEMPORAL_TAU:g}) + temporal draft, prefill emits {a} (scripted)",
              Mode(streaming=True, tau=TEMPORAL_TAU, flow="adaptive", graphs=True, temporal=a)) for a in TEMPORAL_EMITS]
    rows += [(f"ours: all (τ={TEMPORAL_TAU:g}) + action draft {o} (scripted)",
              Mode(streaming=True, tau=TEMPORAL_TAU, flow="adaptive", graphs=True, action_draft=o)) for o in ("hit", "miss")]
    return rows


def environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   sm_count=p.multi_processor_count)
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def _time_rows(name: str, step, steps: int, warmup: int, log) -> dict:
    for _ in range(warmup):
        step()
    per = [step() for _ in range(steps)]
    stats = summarize([{s: r[s] for s in STAGES} for r in per])
    extra = {k: per[-1][k] for k in per[-1] if k not in STAGES}
    log(f"{name:<44} " + "  ".join(f"{s} {stats[s]['median']:8.2f}" for s in STAGES))
    return {"name": name, "stats": stats, **extra}


def run(shape_name: str, steps: int, warmup: int, device: torch.device, dtype: torch.dtype,
        rows: list[str] | None, log=print, out: Path | None = None, draft_vocab: int | str | None = "auto") -> dict:
    """draft_vocab: rows of the scripted drafter's head (OursPipeline); "auto" = shapes.default_draft_vocab."""
    shape = get_shape(shape_name)
    clock = Clock(device)
    result = {"shape": shape_name, "env": environment(device), "dtype": str(dtype).replace("torch.", ""),
              "weights": "random (timing only)", "steps": steps, "warmup": warmup,
              "workload": {"prompt_tokens": shape.prompt_len, "images": shape.n_images,
                           "image_tokens_each": shape.tokens_per_image, "decoded_tokens": shape.decode_tokens,
                           "streaming_query_tokens": shape.streaming_query_len, "samples": 1},
              "rows": [], "checks": {}}
    want = (lambda n: rows is None or any(r in n for r in rows))
    t_start = time.time()

    def save_partial() -> None:  # a long device run keeps what it measured even if a later row fails
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "bench.partial.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))

    def guarded(name: str, fn) -> None:
        try:
            row = fn()
            if row is not None:
                result["rows"].append(row)
        except Exception as e:  # record and go on: one broken row must not cost the other rows
            import traceback

            traceback.print_exc()
            result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        save_partial()

    if want("stock"):
        name = "stock transformers (eager, DynamicCache)"

        def stock_row():
            stock = StockPipeline(shape, device, dtype)
            result["params_stock"] = stock.parameter_count()
            w = make_workload(shape, device, dtype)
            try:
                return _time_rows(name, lambda: stock.step(w, clock), steps, warmup, log)
            finally:
                del stock, w
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        guarded(name, stock_row)

    ours = OursPipeline(shape, device, dtype, draft_vocab=draft_vocab)
    result["params_ours"] = ours.parameter_count()
    result["workload"]["draft_vocab"] = ours.draft_vocab_size
    result["workload"]["vocab"] = shape.cfg.text.vocab_size
    ours.reference_tokens()
    def fast_check():
        result["checks"]["fast_vs_eager_rel_diff"] = ours.fast_path_check()

    guarded("fast-path check", fast_check)

    def check():
        # eager vs graphed on the same cache state: a device-side check of the fast path
        ours.full_prefill_window()
        ours.step(Mode(), clock)
        eager_x, eager_tok = ours.last_action.clone(), ours.last_tokens.clone()
        ours.full_prefill_window()
        ours.step(Mode(graphs=True), clock)
        graph_x, graph_tok = ours.last_action, ours.last_tokens
        result["checks"]["graph_vs_eager_action_rel_diff"] = float((graph_x - eager_x).norm() / eager_x.norm())
        result["checks"]["graph_vs_eager_tokens_equal"] = int((graph_tok == eager_tok).sum())
        result["checks"]["tokens_compared"] = int(eager_tok.numel())
        return None

    guarded("graph-vs-eager check", check)
    for name, mode in our_rows():
        if not want(name):
            continue

        def our_row(name=name, mode=mode):
            if mode.streaming:
                ours.full_prefill_window()  # window 0 of the stream fills every slot
            row = _time_rows(name, lambda: ours.step(mode, clock), steps, warmup, log)
            row["mode"] = mode.label()
            return row

        guarded(name, our_row)
    from ..engine.graphs import attention_choices, linear_choices, lt_choices

    result["attention_choices"] = attention_choices()
    result["linear_choices"] = linear_choices()
    result["cublaslt_choices"] = lt_choices()
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result["wall_s"] = round(time.time() - t_start, 1)
    stock_total = next((r["stats"]["total"]["median"] for r in result["rows"] if r["name"].startswith("stock")), None)
    for r in result["rows"]:
        if stock_total:
            r["speedup_vs_stock"] = stock_total / r["stats"]["total"]["median"]
    result["roofline"] = roofline.floors(shape)
    return result


def to_markdown(res: dict) -> str:
    env = res["env"]
    wl = res["workload"]
    lines = [f"Shape **{res['shape']}**, {res['dtype']}, {res['weights']}; device: {env.get('gpu') or env.get('cpu')}; "
             f"torch {env['torch']}, transformers {env['transformers']}, CUDA {env.get('cuda')}, "
             f"triton {env.get('triton', '–')}, Python {env['python']}.",
             f"Window: {wl['prompt_tokens']}-token prompt with {wl['images']} images × {wl['image_tokens_each']} "
             f"tokens; streaming query {wl['streaming_query_tokens']} tokens; **{wl['decoded_tokens']} decoded tokens**; "
             f"{wl['samples']} trajectory. Median (p90) ms over {res['steps']} steps after {res['warmup']} warm-up steps.",
             *([f"Scripted drafter: draft vocabulary of {wl['draft_vocab']} of the {wl['vocab']} target ids "
                f"(its head GEMM reads {wl['draft_vocab']} lm_head rows per pass)."] if "draft_vocab" in wl else []),
             "",
             "| row | encode | prefill | decode | action | total | decode passes | expert evals | × vs stock |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        s = r["stats"]
        cells = [f"{s[k]['median']:.1f} ({s[k]['p90']:.1f})" for k in STAGES]
        passes = f"{r['decode_passes']:g}" if "decode_passes" in r else f"{wl['decoded_tokens']}"
        evals = f"{r['flow_evaluations']:g}" if "flow_evaluations" in r else "10"
        sp = f"{r['speedup_vs_stock']:.1f}×" if "speedup_vs_stock" in r else "–"
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {passes} | {evals} | {sp} |")
    for name, err in res.get("errors", {}).items():
        lines.append(f"| {name} | failed: {err} | | | | | | | |")
    c = res.get("checks", {})
    if "graph_vs_eager_action_rel_diff" in c:
        lines += ["", f"Graph vs eager on the same cache: action relative difference "
                      f"{c['graph_vs_eager_action_rel_diff']:.2e}, greedy tokens equal {c['graph_vs_eager_tokens_equal']}"
                      f"/{c['tokens_compared']} (bf16 rounding differs between fused and unfused GEMMs; random "
                      f"weights give near-tied logits)."]
    if "fast_vs_eager_rel_diff" in c:
        d = c["fast_vs_eager_rel_diff"]
        lines.append("Fast stage functions vs the engine's eager modules on identical inputs (relative L2 "
                     "difference): " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()) + ".")
    if res.get("attention_choices"):
        lines.append("Attention kernel chosen per shape by timing: " +
                     "; ".join(f"{k}: {v}" for k, v in res["attention_choices"].items()) + ".")
    if res.get("linear_choices"):
        lines.append("Few-row GEMM shapes on the Triton skinny GEMM (shipped tuning records for this GPU, "
                     "engine/tuned/; all others cuBLAS): " +
                     "; ".join(f"{k}: {v}" for k, v in res["linear_choices"].items()) + ".")
    if res.get("cublaslt_choices"):
        lines.append("GEMM shapes on a cuBLASLt algorithm other than F.linear's (shipped records, "
                     "engine/tuned/cublaslt_*.json): " + "; ".join(res["cublaslt_choices"]) + ".")
    if "peak_memory_gib" in res:
        lines.append(f"Peak GPU memory {res['peak_memory_gib']} GiB; wall time {res['wall_s']} s.")
    meas = roofline.measured_from_bench(res)
    lines += ["", "Roofline floors (790 TFLOP/s, 3.0 TB/s) against the measured graphed rows:",
              roofline.markdown(get_shape(res["shape"]), res["roofline"], meas)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--rows", default=None, help="comma-separated substrings selecting rows (default: all)")
    ap.add_argument("--draft-vocab", default="auto",
                    help="rows of the scripted drafter's head (a draft vocabulary of K target ids); 0 = the whole "
                         f"vocabulary; default auto = {DRAFT_VOCAB} where the vocabulary is larger (full shapes), "
                         "else the whole vocabulary (docs/SPECULATIVE.md, Draft vocabulary)")
    args = ap.parse_args(argv)
    draft_vocab = args.draft_vocab if args.draft_vocab == "auto" else (int(args.draft_vocab) or None)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = args.rows.split(",") if args.rows else None
    out = Path(args.out)
    res = run(args.shape, args.steps, args.warmup, device, dtype, rows, out=out, draft_vocab=draft_vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    md = to_markdown(res)
    (out / "bench.md").write_text(md)
    print(md)
    return 0
