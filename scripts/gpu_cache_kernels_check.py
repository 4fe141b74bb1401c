"""Device check of engine/cache_kernels.py at the full model shape (bf16, CUDA; < 2 minutes).

    python scripts/gpu_cache_kernels_check.py [--reps 30] [--json OUT.json]

Shape: 36 layers, batch 1, 8 kv heads, head_dim 128, max_len 3136, M-RoPE positions of a streaming
prompt (prefix, 4 views x 4 frames x (6 label + 182 image slots), tail). Caches are poisoned with
random values first, so a stray or missing write shows up as a difference.

1. Correctness of qk_norm_rope_store (one layer) against the eager path (graphs.fused_qk_prep's
   uncompiled function + the three index_puts) and against the compiled fused_qk_prep + index_puts
   the fast path runs today, for
     verify   Q = 8   (32 q heads, contiguous slots)
     action   Q = 64  (16 q heads = the expert, action slots, store_pre_rope=False)
     prefill  Q = 799 (32 q heads, the streaming query slots: newest frame of each view + tail)
   Expected: v and every untouched slot/layer bitwise; vs eager bitwise or <= 1 bf16 ulp on a tiny
   fraction (fp32 summation order of the RMS); vs compiled <= 1 ulp (inductor keeps some bf16
   intermediates in fp32).
2. Correctness of shift_slots (all layers) against graphs.cache_shift for the streaming shift of
   frames 1..3 -> 0..2 of every view (2184 pairs, sources and destinations overlapping), in the
   default temporary mode, per 4 / 1 layers, and in place by shift_waves' 3 waves. Expected bitwise.
3. Timing inside CUDA graphs (median of --reps replays, CUDA events): the 36-layer loop of each store
   shape (baseline = compiled fused_qk_prep + 3 index_puts + the reshape gqa_attention does; Triton =
   qk_norm_rope_store + the same reshape, free on its contiguous q_rot), and the full shift.
The table is printed last; exit status 1 if a correctness check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdrive_ros.engine import cache_kernels as CK  # noqa: E402
from flashdrive_ros.engine import graphs as G  # noqa: E402
from flashdrive_ros.engine.kv_cache import StaticKVCache  # noqa: E402
from flashdrive_ros.engine.rope import extend_positions, rope_index  # noqa: E402
import gpu_timing  # noqa: E402 (scripts/, beside this file)

LAYERS, KV, D, MAX_LEN, EPS = 36, 8, 128, 3136, 1e-6
VIEWS, FRAMES, LABEL, IMG, PREFIX, TAIL = 4, 4, 6, 182, 10, 71
DT = torch.bfloat16
DEV = torch.device("cuda")


# ------------------------------------------------------------------------------------ layout

def layout():
    """Slot ranges: frame_slots[v][f] = (start, end) of image f of view v; tail range."""
    frames, s = [], PREFIX
    for _ in range(VIEWS):
        row = []
        for _ in range(FRAMES):
            s += LABEL
            row.append((s, s + IMG))
            s += IMG
        frames.append(row)
    return frames, (s, s + TAIL)


def positions() -> torch.Tensor:
    frames, tail = layout()
    ids = torch.zeros(tail[1], dtype=torch.long)
    for row in frames:
        for a, b in row:
            ids[a:b] = 7
    grid = torch.tensor([[1, 28, 26]] * (VIEWS * FRAMES))  # 14 x 13 = 182 merged tokens per image
    pos, _ = rope_index(ids, grid, 7, 2)
    return extend_positions(pos, MAX_LEN)


def poisoned_cache(seed: int = 0) -> StaticKVCache:
    c = StaticKVCache(LAYERS, 1, KV, MAX_LEN, D, positions(), 5e6, (24, 20, 20), DT, DEV)
    g = torch.Generator(device=DEV).manual_seed(seed)
    for t in (c.k, c.v, c.k_rot):
        t.copy_(torch.randn(t.shape, generator=g, device=DEV, dtype=torch.float32).to(DT) * 3 + 5)
    return c


def clone_cache(c: StaticKVCache) -> StaticKVCache:
    n = StaticKVCache.__new__(StaticKVCache)
    n.__dict__.update(c.__dict__)
    n.k, n.v, n.k_rot = c.k.clone(), c.v.clone(), c.k_rot.clone()
    return n


def store_shapes():
    frames, tail = layout()
    prefill = torch.cat([torch.arange(*row[-1]) for row in frames] + [torch.arange(*tail)])
    return {
        "verify": (32, torch.arange(tail[1], tail[1] + 8), True),
        "action": (16, torch.arange(MAX_LEN - 64, MAX_LEN), False),
        "prefill": (32, prefill, True),
    }


def shift_pairs():
    frames, _ = layout()
    src = torch.cat([torch.arange(*row[f + 1]) for row in frames for f in range(FRAMES - 1)])
    dst = torch.cat([torch.arange(*row[f]) for row in frames for f in range(FRAMES - 1)])
    return src.to(DEV), dst.to(DEV)


def projection(q_heads: int, n: int, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    qkv = (torch.randn(1, n, (q_heads + 2 * KV) * D, generator=g, device=DEV) * 2).to(DT)
    q, k, v = qkv.split([q_heads * D, KV * D, KV * D], dim=-1)
    qw = (torch.randn(D, generator=g, device=DEV) * 0.2 + 1).to(DT)
    kw = (torch.randn(D, generator=g, device=DEV) * 0.2 + 1).to(DT)
    return q.view(1, n, q_heads, D), k.view(1, n, KV, D), v.view(1, n, KV, D).transpose(1, 2), qw, kw


# -------------------------------------------------------------------------------- comparisons

def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Differing elements, max |diff|, and whether every difference is within one bf16 ulp."""
    diff = a != b
    af, bf = a.float(), b.float()
    return {"n": a.numel(), "differ": int(diff.sum()), "max_abs": float((af - bf).abs().max()) if a.numel() else 0.0,
            "within_1ulp": bool(((af - bf).abs() <= bf.abs() * 2.0 ** -7 + 1e-30).all())}


