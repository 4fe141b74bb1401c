"""Device probe: alternatives to cuBLAS's pick for the compute-bound GEMMs (prefill at 799 rows, vision tower
at 2880 patches, the mergers at 720 tokens), bf16.

    python scripts/gpu_gemm_probe.py [--out probe.json]

Why: the streaming prefill and the encode are compute bound, and cuBLAS's heuristic picks for some of their
shapes leave SMs idle (the H200 profile: prefill o_proj [799 x 4096 x 4096] on 100 thread blocks of
192 x 208 at ~510 TFLOP/s while gate|up runs at ~780). Per shape, each alternative is timed as a CUDA graph
of CALLS back-to-back calls (median replay / CALLS):
  cublaslt   F.linear (torch's default BLAS backend choice; bias fused in the epilogue)
  cublas     the same under torch.backends.cuda.preferred_blas_library("cublas")
  swapped    the transposed problem, y^T = W x^T (torch.addmm into [N, M]; the caller would read a
             transposed view): other tile heuristics for the same math
  triton     a plain tiled Triton GEMM (grouped launch order), a few tile configs
Correctness of every alternative against F.linear in fp32 is printed with it (rel. L2).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gpu_timing import graph_ms, warm_up  # noqa: E402 (scripts/, beside this file)

CALLS = 10
SHAPES = [  # (name, M, N, K, bias)
    ("prefill q|k|v", 799, 6144, 4096, False),
    ("prefill o", 799, 4096, 4096, False),
    ("prefill gate|up", 799, 24576, 4096, False),
    ("prefill down", 799, 4096, 12288, False),
    ("vision q|k|v", 2880, 3456, 1152, True),
    ("vision proj", 2880, 1152, 1152, True),
    ("vision fc1", 2880, 4304, 1152, True),
    ("vision fc2", 2880, 1152, 4304, True),
    ("merger fc1", 720, 4608, 4608, True),
    ("merger fc2", 720, 4096, 4608, True),
]
TRITON_TILES = [  # (BM, BN, BK, warps, stages)
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
]


@triton.jit
def _tiled_gemm(X, W, B, Y, M, N, K, sxm, swn, sym, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr):
    """Y[M, N] = X[M, K] W[N, K]^T (+ B): one BM x BN tile per program, GROUP_M row tiles launched
    together so that their W columns are shared in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    rows = offs_m % M  # wrapped rows load valid memory; their results are never stored
    cols = offs_n % N
    x_ptrs = X + rows[:, None] * sxm + offs_k[None, :]
    w_ptrs = W + cols[:, None] * swn + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BK
        w_ptrs += BK
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * sym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def triton_linear(x, w, b, tile):
    bm, bn, bk, warps, stages = tile
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _tiled_gemm[grid](x, w, b if b is not None else y, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                      BM=bm, BN=bn, BK=bk, GROUP_M=8, HAS_BIAS=b is not None, EVEN_K=k % bk == 0,
                      num_warps=warps, num_stages=stages)
    return y


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "calls_per_graph": CALLS, "shapes": []}
    default_blas = torch.backends.cuda.preferred_blas_library()
    for name, m, n, k, has_bias in SHAPES:
        x = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
        b = torch.randn(n, device=dev, dtype=dt) if has_bias else None
        ref = F.linear(x.float(), w.float(), b.float() if b is not None else None)
        flop = 2.0 * m * n * k
        row = {"name": name, "m": m, "n": n, "k": k, "bias": has_bias, "us": {}, "err": {}}

        def timed(label, fn):
            try:
                warm_up(fn, 2)
                row["err"][label] = rel_l2(fn(), ref) if label != "swapped" else rel_l2(fn().t(), ref)
                row["us"][label] = 1000.0 * graph_ms(lambda: [fn() for _ in range(CALLS)]) / CALLS
            except Exception as e:  # a config that does not compile / fit: recorded, not fatal
                row["us"][label] = None
                row["err"][label] = f"{type(e).__name__}: {str(e)[:120]}"

        timed("cublaslt", lambda: F.linear(x, w, b))
        torch.backends.cuda.preferred_blas_library("cublas")
        timed("cublas", lambda: F.linear(x, w, b))
        torch.backends.cuda.preferred_blas_library(default_blas)
        bcol = b[:, None] if b is not None else None
        timed("swapped", lambda: torch.addmm(bcol, w, x.t()) if bcol is not None else torch.mm(w, x.t()))
        for tile in TRITON_TILES:
            timed("triton " + "x".join(map(str, tile)), lambda tile=tile: triton_linear(x, w, b, tile))
        base = row["us"]["cublaslt"]
        best = min((u, lbl) for lbl, u in row["us"].items() if u is not None)
        row["best"] = best[1]
        print(f"{name:16s} M{m} N{n} K{k}: default {base:7.1f} us ({flop / base / 1e6:5.0f} TFLOP/s); best "
              f"{best[1]} {best[0]:7.1f} us ({flop / best[0] / 1e6:5.0f} TFLOP/s)", flush=True)
        for lbl, u in row["us"].items():
            print(f"    {lbl:28s} {u if u is None else round(u, 1)!s:>8} us  err {row['err'][lbl]}", flush=True)
        results["shapes"].append(row)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wall {results['wall_s']} s")


if __name__ == "__main__":
    main()
