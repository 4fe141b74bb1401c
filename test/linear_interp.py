"""Runs skinny_linear / skinny_swiglu under Triton's interpreter in a fresh process (helper of
test_linear_kernel.py).

    python test/linear_interp.py CASES.pt RESULTS.pt

TRITON_INTERPRET=1 only takes effect if it is set before triton's jit decorators run, which an earlier
import of triton in the pytest process would already have done; hence a separate process. CASES.pt
maps a name to (x, w, bias, Config fields or None); torch.save keeps views' strides (row / column slices
of a bigger weight). Besides, "__capture__" holds the inputs of the simulated-capture sequence (see
capture_sequence), "__repeat__" a list of case names to run a second time with every tensor the
launcher allocates filled with NaN (output, fp32 partials), "__swiglu__" maps a name to (x, w_gate_up,
Config fields or None) for skinny_swiglu, and "__mlp__" maps a name to (h, gate, up, down weights) for
graphs._mlp (see mlp_with_and_without_record). RESULTS.pt maps each name to (output, w strides as the
kernel saw them), "__capture__" to the sequence's outputs, "__repeat__" each of its names to the
second (poisoned) output, "__swiglu__" and "__mlp__" to their outputs by name, "__tma__" each case with a TMA
config to whether its operands took the TMA kernel (else the pointer kernel ran the same config).
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flashdrive_ros.engine import linear_kernel as L  # noqa: E402


def capture_sequence(x, w, bias):
    """An untuned shape called while 'capturing' (must be F.linear, must not tune or cache), then the
    same shape outside capture (tunes: here the default config, cached), then inside capture again
    (must now run the kernel with the cached config)."""
    L.clear_tuned()
    real = L._capturing
    calls = []
    launch = L._launch
    L._launch = lambda *a: calls.append(a[-1]) or launch(*a)
    try:
        L._capturing = lambda: True
        during_untuned = L.skinny_linear(x, w, bias)
        cached_after_untuned = L.tuned(x, w, bias)
        launches_untuned = len(calls)
        L._capturing = lambda: False
        outside = L.skinny_linear(x, w, bias)
        L._capturing = lambda: True
        during_tuned = L.skinny_linear(x, w, bias)
    finally:
        L._capturing = real
        L._launch = launch
    return dict(during_untuned=during_untuned, cached_after_untuned=cached_after_untuned,
                launches_untuned=launches_untuned, launches=len(calls), outside=outside,
                during_tuned=during_tuned, config=L.tuned(x, w, bias).config)


def run_poisoned(x, w, bias, cfg):
    """skinny_linear with torch.empty returning NaN-filled tensors: an element the kernels leave
    unwritten, or a partial they read without having written it, shows up as NaN."""
    empty = torch.empty
    torch.empty = lambda *a, **kw: empty(*a, **kw).fill_(float("nan"))
    try:
        return L.skinny_linear(x, w, bias, config=cfg)
    finally:
        torch.empty = empty


def mlp_with_and_without_record(h, gate, up, down):
    """graphs._mlp of a fused MLP on h with the skinny kernels usable (as on a GPU): once with a shipped
    record for its gate|up SwiGLU shape, once without. Returns both outputs and the skinny_swiglu
    launches of each run."""
    from flashdrive_ros.engine import graphs
    from flashdrive_ros.engine.config import TextConfig
    from flashdrive_ros.engine.text_model import MLP

    mlp = MLP(TextConfig(hidden_size=gate.shape[1], intermediate_size=gate.shape[0])).to(h.dtype)
    mlp.load_state_dict({"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down})
    graphs.fuse_projections(mlp)
    w = mlp.gate_up_weight
    key = (-1, str(h.dtype)[6:], h.numel() // h.shape[-1], w.shape[0], w.shape[1], False, True)
    launches = []
    real_launch, real_kernels, real_use = L._launch_swiglu, graphs._skinny_kernels, graphs._SHIPPED["use"]
    L._launch_swiglu = lambda *a: launches.append(a[-1]) or real_launch(*a)
    graphs._skinny_kernels = lambda x: L
    try:
        graphs._SHIPPED["use"] = {key}
        with_record = graphs._mlp(mlp, h)
        launches_with = len(launches)
        graphs._SHIPPED["use"] = set()
        without = graphs._mlp(mlp, h)
    finally:
        L._launch_swiglu, graphs._skinny_kernels, graphs._SHIPPED["use"] = real_launch, real_kernels, real_use
    return dict(with_record=with_record, without=without, launches_with=launches_with,
                launches_without=len(launches) - launches_with)


def main(cases_path: str, results_path: str) -> None:
    cases = torch.load(cases_path, weights_only=False)
    results = {}
    for name, case in cases.items():
        if name.startswith("__"):
            continue
        x, w, bias, config = case
        cfg = None if config is None else L.Config(**config)
        results[name] = (L.skinny_linear(x, w, bias, config=cfg), w.stride())
    results["__tma__"] = {name: L._tma_usable(L._rows(case[0]), case[1]) for name, case in cases.items()
                          if not name.startswith("__") and case[3] is not None and case[3].get("tma")}
    results["__capture__"] = capture_sequence(*cases["__capture__"][:3])
    results["__repeat__"] = {name: run_poisoned(*cases[name][:3], L.Config(**cases[name][3]))
                             for name in cases.get("__repeat__", [])}
    results["__swiglu__"] = {name: L.skinny_swiglu(x, w, config=None if config is None else L.Config(**config))
                             for name, (x, w, config) in cases.get("__swiglu__", {}).items()}
    results["__mlp__"] = {name: mlp_with_and_without_record(*args) for name, args in cases.get("__mlp__", {}).items()}
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
