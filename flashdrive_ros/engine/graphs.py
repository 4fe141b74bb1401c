"""Fast path for CUDA: load-time fusion, graph-safe stage functions, and CUDA-graph stage wrappers.

Three layers, each usable alone:

1. Fusion (`fuse_projections`): every text/expert Attention gets one Q‖K‖V weight and every MLP one
   gate‖up weight. The fused tensor owns the storage and the original q/k/v/gate/up parameters are
   re-pointed to row slices of it, so checkpoint keys, `state_dict()` and memory stay as they were
   (no second copy of 9 GB at the full shape). Modules keep their class's behaviour through a
   subclass swap (`FusedAttention`, `FusedMLP`), so engine code that calls `attn.project(x)` or
   `mlp(x)` gets the fused GEMM without any change.
   Caveat: the sliced parameters share storage; `safetensors.save_file` refuses shared tensors, so
   a saver must `.contiguous().clone()` them (or save before fusing).

2. Graph-safe stage functions (`lm_forward`, `expert_forward`, `vision_forward`, `cache_write`,
   `cache_shift`): the same math as TextModel / Expert / Qwen3VLVisionModel forward, but with fixed
   shapes and no host synchronisation (no `.item()`, `.tolist()`, boolean indexing or data-dependent
   checks), so they can be captured. Valid cache slots are chosen by an additive mask over a fixed
   number of key slots: decode masks every unused slot explicitly (flashdrive.md §9 pitfall 2).
   GQA attention folds the query-head groups into the query axis ([B, kv, g*Q, D] against
   [B, kv, N, D]) so keys/values are read once per kv head and no repeat_kv copy is made; per shape,
   SDPA or plain GEMM attention is picked by timing both once. The elementwise chains between the
   GEMMs (RMSNorm, residual add + norm, q/k norm + rotary, SwiGLU, masked softmax, vision rotary) are
   single torch.compile'd kernels on CUDA and plain PyTorch elsewhere. With few rows (LM verify /
   decode, <= FUSED_LAYER_ROWS) and the kernels usable, the norms, SwiGLU and residual adds run inside
   the GEMMs instead (linear_kernel.fused_linear, `_decoder_stack_fused`; `set_fused_layers`).

3. `StageGraph`: static input buffers, warm-up on a side stream, one `torch.cuda.CUDAGraph` capture,
   then per call copy inputs -> replay -> static outputs. On the CPU (or with `enabled=False`) the
   same buffer logic runs eagerly, which is what CPU tests exercise.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rotary
from .text_model import MLP, Attention

# ----------------------------------------------------------------------------------------- fusion


class FusedAttention(Attention):
    """Attention whose q/k/v projections run as one GEMM over `qkv_weight` (a non-persistent buffer)."""

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split([nq, nkv, nkv], dim=-1)
        q = self.q_norm(q.view(b, n, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(b, n, self.n_kv, self.head_dim)).transpose(1, 2)
        v = v.view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k, v


class FusedMLP(MLP):
    """SwiGLU with gate and up as one GEMM over `gate_up_weight`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class PaddedHead(nn.Linear):
    """Output head whose GEMM runs over `padded_weight` ([out rounded up to a multiple of 64, in]) and
    returns the first `out_features` columns (a view). cuBLAS has no fast kernel for an odd output
    width: the real vocabulary (155 697 rows) ran 2.7x slower at 8 rows than its padded width on an H100
    (scripts/gpu_profile.py). `weight` is a row slice of the padded buffer, so keys and memory stay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.padded_weight, None)[..., :self.out_features]


HEAD_MULTIPLE = 64


@torch.no_grad()
def pad_output_head(lin: nn.Linear, multiple: int = HEAD_MULTIPLE) -> bool:
    """Give a bias-free Linear a zero-padded weight buffer of a GEMM-friendly width (in place; idempotent)."""
    if isinstance(lin, PaddedHead) or lin.bias is not None or lin.out_features % multiple == 0:
        return False
    rows = (lin.out_features + multiple - 1) // multiple * multiple
    padded = lin.weight.new_zeros(rows, lin.in_features)
    padded[:lin.out_features] = lin.weight
    lin.register_buffer("padded_weight", padded, persistent=False)
    lin.weight = nn.Parameter(padded[:lin.out_features], requires_grad=lin.weight.requires_grad)
    lin.__class__ = PaddedHead
    return True


def _fuse_linears(owner: nn.Module, names: tuple[str, ...], buffer: str, bias_buffer: str | None) -> None:
    """Concatenate the weights of owner.<names> row-wise into one buffer and re-point each Linear's
    weight (and bias) to its slice, so there is a single copy of the data."""
    lins = [getattr(owner, n) for n in names]
    w = torch.cat([lin.weight.detach() for lin in lins], dim=0)
    owner.register_buffer(buffer, w, persistent=False)
    has_bias = lins[0].bias is not None
    b = torch.cat([lin.bias.detach() for lin in lins], dim=0) if has_bias else None
    if bias_buffer is not None:
        owner.register_buffer(bias_buffer, b, persistent=False)
    row = 0
    for lin in lins:
        rows = lin.weight.shape[0]
        req = lin.weight.requires_grad
        lin.weight = nn.Parameter(w[row:row + rows], requires_grad=req)
        if has_bias:
            lin.bias = nn.Parameter(b[row:row + rows], requires_grad=req)
        row += rows


@torch.no_grad()
def fuse_projections(module: nn.Module) -> int:
    """Fuse Q/K/V and gate/up in every Attention / MLP under `module` and pad an `lm_head` to a
    multiple of 64 rows (idempotent). Returns how many modules changed. Call after the weights are loaded."""
    count = 0
    for name, m in list(module.named_modules()):
        if name.split(".")[-1] == "lm_head" and type(m) is nn.Linear:
            count += pad_output_head(m)
        elif type(m) is Attention:
            _fuse_linears(m, ("q_proj", "k_proj", "v_proj"), "qkv_weight", "qkv_bias")
            m.__class__ = FusedAttention
            count += 1
        elif type(m) is MLP:
            _fuse_linears(m, ("gate_proj", "up_proj"), "gate_up_weight", None)
            m.__class__ = FusedMLP
            count += 1
    return count


@torch.no_grad()
def patch_embed_as_linear(tower: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision Conv3d patch embedding is a matmul (stride == kernel): weight [hidden, C*T*p*p], bias.
    Views of the conv weight (no copy)."""
    proj = tower.patch_embed.proj
    return proj.weight.reshape(proj.weight.shape[0], -1), proj.bias


# ---------------------------------------------------------------------------- fused elementwise ops
# Within a CUDA graph launch overhead is gone, but every small elementwise kernel still costs a few
# microseconds of GPU time: an eager decoder layer issues ~50 of them (the float32 RMSNorm alone is 6).
# The chains below are compiled by torch.compile into one Triton kernel each on CUDA (eager on the
# CPU, where the tests check the math). Compilation happens on the first call, which StageGraph
# makes during its warm-up, never during capture; if it fails the eager function is used.

_COMPILE = {"enabled": True}


def set_compile(enabled: bool) -> None:
    """Switch torch.compile of the fused elementwise chains on/off (eager math either way)."""
    _COMPILE["enabled"] = bool(enabled)


