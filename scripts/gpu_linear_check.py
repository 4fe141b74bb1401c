"""Device check of skinny_linear (engine/linear_kernel.py) at the Alpamayo-1.5 shapes, bf16.

    python scripts/gpu_linear_check.py [--out results.json] [--only expert|lm|head]

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
The table (us, TB/s of weight + activations, the winning config) is printed last.
"""
import argparse
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


def poison(m: int, n: int, cfg: L.Config, k: int) -> None:
    """Leave NaN-filled blocks of the sizes skinny_linear allocates in the caching allocator."""
    blocks = [torch.full((m * n,), float("nan"), dtype=DTYPE, device=DEV)]
    if L._n_splits(cfg, k) > 1:
        blocks.append(torch.full((L._n_splits(cfg, k) * m * n,), float("nan"), dtype=torch.float32, device=DEV))
    torch.cuda.synchronize()
    del blocks


def cfg_name(c: L.Config) -> str:
    return f"bn{c.block_n} bk{c.block_k} sk{c.split_k} w{c.num_warps} st{c.num_stages}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="also write results and export_tuned() as JSON here")
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

        # ---------------------------------------------------------------------- 2. timing
        n_calls = 6 if n * k > 1e8 else 30
        us_k = time_graph(lambda i: L.skinny_linear(xs[i % COPIES], ws[i % COPIES]), n_calls, 10)
        us_c = time_graph(lambda i: F.linear(xs[i % COPIES], ws[i % COPIES]), n_calls, 10)
        nbytes = (n * k + m * k + m * n) * 2
        rows.append(dict(name=name, m=m, n=n, k=k, mb=nbytes / 1e6, cublas_us=us_c, kernel_us=us_k,
                         cublas_tbps=nbytes / us_c / 1e6, kernel_tbps=nbytes / us_k / 1e6, config=cfg_name(cfg),
                         tune_s=tune_s, tuner_kernel_us=tuned.kernel_us, tuner_cublas_us=tuned.cublas_us))
        print(f"[{elapsed():5.0f} s] {name}: cuBLAS {us_c:.1f} us, kernel {us_k:.1f} us", flush=True)
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

    # ---------------------------------------------------------------------------------- 3. table
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
    print(f"correctness: {'all ok' if not failures else f'{failures} FAILED'}; total {elapsed():.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"checks": checks, "rows": rows, "tuned": L.export_tuned()}, indent=1))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
