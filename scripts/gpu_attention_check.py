"""Device check of slot_attention (engine/attention_kernel.py) at the full model shape, bf16.

    python scripts/gpu_attention_check.py [--budget-s 150] [--out results.json] [--only prefill|few] [--tma-only]

KV = 8 heads, D = 128, N = 3136 key slots of which 3057 valid, batch 1, cases:
  decode (R = 4: g = 4, Q = 1), verify (R = 32: Q = 8), action (R = 128: g = 2, Q = 64, one limit),
  streaming prefill (R = 3196: Q = 799 at scattered frozen slots), full prefill (R = 12140: Q = 3035, causal).
1. Correctness of the default plan against slot_attention_reference (rel L2 < 1e-2) with the output and
   workspace memory poisoned with NaN first (and the cache slots after the N-slot key slice), also in
   the heads_last layout, and through a CUDA graph replayed 3 times, each on new inputs and limits
   (the kernel must be capturable: no host sync; one replay's limits reach all N slots, so 128-key
   blocks run past the slice). Few-rows cases check both split merges: fused (the last program of a
   row tile merges, through an atomic counter it resets) and the two-kernel path; eager calls and the
   graph use different counters, and every counter must be back at 0 afterwards.
2. Timing (per call, from CUDA graphs of back-to-back calls, median of replays): slot_attention (default
   plan fused and two-kernel, then a sweep of block sizes / warps / stages / splits / merge, fused merge
   groups), F.scaled_dot_product_attention with the
   additive mask, graphs._attn_math. K/V are read from an 8-layer cache (102 MB, calls rotate layers and
   3 query sets) so they come from HBM as in the model, not from the 50 MB L2.
   The prefill cases also sweep the TMA kernel (Config(tma=True): Q/K/V through tensor descriptors),
   each config checked as in 1. before it is timed; configs over the shared memory fail and are listed.
The sweep stops at --budget-s; the table (us, K/V TB/s over all 3136 slots, TFLOP/s of the visible
scores) is printed last, with the winner per case and the defaults to put into attention_kernel.py.
--only prefill: the streaming and full prefill cases only; --only few: the few-rows cases only; --tma-only: the
sweep runs the TMA configs only (the pointer configs were swept before; the default plan, SDPA and
graphs._attn_math are still timed); few-rows cases then sweep TMA split plans with the two-kernel merge.
"""
import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdrive_ros.engine import attention_kernel as A  # noqa: E402
from flashdrive_ros.engine import graphs as G  # noqa: E402
import gpu_timing  # noqa: E402 (scripts/, beside this file)
from gpu_timing import graph_ms, warm_up  # noqa: E402

KV, D, N, VALID, LAYERS = 8, 128, 3136, 3057, 8
DTYPE = torch.bfloat16
DEV = "cuda"
T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def streaming_slots() -> torch.Tensor:
    """799 query slots of a k = 1 streaming window: the newest frame of each of 4 views (180 slots each,
    views of 4 x (4 label + 180 frame) slots after a 34-slot prefix) and the 79-slot tail."""
    prefix, label, frame = 34, 4, 180
    view = 4 * (label + frame)
    slots = [torch.arange(prefix + v * view + 3 * (label + frame) + label, prefix + (v + 1) * view) for v in range(4)]
    tail_start = prefix + 4 * view
    slots.append(torch.arange(tail_start, VALID))
    s = torch.cat(slots)
    assert s.numel() == 799, s.numel()
    return s


def cases() -> dict[str, tuple[int, torch.Tensor]]:
    """name -> (groups g, key limits [Q]); R = g * Q."""
    return {
        "decode R=4": (4, torch.tensor([VALID])),                                   # row at slot VALID-1
        "verify R=32": (4, torch.clamp(torch.arange(VALID - 8, VALID) + 1, max=VALID)),
        "action R=128": (2, torch.full((64,), VALID)),                               # n_ctx + 64
        "stream R=3196": (4, torch.clamp(streaming_slots() + 1, max=VALID)),
        "prefill R=12140": (4, torch.arange(3035) + 1),                              # causal
    }


