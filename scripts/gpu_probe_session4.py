"""Device probe (issue 7, session 4): does programmatic dependent launch (PDL) pay for the few-row kernels?

    python scripts/gpu_probe_session4.py [--out probe.json]

36 synthetic layers at the real attention shapes (verify: R = 32 folded rows; action: R = 128; decode: R = 4;
8 KV heads of 128 over a 3 136-slot cache, 3 057 keys seen), each layer = a stand-in producer of q (an
in-place scale, like the store kernel that precedes attention in the model) + slot_attention (attention
kernel + split merge). The 36 layers are one CUDA graph; its replay is timed with attention_kernel.PDL off
and on, and the outputs of both are compared (they must be equal: PDL changes only when kernels start).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": LAYERS, "pdl": {}}
    for name, rows, n_q in (("decode", 4, 1), ("verify", 32, 8), ("action", 128, 64)):
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


if __name__ == "__main__":
    main()
