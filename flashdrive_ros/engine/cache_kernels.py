"""Triton kernels for the KV-cache traffic of the CUDA fast path (issue 7).

Why: inside the CUDA graphs, each decoder layer runs one fused q/k RMSNorm + rotary kernel
(graphs.fused_qk_prep) and then writes three cache tensors with `cache.k[i, :, :, slots] = ...`.
PyTorch turns each of those writes into an index_put kernel plus copy kernels (the transposed or
dtype-cast source is made contiguous first). Those generic kernels cost more than the norm itself:
at the full shape ~2.7 ms of index/copy work in the streaming prefill and ~2.4 ms in the action
stage. The streaming slot shift (graphs.cache_shift) is a chain of gathers, index_puts and
elementwise rotary kernels over ~70% of the cache (~1.5 ms).

What this module offers instead:

* `qk_norm_rope_store`: ONE kernel per layer that reads q/k/v straight from the fused projection
  (strided views, no copies), RMS-normalises and rotates q and k, writes the rotated queries as a
  contiguous [B, H, Q, D] tensor and scatters k (pre-RoPE), v and the rotated k into their cache
  slots. Replaces fused_qk_prep + 3 index_puts + the copies.
* `shift_slots`: the streaming shift (graphs.cache_shift semantics) in 2 kernels, or in one
  in-place kernel per "wave" when the caller orders the pairs so that no slot is overwritten before
  it is read (`shift_waves` computes such an order on the host, once, when a graph is built).
* `available(t)`: whether the Triton path can run for tensors like `t` (CUDA, or Triton's CPU
  interpreter with TRITON_INTERPRET=1, which is how the CPU tests run these kernels). The public
  functions fall back to the eager reference (graphs.py math) when it cannot.

Numerics: the kernels reproduce the eager PyTorch arithmetic, including its intermediate roundings
in bf16/fp16: graphs._rms computes x * rsqrt(mean(x^2) + eps) in fp32, rounds to x's dtype, then
multiplies by the weight in x's dtype; rope.apply_rotary computes x*cos, rotate_half(x)*sin and their
sum each rounded to x's dtype. Every such step is computed in fp32 and rounded explicitly
(`_round`), so the results are bitwise those of the eager code up to the order of the fp32 sum in
the RMS (a last-bit difference in mean(x^2) can, rarely, flip one bf16 rounding). torch.compile'd
fused_qk_prep may keep bf16 intermediates in fp32 instead, so on the GPU it can differ from both
eager and these kernels by one bf16 ulp on a few elements. fp32 agrees to ~1 ulp (summation order).

Integration (graphs.py, by its owner): in lm_forward's attend(i, attn, q, k, v)
    qr = qk_norm_rope_store(q, k, v, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps,
                            cos, sin, cache, i, slots)
replaces fused_qk_prep + the three writes (qr is contiguous, so gqa_attention's reshape is free);
expert_forward's attend() does the same with act_slots and store_pre_rope=False when
cache.batch == k_samples (the shared batch-1 branch keeps fused_qk_prep: it stores nothing).
cache_shift(cache, src, dst) -> shift_slots(cache, src, dst), or with a plan from shift_waves.

No host synchronisation anywhere (all launches are captured into CUDA graphs): grids come from
static shapes, slot indices are only read on the device, and all checks look at shapes/dtypes only.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .attention_kernel import pdl_enabled

try:  # Triton is optional: CPU-only installs without it use the eager reference.
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = tl = None
    _HAVE_TRITON = False


# ---------------------------------------------------------------------------------- availability

def interpreted() -> bool:
    """True when this module's kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 was
    set before the module was imported: triton.jit decides at decoration time)."""
    return _INTERPRETED


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on tensors like `t`: a CUDA tensor with triton importable,
    or any tensor when the interpreter built the kernels."""
    return _HAVE_TRITON and (interpreted() or t.is_cuda)


# --------------------------------------------------------------------------- eager references
# The semantics the kernels implement, written with graphs.py's own functions (imported lazily:
# graphs.py may import this module).

