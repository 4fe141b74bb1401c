"""Device check of skinny_linear and skinny_swiglu (engine/linear_kernel.py) at the Alpamayo-1.5 shapes, bf16.

    python scripts/gpu_linear_check.py [--out results.json] [--records linear_<gpu>.json]
                                       [--only expert|lm|head] [--budget-s 420]

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
3. skinny_swiglu (the gate|up GEMM with the SwiGLU in its epilogue; split-K grids only, it has no
   balanced mode) on the gate|up shapes (expert M = 64, LM M = 8 and 1): tuned on its first call;
   against skinny_swiglu_reference with NaN-poisoned memory (tuned config, the default config, a forced
   split-K config), against the engine's two-kernel path, and through a CUDA-graph replay. Timed as
   above against both two-kernel paths the engine could run instead: cuBLAS gate|up +
   graphs.fused_swiglu (torch.compile'd, the engine's SwiGLU kernel) and the tuned skinny_linear gate|up
   + the same SwiGLU. An untuned swiglu shape during capture must fall back.
4. The records, in the format of engine/tuned/linear_<gpu>.json that graphs._load_shipped_tuning reads
   (gpu, software, command, records): per shape the fastest in CUDA-graph timings as in 2. among the tuner's
   winner and its FINALISTS best split-K, TMA and balanced grids (swiglu: its SWIGLU_FINALISTS best), checked
   against the reference when it is not the tuner's winner, i.e. the tuned config (balanced ones with "programs") and
   the CUDA-graph timings of the tables as kernel_us / cublas_us; swiglu records carry "swiglu": true,
   cublas_us = cuBLAS + SwiGLU and skinny_linear_us = skinny_linear + SwiGLU. export_tuned() through JSON
   back into load_tuned must give the same configs, and the records loaded as the engine loads them
   must give the tuned configs, plain and swiglu.
The tables (us, TB/s of weight + activations, the winning config, the best of each grid kind) are
printed last. Config names: bn/bk block_n/block_k, sk split_k (split-K grid) or P programs (balanced grid).

--records PATH (alias --ship) writes the shipped file; records already in PATH for the same GPU whose
shape this run did not tune (--only, or skipped for time) are kept, so partial runs combine. --out
writes everything (the records too) as JSON. Both are written again after every shape, so a run cut off
from outside still leaves what it finished.

Time: --budget-s bounds the run's wall time (default 420 s: a 10-minute limit keeps room for a shape
that overruns its share and for the final checks). The shapes run group by group (a group's plain
shapes, then its swiglu ones). Each shape's tuner may use TUNE_SHARE of an equal share of what is left
of the budget (linear_kernel.TUNE_BUDGET_S; the check line says how many candidates it timed), and a
shape that would start with less than MIN_SHAPE_S left is skipped and reported (not a failure; its
records are not written). Progress is printed, flushed, as it happens.
"""
import time

T0 = time.perf_counter()  # before the heavy imports: the budget counts them

import argparse  # noqa: E402
from dataclasses import asdict  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdrive_ros.engine import graphs  # noqa: E402
from flashdrive_ros.engine import linear_kernel as L  # noqa: E402
from gpu_timing import graph_ms, warm_up  # noqa: E402 (scripts/, beside this file)

DTYPE = torch.bfloat16
DEV = "cuda"
COPIES = 3
TUNE_SHARE = 0.7   # of a shape's share of the time left: the rest is its checks and timings
MIN_TUNE_S = 4.0   # a tuner gets at least this long (compiles of the first candidates)
MIN_SHAPE_S = 12.0  # a shape is not started with less than this left of the budget

