"""The fused few-row decoder layers (graphs._decoder_stack_fused over linear_kernel.fused_linear) against
the unfused kernel path, the eager modules and the stack built from fused_linear's references, on the
tiny config. Run under Triton's interpreter by test_fused_stack.py:

    TRITON_INTERPRET=1 python test/fused_stack_check.py     # prints one JSON line

Keys: "<case>/<a>_vs_<b>" relative L2 errors; "<case>/launches" fused kernel launches.
"""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_path_check import _cache, _randomize, _rel  # noqa: E402

from flashdrive_ros.engine import graphs  # noqa: E402
from flashdrive_ros.engine import linear_kernel as L  # noqa: E402
from flashdrive_ros.engine.config import tiny_config  # noqa: E402
from flashdrive_ros.engine.streaming import causal_mask  # noqa: E402
from flashdrive_ros.engine.text_model import TextModel  # noqa: E402

LAUNCHES = []


class _CountLaunches:
    """Stands in for L._fused_linear_fwd: counts launches, then launches the real kernel."""

    def __init__(self, real):
        self.real = real

    def __getitem__(self, grid):
        def go(*args, **kw):
            LAUNCHES.append((kw["NORM"] or kw["NORM_SCALE"], kw["SWIGLU"], kw["RESIDUAL"]))
            return self.real[grid](*args, **kw)
        return go


CALLS = []  # per fused_linear call of a fused run: (fraction of outputs != the reference, rel L2 error)


def _checked(x, w, **kw):
    """fused_linear, and how far it is from fused_linear_reference on the very same inputs."""
    out = _REAL_FUSED_LINEAR(x, w, **kw)
    ref = L.fused_linear_reference(x, w, **kw)
    CALLS.append(((out != ref).float().mean().item(), _rel(out, ref)))
    return out


_REAL_FUSED_LINEAR = L.fused_linear


def _fast(fn, fused: bool, spec: bool = False):
    """fn() with the fused layers on/off; spec: fused_linear replaced by fused_linear_reference
    (otherwise each fused_linear call is compared with its reference on the same inputs: CALLS)."""
    before = graphs._FUSED_LAYERS["enabled"]
    graphs.set_fused_layers(fused)
    real = L.fused_linear
    L.fused_linear = L.fused_linear_reference if spec else _checked
    LAUNCHES.clear()
    try:
        out = fn()
    finally:
        L.fused_linear = real
        graphs.set_fused_layers(before)
    return out, list(LAUNCHES)


@torch.no_grad()
def run() -> dict:
    torch.manual_seed(0)
    cfg = tiny_config()
    H, n_layers = cfg.text.hidden_size, cfg.text.num_hidden_layers
    L._fused_linear_fwd = _CountLaunches(L._fused_linear_fwd)
    graphs.set_fused_layers(True)  # off by default (graphs._FUSED_LAYERS): is the kernel usable here?
    usable = graphs._fused_layer_kernels(torch.zeros(1, 8, H)) is not None
    graphs.set_fused_layers(False)
    res: dict = {"kernels": float(usable), "swiglu_prologue": graphs.FUSED_LAYER_STYLE["swiglu_prologue"],
                 "layers": n_layers}

    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        lm = TextModel(cfg.text).eval()
        _randomize(lm, 1)
        lm = lm.to(dtype)
        fast = copy.deepcopy(lm)
        graphs.fuse_projections(fast)
        caches = {k: _cache(cfg, 144, 3, dtype) for k in ("eager", "fused")}
        # prefill 50 rows (above FUSED_LAYER_ROWS: the unfused path); the other fast caches are copies
        slots = torch.arange(50)
        x = torch.randn(1, 50, H).to(dtype)
        lm(x, caches["eager"], slots, causal_mask(slots, 50), 50)
        _, launches = _fast(lambda: graphs.lm_forward(fast, x, caches["fused"], slots, None, 64, key_limit=slots + 1),
                            True)
        res[f"{name}/prefill50/launches"] = len(launches)

        # fp32: the attention kernels (key_limit); bf16: PyTorch attention (mask): the fused layers
        # do not depend on how attention runs
        def step(case, s, rows, vis_rows=(), capture=()):
            xq = torch.randn(1, rows, H).to(dtype)
            mask = causal_mask(s, int(s.max()) + 1)
            vis = torch.zeros(rows, dtype=torch.bool)
            vis[list(vis_rows)] = True
            deep = [torch.randn(len(vis_rows), H).to(dtype) for _ in range(2)] if vis_rows else None
            ref, cap_ref = lm(xq, caches["eager"], s, mask, int(s.max()) + 1, vis if vis_rows else None, deep,
                              capture_layers=capture)
            outs = {}
            # every fast run starts from the fused run's cache: the errors are this step's own
            caches["unfused"], caches["spec"] = copy.deepcopy(caches["fused"]), copy.deepcopy(caches["fused"])
            for k in ("unfused", "spec", "fused"):
                if dtype == torch.float32:  # attention kernels over all 144 slots, key_limit per row
                    attn = dict(mask=None, n=144, key_limit=s + 1)
                else:
                    attn = dict(mask=mask, n=int(s.max()) + 1)
                CALLS.clear()
                (out, cap), launches = _fast(
                    lambda: graphs.lm_forward(fast, xq, caches[k], s, vis_idx=vis.nonzero().flatten() if vis_rows else None,
                                              deepstack=deep, capture_layers=capture, **attn),
                    k != "unfused", spec=k == "spec")
                outs[k] = (out, cap)
                if k == "fused":
                    res[f"{name}/{case}/launches"] = len(launches)
                    res[f"{name}/{case}/calls_max_mismatch_fraction"] = max(c[0] for c in CALLS)
                    res[f"{name}/{case}/calls_max_rel"] = max(c[1] for c in CALLS)
                    res[f"{name}/{case}/launch_kinds"] = sorted(set(map(str, launches)))
            for a, b in (("fused", "unfused"), ("fused", "spec")):
                res[f"{name}/{case}/{a}_vs_{b}"] = _rel(outs[a][0], outs[b][0])
            res[f"{name}/{case}/fused_vs_eager"] = _rel(outs["fused"][0], ref)
            if capture:
                res[f"{name}/{case}/captured_fused_vs_eager"] = max(_rel(outs["fused"][1][i], cap_ref[i]) for i in capture)
                res[f"{name}/{case}/captured_fused_vs_unfused"] = max(
                    _rel(outs["fused"][1][i], outs["unfused"][1][i]) for i in capture)
            res[f"{name}/{case}/cache_fused_vs_eager"] = max(
                _rel(getattr(caches["fused"], t)[:, :, :, s], getattr(caches["eager"], t)[:, :, :, s])
                for t in ("k", "v", "k_rot"))

        step("verify8_deepstack_capture", torch.arange(50, 58), 8, vis_rows=(1, 5), capture=(0, 2))
        step("decode1", torch.tensor([58]), 1, capture=(n_layers - 1,))
        step("rows16", torch.arange(59, 75), 16)
    return res


if __name__ == "__main__":
    print(json.dumps(run()))