def _fused(fn: Callable) -> Callable:
    state: dict = {}

    def wrapper(*args):
        if not (_COMPILE["enabled"] and args[0].is_cuda):
            return fn(*args)
        c = state.get("compiled")
        if c is None:
            import torch._dynamo

            cfg = torch._dynamo.config
            for name in ("cache_size_limit", "recompile_limit"):  # one compile per stage shape
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 64))
            c = state["compiled"] = torch.compile(fn, dynamic=False, fullgraph=True)
        if c is fn:
            return fn(*args)
        try:
            return c(*args)
        except Exception as e:  # a compiler problem must not break the fast path: fall back to eager
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            import warnings

            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); using eager")
            state["compiled"] = fn
            return fn(*args)

    wrapper.__name__ = fn.__name__
    wrapper.eager = fn
    return wrapper


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """text_model.RMSNorm: normalise in float32, cast back, then scale."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@_fused
def _compiled_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms(x, w, eps)


@_fused
def _compiled_add_rms_norm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float):
    y = x + a
    return y, _rms(y, w, eps)


# On CUDA the two norms of every decoder layer run as norm_kernels' Triton kernels instead (same
# roundings): unlike inductor's kernels they take part in programmatic dependent launch with the
# attention / cache kernels around them (attention_kernel.PDL). The CPU keeps the eager math.

def _norm_kernels(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor | None = None):
    """engine.norm_kernels when its kernels can run on these CUDA operands, else None. Few rows only (the
    latency-bound passes, where PDL pays: H100 chain of 36 add+RMSNorms 1.74-1.85 us each against
    1.95-2.18 compiled, docs/bench/norm_check_h100.txt); the prefill's 799 rows keep the compiled chain."""
    if not x.is_cuda or x.numel() // max(1, x.shape[-1]) > SKINNY_ROWS:
        return None
    nk = _kernel_module("norm_kernels", x)
    return nk if nk is not None and nk.supported(x, w, a) else None


def fused_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (graphs._rms) of x [..., H]."""
    nk = _norm_kernels(x, w)
    return nk.rms_norm(x, w, eps) if nk is not None else _compiled_rms_norm(x, w, eps)


def fused_add_rms_norm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float):
    """Residual add followed by the next RMSNorm: returns (x + a, norm(x + a))."""
    nk = _norm_kernels(x, w, a)
    return nk.add_rms_norm(x, a, w, eps) if nk is not None else _compiled_add_rms_norm(x, a, w, eps)


fused_rms_norm.eager = _compiled_rms_norm.eager  # the plain PyTorch math, as for the other chains
fused_add_rms_norm.eager = _compiled_add_rms_norm.eager


def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rotary(x, cos, sin)


@_fused
def fused_qk_prep(q: torch.Tensor, k: torch.Tensor, qw: torch.Tensor, kw: torch.Tensor, eps: float,
                  cos: torch.Tensor, sin: torch.Tensor):
    """q [B, Q, H, D], k [B, Q, KV, D] straight from the projection -> (rotated q [B, H, Q, D],
    normed pre-RoPE k [B, KV, Q, D], rotated k [B, KV, Q, D]); cos/sin [Q, D] or [B|1, 1, Q, D]."""
    qn = _rms(q, qw, eps).transpose(1, 2)
    kn = _rms(k, kw, eps).transpose(1, 2)
    return _rot(qn, cos, sin), kn, _rot(kn, cos, sin)


@_fused
def _compiled_add_layer_norm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float):
    y = x + a
    return y, F.layer_norm(y, (y.shape[-1],), w, b, eps)


def fused_add_layer_norm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float):
    """Vision residual add followed by the next LayerNorm: returns (x + a, layer_norm(x + a)). On CUDA the
    one-pass Triton kernel (norm_kernels.add_layer_norm: the compiled chain reads each row twice)."""
    nk = _kernel_module("norm_kernels", x) if x.is_cuda else None
    if nk is not None and nk.layer_norm_supported(x, w, b, a):
        return nk.add_layer_norm(x, a, w, b, eps)
    return _compiled_add_layer_norm(x, a, w, b, eps)


fused_add_layer_norm.eager = _compiled_add_layer_norm.eager


@_fused
def fused_swiglu(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


@_fused
def fused_softmax(s: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(s * scale + mask) in float32, cast back to s's dtype (transformers' eager attention)."""
    dtype = s.dtype
    s = s.float() * scale
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1).to(dtype)


@_fused
def fused_vision_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' apply_rotary_pos_emb_vision: rotate in float32, cast back."""
    qf, kf = q.float(), k.float()
    return ((qf * cos) + (_rotate_half(qf) * sin)).to(q.dtype), ((kf * cos) + (_rotate_half(kf) * sin)).to(k.dtype)


# ---------------------------------------------------------------------------------- attention core