def additive_mask(limit: torch.Tensor, groups: int) -> torch.Tensor:
    """The graphs.py mask of these limits: [1, 1, 1|Q, N] (one row when all rows agree), folded."""
    lim = limit[:1] if bool((limit == limit[0]).all()) else limit
    visible = torch.arange(N, device=limit.device)[None, :] < lim[:, None]
    m = torch.where(visible, 0.0, torch.finfo(DTYPE).min).to(DTYPE)[None, None]
    return G.fold_mask(m, groups)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_graph(call, n_calls: int, replays: int) -> float:
    """us per call: n_calls back-to-back calls captured in one CUDA graph (call(i) rotates inputs),
    median over replays. Warm-up (Triton / inductor compilation) runs on a side stream first."""
    warm_up(lambda: [call(i) for i in range(3)])
    return 1000.0 * graph_ms(lambda: [call(i) for i in range(n_calls)], replays, warm=0) / n_calls


def capture(fn):
    """(replay, output) of fn captured in a CUDA graph after a warm-up on a side stream."""
    g, out = gpu_timing.capture(fn)
    return g.replay, out


def counters_clear() -> bool:
    """Every fused-merge counter handed out so far is 0 (eager ones and those of captured calls)."""
    torch.cuda.synchronize()
    bufs = [a.buf for a in A._ARENAS.values()] + list(A._RETIRED)
    return all(int(b.count_nonzero()) == 0 for b in bufs)


def poison(plan: A.Plan, rows: int) -> None:
    """Leave NaN-filled blocks of the sizes slot_attention will allocate in the caching allocator."""
    sizes = [(KV * rows * D, DTYPE)]
    if plan.splits > 1:
        sizes += [(KV * rows * plan.splits * D, torch.float32)] + [(KV * rows * plan.splits, torch.float32)] * 2
    blocks = [torch.full((n,), float("nan"), dtype=dt, device=DEV) for n, dt in sizes]
    torch.cuda.synchronize()
    del blocks


def cfg_name(c: A.Config | None, plan: A.Plan) -> str:
    c = plan.config if c is None else c
    merge = "" if plan.splits == 1 else f" fused/g{plan.merge_group}" if plan.fused_merge else " 2-kernel"
    return f"bm{c.block_m} bn{c.block_n} w{c.num_warps} st{c.num_stages} sp{plan.splits}{merge}{' tma' if c.tma else ''}"


# TMA kernel configs swept on the prefill cases, the likeliest first. scripts/attention_compile_sm90.py (no GPU
# needed): 64 x 64 / 4 warps takes 157-159 registers against the pointer kernel's 236, 128 x 64 / 8 warps
# 154-158 against 218; 128 x 128 and 64 x 128 at 4 stages need more than the 227 KB of shared memory per
# block: they fail to launch and are listed as failed.
TMA_SWEEP = [A.Config(bm, bn, w, st, 1, tma=True) for bm, bn, w, st in (
    (64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 8, 2),
    (64, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 4, 3), (128, 128, 8, 4), (64, 128, 4, 4))]


TWO_KERNEL = A.Config(0, 0, 0, 0, fused_merge=False)  # marker: the default plan with the two-kernel merge


