"""Probe (issue 7, session 11): would one persistent kernel per pass stream the LM's weights faster than
the chain of per-GEMM kernels the verify pass runs today?

    python scripts/gpu_persistent_chain_probe.py [--layers 36] [--rows 8] [--out probe.json]

Only the GEMMs of a verify layer, at the full shape (hidden 4096, q|k|v 6144, gate|up 2 x 12288, bf16),
residuals, norms and attention left out on every side:
    x [rows, 4096] -> q|k|v [6144] -> its first 4096 columns stand in for the attention output -> o [4096]
      -> gate|up [24576] -> SwiGLU -> down [4096] -> the next layer's x
chain     the engine's own dispatch (graphs.linear / graphs.gate_up_swiglu: on the H100 the shipped records
          put all four GEMMs on the Triton skinny GEMM, with PDL between them), one CUDA graph.
cublas    the same chain through F.linear and fused_swiglu.
persist   one launch for all layers: a grid of one program per SM, each GEMM cut in column tiles dealt
          round robin (tile widths chosen so the tiles fill the grid evenly), a grid barrier (an atomic
          counter: release on arrival, acquire on leaving) between consecutive GEMMs. xN: N programs per SM.
persist+  the same, each program hinting the first K chunk of its next tile into L2 (prefetch.global.L2)
          before it waits at the barrier, so the next GEMM's first weight bytes are on chip when it starts.
Also one GEMM reading the same bytes as a layer (M=rows, N=47104, K=4096, F.linear): the bandwidth a
single long kernel reaches. Prints us per layer and TB/s of weight bytes; checks the persistent outputs
against the chain's (rel. L2 after the last layer). The persistent kernel needs all programs resident at
once: the grid is the SM count and nothing else runs beside it (no PDL into it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from flashdrive_ros.engine import graphs as G  # noqa: E402
from flashdrive_ros.engine.attention_kernel import _prefetch_l2  # noqa: E402 (the engine's L2 hint)
from gpu_timing import capture, replay_ms  # noqa: E402 (scripts/, beside this file)

D, NQKV, FF = 4096, 6144, 12288


@triton.jit
def _grid_barrier(COUNTER, target):
    """Every program arrives (release: its stores before are visible to whoever acquires after), then
    spins until all have: the counter only grows, barrier b of a launch waits for b * grid arrivals."""
    tl.debug_barrier()  # all threads' stores of this program precede the arrival
    tl.atomic_add(COUNTER, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(COUNTER, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(COUNTER, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _hint_first_chunk(W, N, K, pid, TN: tl.constexpr, PF_K: tl.constexpr):
    """L2 hints for the first PF_K columns of the K axis of this program's first tile of W [N, K]."""
    rows_w = pid * TN + tl.arange(0, TN)
    lines = tl.arange(0, PF_K * 2 // 128) * (128 // 2)
    ok = (rows_w < N)[:, None] & (lines < K)[None, :]
    _prefetch_l2(tl.where(ok, W + rows_w[:, None] * K + lines[None, :], W))


@triton.jit
def _gemm_phase(X, x_stride, W, Y, y_stride, N, K, pid, grid, ROWS: tl.constexpr, M_PAD: tl.constexpr,
                TN: tl.constexpr, BK: tl.constexpr, SWIGLU: tl.constexpr, KH, UPCAST: tl.constexpr,
                FLAT: tl.constexpr, W_DESC, w_row0, TMA: tl.constexpr):
    """Y[:ROWS, :N] = A @ W.T with A = X[:ROWS, :K] (SWIGLU: silu(X[:, :K]) * X[:, KH:KH+K]); the N axis in
    TN-wide tiles, tile t done by program t % grid, whole K each (no split, no atomics). TMA: W's tiles
    through W_DESC (all layers stacked as [layers * N, K]; this layer's rows start at w_row0)."""
    rows = tl.arange(0, M_PAD)
    row_ok = (rows < ROWS)[:, None]
    for t in tl.range(pid, N // TN, grid, flatten=FLAT):  # FLAT: one software pipeline over all tiles' K
        cols = t * TN + tl.arange(0, TN)
        acc = tl.zeros([M_PAD, TN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            if SWIGLU:
                g = tl.load(X + rows[:, None] * x_stride + ks[None, :], mask=row_ok, other=0.0).to(tl.float32)
                u = tl.load(X + rows[:, None] * x_stride + KH + ks[None, :], mask=row_ok, other=0.0).to(tl.float32)
                a = (g * tl.sigmoid(g) * u).to(tl.bfloat16)
            else:
                a = tl.load(X + rows[:, None] * x_stride + ks[None, :], mask=row_ok, other=0.0)
            if TMA:  # bulk copy of the [TN, BK] tile into shared memory (multi-buffered by the pipeliner)
                w = W_DESC.load([w_row0 + t * TN, k0])
            else:
                w = tl.load(W + cols[:, None] * K + ks[None, :])
            if UPCAST:  # Triton's interpreter (the CPU check) gets tl.dot wrong on bf16 inputs
                acc += tl.dot(a.to(tl.float32), tl.trans(w).to(tl.float32))
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        tl.store(Y + rows[:, None] * y_stride + cols[None, :], acc.to(tl.bfloat16), mask=row_ok)


@triton.jit
def _chain_kernel(X0, W1, W2, W3, W4, B1, B2, B3, B4, COUNTER, n_layers, grid, D1, D2, D3, D4,
                  ROWS: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, NQKV: tl.constexpr, FF: tl.constexpr,
                  TN1: tl.constexpr, TN2: tl.constexpr, TN3: tl.constexpr, TN4: tl.constexpr, BK: tl.constexpr,
                  PREFETCH: tl.constexpr, PF_K: tl.constexpr, UPCAST: tl.constexpr = False,
                  FLAT: tl.constexpr = False, GEMMS: tl.constexpr = True, TMA: tl.constexpr = False):
    pid = tl.program_id(0)
    barriers = 0
    for layer in range(n_layers):
        lay = tl.cast(layer, tl.int64)  # 36 layers of gate|up are 3.6 G elements: past int32 offsets
        w1 = W1 + lay * NQKV * D
        w2 = W2 + lay * D * D
        w3 = W3 + lay * 2 * FF * D
        w4 = W4 + lay * D * FF
        if not GEMMS:
            pass
        elif layer == 0:
            _gemm_phase(X0, D, w1, B1, NQKV, NQKV, D, pid, grid, ROWS, M_PAD, TN1, BK, False, 0, UPCAST, FLAT,
                        D1, layer * NQKV, TMA)
        else:
            _gemm_phase(B4, D, w1, B1, NQKV, NQKV, D, pid, grid, ROWS, M_PAD, TN1, BK, False, 0, UPCAST, FLAT,
                        D1, layer * NQKV, TMA)
        if PREFETCH:
            _hint_first_chunk(w2, D, D, pid, TN2, PF_K)
        barriers += 1
        _grid_barrier(COUNTER, barriers * grid)
        if GEMMS:
            _gemm_phase(B1, NQKV, w2, B2, D, D, D, pid, grid, ROWS, M_PAD, TN2, BK, False, 0, UPCAST, FLAT,
                        D2, layer * D, TMA)
        if PREFETCH:
            _hint_first_chunk(w3, 2 * FF, D, pid, TN3, PF_K)
        barriers += 1
        _grid_barrier(COUNTER, barriers * grid)
        if GEMMS:
            _gemm_phase(B2, D, w3, B3, 2 * FF, 2 * FF, D, pid, grid, ROWS, M_PAD, TN3, BK, False, 0, UPCAST, FLAT,
                        D3, layer * 2 * FF, TMA)
        if PREFETCH:
            _hint_first_chunk(w4, D, FF, pid, TN4, PF_K)
        barriers += 1
        _grid_barrier(COUNTER, barriers * grid)
        if GEMMS:
            _gemm_phase(B3, 2 * FF, w4, B4, D, D, FF, pid, grid, ROWS, M_PAD, TN4, BK, True, FF, UPCAST, FLAT,
                        D4, layer * D, TMA)
        if PREFETCH:
            if layer + 1 < n_layers:
                _hint_first_chunk(W1 + (lay + 1) * NQKV * D, NQKV, D, pid, TN1, PF_K)
        barriers += 1
        _grid_barrier(COUNTER, barriers * grid)


def tile_width(n: int, grid: int) -> int:
    """The column tile (16..128) whose tile count fills the grid most evenly (ties: the wider tile)."""
    best = None
    for tn in (128, 64, 32, 16):
        if n % tn:
            continue
        tiles = n // tn
        rounds = -(-tiles // grid)
        eff = tiles / (rounds * grid)
        if best is None or eff > best[0] + 1e-9:
            best = (eff, tn)
    return best[1]


def persistent_chain(x, w1, w2, w3, w4, bufs, counter, grid, prefetch, bk=256, warps=4, stages=4, pf_k=512,
                     upcast=False, flat=False, gemms=True, tma=False):
    rows = x.shape[0]
    b1, b2, b3, b4 = bufs
    tns = (tile_width(NQKV, grid), tile_width(D, grid), tile_width(2 * FF, grid), tile_width(D, grid))
    descs = [TensorDescriptor.from_tensor(w.reshape(-1, w.shape[-1]), [tn, bk]) if tma else w
             for w, tn in zip((w1, w2, w3, w4), tns)]
    args = (x, w1, w2, w3, w4, b1, b2, b3, b4, counter, w1.shape[0], grid, *descs)
    options = dict(ROWS=rows, M_PAD=max(16, triton.next_power_of_2(rows)), D=D, NQKV=NQKV, FF=FF,
                   TN1=tns[0], TN2=tns[1], TN3=tns[2], TN4=tns[3], BK=bk, PREFETCH=prefetch, PF_K=pf_k,
                   UPCAST=upcast, FLAT=flat, GEMMS=gemms, TMA=tma, num_warps=warps, num_stages=stages)
    if x.is_cuda:  # the grid barrier hangs unless every program is resident at once: check before launching
        k = _chain_kernel.warmup(*args, grid=(grid,), **options)
        k._init_handles()
        fit = resident_per_sm(k.n_regs, k.metadata.shared, warps, x.device)
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        if fit * sms < grid:
            raise RuntimeError(f"{grid} programs cannot all be resident ({fit} per SM: {k.n_regs} registers, "
                               f"{k.metadata.shared} B shared): the barrier would hang")
    counter.zero_()
    _chain_kernel[(grid,)](*args, **options)
    return b4


def resident_per_sm(regs: int, shared: int, warps: int, device) -> int:
    """Programs of this kernel one SM holds at once (registers allocated per warp in units of 256,
    shared memory, threads), as the occupancy calculator counts them."""
    p = torch.cuda.get_device_properties(device)
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = getattr(p, "regs_per_multiprocessor", 65536) // (per_warp * warps)
    by_shared = getattr(p, "shared_memory_per_multiprocessor", 233472) // (shared + 1024)  # + 1 KB the runtime reserves
    by_threads = getattr(p, "max_threads_per_multi_processor", 2048) // (32 * warps)
    return min(by_regs, by_shared, by_threads)


def kernel_chain(x, w1, w2, w3, w4, linear, swiglu_gemm):
    for i in range(w1.shape[0]):
        a = linear(x, w1[i])[:, :D]
        h = linear(a, w2[i])
        x = linear(swiglu_gemm(h, w3[i]), w4[i])
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    n, r = args.layers, args.rows
    bf = torch.bfloat16

    def weights(*shape):  # scaled so activations stay O(1) through the layers
        return (torch.randn(*shape, device=dev, dtype=torch.float32) / shape[-1] ** 0.5).to(bf)

    w1, w2, w3, w4 = weights(n, NQKV, D), weights(n, D, D), weights(n, 2 * FF, D), weights(n, D, FF)
    w1 *= 2.0  # (keeps the SwiGLU's input from shrinking layer over layer)
    x = torch.randn(r, D, device=dev, dtype=bf)
    layer_bytes = 2 * (NQKV * D + D * D + 2 * FF * D + D * FF)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bufs = [torch.empty(r, m, device=dev, dtype=bf) for m in (NQKV, D, 2 * FF, D)]
    counter = torch.zeros(1, device=dev, dtype=torch.int32)
    results = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
               "layers": n, "rows": r, "layer_MB": layer_bytes / 1e6, "sms": sms,
               "tiles": {"qkv": tile_width(NQKV, sms), "o": tile_width(D, sms), "gate_up": tile_width(2 * FF, sms),
                         "down": tile_width(D, sms)}, "rows_out": []}

    def swiglu_cublas(h, w):
        return G.fused_swiglu(F.linear(h, w))

    # correctness on one layer (bf16 rounding differences grow through the SwiGLU layer over layer, so the
    # all-layer difference is printed but only the one-layer one is a check)
    ref1 = kernel_chain(x, w1[:1], w2[:1], w3[:1], w4[:1], G.linear, G.gate_up_swiglu).float()
    ref = kernel_chain(x, w1, w2, w3, w4, G.linear, G.gate_up_swiglu).float()
    variants = {
        "chain (engine kernels, PDL)": lambda: kernel_chain(x, w1, w2, w3, w4, G.linear, G.gate_up_swiglu),
        "cublas chain": lambda: kernel_chain(x, w1, w2, w3, w4, F.linear, swiglu_cublas),
    }
    # Run 1 (docs/bench/persistent_chain_h100_session11_run1.json): one program per SM, bk 128-512, 4-8 warps,
    # with and without the L2 hints: 0.98-1.81 TB/s. Triton does not multi-buffer these weight loads (the
    # M = 16 dot; attention_compile_sm90-style compiles show no async copies), so a program has one tile
    # load in flight: run 2 puts several programs on each SM (all resident: ~12 KB of shared memory each).
    # Run 2 (..._run2.json): 2-3 programs per SM did not help (0.97-1.46 TB/s); a grid barrier costs ~1.1 us.
    # Run 3: the weight tiles through TMA (bulk copies the pipeliner multi-buffers), 1-2 programs per SM.
    for per_sm in (1, 2):
        for bk, warps, stages in ((128, 4, 4), (128, 4, 6), (256, 4, 4)):
            for pf in (False, True):
                name = f"persist{'+' if pf else ''} bk{bk} w{warps} st{stages} x{per_sm} tma"
                variants[name] = (lambda bk=bk, w=warps, st=stages, pf=pf, n=per_sm:
                                  persistent_chain(x, w1, w2, w3, w4, bufs, counter, n * sms, pf, bk, w, st, tma=True))
    for per_sm in (1, 2):
        variants[f"barriers only (4 per layer) x{per_sm}"] = (
            lambda n=per_sm: persistent_chain(x, w1, w2, w3, w4, bufs, counter, n * sms, False, gemms=False))
    big = weights(layer_bytes // (2 * D), D)
    for name, fn in variants.items():
        try:
            out = fn().float()
            torch.cuda.synchronize()
            err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            err1 = None
            if name.startswith("persist"):
                _, bk, w, st, per_sm, *tma = name.split()
                out1 = persistent_chain(x, w1[:1], w2[:1], w3[:1], w4[:1], bufs, counter, int(per_sm[1:]) * sms,
                                        "+" in name, int(bk[2:]), int(w[1:]), int(st[2:]), tma=bool(tma)).float()
                err1 = float((out1 - ref1).norm() / ref1.norm())
            g, _ = capture(fn)
            ms = replay_ms(g, args.replays)
            del g
        except Exception as e:  # a config the compiler or the GPU rejects
            print(f"{name:<36} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
            results["rows_out"].append({"impl": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        us = ms * 1e3 / n
        row = {"impl": name, "us_per_layer": us, "TBps": layer_bytes / us / 1e6, "rel_l2_vs_chain": err,
               "rel_l2_one_layer": err1, "ok": err1 is None or err1 < 5e-2}
        results["rows_out"].append(row)
        check = "" if err1 is None else f"  one layer {err1:.1e} {'ok' if row['ok'] else 'WRONG'}"
        print(f"{name:<36} {us:8.1f} us/layer  {row['TBps']:5.2f} TB/s  rel L2 vs chain {err:.1e}{check}", flush=True)
    g, _ = capture(lambda: F.linear(x, big))
    us = replay_ms(g, args.replays) * 1e3
    results["one_gemm_layer_bytes"] = {"us": us, "TBps": layer_bytes / us / 1e6}
    print(f"{'one GEMM of a layer bytes (cuBLAS)':<36} {us:8.1f} us        {layer_bytes / us / 1e6:5.2f} TB/s")
    print(f"{'3.0 TB/s floor':<36} {layer_bytes / 3e6:8.1f} us/layer")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
