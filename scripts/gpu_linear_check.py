"""Device check of skinny_linear and skinny_swiglu (engine/linear_kernel.py) at the Alpamayo-1.5 shapes, bf16.

    python scripts/gpu_linear_check.py [--out results.json] [--ship tuned.json] [--only expert|lm|head]

Shapes (M rows, N, K): action expert at M = 64 (q|k|v 4096 x 2048, o 2048 x 2048, gate|up 16512 x 2048,
down 2048 x 8256), LM at M = 8 (verify) and M = 1 (decode) (q|k|v 6144 x 4096, o 4096 x 4096, gate|up
24576 x 4096, down 4096 x 12288), and an lm_head-like 155712 x 4096 at M = 8.
1. The first call per shape autotunes (timed and reported: this is what StageGraph's warm-up will pay).
   Correctness against skinny_linear_reference (rel L2 < 1e-2) with the output / split-K workspace
   memory poisoned with NaN first: tuned config without bias, the default config with a bias, and
   through a CUDA graph replayed on new inputs (capturable: no host sync). An untuned shape called
   during capture must fall back to F.linear (no benchmarking inside the capture).
2. Timing, per call, from CUDA graphs of back-to-back calls (median of replays): skinny_linear (tuned)
   against cuBLAS F.linear. Each weight is a row slice of a fused buffer and calls rotate 3 copies, so
   weights come from HBM (not the 50 MB L2) as in the model.
3. skinny_swiglu (the gate|up GEMM with the SwiGLU in its epilogue) on the gate|up shapes (expert M = 64,
   LM M = 8 and 1): tuned on its first call; against skinny_swiglu_reference with NaN-poisoned memory
   (tuned config, the default config, a forced split-K config), against the engine's two-kernel path,
   and through a CUDA-graph replay. Timed as above against both two-kernel paths the engine could run
   instead: cuBLAS gate|up + graphs.fused_swiglu (torch.compile'd, the engine's SwiGLU kernel) and the
   tuned skinny_linear gate|up + the same SwiGLU. An untuned swiglu shape during capture must fall back.
The tables (us, TB/s of weight + activations, the winning config) are printed last.

--out writes everything as JSON; its "records" (and --ship, which writes only gpu / software / command /
records) are in the format of engine/tuned/linear_<gpu>.json, which graphs._load_shipped_tuning reads:
the tuned configs with the CUDA-graph timings of the tables as kernel_us / cublas_us (swiglu records:
"swiglu": true, cublas_us = cuBLAS + SwiGLU, skinny_linear_us = skinny_linear + SwiGLU). With --only,
only that group's records are written.
"""
import argparse
from dataclasses import asdict
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdrive_ros.engine import graphs  # noqa: E402
from flashdrive_ros.engine import linear_kernel as L  # noqa: E402
from gpu_timing import graph_ms, warm_up  # noqa: E402 (scripts/, beside this file)

DTYPE = torch.bfloat16
DEV = "cuda"
COPIES = 3
T0 = time.perf_counter()

