"""Is the bf16 fast path's difference from the eager path only bf16 rounding? A float32 reference on the GPU.

    python scripts/gpu_fp32_reference.py [--shape full4] [--out DIR]

At the full widths with 4 layers per tower (shape "full4": every kernel sees the real shapes), one set
of random weights runs encode -> full prefill -> one expert pass four ways: eager float32 (the
reference; TF32 off), fast float32, eager bf16 and fast bf16 (fused GEMMs, torch.compile'd chains,
Triton kernels). If the fast path computes the same function, fast float32 lands near float32
rounding of the reference and fast bf16 is as far from the reference as eager bf16 is.
"""
import argparse
import json
from pathlib import Path

import torch

from flashdrive_ros.bench.ours import OursPipeline
from flashdrive_ros.bench.shapes import get_shape
from flashdrive_ros.engine import graphs as G


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="full4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    shape = get_shape(args.shape)
    p32 = OursPipeline(shape, dev, torch.float32)
    state = {k: v.to(torch.bfloat16) for k, v in p32.model.state_dict().items()}
    ref = p32.stage_outputs(fast=False)
    f32 = p32.stage_outputs(fast=True)
    del p32
    torch.cuda.empty_cache()
    p16 = OursPipeline(shape, dev, torch.bfloat16)
    p16.model.load_state_dict(state)
    e16 = p16.stage_outputs(fast=False)
    f16 = p16.stage_outputs(fast=True)
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": args.shape,
           "kernels": G.kernels_usable(f16["prefill"]), "rows": {}}
    for name, outs in (("fast float32", f32), ("eager bf16", e16), ("fast bf16", f16)):
        res["rows"][name] = {k: rel(outs[k], ref[k]) for k in ref}
    res["rows"]["fast bf16 vs eager bf16"] = {k: rel(f16[k], e16[k]) for k in ref}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fp32_reference.json").write_text(json.dumps(res, indent=1))
    print(f"shape {args.shape} on {res['gpu']}, Triton kernels {'on' if res['kernels'] else 'off'}; "
          "relative L2 difference against eager float32 (TF32 off):")
    print(f"| {'path':<26} | encode | prefill | action |")
    print("|---|---:|---:|---:|")
    for name, r in res["rows"].items():
        print(f"| {name:<26} | {r['encode']:.1e} | {r['prefill']:.1e} | {r['action']:.1e} |")


if __name__ == "__main__":
    main()
