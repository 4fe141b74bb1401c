"""Runs slot_attention under Triton's interpreter in a fresh process (helper of test_attention_kernel.py).

    python test/attention_interp.py CASES.pt RESULTS.pt

TRITON_INTERPRET=1 only takes effect if it is set before triton's jit decorators run, which an earlier
import of triton in the pytest process would already have done; hence a separate process. CASES.pt
maps a name to (q, k, v, key_limit, Config fields or None); torch.save keeps views' strides (slices of a
bigger cache, stride-0 expands). RESULTS.pt maps the name to (output, strides of k as the kernel saw
them), "__heads_last__" to {name: the heads_last=True output} and "__counters__" to the fused-merge
counters after all calls (they must be back to 0).
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashdrive_ros.engine import attention_kernel as A  # noqa: E402


def main(cases_path: str, results_path: str) -> None:
    if os.environ.get("ATTN_MERGE"):  # the two-kernel merge's launch (rows per program, warps)
        A.MERGE = tuple(int(x) for x in os.environ["ATTN_MERGE"].split(","))
    cases = torch.load(cases_path, weights_only=False)
    results, heads_last = {}, {}
    for name, (q, k, v, key_limit, config) in cases.items():
        cfg = None if config is None else A.Config(**config)
        results[name] = (A.slot_attention(q, k, v, key_limit, config=cfg), k.stride())
        heads_last[name] = A.slot_attention(q, k, v, key_limit, config=cfg, heads_last=True)
    results["__heads_last__"] = heads_last
    # the eager fused-merge counters after all these calls (every merging program resets its own)
    arena = A._ARENAS.get("cpu")
    results["__counters__"] = None if arena is None else arena.buf.clone()
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