SHAPES = [  # (group, name, leading dims of x, N, K)
    ("expert", "expert qkv", (1, 64), 4096, 2048),
    ("expert", "expert o", (1, 64), 2048, 2048),
    ("expert", "expert gate|up", (1, 64), 16512, 2048),
    ("expert", "expert down", (1, 64), 2048, 8256),
    *[("lm", f"lm {nm} M={m}", (1, m), n, k) for m in (8, 1)
      for nm, n, k in (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate|up", 24576, 4096), ("down", 4096, 12288))],
    ("head", "lm_head M=8", (1, 8), 155712, 4096),
]
GROUPS = ["expert", "lm", "head"]  # the order the shapes run in
SWIGLU_SHAPES = [  # (group, name, leading dims of x, N = 2I gate|up rows, K): skinny_swiglu
    ("expert", "expert gate|up+swiglu", (1, 64), 16512, 2048),
    *[("lm", f"lm gate|up+swiglu M={m}", (1, m), 24576, 4096) for m in (8, 1)],
]
SPLIT_CHECK = L.Config(64, 128, 4, 4, 3)  # a split-K config every swiglu shape is checked with (fits at M = 64)


def elapsed() -> float:
    return time.perf_counter() - T0


def log(line: str) -> None:
    print(f"[{elapsed():5.0f} s] {line}", flush=True)


def replayed_on(call, sx: torch.Tensor, new_x: torch.Tensor) -> torch.Tensor:
    """call() (which reads the static input sx) captured in a CUDA graph after a warm-up, then replayed with
    new_x copied into sx: its output, a copy (the graph is freed)."""
    warm_up(call)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = call()
    sx.copy_(new_x)
    g.replay()
    torch.cuda.synchronize()
    out = out.clone()
    del g
    return out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_graph(call, n_calls: int, replays: int) -> float:
    """us per call: n_calls back-to-back calls captured in one CUDA graph (call(i) rotates weights)."""
    warm_up(lambda: [call(i) for i in range(COPIES)])
    return 1000.0 * graph_ms(lambda: [call(i) for i in range(n_calls)], replays, warm=0) / n_calls


def workspace_floats(c: L.Config, m: int, n: int, k: int, partial_n: int | None = None) -> int:
    """The fp32 partials the launchers allocate with config c (0: none), as in linear_kernel._launch*:
    split K [splits, m, partial_n] (skinny_swiglu: n = I, partial_n = 2I), balanced its partial slots."""
    if c.balanced:
        n_blocks, k_blocks = -(-n // c.block_n), -(-k // c.block_k)
        programs = L._programs(c, n, k)
        split = L.balanced_splits_a_block(n_blocks * k_blocks, programs, k_blocks)
        return (programs + n_blocks - 1) * m * c.block_n if split else 0
    splits = L._n_splits(c, k)
    return splits * m * (partial_n or n) if splits > 1 else 0


def poison(m: int, n: int, cfg: L.Config, k: int, partial_n: int | None = None) -> None:
    """Leave NaN-filled blocks of the sizes the launchers allocate in the caching allocator: the output
    [m, n] and the fp32 partials (workspace_floats)."""
    blocks = [torch.full((m * n,), float("nan"), dtype=DTYPE, device=DEV)]
    floats = workspace_floats(cfg, m, n, k, partial_n)
    if floats:
        blocks.append(torch.full((floats,), float("nan"), dtype=torch.float32, device=DEV))
    torch.cuda.synchronize()
    del blocks


def cfg_name(c: L.Config | None) -> str:
    if c is None:
        return "-"
    grid = f"P{c.programs}" if c.balanced else f"sk{c.split_k}"
    return f"bn{c.block_n} bk{c.block_k} {grid} w{c.num_warps} st{c.num_stages}{' tma' if c.tma else ''}"


def kind_of(c: L.Config) -> str:
    return "balanced" if c.balanced else "tma" if c.tma else "split"


def fastest(sweep, kind: str) -> tuple[L.Config | None, float | None]:
    """The tuner's fastest config of one kind (split: split-K grid with pointer loads, tma: split-K grid
    with TMA loads, balanced: balanced grid) and its time."""
    timed = [(c, us) for c, us in sweep if kind_of(c) == kind]
    return min(timed, key=lambda t: t[1]) if timed else (None, None)


def fmt(us: float | None, width: int) -> str:
    return f"{us:>{width}.1f}" if us is not None else f"{'-':>{width}}"


def _us(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def tune(call, budget_s: float) -> float:
    """Run call (a shape's first call: it tunes) with the tuner capped at budget_s; its wall seconds."""
    L.TUNE_BUDGET_S = budget_s
    t = time.perf_counter()
    try:
        call()
        torch.cuda.synchronize()
    finally:
        L.TUNE_BUDGET_S = None
    return time.perf_counter() - t


def timed_of(tuned: L.Tuned, n_candidates: int) -> str:
    return f"{len(tuned.sweep)}/{n_candidates} candidates timed"


def ship_record(name: str, m: int, n: int, k: int, swiglu: bool, tuned: L.Tuned, kernel_us: float,
                cublas_us: float, **extra) -> dict:
    """A record of engine/tuned/linear_<gpu>.json: the tuned config (with "programs": balanced grids
    load as such), the CUDA-graph timings of the table as kernel_us / cublas_us (what
    graphs._load_shipped_tuning decides by), the tuner's own as tuner_*."""
    return dict(dtype=str(DTYPE)[6:], m=m, n=n, k=k, bias=False, swiglu=swiglu, **asdict(tuned.config),
                kernel_us=_us(kernel_us), cublas_us=_us(cublas_us), **{key: _us(v) for key, v in extra.items()},
                tuner_kernel_us=_us(tuned.kernel_us), tuner_cublas_us=_us(tuned.cublas_us), name=name)


def record_shape(r: dict) -> tuple:
    """What a record is for (its cache key without the device): records older than skinny_swiglu are plain."""
    return L.record_key(dict(r, device=None))[1:]


def merged_records(old: dict, gpu: str, records: list[dict]) -> list[dict]:
    """This run's records after those of an earlier file for the same GPU whose shapes this run did not tune."""
    if old.get("gpu") != gpu:
        return list(records)
    tuned_now = {record_shape(r) for r in records}
    return [r for r in old.get("records", []) if record_shape(r) not in tuned_now] + list(records)


def check_balanced(name: str, bal: L.Config, sx, xs, ws, bias, m: int, n: int, k: int) -> tuple[bool, str]:
    """bal with a bias on NaN-poisoned memory against the reference, 5 calls bitwise equal, a graph replay."""
    try:
        poison(m, n, bal, k)
        outs = [L.skinny_linear(xs[2], ws[2], bias, config=bal) for _ in range(5)]
        err = rel_l2(outs[0], L.skinny_linear_reference(xs[2], ws[2], bias))
        same = all(torch.equal(o, outs[0]) for o in outs[1:])
        sx.copy_(xs[0])
        gout = replayed_on(lambda: L.skinny_linear(sx, ws[1], bias, config=bal), sx, xs[2])
        gerr = rel_l2(gout, L.skinny_linear_reference(xs[2], ws[1], bias))
        ok = err < 1e-2 and gerr < 1e-2 and same and not outs[0].isnan().any()
        return ok, (f"{name:<18} balanced {cfg_name(bal):<26} bias rel L2 {err:.1e}  5 calls bitwise equal: {same}"
                    f"  graph replay {gerr:.1e}  {'ok' if ok else 'FAIL'}")
    except Exception as e:  # a failure of the balanced path is reported, not the end of the run
        return False, f"{name:<18} balanced {cfg_name(bal)}: FAIL ({type(e).__name__}: {str(e)[:160]})"


def check_plain(name: str, lead: tuple, n: int, k: int, sms: int, tune_s: float) -> tuple[int, list, dict, dict]:
    """Tune, check and time skinny_linear on one shape. Returns (failures, check lines, table row, record)."""
    m = lead[0] * lead[1]
    fused = torch.randn(COPIES, n + 64, k, device=DEV, dtype=DTYPE) * k ** -0.5  # row slices [32, 32 + N)
    ws = [fused[i, 32:32 + n] for i in range(COPIES)]
    bias = torch.randn(n, device=DEV, dtype=DTYPE)
    xs = [torch.randn(*lead, k, device=DEV, dtype=DTYPE) for _ in range(COPIES)]
    failures, lines = 0, []

    # ---------------------------------------------------------------- 1. tuning and correctness
    took_s = tune(lambda: L.skinny_linear(xs[0], ws[0]), tune_s)
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
    gerr = rel_l2(replayed_on(lambda: L.skinny_linear(sx, ws[1]), sx, xs[2]), L.skinny_linear_reference(xs[2], ws[1]))
    ok = err < 1e-2 and berr < 1e-2 and gerr < 1e-2 and not nan
    failures += not ok
    lines.append(f"{name:<18} {cfg_name(cfg):<28} rel L2 {err:.1e}  bias (default {cfg_name(dflt)}) {berr:.1e}"
                 f"  graph replay {gerr:.1e}{'  NaN!' if nan else ''}  {'ok' if ok else 'FAIL'}  (tuned in "
                 f"{took_s:.1f} s, {timed_of(tuned, len(L.candidates(m, n, k, sms, tma=L.TMA_CANDIDATES)))})")
    log(lines[-1])
    split_cfg, split_tuner_us = fastest(tuned.sweep, "split")
    tma_cfg, tma_tuner_us = fastest(tuned.sweep, "tma")
    bal, bal_tuner_us = fastest(tuned.sweep, "balanced")
    if bal is None and L.balanced_candidates(m, n, k, sms):  # none timed (all failed, or cut): check one anyway
        bal = L.balanced_candidates(m, n, k, sms)[0]
    if bal is not None:
        ok, line = check_balanced(name, bal, sx, xs, ws, bias, m, n, k)
        failures += not ok
        lines.append(line)
        log(line)

    # ------------------------------------------------------------------------------- 2. timing
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
            log(f"  timing {cfg_name(c)} failed: {type(e).__name__}: {str(e)[:160]}")
            return None

    us_split, us_tma, us_bal = forced_us(split_cfg), forced_us(tma_cfg), forced_us(bal)
    # The record's config: the fastest by these CUDA-graph timings of the tuner's winner and its FINALISTS best of
    # each kind (do_bench times one call with L2 flushed, and its ranking varies between runs by more than the
    # differences it ranks; back-to-back graph calls are how the model runs them).
    timed = [(us, c) for us, c in ((us_k, cfg), (us_split, split_cfg), (us_tma, tma_cfg), (us_bal, bal))
             if us is not None and c is not None]
    seen = {c for _, c in timed}
    for kind in ("split", "tma", "balanced"):
        ranked = sorted(((us, c) for c, us in tuned.sweep if kind_of(c) == kind), key=lambda t: t[0])
        for _, c in ranked[:FINALISTS]:
            if c not in seen:
                seen.add(c)
                us = forced_us(c)
                if us is not None:
                    timed.append((us, c))
    graph_us, graph_cfg = min(timed, key=lambda t: t[0])
    if graph_cfg != cfg:
        out = L.skinny_linear(xs[1], ws[1], config=graph_cfg)
        err = rel_l2(out, L.skinny_linear_reference(xs[1], ws[1]))
        ok = err < 1e-2 and not out.isnan().any()
        failures += not ok
        lines.append(f"{name:<18} {cfg_name(graph_cfg):<28} (fastest in the graph timings, {graph_us:.1f} against the "
                     f"tuner's {us_k:.1f} us) rel L2 {err:.1e}  {'ok' if ok else 'FAIL'}")
        log(lines[-1])
        if ok:
            tuned = L.Tuned(graph_cfg, dict(tuned.sweep).get(graph_cfg), tuned.cublas_us, tuned.sweep)
            L._TUNED[L._key(L._rows(xs[0]), ws[0], None)] = tuned
            cfg, us_k = graph_cfg, graph_us
    nbytes = (n * k + m * k + m * n) * 2
    row = dict(name=name, m=m, n=n, k=k, mb=nbytes / 1e6, cublas_us=us_c, kernel_us=us_k,
               cublas_tbps=nbytes / us_c / 1e6, kernel_tbps=nbytes / us_k / 1e6, config=cfg_name(cfg),
               tune_s=took_s, tuner_kernel_us=tuned.kernel_us, tuner_cublas_us=tuned.cublas_us,
               tuned_config=asdict(cfg), split_config=cfg_name(split_cfg), split_us=us_split,
               tuner_split_us=split_tuner_us, tma_config=cfg_name(tma_cfg), tma_us=us_tma,
               tuner_tma_us=tma_tuner_us, balanced_config=cfg_name(bal), balanced_us=us_bal,
               tuner_balanced_us=bal_tuner_us, candidates=len(tuned.sweep))
    log(f"{name}: cuBLAS {us_c:.1f} us, kernel {us_k:.1f} us ({cfg_name(cfg)}); best split-K {fmt(us_split, 0)} us "
        f"({cfg_name(split_cfg)}), best TMA {fmt(us_tma, 0)} us ({cfg_name(tma_cfg)}), best balanced {fmt(us_bal, 0)} us "
        f"({cfg_name(bal)})")
    record = ship_record(name, m, n, k, False, tuned, us_k, us_c)
    del fused, ws, xs, bias, out, sx
    torch.cuda.empty_cache()
    return failures, lines, row, record


def two_kernel_swiglu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The engine's unfused gate|up on cuBLAS: F.linear, then graphs.fused_swiglu (torch.compile'd on CUDA)."""
    return graphs.fused_swiglu(F.linear(x, w))


FINALISTS = 3  # per kind, the tuner's fastest plain-GEMM configs timed again in a CUDA graph for the record
SWIGLU_FINALISTS = 3  # the tuner's fastest SwiGLU configs timed again in a CUDA graph for the record


def check_swiglu(name: str, lead: tuple, n: int, k: int, sms: int, tune_s: float) -> tuple[int, list, dict, dict]:
    """Tune, check and time skinny_swiglu on one gate|up shape. Returns (failures, check lines, table row, record)."""
    m, i = lead[0] * lead[1], n // 2
    fused = torch.randn(COPIES, n + 64, k, device=DEV, dtype=DTYPE) * k ** -0.5  # row slices [32, 32 + 2I)
    ws = [fused[c, 32:32 + n] for c in range(COPIES)]
    xs = [torch.randn(*lead, k, device=DEV, dtype=DTYPE) for _ in range(COPIES)]

    took_s = tune(lambda: L.skinny_swiglu(xs[0], ws[0]), tune_s)
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
    errs["graph replay"] = rel_l2(replayed_on(lambda: L.skinny_swiglu(sx, ws[1]), sx, xs[2]),
                                  L.skinny_swiglu_reference(xs[2], ws[1]))
    ok = all(e < 1e-2 for e in errs.values()) and not cfg.balanced  # NaN compares False
    line = (f"{name:<22} {cfg_name(cfg):<28} " + "  ".join(f"{lbl} {e:.1e}" for lbl, e in errs.items())
            + f"  (default {cfg_name(dflt)})  {'ok' if ok else 'FAIL'}  (tuned in {took_s:.1f} s, "
            f"{timed_of(tuned, len(L.candidates(m, i, k, sms, tiles=2, tma=L.TMA_CANDIDATES)))})")
    log(line)

    # the plain gate|up GEMM, tuned outside any capture (a cache hit after the plain pass)
    tune(lambda: L.skinny_linear(xs[0], ws[0]), tune_s)
    n_calls = 6 if n * k > 1e8 else 30
    us_k = time_graph(lambda c: L.skinny_swiglu(xs[c % COPIES], ws[c % COPIES]), n_calls, 10)
    # The record's config: the fastest in these graph timings of the tuner's SWIGLU_FINALISTS best (do_bench
    # picks vary between runs), checked against the reference when it is not the tuner's winner.
    for c in [c for c, _ in sorted(tuned.sweep, key=lambda t: t[1])[:SWIGLU_FINALISTS] if c != cfg]:
        us = time_graph(lambda j: L.skinny_swiglu(xs[j % COPIES], ws[j % COPIES], config=c), n_calls, 10)
        if us < us_k:
            out = L.skinny_swiglu(xs[1], ws[1], config=c)
            err = rel_l2(out, L.skinny_swiglu_reference(xs[1], ws[1]))
            good = err < 1e-2 and not out.isnan().any()
            log(f"{name:<22} {cfg_name(c):<28} (faster in the graph timings, {us:.1f} against {us_k:.1f} us) "
                f"rel L2 {err:.1e}  {'ok' if good else 'FAIL'}")
            if not good:
                ok = False
                continue
            cfg, us_k = c, us
            tuned = L.Tuned(c, dict(tuned.sweep).get(c), tuned.cublas_us, tuned.sweep)
            L._TUNED[L._key(L._rows(xs[0]), ws[0], None, swiglu=True)] = tuned
    us_c = time_graph(lambda c: two_kernel_swiglu(xs[c % COPIES], ws[c % COPIES]), n_calls, 10)
    us_s = time_graph(lambda c: graphs.fused_swiglu(L.skinny_linear(xs[c % COPIES], ws[c % COPIES])), n_calls, 10)
    nbytes = (n * k + m * k + m * i) * 2
    row = dict(name=name, m=m, n=n, k=k, mb=nbytes / 1e6, cublas_us=us_c, skinny_linear_us=us_s, kernel_us=us_k,
               kernel_tbps=nbytes / us_k / 1e6, config=cfg_name(cfg), tune_s=took_s, errors=errs,
               tuner_kernel_us=tuned.kernel_us, tuner_cublas_us=tuned.cublas_us, tuned_config=asdict(cfg),
               candidates=len(tuned.sweep))
    log(f"{name}: cuBLAS + SwiGLU {us_c:.1f} us, skinny_linear + SwiGLU {us_s:.1f} us, fused {us_k:.1f} us")
    record = ship_record(name, m, n, k, True, tuned, us_k, us_c, skinny_linear_us=us_s)
    del fused, ws, xs, sx
    torch.cuda.empty_cache()
    return int(not ok), [line], row, record


def check_untuned_capture() -> tuple[int, list]:
    """An untuned shape during capture: F.linear (skinny_swiglu: F.linear + SwiGLU), no benchmarking (which
    would fail inside a capture), nothing tuned."""
    failures, lines = 0, []
    x, w = torch.randn(3, 512, device=DEV, dtype=DTYPE), torch.randn(256, 512, device=DEV, dtype=DTYPE)
    w2 = torch.randn(2 * 256, 512, device=DEV, dtype=DTYPE)
    cases = (("", lambda: L.skinny_linear(x, w), lambda: F.linear(x, w), lambda: L.tuned(x, w)),
             (" swiglu", lambda: L.skinny_swiglu(x, w2), lambda: L.swiglu_reference(F.linear(x, w2)),
              lambda: L.tuned(x, w2, swiglu=True)))
    for kind, call, expected, cached in cases:
        warm_up(expected)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                y = call()
            g.replay()
            torch.cuda.synchronize()
            ok = cached() is None and rel_l2(y, expected()) < 1e-3
            lines.append(f"untuned{kind} shape during capture -> the cuBLAS path, nothing tuned: "
                         f"{'ok' if ok else 'FAIL'}")
        except Exception as e:
            ok = False
            lines.append(f"untuned{kind} shape during capture: FAIL ({type(e).__name__}: {str(e)[:100]})")
        failures += not ok
        log(lines[-1])
    return failures, lines


def check_records(shipped: dict, rows: list[dict], swiglu_rows: list[dict], exported: list[dict],
                  written_to: str | None) -> tuple[bool, str]:
    """export_tuned -> JSON -> load_tuned gives the same cache, and the shipped records, loaded as
    graphs._load_shipped_tuning loads them, give this run's tuned configs (plain and swiglu)."""
    L.clear_tuned()
    L.load_tuned(json.loads(json.dumps(exported)))
    ok = L.export_tuned() == exported
    L.clear_tuned()
    dev = torch.cuda.current_device()
    L.load_tuned([dict(r, device=dev) for r in shipped["records"]])
    for r, swiglu in [(r, False) for r in rows] + [(r, True) for r in swiglu_rows]:
        x, w = (torch.empty(1, r["k"], device=DEV, dtype=DTYPE).expand(rows_, r["k"]) for rows_ in (r["m"], r["n"]))
        t = L.tuned(x, w, swiglu=swiglu)  # only the shapes matter
        ok = ok and t is not None and t.config == L.Config(**r["tuned_config"])
    kinds = sum(r.get("swiglu", False) for r in shipped["records"])
    balanced = sum(r.get("programs", 0) > 0 for r in shipped["records"])
    return ok, (f"export_tuned -> JSON -> load_tuned, and the shipped-format records ({len(shipped['records'])}: "
                f"{kinds} swiglu, {balanced} balanced{', written to ' + written_to if written_to else ''}) load "
                f"back to the tuned configs: {'ok' if ok else 'FAIL'}")


def print_tables(rows: list[dict], swiglu_rows: list[dict], records: list[dict], checks: list[str]) -> None:
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
    if swiglu_rows:
        print(f"\nskinny_swiglu (gate|up GEMM + SwiGLU epilogue) vs the two-kernel paths; SwiGLU = graphs.fused_swiglu "
              f"(torch.compile'd; a 'torch.compile of fused_swiglu failed' warning above means eager)")
        print(f"  {'shape':<22}{'M':>4}{'N=2I':>7}{'K':>6}{'cuBLAS+SwiGLU':>15}{'skinny+SwiGLU':>15}{'fused us':>10}"
              f"{'TB/s':>6}{'vs best':>9}  {'ships':<6}{'config':<28}{'tune s':>7}")
        swiglu_records = {r["name"]: r for r in records if r["swiglu"]}
        margin = graphs._shipping_margin(torch.device(DEV, torch.cuda.current_device()))
        for r in swiglu_rows:
            best = min(r["cublas_us"], r["skinny_linear_us"])
            ships = graphs._record_wins(swiglu_records[r["name"]], margin)
            print(f"  {r['name']:<22}{r['m']:>4}{r['n']:>7}{r['k']:>6}{r['cublas_us']:>15.1f}"
                  f"{r['skinny_linear_us']:>15.1f}{r['kernel_us']:>10.1f}{r['kernel_tbps']:>6.2f}"
                  f"{best / r['kernel_us']:>8.2f}x  {'yes' if ships else 'no':<6}{r['config']:<28}{r['tune_s']:>7.1f}")
        print(f"  ships: graphs would run the fused kernel with this record (faster than both two-kernel paths "
              f"{'at all (PDL on)' if margin == 1 else f'by {100 * (1 - margin):.0f} %'})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write results, records and export_tuned() as JSON here")
    ap.add_argument("--records", "--ship", dest="records", default=None,
                    help="write the records as the engine's shipped file here (engine/tuned/linear_<gpu>.json format; "
                         "records in it of shapes not tuned in this run are kept)")
    ap.add_argument("--only", default=None, choices=["expert", "lm", "head"])
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock budget of the run: tuning is capped per shape so that it ends within it")
    args = ap.parse_args()
    assert L.available(torch.zeros(1, device=DEV)), "needs CUDA and triton"
    sms = L.sm_count(torch.zeros(1, device=DEV))
    gpu = torch.cuda.get_device_name(0)
    log(f"{gpu}, {sms} SMs, torch {torch.__version__}, triton {L.triton.__version__}, budget {args.budget_s:.0f} s")
    torch.manual_seed(0)
    old = {}
    if args.records and Path(args.records).exists():
        old = json.loads(Path(args.records).read_text())  # read once: its other shapes' records are kept
    rows, swiglu_rows, records, checks, skipped, failures = [], [], [], [], [], 0

    def shipped() -> dict:
        return {"gpu": gpu, "software": f"torch {torch.__version__}, triton {L.triton.__version__}",
                "command": "python scripts/gpu_linear_check.py --records PATH (kernel_us / cublas_us / "
                           "skinny_linear_us: the CUDA-graph timings of its tables)",
                "records": merged_records(old, gpu, records)}

    def write(exported: list[dict]) -> None:
        if args.records:
            Path(args.records).write_text(json.dumps(shipped(), indent=1) + "\n")
        if args.out:
            Path(args.out).write_text(json.dumps({**shipped(), "checks": checks, "rows": rows,
                                                  "swiglu_rows": swiglu_rows, "tuned": exported}, indent=1))

    jobs = [(check_plain, rows, shape) for shape in SHAPES] + [(check_swiglu, swiglu_rows, s) for s in SWIGLU_SHAPES]
    jobs = [job for job in jobs if not args.only or job[2][0] == args.only]
    jobs.sort(key=lambda job: GROUPS.index(job[2][0]))  # stable: a group's plain shapes, then its swiglu ones
    for done, (check, table, (_, name, lead, n, k)) in enumerate(jobs):
        left_s = args.budget_s - elapsed()
        if left_s < MIN_SHAPE_S:
            skipped.append(name)
            checks.append(f"{name}: skipped, {left_s:.0f} s left of the {args.budget_s:.0f} s budget")
            log(checks[-1])
            continue
        tune_s = max(MIN_TUNE_S, TUNE_SHARE * left_s / (len(jobs) - done))
        log(f"{name} (M {lead[0] * lead[1]}, N {n}, K {k}): tuning for up to {tune_s:.0f} s")
        try:
            f, lines, row, record = check(name, lead, n, k, sms, tune_s)
        except Exception as e:  # reported; the other shapes still run
            f, lines, row, record = 1, [f"{name}: FAIL ({type(e).__name__}: {str(e)[:200]})"], None, None
            log(lines[-1])
            torch.cuda.empty_cache()
        failures += f
        checks.extend(lines)
        if row is not None:
            table.append(row)
            records.append(record)
        write(L.export_tuned())

    f, lines = check_untuned_capture()
    failures += f
    checks.extend(lines)

    # ----------------------------------------------------------------------------------- 4. records
    exported = L.export_tuned()  # this run's tuner results (--out's "tuned")
    write(exported)
    written = json.loads(Path(args.records).read_text()) if args.records else json.loads(json.dumps(shipped()))
    ok, line = check_records(written, rows, swiglu_rows, exported, args.records)
    failures += not ok
    checks.append(line)
    log(line)

    print_tables(rows, swiglu_rows, records, checks)
    print(f"correctness: {'all ok' if not failures else f'{failures} FAILED'}"
          f"{f'; skipped for time: {skipped}' if skipped else ''}; total {elapsed():.0f} s", flush=True)
    write(exported)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