def qk_norm_rope_store_reference(q, k, v, q_norm_w, k_norm_w, eps, cos, sin, cache, layer, slots,
                                 store_pre_rope: bool = True) -> torch.Tensor:
    """fused_qk_prep followed by the three cache writes of lm_forward / expert_forward's attend()."""
    from .graphs import fused_qk_prep

    qr, kn, kr = fused_qk_prep(q, k, q_norm_w, k_norm_w, eps, cos, sin)
    if store_pre_rope:
        cache.k[layer, :, :, slots] = kn.to(cache.dtype)
    cache.v[layer, :, :, slots] = v.to(cache.dtype)
    cache.k_rot[layer, :, :, slots] = kr.to(cache.dtype)
    return qr.contiguous()


def shift_slots_reference(cache, src: torch.Tensor, dst: torch.Tensor) -> None:
    """graphs.cache_shift: k[dst] = k[src], v[dst] = v[src], k_rot[dst] = rotate(k[src]) at dst's
    positions, on every layer/batch/head; all sources are read before any destination is written."""
    from .graphs import cache_shift

    cache_shift(cache, src, dst)


# ----------------------------------------------------------------------------- Triton kernels

_TL_DTYPE = {}
if _HAVE_TRITON:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _round(x, DT: tl.constexpr):
        """fp32 `x` rounded (to nearest even) to dtype DT, returned as fp32: emulates an eager
        PyTorch op whose result tensor has dtype DT. bf16 is rounded by integer arithmetic on the bit
        pattern: the GPU's cvt would do the same, but Triton's interpreter truncates fp32 -> bf16,
        and the CPU tests must see the GPU's arithmetic."""
        if DT == tl.float32:
            y = x
        elif DT == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # keep NaN a NaN
        else:
            y = x.to(DT).to(tl.float32)
        return y

    @triton.jit
    def _rotate(x_lo, x_hi, c_lo, c_hi, s_lo, s_hi, DT: tl.constexpr):
        """rope.apply_rotary on the two halves of the head dim, each op rounded to DT like eager:
        x*cos + rotate_half(x)*sin with rotate_half(x) = (-x_hi, x_lo). Negation is exact, so
        round(-a*b) = -round(a*b) and the low half is round(round(x_lo*c) - round(x_hi*s))."""
        r_lo = _round(_round(x_lo * c_lo, DT) - _round(x_hi * s_lo, DT), DT)
        r_hi = _round(_round(x_hi * c_hi, DT) + _round(x_lo * s_hi, DT), DT)
        return r_lo, r_hi

    @triton.jit
    def _rms_norm(x_lo, x_hi, w_lo, w_hi, eps, D: tl.constexpr, DT: tl.constexpr):
        """graphs._rms per row (one head) of [heads, half] tiles: x * rsqrt(mean(x^2) + eps) in fp32,
        rounded to DT, times the weight, rounded to DT. Padded lanes are 0 and add nothing."""
        ms = (tl.sum(x_lo * x_lo, axis=1) + tl.sum(x_hi * x_hi, axis=1)) / D
        r = tl.math.rsqrt(ms + eps)[:, None]
        n_lo = _round(w_lo * _round(x_lo * r, DT), DT)
        n_hi = _round(w_hi * _round(x_hi * r, DT), DT)
        return n_lo, n_hi

    @triton.jit
    def _qk_norm_rope_store_kernel(
        q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, slots_ptr,
        qo_ptr, ck_ptr, cv_ptr, ckr_ptr,
        sq_b, sq_t, sq_h, sq_d,
        sk_b, sk_t, sk_h, sk_d,
        sv_b, sv_h, sv_t, sv_d,
        scos_t, scos_d, ssin_t, ssin_d,
        sc_b, sc_h, sc_s, s_slot,
        n_tok, n_q_heads, n_kv_heads, n_q_blocks, eps,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, HEADS: tl.constexpr,
        STORE_PRE: tl.constexpr, DT: tl.constexpr, CDT: tl.constexpr, USE_PDL: tl.constexpr = False,
    ):
        """Grid (token t, batch b, head block). Blocks [0, n_q_blocks) take HEADS query heads each and
        write rotated q to qo [B, H, Q, D]; the others take HEADS kv heads each: norm + rotate k,
        copy v, and scatter k / v / rotated k to cache row `slots[t]` (cache layer views [B, KV, M, D]).
        Every row is split into its low/high halves so rotate_half is plain register arithmetic.
        USE_PDL (attention_kernel.PDL): launched early; wait for the projection's output, then let the
        attention that reads what we store launch (it waits for us in turn)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        t = tl.program_id(0)
        b = tl.program_id(1)
        blk = tl.program_id(2)
        d = tl.arange(0, BLOCK_HALF)
        dm = d < HALF
        hh = tl.arange(0, HEADS)

        # cos/sin of this token's slot, rounded to the compute dtype like apply_rotary's cos.to(x.dtype)
        cp = cos_ptr + t * scos_t
        sp = sin_ptr + t * ssin_t
        c_lo = _round(tl.load(cp + d * scos_d, mask=dm, other=0.0).to(tl.float32), DT)[None, :]
        c_hi = _round(tl.load(cp + (d + HALF) * scos_d, mask=dm, other=0.0).to(tl.float32), DT)[None, :]
        s_lo = _round(tl.load(sp + d * ssin_d, mask=dm, other=0.0).to(tl.float32), DT)[None, :]
        s_hi = _round(tl.load(sp + (d + HALF) * ssin_d, mask=dm, other=0.0).to(tl.float32), DT)[None, :]

        if blk < n_q_blocks:
            h = blk * HEADS + hh
            m = (h < n_q_heads)[:, None] & dm[None, :]
            src = q_ptr + b * sq_b + t * sq_t + h[:, None] * sq_h + d[None, :] * sq_d
            x_lo = tl.load(src, mask=m, other=0.0).to(tl.float32)
            x_hi = tl.load(src + HALF * sq_d, mask=m, other=0.0).to(tl.float32)
            w_lo = tl.load(qw_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
            w_hi = tl.load(qw_ptr + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
            n_lo, n_hi = _rms_norm(x_lo, x_hi, w_lo, w_hi, eps, 2 * HALF, DT)
            r_lo, r_hi = _rotate(n_lo, n_hi, c_lo, c_hi, s_lo, s_hi, DT)
            # q_rot [B, H, Q, D] contiguous
            dst = qo_ptr + ((b * n_q_heads + h[:, None]) * n_tok + t) * (2 * HALF) + d[None, :]
            tl.store(dst, r_lo.to(qo_ptr.dtype.element_ty), mask=m)
            tl.store(dst + HALF, r_hi.to(qo_ptr.dtype.element_ty), mask=m)
        else:
            h = (blk - n_q_blocks) * HEADS + hh
            m = (h < n_kv_heads)[:, None] & dm[None, :]
            slot = tl.load(slots_ptr + t * s_slot).to(tl.int64)
            row = b * sc_b + h[:, None] * sc_h + slot * sc_s + d[None, :]  # same offsets in k, v, k_rot

            src = k_ptr + b * sk_b + t * sk_t + h[:, None] * sk_h + d[None, :] * sk_d
            x_lo = tl.load(src, mask=m, other=0.0).to(tl.float32)
            x_hi = tl.load(src + HALF * sk_d, mask=m, other=0.0).to(tl.float32)
            w_lo = tl.load(kw_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
            w_hi = tl.load(kw_ptr + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
            n_lo, n_hi = _rms_norm(x_lo, x_hi, w_lo, w_hi, eps, 2 * HALF, DT)
            r_lo, r_hi = _rotate(n_lo, n_hi, c_lo, c_hi, s_lo, s_hi, DT)
            if STORE_PRE:
                tl.store(ck_ptr + row, _round(n_lo, CDT).to(CDT), mask=m)
                tl.store(ck_ptr + row + HALF, _round(n_hi, CDT).to(CDT), mask=m)
            tl.store(ckr_ptr + row, _round(r_lo, CDT).to(CDT), mask=m)
            tl.store(ckr_ptr + row + HALF, _round(r_hi, CDT).to(CDT), mask=m)

            vsrc = v_ptr + b * sv_b + t * sv_t + h[:, None] * sv_h + d[None, :] * sv_d
            v_lo = tl.load(vsrc, mask=m, other=0.0).to(tl.float32)
            v_hi = tl.load(vsrc + HALF * sv_d, mask=m, other=0.0).to(tl.float32)
            tl.store(cv_ptr + row, _round(v_lo, CDT).to(CDT), mask=m)
            tl.store(cv_ptr + row + HALF, _round(v_hi, CDT).to(CDT), mask=m)

    @triton.jit
    def _move_rows_kernel(
        in_k, in_v, in_rows, out_k, out_v, out_kr, out_rows, cos_ptr, sin_ptr,
        n_rows, in_slice, out_slice, s_in_rows, s_out_rows,
        N_INNER: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
        IN_INDEXED: tl.constexpr, OUT_INDEXED: tl.constexpr, ROTATE: tl.constexpr, DT: tl.constexpr,
    ):
        """Row copy between [slices, rows, D] tensors (rows of D = 2*HALF contiguous elements).
        Grid (row tile, outer); the program loops over N_INNER slices (outer * N_INNER + j), so the
        row indices and cos/sin are loaded once and reused for every kv head of a layer. Pair r reads
        row in_rows[r] (or r) of in_k/in_v and writes row out_rows[r] (or r) of out_k/out_v, and, with
        ROTATE, the key rotated at the destination row's position (cos/sin [M, D] fp32) to out_kr.
        All loads of a slice precede its stores in every thread, and each element is stored by the
        program that loaded it, so a pair whose source equals its own destination is safe; pairs
        where one's destination is another's source are NOT (the callers split those, see shift_slots)."""
        tile = tl.program_id(0)
        outer = tl.program_id(1).to(tl.int64)
        r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = r < n_rows
        d = tl.arange(0, BLOCK_HALF)
        m = rm[:, None] & (d < HALF)[None, :]
        if IN_INDEXED:
            src = tl.load(in_rows + r * s_in_rows, mask=rm, other=0).to(tl.int64)
        else:
            src = r.to(tl.int64)
        if OUT_INDEXED:
            dst = tl.load(out_rows + r * s_out_rows, mask=rm, other=0).to(tl.int64)
        else:
            dst = r.to(tl.int64)
        src_off = src[:, None] * (2 * HALF) + d[None, :]
        dst_off = dst[:, None] * (2 * HALF) + d[None, :]
        if ROTATE:  # apply_rotary casts the fp32 table to the key dtype first
            c_lo = _round(tl.load(cos_ptr + dst_off, mask=m, other=0.0), DT)
            c_hi = _round(tl.load(cos_ptr + dst_off + HALF, mask=m, other=0.0), DT)
            s_lo = _round(tl.load(sin_ptr + dst_off, mask=m, other=0.0), DT)
            s_hi = _round(tl.load(sin_ptr + dst_off + HALF, mask=m, other=0.0), DT)
        for j in range(N_INNER):  # iterations touch disjoint slices: free to overlap
            s = outer * N_INNER + j
            a = s * in_slice + src_off
            z = s * out_slice + dst_off
            k_lo = tl.load(in_k + a, mask=m)
            k_hi = tl.load(in_k + a + HALF, mask=m)
            v_lo = tl.load(in_v + a, mask=m)
            v_hi = tl.load(in_v + a + HALF, mask=m)
            tl.store(out_k + z, k_lo, mask=m)
            tl.store(out_k + z + HALF, k_hi, mask=m)
            tl.store(out_v + z, v_lo, mask=m)
            tl.store(out_v + z + HALF, v_hi, mask=m)
            if ROTATE:
                r_lo, r_hi = _rotate(k_lo.to(tl.float32), k_hi.to(tl.float32), c_lo, c_hi, s_lo, s_hi, DT)
                tl.store(out_kr + z, r_lo.to(out_kr.dtype.element_ty), mask=m)
                tl.store(out_kr + z + HALF, r_hi.to(out_kr.dtype.element_ty), mask=m)
else:  # pragma: no cover
    _qk_norm_rope_store_kernel = _move_rows_kernel = None


def _built_by_interpreter() -> bool:
    if not _HAVE_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(_qk_norm_rope_store_kernel, InterpretedFunction)


_INTERPRETED = _built_by_interpreter()


def _launch_options(t: torch.Tensor, num_warps: int) -> dict:
    # enable_fp_fusion=False: no fused multiply-add contraction, so fp32 results match eager
    # PyTorch's separate multiply and add exactly (free here: the kernels are memory-bound).
    return {} if interpreted() else {"num_warps": num_warps, "enable_fp_fusion": False}


def _pdl_options(t: torch.Tensor) -> dict:
    """Programmatic dependent launch where attention_kernel.PDL turns it on (the kernel waits first)."""
    return {"USE_PDL": True, "launch_pdl": True} if not interpreted() and pdl_enabled(t) else {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it t's device.
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ------------------------------------------------------------------------- public: q/k store

def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_w: torch.Tensor,
                       k_norm_w: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, cache,
                       layer: int, slots: torch.Tensor, store_pre_rope: bool = True) -> torch.Tensor:
    """q/k norm + rotary + cache store of one decoder layer, one kernel. Returns q_rot [B, H, Q, D].

    q [B, Q, H, D], k [B, Q, KV, D], v [B, KV, Q, D]: any strides (views of the fused QKV output);
    q_norm_w / k_norm_w [D] in q's dtype; cos/sin [Q, D] = cache.cos[slots] / sin[slots] (normally
    already cast to q's dtype); slots LongTensor [Q] on the device, distinct, in [0, cache.max_len);
    B == cache.batch. Writes cache.k[layer, :, :, slots] = normed pre-RoPE k (only when
    store_pre_rope: the action stage's scratch slots need only k_rot and v), cache.v[...] = v and
    cache.k_rot[...] = rotated k. Falls back to the eager reference where Triton cannot run."""
    b, n, h, d = q.shape
    kv = k.shape[2]
    if k.shape != (b, n, kv, d) or v.shape != (b, kv, n, d):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q [B, Q, H, D], "
                         f"k [B, Q, KV, D], v [B, KV, Q, D]")
    if cos.shape != (n, d) or sin.shape != (n, d) or slots.shape != (n,):
        raise ValueError(f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, slots {tuple(slots.shape)}: "
                         f"expected [{n}, {d}], [{n}, {d}], [{n}]")
    if (cache.batch, cache.n_kv_heads, cache.head_dim) != (b, kv, d) or not 0 <= layer < cache.n_layers:
        raise ValueError(f"cache (batch {cache.batch}, kv {cache.n_kv_heads}, head_dim {cache.head_dim}, "
                         f"{cache.n_layers} layers) does not fit q/k/v {b}x{kv}x{d} at layer {layer}")
    if q_norm_w.dtype != q.dtype or k_norm_w.dtype != k.dtype or k.dtype != q.dtype or d % 2:
        raise ValueError("q, k and the norm weights must share one dtype and head_dim must be even")
    if not available(q) or q.dtype not in _TL_DTYPE or cache.dtype not in _TL_DTYPE:
        return qk_norm_rope_store_reference(q, k, v, q_norm_w, k_norm_w, eps, cos, sin, cache, layer, slots,
                                            store_pre_rope)
    ck, cv, ckr = cache.k[layer], cache.v[layer], cache.k_rot[layer]  # [B, KV, M, D], contiguous
    assert ck.stride() == cv.stride() == ckr.stride() and ck.stride(-1) == 1
    q_rot = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    if n == 0:
        return q_rot
    half = d // 2
    heads = min(8, _next_pow2(kv))  # heads per program: a q block and a kv block have equal shapes
    n_q_blocks = triton.cdiv(h, heads)
    grid = (n, b, n_q_blocks + triton.cdiv(kv, heads))
    with _device_guard(q):
        _qk_norm_rope_store_kernel[grid](
            q, k, v, q_norm_w, k_norm_w, cos, sin, slots,
            q_rot, ck, cv, ckr,
            *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(),
            ck.stride(0), ck.stride(1), ck.stride(2), slots.stride(0),
            n, h, kv, n_q_blocks, float(eps),
            HALF=half, BLOCK_HALF=_next_pow2(half), HEADS=heads,
            STORE_PRE=bool(store_pre_rope), DT=_TL_DTYPE[q.dtype], CDT=_TL_DTYPE[cache.dtype],
            **_launch_options(q, 4 if heads * half >= 256 else 2), **_pdl_options(q),
        )
    return q_rot


# ------------------------------------------------------------------------------ public: shift

def _move_rows(in_k, in_v, in_rows, out_k, out_v, out_kr, out_rows, cos, sin, n_rows: int, n_outer: int,
               n_inner: int, rotate: bool, dtype: torch.dtype) -> None:
    """Launch _move_rows_kernel over n_outer * n_inner slices of [rows, D] (in_* / out_* contiguous
    from their slice 0; in_rows / out_rows None = identity)."""
    d = in_k.shape[-1]
    half = d // 2
    block_r = 16
    grid = (triton.cdiv(n_rows, block_r), n_outer)
    dummy = in_rows if in_rows is not None else out_rows
    with _device_guard(in_k):
        _move_rows_kernel[grid](
            in_k, in_v, in_rows if in_rows is not None else dummy, out_k, out_v,
            out_kr if out_kr is not None else out_k, out_rows if out_rows is not None else dummy,
            cos, sin, n_rows, in_k.stride(-3), out_k.stride(-3),
            in_rows.stride(0) if in_rows is not None else 0, out_rows.stride(0) if out_rows is not None else 0,
            N_INNER=n_inner, HALF=half, BLOCK_R=block_r, BLOCK_HALF=_next_pow2(half),
            IN_INDEXED=in_rows is not None, OUT_INDEXED=out_rows is not None, ROTATE=bool(rotate),
            DT=_TL_DTYPE[dtype], **_launch_options(in_k, 4),
        )


def shift_slots(cache, src: torch.Tensor, dst: torch.Tensor, waves: Sequence[int] | None = None,
                layers_per_pass: int | None = None) -> None:
    """graphs.cache_shift semantics for every layer, batch row and kv head: k[dst] = k[src],
    v[dst] = v[src], k_rot[dst] = k[src] rotated at the destination slots' positions; every source is
    read before any destination is written, so src and dst may overlap (a streaming shift moves frame
    f+1 onto frame f: the middle frames are both). src/dst: equal-length integer tensors on the device.

    Default (waves=None): 2 kernels. A gather copies k[src], v[src] of all layers into a temporary
    [layers*B*KV, N, D] pair, then a scatter writes k, v and the rotated k at dst. Correct for any
    overlap; moves 9 bytes per cached byte moved (read 2 + write 2, read 2 + write 3) and holds the
    temporary (2 * layers * B * KV * N * D elements: 322 MB for the full-shape streaming shift of 2184
    slots in bf16, held in the graph's pool; `layers_per_pass` processes that many layers per kernel
    pair to bound it, at 2 launches per pass).

    waves=(n0, n1, ...): the caller promises that the pairs, split into consecutive groups of those
    sizes, never write a slot that the same or a later group still reads (`shift_waves` builds such an
    order on the host; `check_waves` verifies one). Each group is then one in-place kernel: no
    temporary, 5 bytes per byte moved (read k, v; write k, v, k_rot). The streaming shift by k = 1
    (frames 1..3 -> 0..2) takes 3 waves; k = 2 and k = 3 take 1 (sources and destinations disjoint).
    """
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} must be equal-length 1-D tensors")
    n = src.numel()
    if waves is not None and sum(int(w) for w in waves) != n:
        raise ValueError(f"waves {tuple(waves)} must sum to the {n} pairs")
    if not available(cache.k) or cache.dtype not in _TL_DTYPE or cache.head_dim % 2:
        if waves is None:
            return shift_slots_reference(cache, src, dst)
        start = 0
        for w in waves:  # same semantics, one group at a time
            shift_slots_reference(cache, src[start:start + w], dst[start:start + w])
            start += w
        return
    if n == 0:
        return
    for t in (cache.k, cache.v, cache.k_rot, cache.cos, cache.sin):
        assert t.is_contiguous()
    n_layers, inner = cache.n_layers, cache.batch * cache.n_kv_heads
    if waves is not None:
        start = 0
        for w in waves:
            w = int(w)
            if w:
                _move_rows(cache.k, cache.v, src[start:start + w], cache.k, cache.v, cache.k_rot,
                           dst[start:start + w], cache.cos, cache.sin, w, n_layers, inner, True, cache.dtype)
            start += w
        return
    per = n_layers if layers_per_pass is None else max(1, min(int(layers_per_pass), n_layers))
    d = cache.head_dim
    tmp_k = torch.empty((per * inner, n, d), dtype=cache.dtype, device=cache.k.device)
    tmp_v = torch.empty_like(tmp_k)
    for l0 in range(0, n_layers, per):
        nl = min(per, n_layers - l0)
        ck, cv, ckr = cache.k[l0:l0 + nl], cache.v[l0:l0 + nl], cache.k_rot[l0:l0 + nl]
        # gather: sources -> temporary (identity rows), no rotation
        _move_rows(ck, cv, src, tmp_k, tmp_v, None, None, cache.cos, cache.sin, n, nl, inner, False, cache.dtype)
        # scatter: temporary -> destinations, rotated key at the destination positions
        _move_rows(tmp_k, tmp_v, None, ck, cv, ckr, dst, cache.cos, cache.sin, n, nl, inner, True, cache.dtype)


# ------------------------------------------------------------------- host helpers for waves

def check_waves(src: torch.Tensor, dst: torch.Tensor, waves: Sequence[int]) -> bool:
    """Host check (reads the indices: not for capture) that the consecutive groups `waves` of the
    pairs (src[i] -> dst[i]) are safe for in-place shift_slots: no slot written by group g is read by
    a different pair of group g or by any later group, and no slot is written twice."""
    s, t = src.tolist(), dst.tolist()
    if len(s) != len(t) or sum(waves) != len(s) or len(set(t)) != len(t):
        return False
    group = [g for g, w in enumerate(waves) for _ in range(int(w))]
    first_write = {}
    for i, slot in enumerate(t):
        first_write[slot] = (group[i], i)
    for j, slot in enumerate(s):
        w = first_write.get(slot)
        if w is not None and w[1] != j and w[0] <= group[j]:
            return False
    return True


def shift_waves(src: torch.Tensor, dst: torch.Tensor):
    """Order the pairs for in-place shift_slots: returns (src', dst', waves) with the pairs regrouped
    (stable within a group) so that each slot is written only after every read of it, or None when
    that is impossible (a cycle, e.g. a swap, or a repeated destination: use waves=None). Host-side,
    once per index set (e.g. when the shift graph is built).

    A pair's group is 0 when no other pair reads its destination, else 1 + the largest group of those
    readers: the longest chain of "reads what I overwrite", so a streaming shift by k = 1 gets 3."""
    s, t = src.tolist(), dst.tolist()
    if len(s) != len(t) or len(set(t)) != len(t):
        return None
    readers: dict[int, list[int]] = {}
    for j, slot in enumerate(s):
        readers.setdefault(slot, []).append(j)
    level = [0] * len(s)
    state = [0] * len(s)  # 0 new, 1 on the stack, 2 done

    for start in range(len(s)):  # iterative depth-first longest path (the chains can be long)
        if state[start]:
            continue
        stack = [(start, iter(j for j in readers.get(t[start], ()) if j != start))]
        state[start] = 1
        while stack:
            i, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[i] = 2
                level[i] = 1 + max((level[j] for j in readers.get(t[i], ()) if j != i), default=-1)
                continue
            if state[nxt] == 1:
                return None  # cycle
            if state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(j for j in readers.get(t[nxt], ()) if j != nxt)))
    n_waves = 1 + max(level, default=-1)
    order = sorted(range(len(s)), key=lambda i: level[i])
    idx = torch.tensor(order, dtype=torch.long, device=src.device)
    waves = tuple(level.count(g) for g in range(n_waves))
    return src[idx], dst[idx], waves


__all__ = [
    "available", "interpreted", "qk_norm_rope_store", "qk_norm_rope_store_reference", "shift_slots",
    "shift_slots_reference", "shift_waves", "check_waves",
]
