"""Runs slot_attention under Triton's interpreter in a fresh process (helper of test_attention_kernel.py).

    python test/attention_interp.py CASES.pt RESULTS.pt

TRITON_INTERPRET=1 only takes effect if it is set before triton's jit decorators run, which an earlier
import of triton in the pytest process would already have done; hence a separate process. CASES.pt
maps a name to (q, k, v, key_limit, Config fields or None); torch.save keeps views' strides (slices of a
bigger cache, stride-0 expands). RESULTS.pt maps the name to (output, strides of k as the kernel saw
them), "__heads_last__" to {name: the heads_last=True output}, "__kernels__" to {name: the kernels
its two calls launched, in order} and "__counters__" to the fused-merge counters after all calls (they
must be back to 0).
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashdrive_ros.engine import attention_kernel as A  # noqa: E402


KERNELS = ("_slot_attention_fwd", "_slot_attention_tma_fwd", "_merge_splits")


class _Recorded:
    """A kernel of attention_kernel whose launches `kernel[grid](...)` append its name to `launched`."""

    def __init__(self, name: str, launched: list[str]):
        self.name, self.kernel, self.launched = name, getattr(A, name), launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def main(cases_path: str, results_path: str) -> None:
    if os.environ.get("ATTN_MERGE"):  # the two-kernel merge's launch (rows per program, warps)
        A.MERGE = tuple(int(x) for x in os.environ["ATTN_MERGE"].split(","))
    launched: list[str] = []
    for name in KERNELS:
        setattr(A, name, _Recorded(name, launched))
    cases = torch.load(cases_path, weights_only=False)
    results, heads_last, kernels = {}, {}, {}
    for name, (q, k, v, key_limit, config) in cases.items():
        cfg = None if config is None else A.Config(**config)
        launched.clear()
        results[name] = (A.slot_attention(q, k, v, key_limit, config=cfg), k.stride())
        heads_last[name] = A.slot_attention(q, k, v, key_limit, config=cfg, heads_last=True)
        kernels[name] = list(launched)
    results["__heads_last__"] = heads_last
    results["__kernels__"] = kernels
    # the eager fused-merge counters after all these calls (every merging program resets its own)
    arena = A._ARENAS.get("cpu")
    results["__counters__"] = None if arena is None else arena.buf.clone()
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
