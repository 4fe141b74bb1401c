"""Attention among the patches of each image (the vision tower's), for head dims that are no power of two.

    out = patch_attention(q, k, v, scale)     # q/k/v [n_img, heads, L, D] (any strides, last dim contiguous)
                                              # -> [n_img, L, heads, D]: the layout the output projection reads

Why a kernel: the vision tower's heads are 72 wide. cuDNN's flash kernel pads them to 128 and took 40 us per
layer for 4 images x 720 patches on an H100 (~60 TFLOP/s); PyTorch's own flash / efficient kernels were
slower still, and attention_kernel.slot_attention with the 72 lanes masked inside 128 lost its vectorised
loads (139 us). Here the head dim is split into a power-of-two part that loads unmasked (64) and a short
masked tail padded to 16 lanes (8 of them real): scores are the sum of two dots, the output two
accumulators. Every patch sees every patch of its image (no mask beyond the last key block).

FlashAttention-2 forward: one program per (row tile, image * head), online softmax in fp32 (scores in
log2 units for exp2), the output written straight in [n_img, L, heads, D]. Graph-safe (no host sync).
`patch_attention_reference` is the specification.
"""

from __future__ import annotations

import math

import torch

from flashdrive_ros.engine.attention_kernel import _interpreting, _patch_interpreter_for_numpy_2_4, _pow2_at_least

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference still works, available() says False
    triton = None
    tl = None

BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3


def split_head_dim(d: int) -> tuple[int, int]:
    """(unmasked power-of-two part, padded tail width) of a head dim: 72 -> (64, 16), 128 -> (128, 0)."""
    if d < 16 or d > 256 or d % 8:
        raise ValueError(f"head dim must be a multiple of 8 in [16, 256], got {d}")
    lo = 1 << (d.bit_length() - 1)
    rest = d - lo
    return lo, (0 if rest == 0 else max(16, _pow2_at_least(rest)))


if triton is not None:
    if _interpreting():
        _patch_interpreter_for_numpy_2_4()

    @triton.jit
    def _patch_attention_fwd(Q, K, V, OUT, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                             so_b, so_l, so_h, n_heads, L, qk_scale,
                             D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                             PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        offs_n = tl.arange(0, BLOCK_N)
        d_lo = tl.arange(0, D_LO)
        q_base = Q + b * sq_b + h * sq_h + rows[:, None] * sq_l
        q_lo = tl.load(q_base + d_lo[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:  # Triton's interpreter gets tl.dot wrong on 16-bit inputs
            q_lo = q_lo.to(tl.float32)
        k_base = K + b * sk_b + h * sk_h
        v_base = V + b * sv_b + h * sv_h
        if D_HI > 0:
            d_hi = D_LO + tl.arange(0, D_HI)
            hi_ok = d_hi < D
            q_hi = tl.load(q_base + d_hi[None, :], mask=row_ok[:, None] & hi_ok[None, :], other=0.0)
            if UPCAST:
                q_hi = q_hi.to(tl.float32)
            acc_hi = tl.zeros([BLOCK_M, D_HI], dtype=tl.float32)
        acc_lo = tl.zeros([BLOCK_M, D_LO], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, L, BLOCK_N):
            keys = start + offs_n
            k_ok = keys < L
            k_lo = tl.load(k_base + keys[:, None] * sk_l + d_lo[None, :], mask=k_ok[:, None], other=0.0)
            v_lo = tl.load(v_base + keys[:, None] * sv_l + d_lo[None, :], mask=k_ok[:, None], other=0.0)
            if UPCAST:
                k_lo = k_lo.to(tl.float32)
                v_lo = v_lo.to(tl.float32)
            s = tl.dot(q_lo, tl.trans(k_lo), input_precision=PRECISION)
            if D_HI > 0:
                k_hi = tl.load(k_base + keys[:, None] * sk_l + d_hi[None, :], mask=k_ok[:, None] & hi_ok[None, :],
                               other=0.0)
                if UPCAST:
                    k_hi = k_hi.to(tl.float32)
                s += tl.dot(q_hi, tl.trans(k_hi), input_precision=PRECISION)
            s = tl.where(k_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc_lo = acc_lo * alpha[:, None] + tl.dot(p.to(v_lo.dtype), v_lo, input_precision=PRECISION)
            if D_HI > 0:
                v_hi = tl.load(v_base + keys[:, None] * sv_l + d_hi[None, :], mask=k_ok[:, None] & hi_ok[None, :],
                               other=0.0)
                if UPCAST:
                    v_hi = v_hi.to(tl.float32)
                acc_hi = acc_hi * alpha[:, None] + tl.dot(p.to(v_hi.dtype), v_hi, input_precision=PRECISION)
            m_i = m_new
        o_base = OUT + b * so_b + h * so_h + rows[:, None] * so_l
        inv = 1.0 / l_i  # every row sees at least the first key
        tl.store(o_base + d_lo[None, :], (acc_lo * inv[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None])
        if D_HI > 0:
            tl.store(o_base + d_hi[None, :], (acc_hi * inv[:, None]).to(OUT.dtype.element_ty),
                     mask=row_ok[:, None] & hi_ok[None, :])


def available(t: torch.Tensor) -> bool:
    """True when the kernel can run on t: CUDA with triton, or any tensor under Triton's interpreter."""
    return triton is not None and (t.is_cuda or _interpreting())


def patch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per image and head. q/k/v [n_img, heads, L, D] with a contiguous last dim;
    returns [n_img, L, heads, D] in q's dtype (fp32 softmax). Without Triton: the reference.
    tiles: (block_m, block_n, num_warps, num_stages) instead of the module defaults (device sweeps)."""
    if q.shape != k.shape or k.shape != v.shape or q.dim() != 4:
        raise ValueError(f"q, k, v must be equal [n_img, heads, L, D], got {tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)}")
    d = q.shape[-1]
    d_lo, d_hi = split_head_dim(d)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not available(q):
        return patch_attention_reference(q, k, v, scale)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last dim")
    n_img, heads, length, _ = q.shape
    out = torch.empty((n_img, length, heads, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    upcast = _interpreting() and q.dtype != torch.float32
    bm, bn, warps, stages = tiles or (BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES)
    _patch_attention_fwd[(triton.cdiv(length, bm), n_img * heads)](
        q, k, v, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, length, scale * math.log2(math.e),
        D=d, D_LO=d_lo, D_HI=d_hi, BLOCK_M=bm, BLOCK_N=bn, UPCAST=upcast,
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        num_warps=warps, num_stages=stages)
    return out


def patch_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The specification: fp32 softmax attention per image and head, [n_img, L, heads, D] in q's dtype."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype).transpose(1, 2)
