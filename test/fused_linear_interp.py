"""Runs fused_linear under Triton's interpreter in a fresh process (helper of test_fused_linear.py).

    python test/fused_linear_interp.py CASES.pt RESULTS.pt

CASES.pt maps a name to (x, w, kwargs of fused_linear without config, Config fields or None);
RESULTS.pt maps the name to fused_linear's output and the config it launched with.
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashdrive_ros.engine import linear_kernel as L  # noqa: E402


def main(cases_path: str, results_path: str) -> None:
    cases = torch.load(cases_path, weights_only=False)
    results = {}
    launched = []
    real = L._fused_linear_fwd

    class Spy:  # records the constexpr launch parameters, then launches the real kernel
        def __getitem__(self, grid):
            def go(*args, **kw):
                launched.append(kw)
                return real[grid](*args, **kw)
            return go

    L._fused_linear_fwd = Spy()
    for name, (x, w, kwargs, config) in cases.items():
        cfg = None if config is None else L.Config(**config)
        launched.clear()
        out = L.fused_linear(x, w, config=cfg, **kwargs)
        results[name] = (out, [dict(block_n=k["BLOCK_N"], block_k=k["BLOCK_K"], norm=k["NORM"] or k["NORM_SCALE"],
                                    norm_scale=k["NORM_SCALE"], swiglu=k["SWIGLU"], residual=k["RESIDUAL"])
                               for k in launched])
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
