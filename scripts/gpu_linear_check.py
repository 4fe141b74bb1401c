"""Device check of skinny_linear (engine/linear_kernel.py) at the Alpamayo-1.5 shapes, bf16.

    python scripts/gpu_linear_check.py [--out results.json] [--records engine/tuned/linear_<gpu>.json]
                                       [--only expert|lm|head]

Shapes (M rows, N, K): action expert at M = 64 (q|k|v 4096 x 2048, o 2048 x 2048, gate|up 16512 x 2048,
down 2048 x 8256), LM at M = 8 (verify) and M = 1 (decode) (q|k|v 6144 x 4096, o 4096 x 4096, gate|up
24576 x 4096, down 4096 x 12288), and an lm_head-like 155712 x 4096 at M = 8.
1. The first call per shape autotunes (timed and reported: this is what StageGraph's warm-up will pay).
   Correctness against skinny_linear_reference (rel L2 < 1e-2) with the output / split-K workspace
   memory poisoned with NaN first: tuned config without bias, the default config with a bias, and
   through a CUDA graph replayed on new inputs (capturable: no host sync). An untuned shape called
   during capture must fall back to F.linear (no benchmarking inside the capture). The tuner's fastest
   balanced ("stream-K") config, whether it won or not, is checked too: with a bias, on NaN-poisoned
   memory, bitwise the same over repeated calls (its reduce sums in a fixed order), in a graph replay.
2. Timing, per call, from CUDA graphs of back-to-back calls (median of replays): skinny_linear (tuned)
   against cuBLAS F.linear, and the tuner's fastest split-K grid and fastest balanced grid forced.
   Each weight is a row slice of a fused buffer and calls rotate 3 copies, so weights come from HBM
   (not the 50 MB L2) as in the model.
3. The tuned choices as records: export_tuned() through JSON back into load_tuned must give the same
   configs, and the records in the engine's shipped format (--records writes them: graphs.linear loads
   engine/tuned/linear_<gpu>.json) must load back to the tuned configs.
The table (us, TB/s of weight + activations, the winning config, the best of each grid kind) is printed
last. Config names: bn/bk block_n/block_k, sk split_k (split-K grid) or P programs (balanced grid).
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


def elapsed() -> float:
    return time.perf_counter() - T0


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_graph(call, n_calls: int, replays: int) -> float:
    """us per call: n_calls back-to-back calls captured in one CUDA graph (call(i) rotates weights)."""
    warm_up(lambda: [call(i) for i in range(COPIES)])
    return 1000.0 * graph_ms(lambda: [call(i) for i in range(n_calls)], replays, warm=0) / n_calls


def workspace_floats(c: L.Config, m: int, n: int, k: int) -> int:
    """The fp32 partials skinny_linear allocates with config c (0: none), as in linear_kernel._launch*."""
    if c.balanced:
        n_blocks, k_blocks = -(-n // c.block_n), -(-k // c.block_k)
        programs = L._programs(c, n, k)
        split = L.balanced_splits_a_block(n_blocks * k_blocks, programs, k_blocks)
        return (programs + n_blocks - 1) * m * c.block_n if split else 0
    splits = L._n_splits(c, k)
    return splits * m * n if splits > 1 else 0


def poison(m: int, n: int, cfg: L.Config, k: int) -> None:
    """Leave NaN-filled blocks of the sizes skinny_linear allocates in the caching allocator."""
    blocks = [torch.full((m * n,), float("nan"), dtype=DTYPE, device=DEV)]
    if workspace_floats(cfg, m, n, k):
        blocks.append(torch.full((workspace_floats(cfg, m, n, k),), float("nan"), dtype=torch.float32, device=DEV))
    torch.cuda.synchronize()
    del blocks


def cfg_name(c: L.Config | None) -> str:
    if c is None:
        return "-"
    grid = f"P{c.programs}" if c.balanced else f"sk{c.split_k}"
    return f"bn{c.block_n} bk{c.block_k} {grid} w{c.num_warps} st{c.num_stages}"


def fastest(sweep, balanced: bool) -> tuple[L.Config | None, float | None]:
    """The tuner's fastest config of one kind (balanced grid or split-K grid) and its time."""
    timed = [(c, us) for c, us in sweep if c.balanced == balanced]
    return min(timed, key=lambda t: t[1]) if timed else (None, None)


def fmt(us: float | None, width: int) -> str:
    return f"{us:>{width}.1f}" if us is not None else f"{'-':>{width}}"


