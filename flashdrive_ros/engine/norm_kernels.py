"""Triton RMSNorm / LayerNorm kernels of the CUDA fast path (issue 7).

    h = rms_norm(x, w, eps)                    # graphs._rms(x, w, eps)
    y, h = add_rms_norm(x, a, w, eps)          # y = x + a, h = graphs._rms(y, w, eps)
    y, h = add_layer_norm(x, a, w, b, eps)     # y = x + a, h = F.layer_norm(y, (H,), w, b, eps)

Why: every decoder layer of graphs._decoder_stack runs an add + RMSNorm after attention and after the
MLP. With few rows (LM verify 8, decode 1, drafter 8, action expert 64; ~600 layer passes per step
inside CUDA graphs) these kernels are pure latency, ~2-3 us each. The torch.compile'd chains cannot
take part in programmatic dependent launch (PDL, attention_kernel.PDL); these kernels can: launched
early, they wait for their producer's memory (gdc_wait) before their first load, and once their own
loads are issued they let the next kernel launch (gdc_launch_dependents). Between our attention /
cache kernels that saved ~0.5 us per kernel boundary on an H100 (scripts/gpu_probe_session4.py);
scripts/gpu_norm_check.py measures these kernels.

Layout: x [..., H] with any leading dims that flatten to rows (a contiguous last dim), bf16 / fp16 /
fp32; one program per row holds the whole row in registers, padded to a power of two with masked
lanes (H = 2048 / 4096 in the model; up to MAX_COLS).

Numerics: the roundings of graphs._rms, step by step (cache_kernels._round emulates each
intermediate's dtype exactly, also under the interpreter): y = x + a rounded to x's dtype; mean of
y^2 in fp32 (sum, then a correctly rounded division by H: torch's CPU mean; on the GPU, where torch
multiplies by 1/H, the two agree for a power-of-two H); rsqrt(ms + eps); y * r rounded to the dtype;
times the weight, rounded to the dtype. So the results are bitwise those of eager PyTorch up to the
order of the fp32 sum of squares (a last-bit difference there can, rarely, flip one rounding).
torch.compile'd chains may keep the bf16 intermediate in fp32 and differ from both by one ulp on a
few elements (scripts/gpu_norm_check.py counts them).

add_layer_norm is the vision tower's residual add + the next LayerNorm (2 880 rows of 1 152): memory bound,
where the compiled chain's looped reduction reads each row twice; here the row is read once and stays in
registers. Numerics: y = x + a rounded to x's dtype; mean and variance (two passes over the registers) and the
affine step in fp32, rounded once, as F.layer_norm does (it uses Welford's update: the fp32 statistics may
differ in the last bits, rarely flipping one bf16 rounding).

Graph-capturable: no host synchronisation; outputs come from torch.empty, the grid from shapes.
`available(t)` says whether the kernels can run on tensors like t (graphs._kernel_module asks it);
the public functions fall back to the eager reference where they cannot.
"""

from __future__ import annotations

import torch

from . import cache_kernels
from .cache_kernels import _HAVE_TRITON, _TL_DTYPE, _device_guard, _launch_options, _next_pow2, _pdl_options

# Widest row the kernels take: the whole row lives in registers (MAX_COLS / 32 / 16 warps = 32 fp32
# per thread per operand). Wider rows take the eager reference.
MAX_COLS = 16384
# Row elements per thread (auto num_warps: 4096 -> 8 warps, 2048 -> 4): 16 bf16 = two 16-byte loads.
ELEMENTS_PER_THREAD = 16
# None: the rule above; an int forces num_warps (scripts/gpu_norm_check.py sweeps it).
NUM_WARPS: int | None = None


# ---------------------------------------------------------------------------------- availability

def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on tensors like `t`: a CUDA tensor with triton importable,
    or any tensor when the interpreter built the kernels (TRITON_INTERPRET=1 before import)."""
    return cache_kernels.available(t)


def supported(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor | None = None) -> bool:
    """Whether the kernels compute exactly what graphs._rms does for these operands (shapes and dtypes
    only, no sync): a float dtype they know, w [H] and a (if any) in x's dtype, a shaped like x, rows
    of at most MAX_COLS. Otherwise torch's type promotion or broadcasting would make the eager result
    something else (or the row would not fit in registers)."""
    if x.dim() == 0 or x.dtype not in _TL_DTYPE or w.dtype != x.dtype or w.shape != x.shape[-1:]:
        return False
    if a is not None and (a.dtype != x.dtype or a.shape != x.shape):
        return False
    return 0 < x.shape[-1] <= MAX_COLS


def layer_norm_supported(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> bool:
    """supported() for add_layer_norm: the bias too [H] in x's dtype."""
    return supported(x, w, a) and b.dtype == x.dtype and b.shape == w.shape


# --------------------------------------------------------------------------- eager references

def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    from .graphs import _rms  # lazily: graphs.py imports this module

    return _rms(x, w, eps)


def add_rms_norm_reference(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float):
    from .graphs import _rms

    y = x + a
    return y, _rms(y, w, eps)


def add_layer_norm_reference(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float):
    y = x + a
    return y, torch.nn.functional.layer_norm(y, (y.shape[-1],), w, b, eps)


# ------------------------------------------------------------------------------- Triton kernel