def fold_mask(mask: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """Additive mask [B|1, 1, Q, N] -> the mask of the folded query axis [B|1, 1, g*Q, N] (row j*Q + q
    = row q). A one-row mask stays a broadcast view; others are tiled once per forward, not per layer."""
    if mask is None or groups == 1 or mask.shape[-2] == 1:
        return mask
    return mask.repeat(1, 1, groups, 1)


# (folded query shape, key count, mask shape, dtype) -> "sdpa" | "math": chosen by timing both once
_ATTN_CHOICE: dict[tuple, str] = {}


def _attn_sdpa(qf, k, v, fmask):
    return F.scaled_dot_product_attention(qf, k, v, attn_mask=fmask)


def _attn_math(qf, k, v, fmask):
    # Plain GEMM -> fused masked softmax -> GEMM. For few query rows (decode, verify, the 64 action
    # tokens) cuBLAS spreads the long key axis over the whole GPU, where SDPA's kernels get one block
    # per head only.
    s = torch.matmul(qf, k.transpose(-1, -2))
    m = None if fmask is None else fmask.to(qf.dtype)
    if m is None:
        p = torch.softmax(s.float() / math.sqrt(qf.shape[-1]), dim=-1).to(qf.dtype)
    else:
        p = fused_softmax(s, m, 1.0 / math.sqrt(qf.shape[-1]))
    return torch.matmul(p, v)


_ATTN_IMPLS = {"sdpa": _attn_sdpa, "math": _attn_math}


_FORCE_ATTENTION: dict[str, str | None] = {"impl": None}


def force_attention(impl: str | None) -> None:
    """Use one attention implementation everywhere ("sdpa" | "math"; None = time both on CUDA)."""
    if impl is not None and impl not in _ATTN_IMPLS:
        raise ValueError(f"attention impl must be one of {sorted(_ATTN_IMPLS)} or None, got {impl!r}")
    _FORCE_ATTENTION["impl"] = impl


def _pick_attention(key, qf, k, v, fmask) -> str:
    if _FORCE_ATTENTION["impl"] is not None:
        return _FORCE_ATTENTION["impl"]
    if not qf.is_cuda:
        return "sdpa"
    if torch.cuda.is_current_stream_capturing():
        return _ATTN_CHOICE.get(key, "sdpa")
    if key not in _ATTN_CHOICE:
        times = {}
        for name, fn in _ATTN_IMPLS.items():
            for _ in range(2):
                fn(qf, k, v, fmask)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(5):
                fn(qf, k, v, fmask)
            b.record()
            b.synchronize()
            times[name] = a.elapsed_time(b)
        _ATTN_CHOICE[key] = min(times, key=times.get)
    return _ATTN_CHOICE[key]


def attention_choices() -> dict[str, str]:
    """What the timing picked per attention shape (for the benchmark report)."""
    return {f"q{list(k[0])} keys {k[1]}": v for k, v in _ATTN_CHOICE.items()}


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, Q, D], k/v [B, KV, N, D], `fmask` from fold_mask (additive) -> [B, H, Q, D].

    Query heads h = kv * g + j (transformers' repeat_kv order) are folded into the query axis so
    every kv head is read once: [B, KV, g*Q, D], no repeat_kv copy of the keys. On CUDA the faster
    of SDPA and plain GEMM attention is chosen per shape by timing both once (outside capture)."""
    b, h, qn, d = q.shape
    kv = k.shape[1]
    g = h // kv
    qf = q.reshape(b, kv, g * qn, d)
    key = (tuple(qf.shape), k.shape[2], None if fmask is None else tuple(fmask.shape), q.dtype)
    out = _ATTN_IMPLS[_pick_attention(key, qf, k, v, fmask)](qf, k, v, fmask)
    return out.reshape(b, h, qn, d)


# ------------------------------------------------------------------------------------ projections
# Few-row GEMMs (decode / verify / the 64 action tokens) are weight-bandwidth bound, and cuBLAS's kernels
# for them lose to fixed latency on narrow weights. The Triton skinny GEMM (engine/linear_kernel.py) is
# used for a GEMM shape only where a tuning record shipped for this GPU model says it beat cuBLAS
# (engine/tuned/linear_<gpu>.json, written by scripts/gpu_linear_check.py --records): nothing is tuned or
# timed at run time, so a drive node never stalls on a first call. The same holds for an MLP's gate|up
# GEMM with the SwiGLU as its epilogue (linear_kernel.skinny_swiglu, records with "swiglu": true), which
# must beat both two-kernel paths (cuBLAS or the skinny GEMM, then fused_swiglu) by 5%.
SKINNY_ROWS = 128
SHIPPED_MARGIN = 0.95  # a record ships its kernel when kernel_us < SHIPPED_MARGIN * the alternative's time
# With programmatic dependent launch (sm_90+, attention_kernel.PDL) our kernels also overlap their neighbours
# (weight prefetch before the wait, early launch of the next kernel) and cuBLAS's do not, so a kernel that is
# merely as fast alone wins in the graph: the LM's qkv at M = 8 / 1 (20.6 / 20.4 us against cuBLAS's 21.1 /
# 20.8 alone) took 0.3-0.5 ms off the decode stage (scripts/gpu_ab.py, docs/BENCHMARKS.md, session 5).
SHIPPED_MARGIN_PDL = 1.0
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
_SHIPPED: dict = {"loaded": set(), "use": set()}


def _tuned_file(kind: str, gpu_name: str) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in gpu_name.lower()).strip("_")
    return TUNED_DIR / f"{kind}_{slug}.json"


def tuned_linear_file(gpu_name: str) -> Path:
    return _tuned_file("linear", gpu_name)


def _shipped_file_once(table: dict, device: torch.device, file_for: Callable[[str], Path]) -> dict | None:
    """The shipped records file of this GPU model (JSON), the first time `device` asks for this table; else
    None (asked before, or no file for this GPU)."""
    if device in table["loaded"]:
        return None
    table["loaded"].add(device)
    path = file_for(torch.cuda.get_device_name(device))
    return json.loads(path.read_text()) if path.exists() else None


def _record_wins(r: dict, margin: float = SHIPPED_MARGIN) -> bool:
    """A shipped record's kernel beat its alternative(s) by the margin. A swiglu record's alternatives:
    cuBLAS gate|up + SwiGLU (cublas_us) and, when measured, the skinny GEMM + SwiGLU (skinny_linear_us)."""
    if not (r.get("kernel_us") and r.get("cublas_us")):
        return False
    alternative = min(r["cublas_us"], r.get("skinny_linear_us") or float("inf"))
    return r["kernel_us"] < margin * alternative


def _shipping_margin(device: torch.device) -> float:
    from . import attention_kernel
    pdl = attention_kernel.PDL and torch.cuda.get_device_capability(device)[0] >= 9
    return SHIPPED_MARGIN_PDL if pdl else SHIPPED_MARGIN


def _load_shipped_tuning(lk, device: torch.device) -> None:
    data = _shipped_file_once(_SHIPPED, device, tuned_linear_file)
    if data is None:
        return
    margin = _shipping_margin(device)
    for r in data["records"]:
        r = dict(r, device=device.index if device.index is not None else torch.cuda.current_device())
        lk.load_tuned([r])
        if _record_wins(r, margin):
            _SHIPPED["use"].add(lk.record_key(r))


# cuBLASLt algorithm records (engine/cublaslt.py): for GEMM shapes where another algorithm of cuBLASLt's
# heuristic list beat the one F.linear runs (scripts/gpu_cublaslt_check.py times them in CUDA graphs and
# writes engine/tuned/cublaslt_<gpu>.json), that algorithm runs instead. H100 (session 6): the vision
# tower's proj 16.1 against 18.7 us, fc1 + GELU 49.4 against 51.9, patch embedding 19.5 against 22.0, the
# expert's q|k|v 9.3 against 9.9. A record runs only with the cuBLASLt version it was timed with, if
# cublasLtMatmulAlgoCheck accepts it, and if it beat F.linear by LT_MARGIN.
LT_MARGIN = 0.98
_LT: dict = {"loaded": set(), "use": {}}


def tuned_cublaslt_file(gpu_name: str) -> Path:
    return _tuned_file("cublaslt", gpu_name)


def _load_lt_records(device: torch.device) -> None:
    """The shipped cuBLASLt records of this GPU model that run here (see LT_MARGIN), once per device."""
    import warnings

    data = _shipped_file_once(_LT, device, tuned_cublaslt_file)
    if data is None:
        return
    try:
        from . import cublaslt

        version = cublaslt.version()
    except Exception as e:  # no usable libcublasLt: F.linear everywhere
        warnings.warn(f"cuBLASLt records not used: {e}")
        return
    if data.get("lt_version") != version:
        warnings.warn(f"cuBLASLt records of {data.get('gpu')} were timed with cuBLASLt {data.get('lt_version')}, "
                      f"this is {version}: not used")
        return
    for r in data["records"]:
        if not r["lt_us"] <= LT_MARGIN * r["torch_us"]:
            continue
        plan = cublaslt.Plan(r["m"], r["n"], r["k"], r["epilogue"], getattr(torch, r["dtype"]), device.index)
        if plan.supports(r["algo"]):
            _LT["use"][(device.index, r["dtype"], r["m"], r["n"], r["k"], r["epilogue"])] = (plan, r["algo"])


def lt_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, epilogue: str) -> torch.Tensor | None:
    """epilogue(x @ w^T (+ b)) through a cuBLASLt record for this shape (epilogue "none", "bias" or
    "gelu_bias"), or None where no record applies (the caller runs its torch op)."""
    if not x.is_cuda or x.dim() < 1 or x.shape[-1] != w.shape[-1]:
        return None
    _load_lt_records(x.device)
    m = x.numel() // x.shape[-1]
    hit = _LT["use"].get((x.device.index, str(x.dtype)[6:], m, w.shape[0], w.shape[1], epilogue))
    if hit is None:
        return None
    x2 = x.reshape(m, x.shape[-1])
    operands = (x2, w) if b is None else (x2, w, b)
    if any(not t.is_contiguous() or t.dtype != x.dtype or t.data_ptr() % 16 for t in operands):
        return None
    plan, algo = hit
    return plan(x2, w, b, algo).reshape(*x.shape[:-1], w.shape[0])


def lt_choices() -> dict[str, str]:
    """The GEMM shapes that run a cuBLASLt record (for the benchmark report)."""
    return {f"M{k[2]} N{k[3]} K{k[4]} {k[5]}": "cublaslt" for k in sorted(_LT["use"])}


def _dense(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """lin(x), through a cuBLASLt record where one applies."""
    y = lt_linear(x, lin.weight, lin.bias, "none" if lin.bias is None else "bias")
    return lin(x) if y is None else y


def linear_choices() -> dict[str, str]:
    """The GEMM shapes that run the Triton skinny GEMM (for the benchmark report); "triton+swiglu": the
    gate|up GEMM of that shape with the SwiGLU in its epilogue."""
    return {f"{k[1]} M{k[2]} N{k[3]} K{k[4]}{' swiglu' if k[6] else ''}": "triton+swiglu" if k[6] else "triton"
            for k in sorted(_SHIPPED["use"])}


def _skinny_kernels(x: torch.Tensor):
    """linear_kernel (its shipped records loaded) when x's GEMMs may run the skinny kernels: a CUDA tensor
    with <= SKINNY_ROWS rows and the kernels usable; else None."""
    if x.numel() // x.shape[-1] > SKINNY_ROWS or not x.is_cuda:
        return None
    lk = _kernel_module("linear_kernel", x)
    if lk is not None:
        _load_shipped_tuning(lk, x.device)
    return lk


def _shipped(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, swiglu: bool) -> bool:
    """Whether a shipped record says the kernel wins for this call's shape (the key of linear_kernel._key)."""
    dev = x.device.index if x.is_cuda else -1
    return (dev, str(x.dtype)[6:], x.numel() // x.shape[-1], w.shape[0], w.shape[1], b is not None,
            swiglu) in _SHIPPED["use"]


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b), or the Triton skinny GEMM for shapes tuned faster on this GPU model."""
    lk = _skinny_kernels(x)
    if lk is not None and _shipped(x, w, b, swiglu=False):
        return lk.skinny_linear(x, w, b, tune=False)
    y = lt_linear(x, w, b, "none" if b is None else "bias") if x.is_cuda else None
    return F.linear(x, w, b) if y is None else y


def gate_up_swiglu(h: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused gate|up projection of h: one skinny GEMM with the SwiGLU in its
    epilogue for shapes a shipped record measured faster on this GPU model, else the GEMM (`linear`)
    followed by fused_swiglu."""
    lk = _skinny_kernels(h)
    if lk is not None and _shipped(h, gate_up_weight, None, swiglu=True):
        return lk.skinny_swiglu(h, gate_up_weight, tune=False)
    return fused_swiglu(linear(h, gate_up_weight))


