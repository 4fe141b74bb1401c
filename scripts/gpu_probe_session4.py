"""Device probes (issue 7, session 4).

    python scripts/gpu_probe_session4.py [--out probe.json] [--only pdl|ln]

pdl: does programmatic dependent launch (PDL) pay for the few-row kernels?

36 synthetic layers at the real attention shapes (verify: R = 32 folded rows; action: R = 128; decode: R = 4;
8 KV heads of 128 over a 3 136-slot cache, 3 057 keys seen), each layer = a stand-in producer of q (an
in-place scale, like the store kernel that precedes attention in the model) + slot_attention (attention
kernel + split merge). The 36 layers are one CUDA graph; its replay is timed with attention_kernel.PDL off
and on, and the outputs of both are compared (they must be equal: PDL changes only when kernels start).

ln: the vision tower's residual add + LayerNorm ([2 880, 1 152] bf16, 53 per encode): the compiled chain
against norm_kernels.add_layer_norm, each as a CUDA graph of 53 calls on rotating inputs, and both against
eager F.layer_norm (elements that differ, max |difference|). Exit status 1 if the kernel's sum is not bitwise
x + a or its norm is further from eager than one bf16 rounding.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashdrive_ros.engine import attention_kernel as A  # noqa: E402
from gpu_timing import graph_ms, warm_up  # noqa: E402 (scripts/, beside this file)

DEV = "cuda"
BF16 = torch.bfloat16
LAYERS, KV, D, SLOTS, SEEN = 36, 8, 128, 3136, 3057


def chain(rows: int, n_q: int):
    ks = [torch.randn(1, KV, SLOTS, D, device=DEV, dtype=BF16) for _ in range(2)]
    vs = [torch.randn(1, KV, SLOTS, D, device=DEV, dtype=BF16) for _ in range(2)]
    q = torch.randn(1, KV, rows, D, device=DEV, dtype=BF16)
    limit = torch.full((n_q,), SEEN, dtype=torch.int32, device=DEV)

    def run():
        outs = []
        for i in range(LAYERS):
            q.mul_(1.0)  # the producer of q right before attention
            outs.append(A.slot_attention(q, ks[i % 2], vs[i % 2], limit))
        return outs[-1]
    return run


def probe_layer_norm(res: dict) -> bool:
    from flashdrive_ros.engine import graphs as G
    from flashdrive_ros.engine import norm_kernels as NK

    rows, h, calls = 2880, 1152, 53
    g = torch.Generator(device=DEV).manual_seed(0)
    xs = [torch.randn(rows, h, device=DEV, dtype=BF16, generator=g) * 4 for _ in range(4)]
    a_s = [torch.randn(rows, h, device=DEV, dtype=BF16, generator=g) for _ in range(4)]
    w = (torch.randn(h, device=DEV, generator=g) * 0.2 + 1).to(BF16)
    b = (torch.randn(h, device=DEV, generator=g) * 0.1).to(BF16)
    eager_sum, eager = NK.add_layer_norm_reference(xs[0], a_s[0], w, b, 1e-6)
    out = {}
    ok = True
    for name, fn in (("compiled", G._compiled_add_layer_norm), ("triton", NK.add_layer_norm)):
        ys, hs = fn(xs[0], a_s[0], w, b, 1e-6)
        diff = hs != eager
        out[name] = {"sum_equal": bool(torch.equal(ys, eager_sum)), "norm_differing": int(diff.sum()),
                     "norm_max_abs_diff": float((hs.float() - eager.float()).abs().max())}
        warm_up(lambda: fn(xs[0], a_s[0], w, b, 1e-6), 2)
        ms = graph_ms(lambda: [fn(xs[i % 4], a_s[i % 4], w, b, 1e-6) for i in range(calls)], replays=30)
        out[name]["us_per_call"] = round(1000 * ms / calls, 2)
        print(f"add+LayerNorm {name:8s}: {out[name]['us_per_call']:6.2f} us per call; sum bitwise x + a: "
              f"{out[name]['sum_equal']}; norm vs eager: {out[name]['norm_differing']} of {eager.numel()} differ, "
              f"max |diff| {out[name]['norm_max_abs_diff']:.3g}", flush=True)
    t = out["triton"]
    ulp = float(eager.float().abs().max()) * torch.finfo(BF16).eps
    ok = t["sum_equal"] and t["norm_max_abs_diff"] <= ulp
    res["layer_norm"] = out
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", choices=("pdl", "ln"), default=None)
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": LAYERS, "pdl": {}}
    ok = True
    if args.only in (None, "ln"):
        ok = probe_layer_norm(res)
    shapes = (("decode", 4, 1), ("verify", 32, 8), ("action", 128, 64))
    for name, rows, n_q in (() if args.only == "ln" else shapes):
        row = {}
        outs = {}
        for pdl in (False, True, False, True):  # twice each, interleaved: drift shows up as a spread
            A.PDL = pdl
            torch.manual_seed(0)  # same inputs for both settings
            fn = chain(rows, n_q)
            warm_up(fn, 2)
            ms = graph_ms(fn, replays=50)
            row.setdefault(f"pdl={pdl}", []).append(round(1000 * ms / LAYERS, 2))
            outs[pdl] = fn().clone()
        A.PDL = False
        row["equal"] = bool(torch.equal(outs[False], outs[True]))
        res["pdl"][name] = row
        print(f"{name:7s} R={rows:3d}: us per layer (attention + merge + producer) PDL off "
              f"{row['pdl=False']} on {row['pdl=True']}; outputs equal: {row['equal']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