SHAPES = [  # (group, name, leading dims of x, N, K)
    ("expert", "expert qkv", (1, 64), 4096, 2048),
    ("expert", "expert o", (1, 64), 2048, 2048),
    ("expert", "expert gate|up", (1, 64), 16512, 2048),
    ("expert", "expert down", (1, 64), 2048, 8256),
    *[("lm", f"lm {nm} M={m}", (1, m), n, k) for m in (8, 1)
      for nm, n, k in (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate|up", 24576, 4096), ("down", 4096, 12288))],
    ("head", "lm_head M=8", (1, 8), 155712, 4096),
]
SWIGLU_SHAPES = [  # (group, name, leading dims of x, N = 2I gate|up rows, K): skinny_swiglu
    ("expert", "expert gate|up+swiglu", (1, 64), 16512, 2048),
    *[("lm", f"lm gate|up+swiglu M={m}", (1, m), 24576, 4096) for m in (8, 1)],
]
SPLIT_CHECK = L.Config(64, 128, 4, 4, 3)  # a split-K config every swiglu shape is checked with (fits at M = 64)


def elapsed() -> float:
    return time.perf_counter() - T0


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_graph(call, n_calls: int, replays: int) -> float:
    """us per call: n_calls back-to-back calls captured in one CUDA graph (call(i) rotates weights)."""
    warm_up(lambda: [call(i) for i in range(COPIES)])
    return 1000.0 * graph_ms(lambda: [call(i) for i in range(n_calls)], replays, warm=0) / n_calls


def poison(m: int, n: int, cfg: L.Config, k: int, partial_n: int | None = None) -> None:
    """Leave NaN-filled blocks of the sizes skinny_linear allocates in the caching allocator: the output
    [m, n] and, split, the fp32 partials [splits, m, partial_n] (skinny_swiglu: n = I, partial_n = 2I)."""
    blocks = [torch.full((m * n,), float("nan"), dtype=DTYPE, device=DEV)]
    if L._n_splits(cfg, k) > 1:
        size = L._n_splits(cfg, k) * m * (partial_n or n)
        blocks.append(torch.full((size,), float("nan"), dtype=torch.float32, device=DEV))
    torch.cuda.synchronize()
    del blocks


def cfg_name(c: L.Config) -> str:
    return f"bn{c.block_n} bk{c.block_k} sk{c.split_k} w{c.num_warps} st{c.num_stages}"


def _us(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def ship_record(name: str, m: int, n: int, k: int, swiglu: bool, tuned: L.Tuned, kernel_us: float,
                cublas_us: float, **extra) -> dict:
    """A record of engine/tuned/linear_<gpu>.json: the tuned config, the CUDA-graph timings of the table
    as kernel_us / cublas_us (what graphs._load_shipped_tuning decides by), the tuner's own as tuner_*."""
    return dict(dtype=str(DTYPE)[6:], m=m, n=n, k=k, bias=False, swiglu=swiglu, **asdict(tuned.config),
                kernel_us=_us(kernel_us), cublas_us=_us(cublas_us), **{key: _us(v) for key, v in extra.items()},
                tuner_kernel_us=_us(tuned.kernel_us), tuner_cublas_us=_us(tuned.cublas_us), name=name)


def two_kernel_swiglu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The engine's unfused gate|up on cuBLAS: F.linear, then graphs.fused_swiglu (torch.compile'd on CUDA)."""
    return graphs.fused_swiglu(F.linear(x, w))


def check_swiglu(name: str, lead: tuple, n: int, k: int, sms: int) -> tuple[bool, str, dict, dict]:
    """Tune, check and time skinny_swiglu on one gate|up shape. Returns (ok, check line, table row, record)."""
    m, i = lead[0] * lead[1], n // 2
    fused = torch.randn(COPIES, n + 64, k, device=DEV, dtype=DTYPE) * k ** -0.5  # row slices [32, 32 + 2I)
    ws = [fused[c, 32:32 + n] for c in range(COPIES)]
    xs = [torch.randn(*lead, k, device=DEV, dtype=DTYPE) for _ in range(COPIES)]

    t = time.perf_counter()
    L.skinny_swiglu(xs[0], ws[0])  # tunes this shape
    torch.cuda.synchronize()
    tune_s = time.perf_counter() - t
    tuned = L.tuned(xs[0], ws[0], swiglu=True)
    cfg, dflt = tuned.config, L.default_config(m, i, k, sms, tiles=2)
    errs = {}
    for label, c in (("tuned", None), ("default", dflt), ("split", SPLIT_CHECK)):
        poison(m, i, c or cfg, k, 2 * i)
        out = L.skinny_swiglu(xs[1], ws[1], config=c)
        errs[label] = rel_l2(out, L.skinny_swiglu_reference(xs[1], ws[1]))
        if out.isnan().any():
            errs[label] = float("nan")
    errs["vs two-kernel"] = rel_l2(L.skinny_swiglu(xs[2], ws[2]), two_kernel_swiglu(xs[2], ws[2]))
    sx = xs[0].clone()
    warm_up(lambda: L.skinny_swiglu(sx, ws[1]))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = L.skinny_swiglu(sx, ws[1])
    sx.copy_(xs[2])
    g.replay()
    torch.cuda.synchronize()
    errs["graph replay"] = rel_l2(gout, L.skinny_swiglu_reference(xs[2], ws[1]))
    del g, gout
    ok = all(e < 1e-2 for e in errs.values())  # NaN compares False
    line = (f"{name:<22} {cfg_name(cfg):<28} " + "  ".join(f"{lbl} {e:.1e}" for lbl, e in errs.items())
            + f"  (default {cfg_name(dflt)})  {'ok' if ok else 'FAIL'}  (tuned in {tune_s:.1f} s)")

    L.skinny_linear(xs[0], ws[0])  # the plain gate|up GEMM tuned (if the plain pass has not) outside any capture
    n_calls = 6 if n * k > 1e8 else 30
    us_k = time_graph(lambda c: L.skinny_swiglu(xs[c % COPIES], ws[c % COPIES]), n_calls, 10)
    us_c = time_graph(lambda c: two_kernel_swiglu(xs[c % COPIES], ws[c % COPIES]), n_calls, 10)
    us_s = time_graph(lambda c: graphs.fused_swiglu(L.skinny_linear(xs[c % COPIES], ws[c % COPIES])), n_calls, 10)
    nbytes = (n * k + m * k + m * i) * 2
    row = dict(name=name, m=m, n=n, k=k, mb=nbytes / 1e6, cublas_us=us_c, skinny_linear_us=us_s, kernel_us=us_k,
               kernel_tbps=nbytes / us_k / 1e6, config=cfg_name(cfg), tune_s=tune_s, errors=errs,
               tuner_kernel_us=tuned.kernel_us, tuner_cublas_us=tuned.cublas_us)
    record = ship_record(name, m, n, k, True, tuned, us_k, us_c, skinny_linear_us=us_s)
    del fused, ws, xs
    torch.cuda.empty_cache()
    return ok, line, row, record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="also write results and export_tuned() as JSON here")
    ap.add_argument("--ship", default=None, help="write only the shippable records (engine/tuned/linear_<gpu>.json "
                    "format: gpu, software, command, records) here")
    ap.add_argument("--only", default=None, choices=["expert", "lm", "head"])
    args = ap.parse_args()
    assert L.available(torch.zeros(1, device=DEV)), "needs CUDA and triton"
    sms = L.sm_count(torch.zeros(1, device=DEV))
    print(f"{torch.cuda.get_device_name(0)}, {sms} SMs, torch {torch.__version__}, triton {L.triton.__version__}")
    torch.manual_seed(0)
    rows, swiglu_rows, records, checks, failures = [], [], [], [], 0

    for group, name, lead, n, k in SHAPES:
        if args.only and group != args.only:
            continue
        m = lead[0] * lead[1]
        fused = torch.randn(COPIES, n + 64, k, device=DEV, dtype=DTYPE) * k ** -0.5  # row slices [32, 32 + N)
        ws = [fused[i, 32:32 + n] for i in range(COPIES)]
        bias = torch.randn(n, device=DEV, dtype=DTYPE)
        xs = [torch.randn(*lead, k, device=DEV, dtype=DTYPE) for _ in range(COPIES)]

        # ---------------------------------------------------------- 1. tuning and correctness
        t = time.perf_counter()
        L.skinny_linear(xs[0], ws[0])  # tunes this shape
        torch.cuda.synchronize()
        tune_s = time.perf_counter() - t
        tuned = L.tuned(xs[0], ws[0])
        cfg = tuned.config
        poison(m, n, cfg, k)
        out = L.skinny_linear(xs[1], ws[1])
        err = rel_l2(out, L.skinny_linear_reference(xs[1], ws[1]))
        nan = bool(out.isnan().any())
        dflt = L.default_config(m, n, k, sms)
        poison(m, n, dflt, k)
        berr = rel_l2(L.skinny_linear(xs[2], ws[2], bias, config=dflt), L.skinny_linear_reference(xs[2], ws[2], bias))
        sx = xs[0].clone()
        warm_up(lambda: L.skinny_linear(sx, ws[1]))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            gout = L.skinny_linear(sx, ws[1])
        sx.copy_(xs[2])
        g.replay()
        torch.cuda.synchronize()
        gerr = rel_l2(gout, L.skinny_linear_reference(xs[2], ws[1]))
        del g, gout
        ok = err < 1e-2 and berr < 1e-2 and gerr < 1e-2 and not nan
        failures += not ok
        checks.append(f"{name:<18} {cfg_name(cfg):<28} rel L2 {err:.1e}  bias (default {cfg_name(dflt)}) {berr:.1e}"
                      f"  graph replay {gerr:.1e}{'  NaN!' if nan else ''}  {'ok' if ok else 'FAIL'}  (tuned in {tune_s:.1f} s)")
        print(f"[{elapsed():5.0f} s] " + checks[-1], flush=True)

        # ---------------------------------------------------------------------- 2. timing
        n_calls = 6 if n * k > 1e8 else 30
        us_k = time_graph(lambda i: L.skinny_linear(xs[i % COPIES], ws[i % COPIES]), n_calls, 10)
        us_c = time_graph(lambda i: F.linear(xs[i % COPIES], ws[i % COPIES]), n_calls, 10)
        nbytes = (n * k + m * k + m * n) * 2
        rows.append(dict(name=name, m=m, n=n, k=k, mb=nbytes / 1e6, cublas_us=us_c, kernel_us=us_k,
                         cublas_tbps=nbytes / us_c / 1e6, kernel_tbps=nbytes / us_k / 1e6, config=cfg_name(cfg),
                         tune_s=tune_s, tuner_kernel_us=tuned.kernel_us, tuner_cublas_us=tuned.cublas_us))
        records.append(ship_record(name, m, n, k, False, tuned, us_k, us_c))
        print(f"[{elapsed():5.0f} s] {name}: cuBLAS {us_c:.1f} us, kernel {us_k:.1f} us", flush=True)
        del fused, ws, xs, bias, out
        torch.cuda.empty_cache()

    # ------------------------------------------------------------- 3. skinny_swiglu on the gate|up shapes
    for group, name, lead, n, k in SWIGLU_SHAPES:
        if args.only and group != args.only:
            continue
        ok, line, row, record = check_swiglu(name, lead, n, k, sms)
        failures += not ok
        checks.append(line)
        swiglu_rows.append(row)
        records.append(record)
        print(f"[{elapsed():5.0f} s] " + line, flush=True)
        print(f"[{elapsed():5.0f} s] {name}: cuBLAS + SwiGLU {row['cublas_us']:.1f} us, skinny_linear + SwiGLU "
              f"{row['skinny_linear_us']:.1f} us, fused {row['kernel_us']:.1f} us", flush=True)

    # An untuned shape during capture: F.linear, no benchmarking (which would fail inside a capture).
    x, w = torch.randn(3, 512, device=DEV, dtype=DTYPE), torch.randn(256, 512, device=DEV, dtype=DTYPE)
    warm_up(lambda: F.linear(x, w))
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            y = L.skinny_linear(x, w)
        g.replay()
        torch.cuda.synchronize()
        ok = L.tuned(x, w) is None and rel_l2(y, F.linear(x, w)) < 1e-3
        checks.append(f"untuned shape during capture -> F.linear, nothing tuned: {'ok' if ok else 'FAIL'}")
    except Exception as e:
        ok = False
        checks.append(f"untuned shape during capture: FAIL ({type(e).__name__}: {str(e)[:100]})")
    failures += not ok

    # The same for skinny_swiglu: the two-kernel path (F.linear, then the fp32 SwiGLU), nothing tuned.
    w2 = torch.randn(2 * 256, 512, device=DEV, dtype=DTYPE)
    warm_up(lambda: L.swiglu_reference(F.linear(x, w2)))
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            y = L.skinny_swiglu(x, w2)
        g.replay()
        torch.cuda.synchronize()
        ok = L.tuned(x, w2, swiglu=True) is None and rel_l2(y, L.swiglu_reference(F.linear(x, w2))) < 1e-3
        checks.append(f"untuned swiglu shape during capture -> F.linear + SwiGLU, nothing tuned: "
                      f"{'ok' if ok else 'FAIL'}")
    except Exception as e:
        ok = False
        checks.append(f"untuned swiglu shape during capture: FAIL ({type(e).__name__}: {str(e)[:100]})")
    failures += not ok

    # ---------------------------------------------------------------------------------- 4. tables
    print("\n" + "=" * 118)
    print(f"skinny_linear vs cuBLAS on {torch.cuda.get_device_name(0)}, bf16, weights from HBM "
          f"(CUDA graph of back-to-back calls, {COPIES} rotated copies)")
    print("correctness:")
    for c in checks:
        print("  " + c)
    print(f"\n  {'shape':<18}{'M':>4}{'N':>8}{'K':>7}{'MB':>8}{'cuBLAS us':>11}{'TB/s':>6}{'kernel us':>11}{'TB/s':>6}"
          f"{'speed-up':>9}  {'config':<28}{'tune s':>7}")
    for r in rows:
        print(f"  {r['name']:<18}{r['m']:>4}{r['n']:>8}{r['k']:>7}{r['mb']:>8.1f}{r['cublas_us']:>11.1f}"
              f"{r['cublas_tbps']:>6.2f}{r['kernel_us']:>11.1f}{r['kernel_tbps']:>6.2f}"
              f"{r['cublas_us'] / r['kernel_us']:>8.2f}x  {r['config']:<28}{r['tune_s']:>7.1f}")
    exp = [r for r in rows if r["name"].startswith("expert")]
    if exp:
        d = sum(r["cublas_us"] - min(r["cublas_us"], r["kernel_us"]) for r in exp)
        print(f"\n  expert layer (per-shape best of the two): saves {d:.1f} us per layer -> "
              f"{d * 36 * 4 / 1000:.2f} ms per step (36 layers x 4 evaluations)")
    if swiglu_rows:
        print(f"\nskinny_swiglu (gate|up GEMM + SwiGLU epilogue) vs the two-kernel paths; SwiGLU = graphs.fused_swiglu "
              f"(torch.compile'd; a 'torch.compile of fused_swiglu failed' warning above means eager)")
        print(f"  {'shape':<22}{'M':>4}{'N=2I':>7}{'K':>6}{'cuBLAS+SwiGLU':>15}{'skinny+SwiGLU':>15}{'fused us':>10}"
              f"{'TB/s':>6}{'vs best':>9}  {'ships':<6}{'config':<28}{'tune s':>7}")
        for r, rec in zip(swiglu_rows, [rec for rec in records if rec["swiglu"]]):
            best = min(r["cublas_us"], r["skinny_linear_us"])
            print(f"  {r['name']:<22}{r['m']:>4}{r['n']:>7}{r['k']:>6}{r['cublas_us']:>15.1f}"
                  f"{r['skinny_linear_us']:>15.1f}{r['kernel_us']:>10.1f}{r['kernel_tbps']:>6.2f}"
                  f"{best / r['kernel_us']:>8.2f}x  {'yes' if graphs._record_wins(rec) else 'no':<6}{r['config']:<28}"
                  f"{r['tune_s']:>7.1f}")
        print("  ships: graphs would run the fused kernel with this record (>= 5% faster than both two-kernel paths)")
    print(f"correctness: {'all ok' if not failures else f'{failures} FAILED'}; total {elapsed():.0f} s")
    shipped = {"gpu": torch.cuda.get_device_name(0),
               "software": f"torch {torch.__version__}, triton {L.triton.__version__}",
               "command": "python scripts/gpu_linear_check.py --ship FILE (kernel_us / cublas_us / skinny_linear_us: "
                          "the CUDA-graph timings of its tables)",
               "records": records}
    if args.out:
        Path(args.out).write_text(json.dumps({**shipped, "checks": checks, "rows": rows, "swiglu_rows": swiglu_rows,
                                              "tuned": L.export_tuned()}, indent=1))
    if args.ship:
        Path(args.ship).write_text(json.dumps(shipped, indent=1) + "\n")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