def _out_proj(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = out.shape
    o = attn.o_proj
    return linear(out.transpose(1, 2).reshape(b, n, attn.n_heads * attn.head_dim), o.weight, o.bias)


def _qkv(attn: Attention, h: torch.Tensor):
    """Projections of normed h [B, Q, H] -> q [B, Q, heads, D], k/v [B, Q, kv, D] (views)."""
    if hasattr(attn, "qkv_weight"):
        return _split_qkv(attn, linear(h, attn.qkv_weight, attn.qkv_bias))
    b, n, _ = h.shape
    return (attn.q_proj(h).view(b, n, attn.n_heads, attn.head_dim), attn.k_proj(h).view(b, n, attn.n_kv, attn.head_dim),
            attn.v_proj(h).view(b, n, attn.n_kv, attn.head_dim).transpose(1, 2))


def _split_qkv(attn: Attention, qkv: torch.Tensor):
    """The fused q|k|v projection output [B, Q, (heads + 2 kv) * D] -> q, k, v as _qkv returns them."""
    b, n, _ = qkv.shape
    nq, nkv = attn.n_heads * attn.head_dim, attn.n_kv * attn.head_dim
    q, k, v = qkv.split([nq, nkv, nkv], dim=-1)
    return (q.view(b, n, attn.n_heads, attn.head_dim), k.view(b, n, attn.n_kv, attn.head_dim),
            v.view(b, n, attn.n_kv, attn.head_dim).transpose(1, 2))


def _mlp(mlp: MLP, h: torch.Tensor) -> torch.Tensor:
    if hasattr(mlp, "gate_up_weight"):
        d = mlp.down_proj
        return linear(gate_up_swiglu(h, mlp.gate_up_weight), d.weight, d.bias)
    return mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))


def _decoder_stack(layers, final_norm, x: torch.Tensor, attend: Callable, capture_layers=(),
                   deepstack=None, vis_idx=None):
    """Pre-norm decoder layers with the residual adds fused into the following norm.
    attend(i, attn, q, k, v) -> attention output [B, heads, Q, D] (q/k given raw from the projection).
    Few rows with the kernels usable: _decoder_stack_fused (the norms, SwiGLU and residual adds inside
    the GEMMs)."""
    lk = _fused_layer_kernels(x)
    if lk is not None and any(_fusable(layer, x) for layer in layers):
        return _decoder_stack_fused(lk, layers, final_norm, x, attend, capture_layers, deepstack, vis_idx)
    captured: dict[int, torch.Tensor] = {}
    n = len(layers)
    h = fused_rms_norm(x, layers[0].input_layernorm.weight, layers[0].input_layernorm.eps)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        q, k, v = _qkv(attn, h)
        a = _out_proj(attn, attend(i, attn, q, k, v))
        pn = layer.post_attention_layernorm
        x, h2 = fused_add_rms_norm(x, a, pn.weight, pn.eps)
        m = _mlp(layer.mlp, h2)
        nxt = layers[i + 1].input_layernorm if i + 1 < n else final_norm
        if i in capture_layers or (deepstack is not None and i < len(deepstack)):
            x = x + m
            if i in capture_layers:
                captured[i] = x
            if deepstack is not None and i < len(deepstack):
                x = x.index_add(1, vis_idx, deepstack[i].to(x.dtype)[None].expand(x.shape[0], -1, -1))
            h = fused_rms_norm(x, nxt.weight, nxt.eps)
        else:
            x, h = fused_add_rms_norm(x, m, nxt.weight, nxt.eps)
    return h, captured


