"""Device check of engine/vision_attention_kernel.py against cuDNN at the vision tower's shape (issue 7).

    python scripts/gpu_vision_attention_check.py [--out results.json] [--best best.txt] [--images 4 --seq 720
                                                  --heads 16 --head-dim 72]

The tower's attention as graphs._vision_attention runs it: q and k contiguous [N, H, D] (the rotary's
output), v the strided slice of the qkv GEMM's [N, 3, H, D] output. Timed as CUDA graphs of 27 back-to-back
calls (one per layer) over 3 rotating input copies, median of replays:
- "sdpa": F.scaled_dot_product_attention per image (cuDNN's flash attention on an H100), output transposed to [N, H * D];
- every kernel Config of the sweep below (its output written straight as [N, H * D]).
Each is checked against a float32 reference first (max |error|; SDPA's own error printed beside it).
--best writes the fastest correct config as "BMxBNxWxS" (block_m, block_n, num_warps, num_stages; gpu_ab.py's
variant vision_attention_kernel=... takes that string).
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashdrive_ros.engine import vision_attention_kernel as vak  # noqa: E402
from gpu_timing import graph_ms, warm_up  # noqa: E402 (scripts/, beside this file)

LAYERS, COPIES = 27, 3


def sweep() -> list[vak.Config]:
    configs = [vak.Config(bm, bn, w, s) for bm, bn, w, s in itertools.product((128, 64), (64, 128, 32), (8, 4), (2, 3, 4))]
    return [c for c in configs if not (c.block_m == 128 and c.num_warps == 4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--best")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--seq", type=int, default=720)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    n, h, d = args.images * args.seq, args.heads, args.head_dim
    scale = d ** -0.5
    inputs = []
    for _ in range(COPIES):
        qkv = torch.randn(n, 3, h, d, device="cuda", dtype=torch.bfloat16)
        inputs.append((qkv[:, 0].contiguous(), qkv[:, 1].contiguous(), qkv[:, 2]))
    q, k, v = inputs[0]
    ref = vak.vision_attention_reference(q.float(), k.float(), v.float(), args.images, scale)
    flops = 4.0 * args.images * h * args.seq * args.seq * d
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.images} images x {args.seq} patches, "
          f"{h} heads, head dim {d}; {flops / 1e9:.2f} GFLOP per call", flush=True)

    def timed(call):
        warm_up(lambda: [call(i) for i in range(COPIES)])
        return 1000.0 * graph_ms(lambda: [call(i % COPIES) for i in range(LAYERS)], args.replays) / LAYERS

    def sdpa(i):
        return vak.vision_attention_reference(*inputs[i], args.images, scale)

    sdpa_err = (sdpa(0).float() - ref).abs().max().item()
    sdpa_us = timed(sdpa)
    rows = [{"impl": "sdpa", "us": round(sdpa_us, 2), "max_err": sdpa_err}]
    print(f"sdpa (cuDNN)                      {sdpa_us:7.2f} us  {flops / sdpa_us / 1e6:6.1f} TFLOP/s  err {sdpa_err:.2e}",
          flush=True)
    outs = [torch.empty(n, h * d, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
    for cfg in sweep():
        name = f"bm{cfg.block_m} bn{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
        try:
            outs[0].fill_(float("nan"))
            got = vak.vision_attention(q, k, v, args.images, scale, config=cfg, out=outs[0])
            torch.cuda.synchronize()
            err = (got.float() - ref).abs().max().item()
            if not err <= 2 * sdpa_err + 1e-2:
                rows.append({"impl": name, "error": f"wrong output: max err {err:.3e}"})
                print(f"{name:33s} wrong output (max err {err:.3e})", flush=True)
                continue
            us = timed(lambda i, cfg=cfg: vak.vision_attention(*inputs[i], args.images, scale, config=cfg, out=outs[i]))
        except Exception as e:  # a config that does not compile (shared memory) must not stop the sweep
            rows.append({"impl": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(f"{name:33s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        rows.append({"impl": name, "config": [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages],
                     "us": round(us, 2), "max_err": err})
        print(f"{name:33s} {us:7.2f} us  {flops / us / 1e6:6.1f} TFLOP/s  err {err:.2e}  x{sdpa_us / us:.2f} vs sdpa",
              flush=True)
    kernel_rows = sorted((r for r in rows if "config" in r), key=lambda r: r["us"])
    if kernel_rows:
        best = kernel_rows[0]
        print(f"\nfastest kernel config {best['impl']}: {best['us']:.2f} us against sdpa {sdpa_us:.2f} us "
              f"({LAYERS} layers: {LAYERS * (sdpa_us - best['us']) / 1000:+.3f} ms saved per encode)")
        if args.best:
            Path(args.best).write_text("x".join(str(x) for x in best["config"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "shape": vars(args), "gflop": flops / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