if _HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    from .cache_kernels import _round  # exact rounding to a dtype, also under the interpreter

    @triton.jit
    def _rms_norm_kernel(x_ptr, a_ptr, w_ptr, sum_ptr, out_ptr, x_row, a_row, eps,
                         H: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr, DT: tl.constexpr,
                         USE_PDL: tl.constexpr = False):
        """Program `row`: out[row] = w * rmsnorm(v) with v = x[row] (+ a[row], stored to sum[row], when
        ADD), every step rounded like graphs._rms (see the module docstring). Padded lanes load 0 and add
        nothing to the sum of squares. sum / out are contiguous [rows, H]; x / a rows are x_row / a_row
        elements apart."""
        if USE_PDL:  # x and a come from the kernel launched just before
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < H
        v = tl.load(x_ptr + row * x_row + cols, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if ADD:
            a = tl.load(a_ptr + row * a_row + cols, mask=inside, other=0.0).to(tl.float32)
        if USE_PDL:  # our inputs are read: the next kernel may launch (it waits for our stores in turn)
            gdc_launch_dependents()
        if ADD:
            v = _round(v + a, DT)
            tl.store(sum_ptr + row * H + cols, v.to(DT), mask=inside)
        mean_sq = tl.math.div_rn(tl.sum(v * v, axis=0), H * 1.0)
        r = tl.math.rsqrt(mean_sq + eps)
        out = _round(w * _round(v * r, DT), DT)
        tl.store(out_ptr + row * H + cols, out.to(DT), mask=inside)

    @triton.jit
    def _add_layer_norm_kernel(x_ptr, a_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, x_row, a_row, eps,
                               H: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr,
                               USE_PDL: tl.constexpr = False):
        """Program `row`: sum[row] = x + a (rounded to DT), out[row] = layer_norm(sum[row]) * w + b in fp32,
        rounded once. The row is read once and stays in registers; padded lanes are 0 and kept out of the
        variance."""
        if USE_PDL:
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < H
        v = tl.load(x_ptr + row * x_row + cols, mask=inside, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + row * a_row + cols, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if USE_PDL:
            gdc_launch_dependents()
        v = _round(v + a, DT)
        tl.store(sum_ptr + row * H + cols, v.to(DT), mask=inside)
        mean = tl.math.div_rn(tl.sum(v, axis=0), H * 1.0)
        d = tl.where(inside, v - mean, 0.0)
        var = tl.math.div_rn(tl.sum(d * d, axis=0), H * 1.0)
        out = d * tl.math.rsqrt(var + eps) * w + bias
        tl.store(out_ptr + row * H + cols, _round(out, DT).to(DT), mask=inside)
else:  # pragma: no cover - depends on the environment
    _rms_norm_kernel = None
    _add_layer_norm_kernel = None


# ------------------------------------------------------------------------------------- public

def _options(x: torch.Tensor, block: int) -> dict:
    """Launch options: warps for the row width, no fp contraction (exact fp32 steps), and PDL where
    attention_kernel.PDL turns it on for x's GPU (never on the CPU or under the interpreter)."""
    warps = NUM_WARPS or max(1, min(16, block // (32 * ELEMENTS_PER_THREAD)))
    return {**_launch_options(x, warps), **_pdl_options(x)}


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [rows, H] with a contiguous last dim (a view where the leading dims allow one)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x: torch.Tensor, a: torch.Tensor | None, w: torch.Tensor, eps: float):
    xr = _as_rows(x)
    ar = _as_rows(a) if a is not None else xr
    h = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device) if a is not None else out
    n_rows = xr.shape[0]
    if n_rows:
        block = _next_pow2(h)
        with _device_guard(x):
            _rms_norm_kernel[(n_rows,)](
                xr, ar, w.contiguous(), total, out, xr.stride(0), ar.stride(0), float(eps),
                H=h, BLOCK=block, ADD=a is not None, DT=_TL_DTYPE[x.dtype], **_options(x, block))
    return total, out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """graphs._rms(x, w, eps) for x [..., H], w [H] in x's dtype, as one Triton kernel (PDL-capable)."""
    if not (available(x) and supported(x, w)):
        return rms_norm_reference(x, w, eps)
    return _launch(x, None, w, eps)[1]


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float):
    """(x + a, graphs._rms(x + a, w, eps)) for x, a [..., H], w [H], all one dtype: one Triton kernel
    (graphs.fused_add_rms_norm's residual add + the next layer's norm)."""
    if not (available(x) and supported(x, w, a)):
        return add_rms_norm_reference(x, a, w, eps)
    return _launch(x, a, w, eps)


def add_layer_norm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float):
    """(x + a, F.layer_norm(x + a, (H,), w, b, eps)) for x, a [..., H], w, b [H], all one dtype: one Triton
    kernel (graphs.fused_add_layer_norm: the vision tower's residual add + the next LayerNorm)."""
    if not (available(x) and layer_norm_supported(x, w, b, a)):
        return add_layer_norm_reference(x, a, w, b, eps)
    xr, ar = _as_rows(x), _as_rows(a)
    h = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if xr.shape[0]:
        block = _next_pow2(h)
        with _device_guard(x):
            _add_layer_norm_kernel[(xr.shape[0],)](
                xr, ar, w.contiguous(), b.contiguous(), total, out, xr.stride(0), ar.stride(0), float(eps),
                H=h, BLOCK=block, DT=_TL_DTYPE[x.dtype], **_options(x, block))
    return total, out


__all__ = ["available", "supported", "layer_norm_supported", "rms_norm", "add_rms_norm", "add_layer_norm",
           "rms_norm_reference", "add_rms_norm_reference", "add_layer_norm_reference"]