def eager_store(q, k, v, qw, kw, eps, cos, sin, cache, layer, slots, pre):
    """The uncompiled math of fused_qk_prep + the three writes."""
    qr, kn, kr = G.fused_qk_prep.eager(q, k, qw, kw, eps, cos, sin)
    if pre:
        cache.k[layer, :, :, slots] = kn.to(cache.dtype)
    cache.v[layer, :, :, slots] = v.to(cache.dtype)
    cache.k_rot[layer, :, :, slots] = kr.to(cache.dtype)
    return qr.contiguous()


def check_store(results: dict) -> bool:
    ok = True
    layer = min(5, LAYERS - 1)
    base = poisoned_cache(1)
    for name, (heads, slots, pre) in store_shapes().items():
        slots = slots.to(DEV)
        q, k, v, qw, kw = projection(heads, slots.numel(), seed=heads + slots.numel())
        cos, sin = base.cos[slots].to(DT), base.sin[slots].to(DT)
        caches, outs = {}, {}
        for impl, fn in (("triton", CK.qk_norm_rope_store), ("eager", eager_store),
                         ("compiled", CK.qk_norm_rope_store_reference)):
            c = clone_cache(base)
            outs[impl] = fn(q, k, v, qw, kw, EPS, cos, sin, c, layer, slots, pre)
            caches[impl] = c
        torch.cuda.synchronize()
        t = caches["triton"]
        other = torch.ones(MAX_LEN, dtype=torch.bool, device=DEV)
        other[slots] = False
        untouched = all(torch.equal(getattr(t, n)[torch.arange(LAYERS, device=DEV) != layer],
                                    getattr(base, n)[torch.arange(LAYERS, device=DEV) != layer])
                        and torch.equal(getattr(t, n)[layer][:, :, other], getattr(base, n)[layer][:, :, other])
                        for n in ("k", "v", "k_rot"))
        k_kept = torch.equal(t.k, base.k) if not pre else True
        entry = {"untouched_ok": untouched, "k_kept_when_no_pre_rope": k_kept}
        for ref in ("eager", "compiled"):
            r = caches[ref]
            entry[ref] = {"q_rot": compare(outs["triton"], outs[ref]),
                          "k": compare(t.k[layer][:, :, slots], r.k[layer][:, :, slots]),
                          "v": compare(t.v[layer][:, :, slots], r.v[layer][:, :, slots]),
                          "k_rot": compare(t.k_rot[layer][:, :, slots], r.k_rot[layer][:, :, slots])}
        e = entry["eager"]
        good = (untouched and k_kept and e["v"]["differ"] == 0
                and all(e[x]["within_1ulp"] and e[x]["differ"] <= 1e-3 * e[x]["n"] for x in ("q_rot", "k", "k_rot"))
                and all(entry["compiled"][x]["within_1ulp"] for x in ("q_rot", "k", "v", "k_rot")))
        entry["ok"] = good
        ok &= good
        results["store_check"][name] = entry
        print(f"store {name:8s} Q={slots.numel():4d} H={heads}: ok={good} untouched={untouched} | vs eager "
              + ", ".join(f"{x} {e[x]['differ']}/{e[x]['n']} (max {e[x]['max_abs']:.3g})" for x in e)
              + " | vs compiled " + ", ".join(f"{x} {entry['compiled'][x]['differ']}" for x in entry["compiled"]),
              flush=True)
    return ok


def shift_modes(src, dst):
    s_w, d_w, waves = CK.shift_waves(src, dst)
    return {
        "eager cache_shift": lambda c: G.cache_shift(c, src, dst),
        "triton temp (2 kernels)": lambda c: CK.shift_slots(c, src, dst),
        "triton temp, 4 layers/pass": lambda c: CK.shift_slots(c, src, dst, layers_per_pass=4),
        "triton temp, 1 layer/pass": lambda c: CK.shift_slots(c, src, dst, layers_per_pass=1),
        f"triton waves {waves}": lambda c: CK.shift_slots(c, s_w, d_w, waves=waves),
    }