# --------------------------------------------------------------------------- fused few-row layers
# With few rows (LM verify: 8, decode: 1) every GEMM streams its weight from HBM and does almost no
# arithmetic, while each standalone elementwise kernel between them (RMSNorm ~2.8 us, add + RMSNorm,
# SwiGLU ~1.7 us on an H100) costs its time plus a launch gap. linear_kernel.fused_linear folds them
# into the GEMMs, so a layer is four GEMM kernels plus attention:
#
#     q|k|v = rmsnorm(x; input_layernorm) @ Wqkv^T          norm prologue
#     x     = x + attention(...) @ Wo^T                      residual epilogue
#     g|u   = rmsnorm(x; post_attention_layernorm) @ Wgu^T   norm prologue
#     x     = x + (silu(g) * u) @ Wdown^T                    swiglu prologue + residual epilogue
#
# and the stack ends with final_norm(x). Same function as the unfused path, same roundings as its
# compiled GPU form (see linear_kernel's notes; eager CPU SwiGLU on bf16 rounds twice).
FUSED_LAYER_ROWS = 16
# Off by default: on an H100 (scripts/gpu_fused_linear_check.py) the fused layer stack (36 layers, M = 8,
# no attention) is slower than the unfused one in both styles below. Norm pre-pass + SwiGLU prologue
# (docs/bench/fused_linear_h100.json): 7.35 ms against 5.43 ms; the pre-pass costs each qkv / gate|up
# program ~6 / ~15 us before its weight stream starts, and the SwiGLU prologue doubled the down GEMM
# (74.3 against 37.5 us). Norm as a row scale, SwiGLU apart (docs/bench/fused_linear_rowscale_h100.json):
# 5.87 ms against 5.45 ms; gate|up + norm 71.3 us ties gate|up 69.3 + norm 2.2, but qkv + norm took 35.4
# against 20.9 + 2.0. The kernels the fusion saves cost only ~2 us each inside a CUDA graph.
_FUSED_LAYERS = {"enabled": False}
# How a fused layer applies its pieces. norm_scale: the RMSNorm as a row scale after the qkv / gate|up GEMMs
# (sum of squares gathered in the K loop; no pre-pass, bf16 rounding of x * w instead of the normed row);
# False: the pre-pass prologue, bitwise the eager norm input. swiglu_prologue: SwiGLU inside the down GEMM
# (measured 2x slower down GEMM on the H100) or its own kernel.
FUSED_LAYER_STYLE = {"norm_scale": True, "swiglu_prologue": False}


def set_fused_layers(enabled: bool) -> None:
    """Switch the fused few-row decoder layers on/off (set_kernels(False) switches them off as well)."""
    _FUSED_LAYERS["enabled"] = bool(enabled)


def _fused_layer_kernels(x: torch.Tensor):
    """linear_kernel when x's rows may run as fused layers (<= FUSED_LAYER_ROWS, kernels usable), else None."""
    if not _FUSED_LAYERS["enabled"] or x.dim() != 3 or x.shape[0] * x.shape[1] > FUSED_LAYER_ROWS:
        return None
    lk = _kernel_module("linear_kernel", x)
    if lk is not None and x.is_cuda:
        _load_shipped_tuning(lk, x.device)  # fused_config prefers the shape's split_k 1 record
    return lk


def _fusable(layer, x: torch.Tensor) -> bool:
    """A layer with fused q|k|v and gate|up buffers, no biases, RMSNorms, weights in x's dtype."""
    attn, mlp = layer.self_attn, layer.mlp
    ln, pn = layer.input_layernorm, layer.post_attention_layernorm
    ws = (getattr(attn, "qkv_weight", None), attn.o_proj.weight, getattr(mlp, "gate_up_weight", None),
          mlp.down_proj.weight, getattr(ln, "weight", None), getattr(pn, "weight", None))
    return (all(w is not None and w.dtype == x.dtype for w in ws) and getattr(attn, "qkv_bias", None) is None
            and attn.o_proj.bias is None and mlp.down_proj.bias is None
            and hasattr(ln, "eps") and hasattr(pn, "eps") and not hasattr(ln, "bias") and not hasattr(pn, "bias"))


def _decoder_stack_fused(lk, layers, final_norm, x: torch.Tensor, attend: Callable, capture_layers=(),
                         deepstack=None, vis_idx=None):
    """_decoder_stack with each fusable layer as four fused GEMMs (see above); x stays the un-normed
    residual stream between layers (each layer's first GEMM applies its norm). A layer that is not
    fusable runs the unfused ops with its own norms."""
    captured: dict[int, torch.Tensor] = {}
    b, q_len, _ = x.shape
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        ln, pn = layer.input_layernorm, layer.post_attention_layernorm
        if _fusable(layer, x):
            scale = FUSED_LAYER_STYLE["norm_scale"]
            q, k, v = _split_qkv(attn, lk.fused_linear(x, attn.qkv_weight, norm_weight=ln.weight, eps=ln.eps,
                                                       norm_scale=scale))
            o = attend(i, attn, q, k, v)
            x = lk.fused_linear(o.transpose(1, 2).reshape(b, q_len, attn.n_heads * attn.head_dim), attn.o_proj.weight,
                                residual=x)
            gu = lk.fused_linear(x, mlp.gate_up_weight, norm_weight=pn.weight, eps=pn.eps, norm_scale=scale)
            if FUSED_LAYER_STYLE["swiglu_prologue"]:
                x = lk.fused_linear(gu, mlp.down_proj.weight, swiglu=True, residual=x)
            else:
                x = lk.fused_linear(fused_swiglu(gu), mlp.down_proj.weight, residual=x)
        else:
            q, k, v = _qkv(attn, fused_rms_norm(x, ln.weight, ln.eps))
            x, h2 = fused_add_rms_norm(x, _out_proj(attn, attend(i, attn, q, k, v)), pn.weight, pn.eps)
            x = x + _mlp(mlp, h2)
        if i in capture_layers:
            captured[i] = x
        if deepstack is not None and i < len(deepstack):
            x = x.index_add(1, vis_idx, deepstack[i].to(x.dtype)[None].expand(x.shape[0], -1, -1))
    return fused_rms_norm(x, final_norm.weight, final_norm.eps), captured


# ------------------------------------------------------------------------------- Triton kernels
# On CUDA the cache-side work of each layer runs as Triton kernels (engine/cache_kernels.py: q/k norm +
# rotary + the three cache stores in one kernel; the streaming slot shift) and attention over the
# cache as a split-K kernel with a per-row key limit (engine/attention_kernel.py), when the caller
# states its mask as `key_limit` (row q sees keys j < key_limit[q]). Elsewhere, or with the kernels
# switched off, the same functions run the PyTorch path above with the equivalent additive mask.

_KERNELS = {"enabled": True}


def set_kernels(enabled: bool) -> None:
    """Switch the Triton kernels of the fast path on/off (the PyTorch path computes the same function)."""
    _KERNELS["enabled"] = bool(enabled)


def _kernel_module(name: str, t: torch.Tensor):
    """engine.<name> when its kernels can run on t (CUDA + triton, or Triton's interpreter), else None."""
    if not _KERNELS["enabled"]:
        return None
    try:
        import importlib

        mod = importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None
    return mod if mod.available(t) else None