def check_balanced(name: str, bal: L.Config, sx, xs, ws, bias, m: int, n: int, k: int) -> tuple[bool, str]:
    """bal with a bias on NaN-poisoned memory against the reference, 5 calls bitwise equal, a graph replay."""
    try:
        poison(m, n, bal, k)
        outs = [L.skinny_linear(xs[2], ws[2], bias, config=bal) for _ in range(5)]
        err = rel_l2(outs[0], L.skinny_linear_reference(xs[2], ws[2], bias))
        same = all(torch.equal(o, outs[0]) for o in outs[1:])
        sx.copy_(xs[0])
        warm_up(lambda: L.skinny_linear(sx, ws[1], bias, config=bal))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            gout = L.skinny_linear(sx, ws[1], bias, config=bal)
        sx.copy_(xs[2])
        g.replay()
        torch.cuda.synchronize()
        gerr = rel_l2(gout, L.skinny_linear_reference(xs[2], ws[1], bias))
        del g, gout
        ok = err < 1e-2 and gerr < 1e-2 and same and not outs[0].isnan().any()
        return ok, (f"{name:<18} balanced {cfg_name(bal):<26} bias rel L2 {err:.1e}  5 calls bitwise equal: {same}"
                    f"  graph replay {gerr:.1e}  {'ok' if ok else 'FAIL'}")
    except Exception as e:  # a failure of the balanced path is reported, not the end of the run
        return False, f"{name:<18} balanced {cfg_name(bal)}: FAIL ({type(e).__name__}: {str(e)[:160]})"


