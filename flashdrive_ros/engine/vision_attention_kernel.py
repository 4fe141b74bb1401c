"""The vision tower's attention: full (non-causal) attention inside each image, head dim 72 (issue 7).

    out = vision_attention(q, k, v, n_images, scale)     # q/k/v [N, H, D] -> out [N, H * D]

N = n_images * L patch rows, image i owning rows [i * L, (i + 1) * L). q, k, v may be strided views
(the qkv GEMM's [N, 3, H, D] output, the rotary's output); the last dim must be contiguous. The output
is written straight in the layout the output projection reads, [N, H * D].

Why a kernel: at the full shape (4 images x 720 patches x 16 heads, head dim 72) cuDNN's flash
attention takes ~40 us per layer on an H100, ~240 TFLOP/s, because 72 is no tile width it is built for.
tl.dot needs power-of-two tiles, and padding the head to 128 lanes with masked loads spends 78 % more
FLOPs and breaks vectorised loads. So the head is split into an unmasked 64-lane part and a small
16-lane rest whose lanes 72..79 are masked to zero: scores = qa.ka + qb.kb, out = [p.va | p.vb],
11 % padding, and the 64-lane loads stay full-width. One program per (row tile, image, head); an
online softmax (exp2, fp32 statistics) over the image's key blocks; the probabilities go to the value
dot in the inputs' dtype as in flash attention.

`vision_attention_reference` is the specification in plain PyTorch (SDPA per image).
scripts/gpu_vision_attention_check.py times the configs against cuDNN on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference still works, available() says False
    triton = None
    tl = None


@dataclass(frozen=True)
class Config:
    block_m: int = 128   # query rows per program
    block_n: int = 64    # keys per inner step
    num_warps: int = 8
    num_stages: int = 2


DEFAULT = Config()


def available(t: torch.Tensor) -> bool:
    """True when the kernel can run on tensor t: a CUDA tensor with triton importable, or any tensor
    while Triton's interpreter (TRITON_INTERPRET=1, set before import) is on."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return triton is not None and (t.is_cuda or interpreting)


def head_split(head_dim: int) -> tuple[int, int]:
    """(lanes of the unmasked part, lanes of the masked rest; 0 = none): 72 -> (64, 16), 64 -> (64, 0),
    80 -> (64, 16), 40 -> (32, 16). Both are powers of two and at least 16 (tl.dot's minimum)."""
    if head_dim < 16 or head_dim % 8:
        raise ValueError(f"head dim must be a multiple of 8 and at least 16, got {head_dim}")
    main = 1 << (head_dim.bit_length() - 1)  # the largest power of two <= head_dim
    rest = head_dim - main
    return main, (0 if rest == 0 else max(16, 1 << (rest - 1).bit_length()))


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these operands (else the caller runs SDPA)."""
    if not available(q) or q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    d = q.shape[-1]
    return d >= 16 and d % 8 == 0 and all(t.stride(-1) == 1 for t in (q, k, v))


def vision_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_images: int,
                               scale: float) -> torch.Tensor:
    """SDPA inside each image: q/k/v [N, H, D] -> [N, H * D]."""
    n, h, d = q.shape

    def per_image(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n_images, n // n_images, h, d).transpose(1, 2)

    o = F.scaled_dot_product_attention(per_image(q), per_image(k), per_image(v), scale=scale)
    return o.transpose(1, 2).reshape(n, h * d)


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_images: int, scale: float,
                     config: Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention inside each of n_images equal images; q/k/v [N, H, D] (last dim contiguous) -> [N, H * D]."""
    if not supports(q, k, v):
        raise ValueError(f"vision_attention takes q/k/v [N, H, D] of one float dtype with a contiguous last dim "
                         f"and D a multiple of 8 >= 16; got {tuple(q.shape)} {q.dtype}, strides {q.stride()}")
    n, h, d = q.shape
    if n_images < 1 or n % n_images:
        raise ValueError(f"{n} rows do not split into {n_images} equal images")
    seq = n // n_images
    cfg = config or DEFAULT
    main, rest = head_split(d)
    if out is None:
        out = torch.empty(n, h * d, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(seq, cfg.block_m), n_images * h)
    _vision_attention_fwd[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
        scale * 1.4426950408889634,  # log2(e): the softmax runs on exp2
        SEQ=seq, HEADS=h, D=d, DA=main, DB=rest, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        UPCAST=q.device.type == "cpu", PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


if triton is not None:

    @triton.jit
    def _vision_attention_fwd(q_ptr, k_ptr, v_ptr, o_ptr,
                              sq_row, sq_head, sk_row, sk_head, sv_row, sv_head, so_row,
                              qk_scale_log2,
                              SEQ: tl.constexpr, HEADS: tl.constexpr,
                              D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                              PRECISION: tl.constexpr):
        # SEQ (patches per image) is a compile-time constant: the key loop and its last partial block
        # are fixed at compile time (one image size per model, so one compile)
        tile = tl.program_id(0)
        image = tl.program_id(1) // HEADS
        head = tl.program_id(1) % HEADS
        first = image * SEQ  # the image's first row of N
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < SEQ
        lanes_a = tl.arange(0, DA)
        q_base = q_ptr + first * sq_row + head * sq_head
        k_base = k_ptr + first * sk_row + head * sk_head
        v_base = v_ptr + first * sv_row + head * sv_head
        qa = tl.load(q_base + rows[:, None] * sq_row + lanes_a[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:  # Triton's interpreter gets tl.dot wrong on 16-bit inputs; fp32 is exact there
            qa = qa.to(tl.float32)
        if DB > 0:
            lanes_b = DA + tl.arange(0, DB)
            lane_b_ok = lanes_b < D
            qb = tl.load(q_base + rows[:, None] * sq_row + lanes_b[None, :],
                         mask=row_ok[:, None] & lane_b_ok[None, :], other=0.0)
            if UPCAST:
                qb = qb.to(tl.float32)
            acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
        for start in range(0, SEQ, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < SEQ
            ka = tl.load(k_base + keys[None, :] * sk_row + lanes_a[:, None], mask=key_ok[None, :], other=0.0)
            s = tl.dot(qa, ka.to(qa.dtype), input_precision=PRECISION)
            if DB > 0:
                kb = tl.load(k_base + keys[None, :] * sk_row + lanes_b[:, None],
                             mask=key_ok[None, :] & lane_b_ok[:, None], other=0.0)
                s = tl.dot(qb, kb.to(qb.dtype), s, input_precision=PRECISION)
            s = tl.where(key_ok[None, :], s * qk_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(q_ptr.dtype.element_ty).to(qa.dtype)  # the value dot takes probabilities in the inputs' dtype
            va = tl.load(v_base + keys[:, None] * sv_row + lanes_a[None, :], mask=key_ok[:, None], other=0.0)
            acc_a = tl.dot(p, va.to(qa.dtype), acc_a * alpha[:, None], input_precision=PRECISION)
            if DB > 0:
                vb = tl.load(v_base + keys[:, None] * sv_row + lanes_b[None, :],
                             mask=key_ok[:, None] & lane_b_ok[None, :], other=0.0)
                acc_b = tl.dot(p, vb.to(qa.dtype), acc_b * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        inv = 1.0 / l_i
        o_base = o_ptr + (first + rows[:, None]) * so_row + head * D
        tl.store(o_base + lanes_a[None, :], (acc_a * inv[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        if DB > 0:
            tl.store(o_base + lanes_b[None, :], (acc_b * inv[:, None]).to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & lane_b_ok[None, :])