def limit_mask(key_limit: torch.Tensor, n_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """key_limit [Q] (or a 0-d tensor for every row) -> the additive mask [1, 1, Q|1, n_keys]."""
    keys = torch.arange(n_keys, device=key_limit.device)
    visible = keys < key_limit.reshape(-1, 1)
    zero = torch.zeros((), dtype=dtype, device=key_limit.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=key_limit.device)
    return torch.where(visible, zero, neg)[None, None]


def _store_and_attend(i: int, attn, q, k, v, cos, sin, cache, slots, n: int, key_limit, batch: int,
                      store_pre_rope: bool = True):
    """Kernel path of one layer's attention: norm + rotary + cache stores in one kernel, then split-K
    attention over the first n key slots."""
    ck, ak = _kernel_module("cache_kernels", q), _kernel_module("attention_kernel", q)
    if ck is not None:
        qr = ck.qk_norm_rope_store(q, k, v, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, cos, sin,
                                   cache, i, slots, store_pre_rope=store_pre_rope)
    else:
        qr, kn, kr = fused_qk_prep(q, k, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, cos, sin)
        if store_pre_rope:
            cache.k[i, :, :, slots] = kn.to(cache.dtype)
        cache.v[i, :, :, slots] = v.to(cache.dtype)
        cache.k_rot[i, :, :, slots] = kr.to(cache.dtype)
    b, h, qn, d = qr.shape
    keys = cache.k_rot[i, :, :, :n].expand(batch, -1, -1, -1)
    values = cache.v[i, :, :, :n].expand(batch, -1, -1, -1)
    limit = key_limit.reshape(-1).expand(qn) if key_limit.numel() == 1 else key_limit
    # heads-last output [B, Q, H, D]: _out_proj's transpose back makes it a view, not a copy
    out = ak.slot_attention(qr.reshape(b, attn.n_kv, (h // attn.n_kv) * qn, d), keys, values, limit,
                            heads_last=True)
    return out.transpose(1, 2)


def kernels_usable(t: torch.Tensor) -> bool:
    """Whether lm_forward / expert_forward given a key_limit take the Triton kernel path for t (the
    attention kernel; the cache kernels join when they can run too)."""
    return _kernel_module("attention_kernel", t) is not None


# ---------------------------------------------------------------------------------- cache (no sync)

def cache_write(cache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> None:
    """StaticKVCache.write without its host-side range checks (slots must be valid): pre-RoPE key,
    value, and the rotated mirror at the slots' positions (cos/sin = cache.cos[slots])."""
    k = k.to(cache.dtype)
    cache.k[layer, :, :, slots] = k
    cache.v[layer, :, :, slots] = v.to(cache.dtype)
    cache.k_rot[layer, :, :, slots] = apply_rotary(k, cos, sin)


def cache_shift(cache, src: torch.Tensor, dst: torch.Tensor, waves: tuple[int, ...] | None = None) -> None:
    """StaticKVCache.shift without host checks: one gather/scatter over all layers, keys re-rotated
    at the destination slots' positions. waves: the pairs are ordered in groups that are safe to move
    in place (cache_kernels.shift_waves, computed once per index set on the host): the kernel path then
    needs no temporary and one launch per group; the PyTorch path is the same either way."""
    ck = _kernel_module("cache_kernels", cache.k)
    if ck is not None:
        ck.shift_slots(cache, src, dst, waves=waves)
        return
    cache.k[:, :, :, dst] = cache.k[:, :, :, src]
    cache.v[:, :, :, dst] = cache.v[:, :, :, src]
    cache.k_rot[:, :, :, dst] = apply_rotary(cache.k[:, :, :, dst], cache.cos[dst], cache.sin[dst])


def causal_slot_mask(q_slots: torch.Tensor, n_keys: int, dtype: torch.dtype, limit: torch.Tensor | None = None):
    """Additive [1, 1, Q, n_keys]: row q sees keys k <= q_slots[q] (and k < limit when given).
    Built on the device from tensors, so it can live inside a graph."""
    keys = torch.arange(n_keys, device=q_slots.device)
    visible = keys[None, :] <= q_slots[:, None]
    if limit is not None:
        visible = visible & (keys[None, :] < limit)
    zero = torch.zeros((), dtype=dtype, device=q_slots.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=q_slots.device)
    return torch.where(visible, zero, neg)[None, None]


# ---------------------------------------------------------------------------------- stage functions

def lm_forward(lm, x: torch.Tensor, cache, slots: torch.Tensor, mask: torch.Tensor | None, n: int,
               vis_idx: torch.Tensor | None = None, deepstack: list[torch.Tensor] | None = None,
               capture_layers: tuple[int, ...] = (), mask_folded: bool = False,
               key_limit: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """TextModel.forward without host syncs. x [B, Q, H]; slots [Q]; mask additive [1|B, 1, Q, n]
    (or already `fold_mask`-ed when mask_folded: constant prefill masks are folded once at build);
    vis_idx LongTensor [n_vis] = query rows of image tokens (replaces the bool visual_pos_mask);
    deepstack[i] [n_vis, H] added after layer i. Returns (normed hidden, captured layer outputs).
    key_limit [Q] (optional, replaces mask): row q sees keys j < key_limit[q]; with it the Triton
    kernels run where they can."""
    b = x.shape[0]
    cos, sin = cache.cos[slots].to(x.dtype), cache.sin[slots].to(x.dtype)
    a0 = lm.layers[0].self_attn
    use_kernels = key_limit is not None and kernels_usable(x)
    if key_limit is not None and not use_kernels:
        mask, mask_folded = limit_mask(key_limit, n, x.dtype), False
    if mask is not None and not use_kernels:
        mask = mask.to(x.dtype)
        if not mask_folded:
            mask = fold_mask(mask, a0.n_heads // a0.n_kv)

    def attend(i, attn, q, k, v):
        if use_kernels:
            return _store_and_attend(i, attn, q, k, v, cos, sin, cache, slots, n, key_limit, b)
        qr, kn, kr = fused_qk_prep(q, k, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, cos, sin)
        cache.k[i, :, :, slots] = kn.to(cache.dtype)
        cache.v[i, :, :, slots] = v.to(cache.dtype)
        cache.k_rot[i, :, :, slots] = kr.to(cache.dtype)
        keys = cache.k_rot[i, :, :, :n].expand(b, -1, -1, -1)
        values = cache.v[i, :, :, :n].expand(b, -1, -1, -1)
        return gqa_attention(qr, keys, values, mask)

    return _decoder_stack(lm.layers, lm.norm, x, attend, capture_layers, deepstack, vis_idx)


@_fused
def _action_tokens(x: torch.Tensor, t: torch.Tensor, in_proj: nn.Module) -> torch.Tensor:
    return in_proj(x, t)


def action_tokens(in_proj: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """in_proj(x, t) (action_proj.ActionInProj: Fourier features, MLP trunk, LayerNorm), torch.compile'd on
    CUDA: ~30 small kernels of every flow evaluation become a few (the trunk's GEMMs stay cuBLAS)."""
    return _action_tokens(x, t, in_proj)


def action_rope(cache, act_slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin of the action slots in `dtype`: what expert_forward gathers; the same for every flow
    evaluation of a step, so the action stage gathers them once and passes them as `rope`."""
    return cache.cos[act_slots].to(dtype), cache.sin[act_slots].to(dtype)


def expert_forward(expert, emb: torch.Tensor, cache, act_slots: torch.Tensor, mask: torch.Tensor | None,
                   n: int, key_limit: torch.Tensor | None = None,
                   rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Expert.forward without host syncs and without concatenating keys: the T action tokens write
    their K/V into the cache's reserved action slots `act_slots` (positions there = slot position of
    n_ctx + arange(T), equal on all axes: the contract's action positions) and attend over key slots
    [0, n) with `mask` hiding everything that is neither context (< n_ctx) nor an action slot.
    emb [K, T, He]; cache batch 1 or K. Slots >= n_ctx are scratch: the LM masks them by valid length.
    key_limit (optional, 0-d or [T]): with act_slots = n_ctx + arange(T), n_ctx + T; the Triton
    kernels then run where they can (not for K samples over a shared batch-1 cache).
    rope: action_rope(cache, act_slots, emb.dtype), when the caller has it already."""
    k_samples = emb.shape[0]
    cos, sin = rope if rope is not None and rope[0].dtype == emb.dtype else action_rope(cache, act_slots, emb.dtype)
    a0 = expert.layers[0].self_attn
    use_kernels = key_limit is not None and cache.batch == k_samples and kernels_usable(emb)
    if key_limit is not None and not use_kernels and mask is None:
        mask = limit_mask(key_limit, n, emb.dtype)
    mask = fold_mask(None if mask is None else mask.to(emb.dtype), a0.n_heads // a0.n_kv)

    def attend(i, attn, q, k, v):
        if use_kernels:  # action slots are scratch: their pre-RoPE keys are never read
            return _store_and_attend(i, attn, q, k, v, cos, sin, cache, act_slots, n, key_limit, k_samples,
                                     store_pre_rope=False)
        qr, kn, kr = fused_qk_prep(q, k, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, cos, sin)
        if cache.batch == k_samples:
            cache.k[i, :, :, act_slots] = kn.to(cache.dtype)
            cache.v[i, :, :, act_slots] = v.to(cache.dtype)
            cache.k_rot[i, :, :, act_slots] = kr.to(cache.dtype)
            keys, values = cache.k_rot[i, :, :, :n], cache.v[i, :, :, :n]
        else:  # shared batch-1 context, K samples: append own keys (cannot share one slot range)
            keys = torch.cat([cache.k_rot[i, :, :, :n].expand(k_samples, -1, -1, -1), kr], dim=2)
            values = torch.cat([cache.v[i, :, :, :n].expand(k_samples, -1, -1, -1), v], dim=2)
        return gqa_attention(qr, keys, values, mask)

    h, _ = _decoder_stack(expert.layers, expert.norm, emb, attend)
    return h


def drafter_forward(layers, final_norm, ctx: torch.Tensor, block: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
    """A DFlash drafter's decoder (speculative.Drafter.forward) with the fused pieces of the fast path.
    ctx [B, C, H]: fused context features (norm(fc(target states))); block [B, S, H]: anchor + MASK
    embeddings; cos/sin [C + S, D]: context at positions 0..C-1, block after. Block rows attend to the
    whole context and block (non-causal); context keys/values come from the same projections, so
    context and block rows go through one QKV GEMM. Returns the final-normed block hidden [B, S, H]."""
    c = ctx.shape[1]
    cos, sin = cos.to(block.dtype), sin.to(block.dtype)
    x = block
    h = fused_rms_norm(x, layers[0].input_layernorm.weight, layers[0].input_layernorm.eps)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        q, k, v = _qkv(attn, torch.cat([ctx.to(h.dtype), h], dim=1))
        qr, _, kr = fused_qk_prep(q, k, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, cos, sin)
        out = gqa_attention(qr[:, :, c:], kr, v, None)
        pn = layer.post_attention_layernorm
        x, h2 = fused_add_rms_norm(x, _out_proj(attn, out), pn.weight, pn.eps)
        nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else final_norm
        x, h = fused_add_rms_norm(x, _mlp(layer.mlp, h2), nxt.weight, nxt.eps)
    return h


def action_mask(n_ctx: torch.Tensor, act_slots: torch.Tensor, n_keys: int, dtype: torch.dtype,
                shared_batch: bool = False) -> torch.Tensor:
    """Additive [1, 1, 1, n_keys(+T)] mask of the action stage: context slots < n_ctx and the action
    slots are visible (non-causal among the action tokens). With `shared_batch` the own keys are
    appended after n_keys (see expert_forward)."""
    keys = torch.arange(n_keys, device=act_slots.device)
    visible = keys < n_ctx
    if shared_batch:
        visible = torch.cat([visible, torch.ones(act_slots.numel(), dtype=torch.bool, device=keys.device)])
    else:
        # index_fill, not torch.isin: isin is not capturable
        visible = visible | torch.zeros_like(visible).index_fill_(0, act_slots, True)
    zero = torch.zeros((), dtype=dtype, device=keys.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=keys.device)
    return torch.where(visible, zero, neg)[None, None, None]


@dataclass
class VisionStatic:
    """Grid-dependent inputs of the vision tower, computed once for a fixed image set
    (equal-size images: attention is batched per image instead of split by cu_seqlens)."""

    interp_indices: torch.Tensor
    interp_weights: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    n_images: int
    patches_per_image: int
    key_limit: torch.Tensor  # [patches_per_image], all = patches_per_image: a patch sees its whole image
    # The interpolated learned position embedding [N, hidden] (in the patch
    # embedding's dtype, as the sum is cast to before the add): it depends on the grid and the
    # pos_embed weights only, so it is computed here once instead of a gather + weighted sum per step.
    # pos_version: pos_embed.weight._version it was computed from (callers rebuild when it moves).
    pos: torch.Tensor
    pos_version: int


@torch.no_grad()
def vision_static(tower, grid_thw: torch.Tensor) -> VisionStatic:
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    g = grid_thw.tolist()
    if any(tuple(r) != tuple(g[0]) for r in g):
        raise ValueError(f"vision_forward needs equal image grids, got {g}")
    idx, w = get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
        align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.config.spatial_merge_size)
    pos_ids = get_vision_position_ids(grid_thw, tower.spatial_merge_size)
    dummy = torch.empty(1, dtype=tower.patch_embed.proj.weight.dtype, device=grid_thw.device)
    cos, sin = tower.rotary_pos_emb(dummy, pos_ids)
    t, h, w_ = g[0]
    n = t * h * w_
    pos = (tower.pos_embed(idx) * w[:, :, None]).sum(1).to(tower.patch_embed.proj.weight.dtype)
    return VisionStatic(idx, w, cos, sin, len(g), n, torch.full((n,), n, dtype=torch.int32, device=grid_thw.device),
                        pos, tower.pos_embed.weight._version)


# Vision tower on CUDA (scripts/gpu_probe_session3.py, docs/bench/probe_session3_h100.json / _h200.json):
# - fc1 + GELU: cuBLASLt's GELU epilogue, one kernel instead of two (H100: 53.4 against 65.4 us per
#   layer; the epilogue is the tanh approximation, which is what gelu_pytorch_tanh computes, and is as
#   close to float32 as the two-kernel path).
# - attention (head dim 72): slot_attention with padded head lanes is correct but off: the masked lanes
#   defeat vectorised loads (H200: 139 us per layer against cuDNN's 41.7); cuDNN stays the default.
#   Session 8's flash kernel with the head split into 64 + 16 lanes loaded through TMA (commit 1f5f1d6,
#   reverted) was correct but slower too: 51.2 us per layer at best against cuDNN's 42.8 on the H100
#   (docs/bench/vision_attention_tma_h100_session8.json).
VISION_FAST = {"attention_kernel": False, "gelu_epilogue": True}


def _vision_attention(a, q, k, v, st: VisionStatic, n_tok: int) -> torch.Tensor:
    """Per-image attention of q/k/v [N, heads, d] -> [N, heads * d] in the projection's layout."""
    ak = _kernel_module("attention_kernel", q) if VISION_FAST["attention_kernel"] else None

    def per_image(t: torch.Tensor) -> torch.Tensor:  # [N, heads, d] -> [n_img, heads, L, d]
        return t.reshape(st.n_images, st.patches_per_image, a.num_heads, -1).transpose(1, 2)

    if ak is not None:  # heads-last output [n_img, L, heads, d] is already the projection's layout
        o = ak.slot_attention(per_image(q), per_image(k), per_image(v), st.key_limit, scale=a.scaling,
                              heads_last=True)
        return o.reshape(n_tok, -1)
    o = F.scaled_dot_product_attention(per_image(q), per_image(k), per_image(v), scale=a.scaling)
    return o.transpose(1, 2).reshape(n_tok, -1)


def _vision_mlp(tower, mlp, h: torch.Tensor) -> torch.Tensor:
    fc1 = mlp.linear_fc1
    if (VISION_FAST["gelu_epilogue"] and h.is_cuda and h.dim() == 2 and fc1.bias is not None
            and getattr(tower.config, "hidden_act", None) == "gelu_pytorch_tanh"):
        g = lt_linear(h, fc1.weight, fc1.bias, "gelu_bias")
        if g is None:
            g = torch._addmm_activation(fc1.bias, h, fc1.weight.t(), use_gelu=True)
        return _dense(mlp.linear_fc2, g)
    return mlp(h)


def vision_forward(tower, pixel_values: torch.Tensor, st: VisionStatic) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Qwen3VLVisionModel.forward for equal-size images without host syncs: patch embedding as a
    matmul, attention batched per image [n_img, heads, L, d]. Returns (merged embeds [n_tok, out],
    deepstack features)."""
    w_pe, b_pe = patch_embed_as_linear(tower)
    pix = pixel_values.to(w_pe.dtype)
    x = lt_linear(pix, w_pe, b_pe, "none" if b_pe is None else "bias") if pix.is_cuda else None
    x = F.linear(pix, w_pe, b_pe) if x is None else x
    if tower.pos_embed.weight._version != st.pos_version:
        raise RuntimeError("the vision pos_embed weights changed after vision_static(): build it again")
    x = x + st.pos.to(x.dtype)
    n_tok, hid = x.shape
    cos, sin = st.cos.unsqueeze(-2).float(), st.sin.unsqueeze(-2).float()
    deep: list[torch.Tensor] = []
    ds_index = list(tower.deepstack_visual_indexes)
    blocks = list(tower.blocks)
    h = blocks[0].norm1(x)
    for li, blk in enumerate(blocks):
        a = blk.attn
        qkv = _dense(a.qkv, h).reshape(n_tok, 3, a.num_heads, -1)
        q, k, v = qkv.unbind(1)
        q, k = fused_vision_rotary(q, k, cos, sin)  # float32 rotary, as transformers does
        o = _vision_attention(a, q, k, v, st, n_tok)
        # residual adds fused into the LayerNorm that follows them (one kernel instead of two)
        x, h2 = fused_add_layer_norm(x, _dense(a.proj, o), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        m = _vision_mlp(tower, blk.mlp, h2)
        if li + 1 < len(blocks):
            nxt = blocks[li + 1].norm1
            x, h = fused_add_layer_norm(x, m, nxt.weight, nxt.bias, nxt.eps)
        else:
            x = x + m
        if li in ds_index:
            deep.append(tower.deepstack_merger_list[ds_index.index(li)](x))
    return tower.merger(x), deep


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def greedy_token(logits: torch.Tensor, banned: tuple[int, int]) -> torch.Tensor:
    """argmax over the vocabulary with the id range [lo, hi) excluded (trajectory ids), no host sync."""
    lo, hi = banned
    logits = logits.float()
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    ban = (vocab >= lo) & (vocab < hi)
    return logits.masked_fill(ban, float("-inf")).argmax(-1)


# ------------------------------------------------------------------------------------ StageGraph

class StageGraph:
    """One captured stage: `fn(**buffers) -> tensor | tuple | list | dict of tensors`.

    `inputs` maps names to example tensors; they are cloned into static buffers unless listed in
    `shared` (then the tensor itself is the buffer: chains one graph's static output into the next
    graph's input without a copy). `__call__(**new)` copies the given inputs into their buffers (names
    not given keep their current content) and replays. With `enabled=False` or on the CPU, it calls
    `fn` eagerly on the same buffers. Outputs are the static output tensors: copy or consume them
    before the next call overwrites them.
    """

    def __init__(self, fn: Callable, inputs: dict[str, torch.Tensor], enabled: bool = True,
                 shared: tuple[str, ...] = (), warmup: int = 2, name: str = "stage"):
        self.fn, self.name = fn, name
        self.buffers = {k: (v if k in shared else v.clone()) for k, v in inputs.items()}
        dev = next(iter(self.buffers.values())).device if self.buffers else torch.device("cpu")
        self.enabled = enabled and dev.type == "cuda" and torch.cuda.is_available()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None
        if self.enabled:
            self._capture(warmup)

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        # Warm-up on a side stream so lazy initialisation (cuBLAS handles, autotuning) stays out of
        # the capture, as the PyTorch CUDA-graph recipe requires.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.fn(**self.buffers)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.fn(**self.buffers)

    @torch.no_grad()
    def __call__(self, **new: torch.Tensor):
        for k, v in new.items():
            buf = self.buffers[k]
            if v is not buf:
                buf.copy_(v)
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        return self.fn(**self.buffers)


__all__ = [
    "FusedAttention", "FusedMLP", "PaddedHead", "pad_output_head", "fuse_projections", "patch_embed_as_linear", "gqa_attention",
    "cache_write", "cache_shift", "causal_slot_mask", "lm_forward", "expert_forward", "action_mask",
    "VisionStatic", "vision_static", "vision_forward", "greedy_token", "StageGraph", "fold_mask",
    "drafter_forward", "action_tokens", "action_rope", "linear", "lt_linear", "lt_choices", "gate_up_swiglu", "linear_choices", "set_compile", "set_kernels", "kernels_usable", "limit_mask", "attention_choices", "force_attention", "fused_rms_norm", "fused_add_rms_norm", "fused_qk_prep", "fused_swiglu",
    "set_fused_layers", "FUSED_LAYER_ROWS",
]