def shipped_records(rows: list[dict]) -> list[dict]:
    """The rows as engine/tuned/linear_<gpu>.json records (graphs._load_shipped_tuning): the tuned config,
    kernel_us / cublas_us from the CUDA-graph timings (graphs.linear uses the kernel where it is faster)."""
    return [dict(dtype=str(DTYPE)[6:], m=r["m"], n=r["n"], k=r["k"], bias=False, **r["tuned_config"],
                 kernel_us=round(r["kernel_us"], 2), cublas_us=round(r["cublas_us"], 2),
                 tuner_kernel_us=r["tuner_kernel_us"] and round(r["tuner_kernel_us"], 2),
                 tuner_cublas_us=r["tuner_cublas_us"] and round(r["tuner_cublas_us"], 2), name=r["name"])
            for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="also write results and export_tuned() as JSON here")
    ap.add_argument("--records", default=None,
                    help="write the tuned configs as the engine's shipped records here "
                         "(engine/tuned/linear_<gpu>.json; records of shapes not tuned in this run are kept)")
    ap.add_argument("--only", default=None, choices=["expert", "lm", "head"])
    args = ap.parse_args()
    assert L.available(torch.zeros(1, device=DEV)), "needs CUDA and triton"
    sms = L.sm_count(torch.zeros(1, device=DEV))
    print(f"{torch.cuda.get_device_name(0)}, {sms} SMs, torch {torch.__version__}, triton {L.triton.__version__}")
    torch.manual_seed(0)
    rows, checks, failures = [], [], 0

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
        split_cfg, split_tuner_us = fastest(tuned.sweep, balanced=False)
        bal, bal_tuner_us = fastest(tuned.sweep, balanced=True)
        if bal is None and L.balanced_candidates(m, n, k, sms):  # none timed (all failed?): check one anyway
            bal = L.balanced_candidates(m, n, k, sms)[0]
        if bal is not None:
            ok, line = check_balanced(name, bal, sx, xs, ws, bias, m, n, k)
            failures += not ok
            checks.append(line)
            print(f"[{elapsed():5.0f} s] " + line, flush=True)

        # ---------------------------------------------------------------------- 2. timing
        n_calls = 6 if n * k > 1e8 else 30
        us_k = time_graph(lambda i: L.skinny_linear(xs[i % COPIES], ws[i % COPIES]), n_calls, 10)
        us_c = time_graph(lambda i: F.linear(xs[i % COPIES], ws[i % COPIES]), n_calls, 10)

        def forced_us(c: L.Config | None) -> float | None:
            if c is None:
                return None
            if c == cfg:
                return us_k
            try:
                return time_graph(lambda i: L.skinny_linear(xs[i % COPIES], ws[i % COPIES], config=c), n_calls, 10)
            except Exception as e:  # reported above by the checks if it is the balanced path
                print(f"  timing {cfg_name(c)} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                return None

        us_split, us_bal = forced_us(split_cfg), forced_us(bal)
        nbytes = (n * k + m * k + m * n) * 2
        rows.append(dict(name=name, m=m, n=n, k=k, mb=nbytes / 1e6, cublas_us=us_c, kernel_us=us_k,
                         cublas_tbps=nbytes / us_c / 1e6, kernel_tbps=nbytes / us_k / 1e6, config=cfg_name(cfg),
                         tune_s=tune_s, tuner_kernel_us=tuned.kernel_us, tuner_cublas_us=tuned.cublas_us,
                         tuned_config=asdict(cfg), split_config=cfg_name(split_cfg), split_us=us_split,
                         tuner_split_us=split_tuner_us, balanced_config=cfg_name(bal), balanced_us=us_bal,
                         tuner_balanced_us=bal_tuner_us, candidates=len(tuned.sweep)))
        print(f"[{elapsed():5.0f} s] {name}: cuBLAS {us_c:.1f} us, kernel {us_k:.1f} us ({cfg_name(cfg)}); "
              f"best split-K {fmt(us_split, 0)} us ({cfg_name(split_cfg)}), best balanced {fmt(us_bal, 0)} us "
              f"({cfg_name(bal)})", flush=True)
        del fused, ws, xs, bias, out
        torch.cuda.empty_cache()

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

    # ------------------------------------------------------------------------------- 3. records
    exported = L.export_tuned()  # this run's tuner results (--out's "tuned")
    L.clear_tuned()
    L.load_tuned(json.loads(json.dumps(exported)))
    ok = L.export_tuned() == exported
    shipped = {"gpu": torch.cuda.get_device_name(0),
               "software": f"torch {torch.__version__}, triton {L.triton.__version__}",
               "command": "python scripts/gpu_linear_check.py --records PATH (kernel_us / cublas_us: the CUDA-graph "
                          "timings of its table)", "records": shipped_records(rows)}
    if args.records:
        path = Path(args.records)
        old = json.loads(path.read_text()) if path.exists() else {}
        if old.get("gpu") == shipped["gpu"]:  # shapes this run did not tune (--only) keep their records
            shape = lambda r: (r["dtype"], r["m"], r["n"], r["k"], r["bias"])  # noqa: E731
            tuned_now = {shape(r) for r in shipped["records"]}
            shipped["records"] = [r for r in old["records"] if shape(r) not in tuned_now] + shipped["records"]
        path.write_text(json.dumps(shipped, indent=1) + "\n")
        shipped = json.loads(path.read_text())
    L.clear_tuned()
    dev = torch.cuda.current_device()
    L.load_tuned([dict(r, device=dev) for r in shipped["records"]])  # as graphs._load_shipped_tuning does
    for r in rows:
        x, w = (torch.empty(1, r["k"], device=DEV, dtype=DTYPE).expand(rows_, r["k"]) for rows_ in (r["m"], r["n"]))
        t = L.tuned(x, w)  # only the shapes matter
        ok = ok and t is not None and t.config == L.Config(**r["tuned_config"])
    failures += not ok
    checks.append(f"export_tuned -> JSON -> load_tuned, and the shipped-format records ({len(shipped['records'])}"
                  f"{', written to ' + args.records if args.records else ''}) load back to the tuned configs: "
                  f"{'ok' if ok else 'FAIL'}")

    # ---------------------------------------------------------------------------------- 4. table
    print("\n" + "=" * 190)
    print(f"skinny_linear vs cuBLAS on {torch.cuda.get_device_name(0)}, bf16, weights from HBM "
          f"(CUDA graph of back-to-back calls, {COPIES} rotated copies)")
    print("correctness:")
    for c in checks:
        print("  " + c)
    print(f"\n  {'shape':<18}{'M':>4}{'N':>8}{'K':>7}{'MB':>8}{'cuBLAS us':>11}{'TB/s':>6}{'kernel us':>11}{'TB/s':>6}"
          f"{'speed-up':>9}  {'config':<28}{'tune s':>7}  {'split-K us':>10} {'(best split-K grid)':<28}"
          f"{'balanced us':>11} {'(best balanced grid)':<28}")
    for r in rows:
        print(f"  {r['name']:<18}{r['m']:>4}{r['n']:>8}{r['k']:>7}{r['mb']:>8.1f}{r['cublas_us']:>11.1f}"
              f"{r['cublas_tbps']:>6.2f}{r['kernel_us']:>11.1f}{r['kernel_tbps']:>6.2f}"
              f"{r['cublas_us'] / r['kernel_us']:>8.2f}x  {r['config']:<28}{r['tune_s']:>7.1f}"
              f"  {fmt(r['split_us'], 10)} {r['split_config']:<28}"
              f"{fmt(r['balanced_us'], 11)} {r['balanced_config']:<28}")
    exp = [r for r in rows if r["name"].startswith("expert")]
    if exp:
        d = sum(r["cublas_us"] - min(r["cublas_us"], r["kernel_us"]) for r in exp)
        print(f"\n  expert layer (per-shape best of the two): saves {d:.1f} us per layer -> "
              f"{d * 36 * 4 / 1000:.2f} ms per step (36 layers x 4 evaluations)")
    print(f"correctness: {'all ok' if not failures else f'{failures} FAILED'}; total {elapsed():.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"checks": checks, "rows": rows, "tuned": exported}, indent=1))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