def resolve(cfg: A.Config | None, rows: int, sms: int) -> A.Config | None:
    """cfg, or for TWO_KERNEL the automatic plan's config with fused_merge=False."""
    if cfg is TWO_KERNEL:
        from dataclasses import replace
        return replace(A.plan(KV, rows, N, sms).config, fused_merge=False)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop the sweep after this many seconds")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--only", choices=("all", "prefill", "few"), default="all",
                    help="prefill: the streaming and full prefill cases only; few: the few-rows cases only")
    ap.add_argument("--tma-only", action="store_true",
                    help="sweep the TMA configs only (the pointer configs were swept before; few-rows cases: "
                         "split plans with the two-kernel merge)")
    args = ap.parse_args()
    dev = torch.device(DEV)
    # Every captured fused-merge call gets counters of its own: room for the sweep's thousands of
    # captured calls, so none falls back to a captured torch.zeros (a memset node in the timing).
    A.COUNTERS_CAPTURED = 1 << 22
    assert A.available(torch.zeros(1, device=dev)), "needs CUDA and triton"
    sms = A.sm_count(torch.zeros(1, device=dev))
    print(f"{torch.cuda.get_device_name(0)}, {sms} SMs, torch {torch.__version__}, triton {A.triton.__version__}")
    torch.manual_seed(0)
    k_cache = torch.randn(LAYERS, 1, KV, N + 16, D, device=dev, dtype=DTYPE)  # 16 spare slots: views, as in the engine
    v_cache = torch.randn(LAYERS, 1, KV, N + 16, D, device=dev, dtype=DTYPE)
    k_cache[..., N:, :] = float("nan")  # a kernel reading past the key slice returns NaN
    v_cache[..., N:, :] = float("nan")
    kv_bytes = 2 * KV * N * D * k_cache.element_size()
    results: dict[str, list[dict]] = {}
    checks: list[str] = []
    failures = 0
    broken: list[str] = []  # a CUDA error that outlived its config (the context is unusable): stop timing

    def recover(e: Exception) -> str:
        """The error of a failed config as a short string, after waiting for the device; a sticky CUDA
        error (illegal address, ...) also makes that wait fail: then everything after is skipped."""
        try:
            torch.cuda.synchronize()
        except Exception as sticky:
            broken.append(f"{type(sticky).__name__}: {str(sticky)[:120]}")
        return f"{type(e).__name__}: {str(e)[:80]}"

    # -------------------------------------------------------------- 1. correctness of the default plan
    def check(name: str, limit: torch.Tensor, rows: int, qs, kv, cfg: A.Config | None) -> tuple[bool, str]:
        """(ok, report line) of slot_attention with cfg (None: the default plan) as described at the top."""
        vplan = A.plan(KV, rows, N, sms, cfg)
        ref = A.slot_attention_reference(qs[0], *kv[0], limit)
        poison(vplan, rows)
        out = A.slot_attention(qs[0], *kv[0], limit, config=cfg)
        err = rel_l2(out, ref)
        nan = bool(out.isnan().any())
        hl = A.slot_attention(qs[0], *kv[0], limit, config=cfg, heads_last=True)
        err = max(err, rel_l2(hl, A._to_heads_last(ref, limit.numel())))
        nan = nan or bool(hl.isnan().any())
        # Eager twice more in a row (the same eager counters), new inputs each time.
        for i in (1, 2):
            err = max(err, rel_l2(A.slot_attention(qs[i], *kv[i], limit, config=cfg),
                                  A.slot_attention_reference(qs[i], *kv[i], limit)))
        # Capturable: a graph captured on static buffers (poisoned output), replayed 3 times, each
        # after new inputs were copied in (the counters of the captured call must reset each time).
        sq, sl = qs[0].clone(), limit.clone()
        poison(vplan, rows)
        replay, gout = capture(lambda: A.slot_attention(sq, *kv[1], sl, config=cfg))
        gerr = 0.0
        # 100 more keys: every slot up to N (blocks past the slice); 700 fewer: some splits dead
        for i, shift in ((1, 5), (2, -100), (0, 700)):
            sq.copy_(qs[i])
            sl.copy_(torch.clamp(limit - shift, min=0, max=N))
            gout.fill_(float("nan"))  # every replay must write every output element
            replay()
            gerr = max(gerr, rel_l2(gout, A.slot_attention_reference(qs[i], *kv[1], sl)))
            nan = nan or bool(gout.isnan().any())
        clear = counters_clear()
        ok = err < 1e-2 and gerr < 1e-2 and not nan and clear
        path = ""
        if vplan.config.tma:
            path = "  (TMA kernel)" if A.tma_applies(vplan, qs[0], *kv[0]) else "  (TMA not applicable: pointer kernel)"
        line = (f"{name:<16} plan {cfg_name(cfg, vplan):<42} rel L2 {err:.2e}  3 graph replays {gerr:.2e}"
                f"{'  NaN!' if nan else ''}{'' if clear else '  COUNTERS NOT 0!'}  {'ok' if ok else 'FAIL'}{path}")
        del replay, gout, ref, out, hl
        return ok, line

    state = {}
    for name, (g, limit) in cases().items():
        limit = limit.to(dev)
        rows = g * limit.numel()
        if (args.only == "prefill" and rows <= 256) or (args.only == "few" and rows > 256):
            continue
        qs = [torch.randn(1, KV, rows, D, device=dev, dtype=DTYPE) for _ in range(3)]
        kv = [(k_cache[i, :, :, :N], v_cache[i, :, :, :N]) for i in range(LAYERS)]
        plan = A.plan(KV, rows, N, sms)
        variants = [None] + ([TWO_KERNEL] if plan.splits > 1 else [])
        for variant in variants:
            ok, line = check(name, limit, rows, qs, kv, resolve(variant, rows, sms))
            failures += not ok
            checks.append(line)
            print(line, flush=True)
        state[name] = (g, limit, rows, qs, kv, plan)

    # -------------------------------------------------------------------------------- 2. timing
    def timed(name: str, impl: str, fn, flops: float, err: float | None, big: bool, cfg=None) -> None:
        if broken:
            return
        try:
            us = time_graph(fn, n_calls=6 if big else 30, replays=5 if big else 15)
        except Exception as e:  # a config out of shared memory / registers, an inductor failure, ...
            results[name].append({"impl": impl, "us": None, "error": recover(e)})
            return
        results[name].append({"impl": impl, "us": us, "kv_TBps": kv_bytes / us / 1e6,
                              "TFLOPs": flops / us / 1e6, "rel_l2": err, "cfg": cfg})

    def kernel_call(qs, kv, limit, cfg):
        return lambda i: A.slot_attention(qs[i % 3], *kv[i % LAYERS], limit, config=cfg)

    refs = {}
    for name, (g, limit, rows, qs, kv, plan) in state.items():
        results[name] = []
        big = rows > 1000
        # visible scores: QK^T and PV, 2 flops per multiply-add each, per row and kv head
        flops = 4.0 * D * KV * g * float(torch.clamp(limit, max=N).sum())
        refs[name] = A.slot_attention_reference(qs[0], *kv[0], limit)
        timed(name, f"kernel default ({cfg_name(None, plan)})", kernel_call(qs, kv, limit, None), flops,
              rel_l2(A.slot_attention(qs[0], *kv[0], limit), refs[name]), big)
        if plan.splits > 1:  # the same plan with the separate merge kernel
            cfg2 = resolve(TWO_KERNEL, rows, sms)
            timed(name, f"kernel default 2-kernel ({cfg_name(cfg2, A.plan(KV, rows, N, sms, cfg2))})",
                  kernel_call(qs, kv, limit, cfg2), flops,
                  rel_l2(A.slot_attention(qs[0], *kv[0], limit, config=cfg2), refs[name]), big, cfg2)
        fmask = additive_mask(limit, g)
        timed(name, "sdpa + additive mask", lambda i: F.scaled_dot_product_attention(
            qs[i % 3], *kv[i % LAYERS], attn_mask=fmask), flops,
            rel_l2(F.scaled_dot_product_attention(qs[0], *kv[0], attn_mask=fmask), refs[name]), big)
        if elapsed() < args.budget_s * 0.4:
            timed(name, "graphs._attn_math", lambda i: G._attn_math(qs[i % 3], *kv[i % LAYERS], fmask), flops,
                  rel_l2(G._attn_math(qs[0], *kv[0], fmask), refs[name]), big)
        print(f"[{elapsed():5.0f} s] {name}: baselines timed", flush=True)

    # Sweep: few-rows cases try blocks at the automatic split count (fused merge), then fused merge
    # groups and split counts (fused and two-kernel) for the best blocks; prefill cases try blocks
    # without split. Stops at the budget.
    def sweep_configs(rows: int) -> list[A.Config]:
        if rows <= 256 and args.tma_only:  # the default tiles through TMA first, then the others
            bms = [m for m in (16, 32, 64, 128) if m <= max(16, rows)]
            default = A.plan(KV, rows, N, sms).config
            first = [A.Config(default.block_m, default.block_n, default.num_warps, st, 0, fused_merge=False, tma=True)
                     for st in (default.num_stages, 2, 3, 4)]
            return first + [A.Config(bm, bn, w, st, 0, fused_merge=False, tma=True)
                            for bm, bn, w, st in itertools.product(bms, (64, 128), (4, 8), (2, 3, 4))
                            if not (w == 8 and bm < 64)]
        if rows <= 256:
            bms = [m for m in (16, 32, 64, 128) if m <= max(16, rows)]
            return [A.Config(bm, bn, w, st, 0, fused_merge=fm)
                    for fm, bm, bn, w, st in itertools.product((True,), bms, (64, 128), (4, 8), (2, 3))
                    if not (w == 8 and bm < 64)]
        pointer = [A.Config(bm, bn, w, st, 1) for bm, bn, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))]
        return TMA_SWEEP if args.tma_only else TMA_SWEEP + pointer  # TMA first: the new kernel within the budget

    skipped = 0
    for n_case, (name, (g, limit, rows, qs, kv, plan)) in enumerate(state.items()):
        flops = 4.0 * D * KV * g * float(torch.clamp(limit, max=N).sum())
        big = rows > 1000
        tried = set()
        deadline = elapsed() + (args.budget_s - elapsed()) / (len(state) - n_case)  # an equal share of what is left

        def run(cfg: A.Config) -> None:
            nonlocal skipped, failures
            p = A.plan(KV, rows, N, sms, cfg)
            label = cfg_name(cfg, p)
            if label in tried:
                return
            tried.add(label)
            if elapsed() > deadline or broken:
                skipped += 1
                return
            try:
                err = rel_l2(A.slot_attention(qs[0], *kv[0], limit, config=cfg), refs[name])
                if cfg.tma:  # the new kernel: the full check of 1. (poisoned memory, heads_last, graph replays)
                    ok, line = check(name, limit, rows, qs, kv, cfg)
                    failures += not ok
                    checks.append(line)
                    print(line, flush=True)
                    if not ok:
                        err = max(err, 1.0)  # never a winner
            except Exception as e:
                results[name].append({"impl": f"kernel {label}", "us": None, "error": recover(e)})
                return
            timed(name, f"kernel {label}", kernel_call(qs, kv, limit, cfg), flops, err, big, cfg)

        for cfg in sweep_configs(rows):
            run(cfg)
        if rows <= 256:
            ok = [r for r in results[name] if r["impl"].startswith("kernel bm") and r.get("us") and r["rel_l2"] < 1e-2]
            if ok:
                from dataclasses import replace
                best = min(ok, key=lambda r: r["us"])["cfg"]
                if not best.tma:  # (a fused merge runs the pointer kernel)
                    for mg in (1, 2, 4, 8):  # fused merge: splits loaded per merge step
                        run(replace(best, fused_merge=True, merge_group=mg))
                for splits, fm in itertools.product((4, 8, 12, 16, 24, 32, 48, 64),
                                                    (False,) if best.tma else (True, False)):
                    run(replace(best, splits=splits, fused_merge=fm, merge_group=0))
        print(f"[{elapsed():5.0f} s] {name}: sweep done", flush=True)

    # ---------------------------------------------------------------------------------- 3. table
    print("\n" + "=" * 100)
    print(f"slot_attention on {torch.cuda.get_device_name(0)}: KV={KV} D={D} N={N} ({VALID} valid), {str(DTYPE)[6:]}, "
          f"K/V {kv_bytes / 1e6:.1f} MB per call")
    print("correctness (default plan):")
    for c in checks:
        print("  " + c)
    winners = {}
    for name, rows_ in results.items():
        print(f"\n{name}")
        print(f"  {'impl':<64}{'us':>9}{'K/V TB/s':>10}{'TFLOP/s':>9}{'rel L2':>10}")
        timed_rows = [r for r in rows_ if r.get("us")]
        good = [r for r in timed_rows if r["impl"].startswith("kernel") and (r["rel_l2"] or 0) < 1e-2]
        best = min(good, key=lambda r: r["us"]) if good else None
        sdpa = next((r for r in timed_rows if r["impl"].startswith("sdpa")), None)
        for r in sorted(rows_, key=lambda r: (not r["impl"].startswith(("sdpa", "graphs", "kernel default")),
                                              r.get("us") or 1e18)):
            if r.get("us") is None:
                print(f"  {r['impl']:<64}{'failed':>9}   {r['error']}")
                continue
            mark = "  <- best" if r is best else ""
            print(f"  {r['impl']:<64}{r['us']:>9.1f}{r['kv_TBps']:>10.2f}{r['TFLOPs']:>9.1f}{r['rel_l2']:>10.1e}{mark}")
        if best:
            winners[name] = (best, sdpa)
    print("\nwinners (fastest correct kernel config per case; speed-up over SDPA + mask):")
    for name, (best, sdpa) in winners.items():
        dflt = next((r for r in results[name] if r["impl"].startswith("kernel default (") and r.get("us")), None)
        two = next((r for r in results[name] if r["impl"].startswith("kernel default 2-kernel") and r.get("us")), None)
        fused = [r for r in results[name] if r.get("us") and "fused" in r["impl"] and (r["rel_l2"] or 0) < 1e-2]
        unfused = [r for r in results[name] if r.get("us") and "2-kernel" in r["impl"] and (r["rel_l2"] or 0) < 1e-2]
        two_s = f", 2-kernel {two['us']:.1f} us" if two else ""
        merge = (f"  best fused {min(r['us'] for r in fused):.1f} / 2-kernel {min(r['us'] for r in unfused):.1f} us"
                 if fused and unfused else "")
        print(f"  {name:<16} {best['impl'][7:]:<48} {best['us']:8.1f} us"
              f"  (default {dflt['us'] if dflt else float('nan'):.1f} us"
              f"{two_s})"
              f"  x{(sdpa['us'] / best['us']) if sdpa else float('nan'):.1f} vs sdpa{merge}")
    print("\nTMA kernel (Config(tma=True)) against the pointer kernel, per prefill case:")
    for name, rows_ in results.items():
        ok = [r for r in rows_ if r.get("us") and r["impl"].startswith("kernel") and (r["rel_l2"] or 0) < 1e-2]
        tma = [r for r in ok if r["impl"].endswith(" tma")]
        if not any(r["impl"].endswith(" tma") for r in rows_):
            continue
        pointer = [r for r in ok if not r["impl"].endswith(" tma") and not r["impl"].startswith("kernel default")]
        dflt = next((r for r in ok if r["impl"].startswith("kernel default (")), None)
        best_tma = min(tma, key=lambda r: r["us"]) if tma else None
        print(f"  {name:<16} best TMA "
              + (f"{best_tma['impl'][7:]} {best_tma['us']:.1f} us" if best_tma else "none correct and timed")
              + f"  default {dflt['us'] if dflt else float('nan'):.1f} us"
              + (f"  best pointer {min(r['us'] for r in pointer):.1f} us" if pointer else "")
              + (f"  -> x{dflt['us'] / best_tma['us']:.2f} vs default" if best_tma and dflt else ""))
    print("  defaults now: FEW_ROWS =", A.FEW_ROWS, " MANY_ROWS =", A.MANY_ROWS,
          f" PROGRAMS_PER_SM = {A.PROGRAMS_PER_SM}  MIN_SPLIT_KEYS = {A.MIN_SPLIT_KEYS}"
          f"  FUSED_MERGE = {A.FUSED_MERGE}  MERGE_FP32_PER_THREAD = {A.MERGE_FP32_PER_THREAD}")
    print(f"  fused-merge counters: {A.CAPTURE_FALLBACKS} captured calls fell back to captured torch.zeros")
    if skipped:
        print(f"  ({skipped} sweep configs skipped at the {args.budget_s:.0f} s budget{' or after a sticky CUDA error' if broken else ''})")
    if broken:
        print(f"  sweep stopped by a sticky CUDA error: {broken[0]}")
        failures += 1
    print(f"correctness: {'all ok' if not failures else f'{failures} FAILED'}; total {elapsed():.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"checks": checks, "results": results, "broken": broken}, indent=1,
                                             default=str))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