def check_shift(results: dict) -> bool:
    ok = True
    src, dst = shift_pairs()
    base = poisoned_cache(2)
    ref = clone_cache(base)
    G.cache_shift(ref, src, dst)
    for name, fn in shift_modes(src, dst).items():
        if name.startswith("eager"):
            continue
        c = clone_cache(base)
        fn(c)
        torch.cuda.synchronize()
        same = {n: int((getattr(c, n) != getattr(ref, n)).sum()) for n in ("k", "v", "k_rot")}
        good = not any(same.values())
        ok &= good
        results["shift_check"][name] = {"differ": same, "ok": good}
        print(f"shift {name}: ok={good} differing elements {same}", flush=True)
        del c
    return ok


# ------------------------------------------------------------------------------------- timing

def capture(fn):
    """fn captured in a CUDA graph after two side-stream runs (compiles and lazy init stay out of it)."""
    return gpu_timing.capture(fn, warm=2)[0]


def time_graph(g, reps: int) -> float:
    return gpu_timing.replay_ms(g, reps)


def time_store(rows: list, reps: int) -> None:
    cache = poisoned_cache(3)
    for name, (heads, slots, pre) in store_shapes().items():
        slots = slots.to(DEV)
        n = slots.numel()
        q, k, v, qw, kw = projection(heads, n, seed=1)
        cos, sin = cache.cos[slots].to(DT), cache.sin[slots].to(DT)
        g_ = heads // KV

        def baseline():  # attend() today: compiled fused_qk_prep, three index_puts, gqa_attention's reshape
            for i in range(LAYERS):
                qr, kn, kr = G.fused_qk_prep(q, k, qw, kw, EPS, cos, sin)
                if pre:
                    cache.k[i, :, :, slots] = kn.to(cache.dtype)
                cache.v[i, :, :, slots] = v.to(cache.dtype)
                cache.k_rot[i, :, :, slots] = kr.to(cache.dtype)
                qr.reshape(1, KV, g_ * n, D)

        def fused():
            for i in range(LAYERS):
                CK.qk_norm_rope_store(q, k, v, qw, kw, EPS, cos, sin, cache, i, slots, pre).reshape(1, KV, g_ * n, D)

        t_base = time_graph(capture(baseline), reps)
        t_tri = time_graph(capture(fused), reps)
        moved = n * ((heads + 2 * KV) * D * 2 + heads * D * 2 + (3 if pre else 2) * KV * D * 2)  # bytes/layer
        rows.append({"op": f"store {name}", "shape": f"Q={n} H={heads} x36 layers{'' if pre else ', no pre-RoPE k'}",
                     "baseline_ms": t_base, "triton_ms": t_tri, "per_layer": True,
                     "triton_GBps": moved * LAYERS / (t_tri * 1e-3) / 1e9})
        print(f"timed store {name}", flush=True)
    del cache


def time_shift(rows: list, reps: int) -> None:
    src, dst = shift_pairs()
    cache = poisoned_cache(4)
    n = src.numel()
    useful = 5 * LAYERS * KV * n * D * 2  # read k, v at src; write k, v, k_rot at dst
    base_ms = None
    for name, fn in shift_modes(src, dst).items():
        t = time_graph(capture(lambda: fn(cache)), reps)
        base_ms = t if base_ms is None else base_ms
        rows.append({"op": f"shift: {name}", "shape": f"{n} slots x36 layers", "baseline_ms": base_ms,
                     "triton_ms": t, "per_layer": False, "triton_GBps": useful / (t * 1e-3) / 1e9})
        torch.cuda.empty_cache()
    del cache


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not CK.available(torch.empty(1, device="cuda")):
        print("needs CUDA and triton")
        return 2
    t0 = time.time()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    results = {"store_check": {}, "shift_check": {}, "timing": []}
    ok = check_store(results)
    ok &= check_shift(results)
    time_store(results["timing"], args.reps)
    time_shift(results["timing"], args.reps)
    results["ok"] = bool(ok)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\ncorrectness: {'OK' if ok else 'FAILED'}   ({time.time() - t0:.0f} s)")
    print(f"{'op':40s} {'shape':36s} {'baseline ms':>11s} {'triton ms':>9s} {'speedup':>7s} {'GB/s':>6s} "
          f"{'us/layer base -> triton':>24s}")
    for r in results["timing"]:
        per = (f"{r['baseline_ms'] * 1e3 / LAYERS:10.1f} -> {r['triton_ms'] * 1e3 / LAYERS:6.1f}"
               if r["per_layer"] else "")
        print(f"{r['op']:40s} {r['shape']:36s} {r['baseline_ms']:11.3f} {r['triton_ms']:9.3f} "
              f"{r['baseline_ms'] / r['triton_ms']:6.2f}x {r['triton_GBps']:6.0f} {per:>24s}")
    print("store rows: the 36-layer loop of one stage evaluation (action runs it 4x per step); baseline = "
          "compiled fused_qk_prep + 3 index_puts (+ the q reshape copy gqa_attention makes); shift baseline = "
          "graphs.cache_shift; GB/s counts the bytes that must move.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
