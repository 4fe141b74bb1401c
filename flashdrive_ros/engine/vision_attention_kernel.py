"""The vision tower's attention: full (non-causal) attention inside each image, head dim 72 (issue 7).

    out = vision_attention(q, k, v, n_images, scale)     # q/k/v [N, H, D] -> out [N, H * D]

N = n_images * L patch rows, image i owning rows [i * L, (i + 1) * L). q, k, v may be strided views
(the qkv GEMM's [N, 3, H, D] output, the rotary's output); the last dim must be contiguous. The output
is written straight in the layout the output projection reads, [N, H * D].

Why a kernel: at the full shape (4 images x 720 patches x 16 heads, head dim 72) cuDNN's flash
attention takes ~40 us per layer on an H100, ~240 TFLOP/s, because 72 is no tile width it is built for.
tl.dot needs power-of-two tiles, and padding the head to 128 lanes with masked loads spends 78 % more
FLOPs and breaks vectorised loads. So the head is split into an unmasked 64-lane part and a small
16-lane rest whose lanes 72..79 read as zeros: scores = qa.ka + qb.kb, out = [p.va | p.vb], 11 %
padding. All operands arrive through TMA descriptors (bulk copies into shared memory, which TMA fills
with zeros past the head's 72 lanes), so no load needs a mask. One program per (row tile, image, head);
an online softmax (exp2, fp32 statistics) over the image's key blocks; the probabilities go to the
value dot in the inputs' dtype as in flash attention. Needs TMA: sm_90+ (elsewhere SDPA runs).

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
try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


@dataclass(frozen=True)
class Config:
    block_m: int = 128   # query rows per program
    block_n: int = 64    # keys per inner step
    num_warps: int = 8
    num_stages: int = 2


DEFAULT = Config()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(t: torch.Tensor) -> bool:
    """True when the kernel can run on tensor t: TMA descriptors importable and a CUDA tensor on an sm_90+
    GPU (Hopper, Blackwell, Thor), or any tensor while Triton's interpreter (TRITON_INTERPRET=1, set before
    import) is on."""
    if triton is None or TensorDescriptor is None:
        return False
    if _interpreting():
        return True
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def head_split(head_dim: int) -> tuple[int, int]:
    """(lanes of the unmasked part, lanes of the rest; 0 = none): 72 -> (64, 16), 64 -> (64, 0),
    80 -> (64, 16), 40 -> (32, 16). Both are powers of two and at least 16 (tl.dot's minimum)."""
    if head_dim < 16 or head_dim % 8:
        raise ValueError(f"head dim must be a multiple of 8 and at least 16, got {head_dim}")
    main = 1 << (head_dim.bit_length() - 1)  # the largest power of two <= head_dim
    rest = head_dim - main
    return main, (0 if rest == 0 else max(16, 1 << (rest - 1).bit_length()))


def _descriptor_ok(t: torch.Tensor) -> bool:
    """TMA addresses t [N, H, D]: 16-byte aligned base, contiguous last dim, row and head strides that are
    positive multiples of 16 bytes."""
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:-1]))


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these operands (else the caller runs SDPA)."""
    if not available(q) or q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    d = q.shape[-1]
    return d >= 16 and d % 8 == 0 and all(_descriptor_ok(t) for t in (q, k, v))


def vision_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_images: int,
                               scale: float) -> torch.Tensor:
    """SDPA inside each image: q/k/v [N, H, D] -> [N, H * D]."""
    n, h, d = q.shape

    def per_image(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n_images, n // n_images, h, d).transpose(1, 2)

    o = F.scaled_dot_product_attention(per_image(q), per_image(k), per_image(v), scale=scale)
    return o.transpose(1, 2).reshape(n, h * d)


def _descriptors(t: torch.Tensor, rows: int, main: int, rest: int):
    """Two descriptors over t [N, H, D]: blocks [rows, 1, main] (lanes 0..main-1) and [rows, 1, rest]
    (loaded at lane `main`; TMA reads zeros past D and past N)."""
    shape, strides = list(t.shape), list(t.stride())
    a = TensorDescriptor(t, shape, strides, [rows, 1, main])
    return a, (TensorDescriptor(t, shape, strides, [rows, 1, rest]) if rest else a)


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_images: int, scale: float,
                     config: Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention inside each of n_images equal images; q/k/v [N, H, D] -> [N, H * D]."""
    if not supports(q, k, v):
        raise ValueError(f"vision_attention takes q/k/v [N, H, D] of one float dtype, D a multiple of 8 >= 16, "
                         f"16-byte aligned rows and heads, on an sm_90+ GPU; got {tuple(q.shape)} {q.dtype}, "
                         f"strides {q.stride()}, {q.device}")
    n, h, d = q.shape
    if n_images < 1 or n % n_images:
        raise ValueError(f"{n} rows do not split into {n_images} equal images")
    seq = n // n_images
    cfg = config or DEFAULT
    main, rest = head_split(d)
    if out is None:
        out = torch.empty(n, h * d, dtype=q.dtype, device=q.device)
    qa, qb = _descriptors(q, cfg.block_m, main, rest)
    ka, kb = _descriptors(k, cfg.block_n, main, rest)
    va, vb = _descriptors(v, cfg.block_n, main, rest)
    grid = (triton.cdiv(seq, cfg.block_m), n_images * h)
    _vision_attention_fwd[grid](
        qa, qb, ka, kb, va, vb, out, out.stride(0),
        scale * 1.4426950408889634,  # log2(e): the softmax runs on exp2
        SEQ=seq, HEADS=h, D=d, DA=main, DB=rest, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        UPCAST=q.device.type == "cpu", PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


if triton is not None:

    @triton.jit
    def _softmax_step(qa, qb, ka, kb, va, vb, acc_a, acc_b, m_i, l_i, keys, qk_scale_log2,
                      SEQ: tl.constexpr, DB: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """One key block of the online softmax: scores over the split head, then the two value dots."""
        s = tl.dot(qa, tl.trans(ka.to(qa.dtype)), input_precision=PRECISION)
        if DB > 0:
            s = tl.dot(qb, tl.trans(kb.to(qa.dtype)), s, input_precision=PRECISION)
        s = s * qk_scale_log2
        if MASKED:  # the image's last, partial key block: later rows are the next image's (or zeros past N)
            s = tl.where((keys < SEQ)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(va.dtype).to(qa.dtype)  # the value dot takes probabilities in the inputs' dtype
        acc_a = tl.dot(p, va.to(qa.dtype), acc_a * alpha[:, None], input_precision=PRECISION)
        if DB > 0:
            acc_b = tl.dot(p, vb.to(qa.dtype), acc_b * alpha[:, None], input_precision=PRECISION)
        return acc_a, acc_b, m_new, l_i

    @triton.jit
    def _vision_attention_fwd(QA, QB, KA, KB, VA, VB, o_ptr, so_row, qk_scale_log2,
                              SEQ: tl.constexpr, HEADS: tl.constexpr,
                              D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                              PRECISION: tl.constexpr):
        """Program (row tile, image * HEADS + head). Q, K and V arrive through TMA descriptors over
        [N, H, D] in blocks [rows, 1, lanes]: the 64-lane part at lane 0, the rest at lane DA, which TMA
        fills with zeros past D. SEQ (patches per image) is a compile-time constant (one image size per
        model, one compile): the full key blocks run unmasked, the last partial one masked."""
        tile = tl.program_id(0)
        image = tl.program_id(1) // HEADS
        head = tl.program_id(1) % HEADS
        first = image * SEQ  # the image's first row of N
        r0 = first + tile * BLOCK_M
        qa = QA.load([r0, head, 0]).reshape(BLOCK_M, DA)
        if UPCAST:  # Triton's interpreter gets tl.dot wrong on 16-bit inputs; fp32 is exact there
            qa = qa.to(tl.float32)
        qb = qa
        acc_b = tl.zeros([BLOCK_M, DA], dtype=tl.float32)  # unused without a rest
        if DB > 0:
            qb = QB.load([r0, head, DA]).reshape(BLOCK_M, DB).to(qa.dtype)
            acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        FULL: tl.constexpr = SEQ // BLOCK_N * BLOCK_N
        for start in range(0, FULL, BLOCK_N):
            ka = KA.load([first + start, head, 0]).reshape(BLOCK_N, DA)
            va = VA.load([first + start, head, 0]).reshape(BLOCK_N, DA)
            kb, vb = ka, va
            if DB > 0:
                kb = KB.load([first + start, head, DA]).reshape(BLOCK_N, DB)
                vb = VB.load([first + start, head, DA]).reshape(BLOCK_N, DB)
            acc_a, acc_b, m_i, l_i = _softmax_step(qa, qb, ka, kb, va, vb, acc_a, acc_b, m_i, l_i,
                                                   start + offs_n, qk_scale_log2, SEQ, DB, False, PRECISION)
        if FULL < SEQ:
            ka = KA.load([first + FULL, head, 0]).reshape(BLOCK_N, DA)
            va = VA.load([first + FULL, head, 0]).reshape(BLOCK_N, DA)
            kb, vb = ka, va
            if DB > 0:
                kb = KB.load([first + FULL, head, DA]).reshape(BLOCK_N, DB)
                vb = VB.load([first + FULL, head, DA]).reshape(BLOCK_N, DB)
            acc_a, acc_b, m_i, l_i = _softmax_step(qa, qb, ka, kb, va, vb, acc_a, acc_b, m_i, l_i,
                                                   FULL + offs_n, qk_scale_log2, SEQ, DB, True, PRECISION)
        inv = 1.0 / l_i
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < SEQ  # the last row tile's later rows belong to the next image
        o_base = o_ptr + (first + rows[:, None]) * so_row + head * D
        lanes_a = tl.arange(0, DA)
        tl.store(o_base + lanes_a[None, :], (acc_a * inv[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        if DB > 0:
            lanes_b = DA + tl.arange(0, DB)
            tl.store(o_base + lanes_b[None, :], (acc_b * inv[:, None]).to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (lanes_b < D)[None, :])
