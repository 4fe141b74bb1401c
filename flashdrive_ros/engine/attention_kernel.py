"""Attention over KV-cache key slots with one key limit per query (flash-decoding; issue 7).

    out = slot_attention(q, k, v, key_limit)      # q [B, KV, R, D], k/v [B, KV, N, D], key_limit [Q]

Every mask of the fast path (graphs.py) is "query q sees the key slots j < key_limit[q]":
decode / verify / full and streaming prefill rows see keys <= their own slot and < the valid length
(limit = min(slot + 1, L)); the action stage's 64 tokens see the context and their own slots placed
right after it (limit = n_ctx + 64). Queries arrive GQA-folded (graphs.gqa_attention): kv head `h`
carries its g query heads as R = g * Q rows, row r being query r % Q.

Why a kernel: with few query rows (decode R=4, verify 32, action 128) SDPA runs one thread block per
(batch, kv head), 8 in all, and reads the 12.8 MB of K/V at ~0.17 TB/s. Here the key axis is split
over S programs per row tile, each does an online softmax over its chunk and writes a partial
(o, m, l) in fp32, and the partials are merged (flash-decoding): by default in the same kernel, the
last program of the row tile to finish (an atomic counter per tile, reset by that program) reading
the others' partials (FUSED_MERGE; saves the launch and the dependent wave of a second kernel), or
by a second small kernel (Config(fused_merge=False)). Splits past the tile's largest limit have
nothing to add: in the fused merge they exit at once and are not merged. With many rows
(prefill) the row tiles alone fill the GPU, so there is one program per row tile and no split.
In both, a program stops at the largest limit of its rows, so key blocks nobody in the tile sees
(past the valid length, the causal upper triangle) are never read. Config(tma=True) runs either regime
(split plans with the two-kernel merge) as _slot_attention_tma_fwd instead: Q, K and V arrive through TMA tensor descriptors (sm_90+),
bulk asynchronous copies into shared memory in place of per-element pointer loads (see tma_applies for
where it falls back to the pointer kernel).

Graph-safe: no host synchronisation; grid, split count and block sizes come from static shapes and
the (cached) SM count only. `slot_attention_reference` is the specification in plain PyTorch.
Tuning: FEW_ROWS / MANY_ROWS / PROGRAMS_PER_SM / MIN_SPLIT_KEYS / FUSED_MERGE / MERGE_FP32_PER_THREAD below (scripts/gpu_attention_check.py
times the alternatives on the device; `--only prefill --tma-only` the TMA configs of the many-rows regime).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import functools
import math
import os
import threading

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs: the reference still works, available() says False
    triton = None
    tl = None
try:  # host-side TMA descriptors (triton >= 3.4); without them Config(tma=True) runs the pointer kernel
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


# --------------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class Config:
    """Launch configuration. block_m: query rows per program (>= 16, tl.dot's minimum; capped by the
    row count in the few-rows regime); block_n: keys per inner step; splits: key-axis splits
    (0 = automatic, 1 = no split); fused_merge / merge_group: how the splits are merged."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int = 0
    # Split regime only. fused_merge: the last program of a row tile merges the splits itself (one
    # kernel, see _slot_attention_fwd); False: the separate _merge_splits kernel; None: FUSED_MERGE.
    # merge_group: splits the fused merge loads per step (0: auto, MERGE_ELEMENTS per program).
    fused_merge: bool | None = None
    merge_group: int = 0
    # Load Q, K and V through TMA tensor descriptors (_slot_attention_tma_fwd; a split plan merges in
    # _merge_splits). Where TMA cannot run (a fused merge, padded head dims, GPUs before sm_90, layouts a
    # descriptor cannot address; see tma_applies) the pointer kernel runs.
    tma: bool = False


# Few rows (decode, verify, action, drafter): memory bound, parallelism comes from splitting keys.
# Up to 32 rows (decode R=4, verify R=32): 16-row tiles. More (the action's R=128): 64-row tiles with a
# 4-deep pipeline, so each K/V block is read by 2 row tiles instead of 4. Two-kernel sweep on an H200
# (scripts/gpu_probe_session3.py --only few_rows, docs/bench/probe_session3_h200.json), 3057 of 3136
# keys: action 15.5 us at 64/64/4 warps/4 stages/7 splits against 27.4 at the former 32-row default
# (13 splits); verify 12.4-12.8 us at 16 rows and 9-17 splits against 13.4 at 25 splits; decode 10.4-10.7
# against 11.4.
FEW_ROWS = Config(block_m=16, block_n=64, num_warps=4, num_stages=3, splits=0)
FEW_ROWS_TALL = Config(block_m=64, block_n=64, num_warps=4, num_stages=4, splits=0)
FEW_ROWS_MAX_SHORT = 32  # rows up to this take FEW_ROWS, more FEW_ROWS_TALL
# Many rows (prefill): row tiles fill the GPU, no key split. Q/K/V through TMA descriptors (tma=True, the
# _slot_attention_tma_fwd kernel; the pointer kernel where a descriptor cannot address the tensors).
# H100 sweep (scripts/gpu_attention_check.py --only prefill --tma-only, docs/bench/attention_tma_h100.json):
# full prefill R=12140 186.5 us at 64/64/4 warps/3 stages with TMA against 241.4 us for the former pointer
# default (128/64/8/3); streaming prefill R=3196 84.9 us against 99.7 us (pointer 64/64/4/3). Both TMA
# winners are the same tile; 128-row TMA tiles took 100.9-103.1 (streaming) / 215.9-217.8 us (full).
MANY_ROWS = Config(block_m=64, block_n=64, num_warps=4, num_stages=3, splits=1, tma=True)
# Many rows but under two waves of 128-row tiles (the 799-token streaming prefill: 200 tiles on 132 SMs):
# the pointer sweep preferred 64-row tiles there (99.4 us against 114.9 at 128 rows); with TMA the same
# tile wins for both, so the two regimes share one config now (kept apart for future tuning).
MANY_ROWS_SHORT = Config(block_m=64, block_n=64, num_warps=4, num_stages=3, splits=1, tma=True)
# Split regime target: programs per SM, rounded down (one wave: the splits are short, and a second
# wave or more partials cost more than the idle SMs of one wave; the sweep above: action 7 splits =
# 112 programs on 132 SMs beat 13 = 208).
PROGRAMS_PER_SM = 1
# Each split reads at least this many keys: shorter chunks cost more in partial writes and merging
# (a split writes block_m x D fp32 per row tile) than they gain in parallelism.
MIN_SPLIT_KEYS = 128
# Split regime: merge the partials inside the attention kernel (the last program of each row tile
# to finish, found through an atomic counter) instead of a second kernel launch (~3-5 us each at the
# verify / action shapes, mostly launch latency and a dependent wave of tiny programs).
# Off: on an H100 the fused merge measured slower than the two-kernel path at every few-rows shape
# (best fused / best two-kernel: decode 17.2 / 11.8 us, verify 18.9 / 13.8, action 23.4 / 20.4;
# docs/bench/attention_check_h100_run2.json). Kept for configs and tests.
FUSED_MERGE = False
# Fused merge: each step loads merge_group splits of the tile at once ([group, block_m, D] fp32): their
# loads are in flight together instead of one L2 round trip per split. Auto: as many as fit in this
# many fp32 per thread. 32: ptxas (sm_90, D=128) keeps block_m 16 / 4 warps at the two-kernel
# path's 168 registers with group 2 (3 programs per SM, as before; group 4 needs 245 -> 2 per SM);
# block_m 32 gets group 1 (shared memory already limits it to 2 programs per SM).
MERGE_FP32_PER_THREAD = 32
# Two-kernel merge launch: (rows per program, warps). One row per one-warp program: H100 sweep
# (scripts/gpu_probe_session3.py --only few_rows --only-default --merge-sweep,
# docs/bench/probe_session3_merge_h100.json), attention + merge per layer: action 14.1 against 16.3 us with
# (1, 4), verify 12.5 against 13.1, decode 11.9 against 11.6 (noise level); 16 rows / 4 warps tied on the action.
MERGE = (1, 1)
# Programmatic dependent launch (Hopper+): each kernel is launched with the PDL attribute and waits for its
# predecessor's memory (griddepcontrol.wait) before its first load, so its launch and block setup overlap
# the predecessor's tail; the attention kernel lets the merge launch once its key loop is done. Also read
# by cache_kernels (the q/k store before attention) and linear_kernel (the skinny GEMMs and their reduces).
# H100 (scripts/gpu_probe_session4.py, docs/bench/probe_session4_pdl_h100.json), 36 layers of producer +
# attention + merge in one graph, us per layer off / on: decode 10.3 / 9.9, verify 12.1 / 11.5, action 14.2 / 13.1, outputs bitwise equal.
# Never under the interpreter (inline PTX).
PDL = True
# With PDL, before its wait each split program of the few-rows kernel hints the first PREFETCH_BLOCKS key
# blocks of its K and V chunk into L2 (PTX prefetch.global.L2, one per LINE_BYTES): the cache does not depend
# on the producer except for the slots it just stored, and L2 is coherent, so a hint is never stale. The K/V
# stream then starts during the producer's tail. 0: wait first. (The TMA prefill kernel does not prefetch.)
PREFETCH_BLOCKS = 1
LINE_BYTES = 128
# Where the few-rows kernel lets its successor (the merge) launch: False, once its key loop is done; True,
# right after its own wait, so the merge's one-warp programs are resident and waiting when it ends (the
# merge then does the same for the GEMM after it).
TRIGGER_EARLY = True


def pdl_enabled(t: torch.Tensor) -> bool:
    """Launch with programmatic dependent launch: the switch is on, a CUDA tensor on sm_90 or newer."""
    return PDL and t.is_cuda and not _interpreting() and torch.cuda.get_device_capability(t.device)[0] >= 9


@dataclass(frozen=True)
class Plan:
    config: Config  # block_m already capped to the rows
    splits: int     # programs along the key axis per row tile
    chunk: int      # keys per split (a multiple of block_n)
    row_tiles: int
    fused_merge: bool = False  # splits > 1 merged in the attention kernel (no _merge_splits launch)
    merge_group: int = 1       # fused merge: splits loaded per step (a power of two)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's GPU (cached); a nominal 4 off the GPU (interpreter)."""
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device()) \
        if t.is_cuda else 4


def plan(batch_heads: int, rows: int, n_keys: int, sms: int, config: Config | None = None,
         head_dim: int = 128) -> Plan:
    """Pick regime, blocks and split count from static shapes only (so the same plan is captured)."""
    if config is None:
        tiles128 = _cdiv(rows, MANY_ROWS.block_m) * batch_heads
        many = tiles128 >= sms
        if many:
            config = MANY_ROWS if tiles128 >= 2 * sms else MANY_ROWS_SHORT
        else:
            config = FEW_ROWS if rows <= FEW_ROWS_MAX_SHORT else FEW_ROWS_TALL
    tiles = _cdiv(rows, config.block_m)
    splits = config.splits
    if splits == 0:
        wanted = max(1, PROGRAMS_PER_SM * sms // (tiles * batch_heads))
        splits = min(wanted, _cdiv(n_keys, max(MIN_SPLIT_KEYS, config.block_n)))
    splits = max(1, min(splits, _cdiv(n_keys, config.block_n)))
    chunk = _cdiv(_cdiv(n_keys, splits), config.block_n) * config.block_n
    splits = _cdiv(n_keys, chunk)
    fused = splits > 1 and (FUSED_MERGE if config.fused_merge is None else config.fused_merge)
    group = config.merge_group or max(1, MERGE_FP32_PER_THREAD * 32 * config.num_warps // (config.block_m * head_dim))
    group = min(_pow2_at_least(group), _pow2_at_least(splits)) if fused else 1
    return Plan(config, splits, chunk, tiles, fused, group)


# ---------------------------------------------------------------------------------------- kernels

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _patch_interpreter_for_numpy_2_4() -> None:
    """triton 3.6's interpreter turns loop bounds into ints with int(array of shape (1,)), which numpy
    >= 2.4 refuses (triton-lang/triton#9171, fixed upstream in #9172). Index through the one element."""
    import numpy as np
    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter
    if getattr(interpreter._patch_lang_tensor, "_numpy_2_4", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._numpy_2_4 = True
    interpreter._patch_lang_tensor = patched


if triton is not None:
    if _interpreting():
        _patch_interpreter_for_numpy_2_4()

    @triton.jit
    def _prefetch_l2(ptrs):
        """Hint the L2 lines holding ptrs in (PTX prefetch.global.L2: no result, and callers pass valid
        addresses only). Only with PDL, never under the interpreter (inline PTX)."""
        tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prefetch_chunk(K, V, b, h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, start, n_keys,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                        PREFETCH: tl.constexpr, LINE: tl.constexpr):
        """Hint the first PREFETCH key blocks of K and V from key `start` into L2 (see PREFETCH_BLOCKS)."""
        keys = start + tl.arange(0, PREFETCH * BLOCK_N)
        lines = tl.arange(0, BLOCK_D // LINE) * LINE
        pf_ok = (keys < n_keys)[:, None] & (lines < HEAD_DIM)[None, :]
        _prefetch_l2(tl.where(pf_ok, K + b * sk_b + h * sk_h + keys[:, None] * sk_n + lines[None, :], K))
        _prefetch_l2(tl.where(pf_ok, V + b * sv_b + h * sv_h + keys[:, None] * sv_n + lines[None, :], V))

    @triton.jit
    def _row_limits(LIMIT, rows, row_ok, s_lim, n_queries, n_keys):
        """Key limit of each folded row (row r is query r % Q), clamped to [0, N]; padding rows get 0."""
        limit = tl.load(LIMIT + (rows % n_queries) * s_lim, mask=row_ok, other=0)
        return tl.minimum(tl.maximum(limit.to(tl.int32), 0), n_keys)

    @triton.jit
    def _output_ptrs(OUT, b, h, rows, offs_d, so_b, so_h, so_j, so_q, n_queries):
        """Folded row r = j * Q + q: its output address from (j, q), so heads-last layouts need no copy."""
        return OUT + b * so_b + h * so_h + ((rows // n_queries) * so_j + (rows % n_queries) * so_q)[:, None] \
            + offs_d[None, :]

    @triton.jit
    def _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, offs_n, limit, n_keys, qk_scale, d_ok,
                      MASKED: tl.constexpr, PRECISION: tl.constexpr, PAD_D: tl.constexpr):
        """One online-softmax step over keys [start, start + BLOCK_N). Scores are in log2 units
        (qk_scale includes log2 e) so exp2 can be used. MASKED: some row of the tile may not see
        some key of this block (or the block runs past the end): mask loads and scores. PAD_D: the
        head dim is padded to a power of two in registers; the padding lanes load 0 (no effect on dots)."""
        keys = start + offs_n
        if MASKED:
            inside = (keys < n_keys)[:, None]
            if PAD_D:
                inside = inside & d_ok[None, :]
            k = tl.load(k_ptrs, mask=inside, other=0.0)
            v = tl.load(v_ptrs, mask=inside, other=0.0)
        elif PAD_D:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        return _online_softmax_step(acc, m_i, l_i, q, k, v, keys, limit, qk_scale, MASKED, PRECISION)

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, q, k, v, keys, limit, qk_scale,
                             MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """Fold the key block k / v (keys: their slots) into the running (acc, m, l) of the rows.
        MASKED: row r only sees the keys below limit[r]."""
        k = k.to(q.dtype)  # no-op unless the cache dtype differs (or UPCAST made q fp32)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(keys[None, :] < limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; shift by 0 then so that p = exp2(-inf) = 0
        # instead of exp2(-inf - -inf) = NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _slot_attention_fwd(Q, K, V, LIMIT, OUT, O_PART, M_PART, L_PART, COUNTER,
                            sq_b, sq_h, sq_r, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_j, so_q,
                            s_lim, n_kv, n_rows, n_queries, n_keys, chunk, n_splits, qk_scale,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FUSED: tl.constexpr, GROUP: tl.constexpr,
                            UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False,
                            PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 64, EARLY: tl.constexpr = False):
        """Program (row tile, b * KV + h, split): attention of BLOCK_M folded rows over the keys
        [split * chunk, (split + 1) * chunk) that some row of the tile sees. SPLIT: write the
        unnormalised partial (acc, m, l) for _merge_splits, or with FUSED merge them here (the last
        program of the tile to finish, see below); otherwise the final output."""
        # Later row tiles tend to see more keys (causal rows, the tail after the frames): start them
        # first so that the short tiles fill the last wave.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = pid_bh // n_kv
        h = pid_bh % n_kv
        if USE_PDL:  # q, the cache and the limits may come from the kernel launched just before
            if PREFETCH > 0:  # the first blocks of this split's K / V chunk (see PREFETCH_BLOCKS)
                _prefetch_chunk(K, V, b, h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, pid_s * chunk, n_keys,
                                HEAD_DIM, BLOCK_D, BLOCK_N, PREFETCH, LINE)
            gdc_wait()
            if EARLY:  # see TRIGGER_EARLY
                gdc_launch_dependents()
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        offs_n = tl.arange(0, BLOCK_N)
        # Head dims that are no power of two (the vision tower's 72) run padded to BLOCK_D lanes (PAD_D).
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM

        limit = _row_limits(LIMIT, rows, row_ok, s_lim, n_queries, n_keys)
        tile_max = tl.max(limit, 0)
        # FUSED: splits starting at or past the largest limit of the tile ("dead") have nothing to
        # add; every program of the tile computes the same n_live from the same limits, so dead
        # programs just exit (no partial, no count) and the merge reads the live splits only.
        # Split 0 is always live, so a tile whose rows see no key still gets its (zero) output.
        if FUSED:
            n_live = tl.maximum((tile_max + chunk - 1) // chunk, 1)
        else:
            n_live = n_splits
        if pid_s < n_live:
            # This program's keys: its chunk, cut at the largest limit of the tile. Below `full`
            # (the smallest limit of the real rows, rounded down to a block) every row sees every
            # key, so those blocks need no mask; chunk starts are block multiples, so [lo, mid) is
            # whole blocks.
            lo = pid_s * chunk
            hi = tl.minimum(lo + chunk, tile_max)
            full = tl.min(tl.where(row_ok, limit, n_keys), 0) // BLOCK_N * BLOCK_N
            mid = tl.maximum(lo, tl.minimum(hi, full))

            q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_r + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:  # Triton's interpreter gets tl.dot wrong on 16-bit inputs; fp32 is exact there
                q = q.to(tl.float32)
            k_ptrs = K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :]
            v_ptrs = V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :]

            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(lo, mid, BLOCK_N):
                acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs + start * sk_n, v_ptrs + start * sv_n,
                                              start, offs_n, limit, n_keys, qk_scale, d_ok,
                                              False, PRECISION, PAD_D)
            for start in range(mid, hi, BLOCK_N):
                acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs + start * sk_n, v_ptrs + start * sv_n,
                                              start, offs_n, limit, n_keys, qk_scale, d_ok,
                                              True, PRECISION, PAD_D)

            if USE_PDL and not EARLY:  # the merge (or whatever follows) may launch; it waits for our stores
                gdc_launch_dependents()
            o_ptrs = _output_ptrs(OUT, b, h, rows, offs_d, so_b, so_h, so_j, so_q, n_queries)
            if SPLIT:  # partials laid out [B*KV, R, S, (D)] so _merge_splits reads one row's splits at once
                part = (pid_bh * n_rows + rows) * n_splits + pid_s
                tl.store(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
                tl.store(M_PART + part, m_i, mask=row_ok)
                tl.store(L_PART + part, l_i, mask=row_ok)
                if FUSED:
                    # Last one merges. Memory ordering (PTX memory model):
                    # 1. debug_barrier (bar.sync) after the stores above: every thread of this
                    #    program has performed its partial stores before the barrier, and the
                    #    barrier orders them before anything the program does after it.
                    # 2. The counter increment is an atomic with acq_rel semantics at gpu scope,
                    #    issued after the barrier (for a scalar pointer Triton lets one thread do it).
                    #    Its release half is cumulative: the whole program's partial stores, ordered
                    #    before it by the barrier, become visible GPU-wide no later than the new
                    #    count (the fence + atomic of CUDA's threadfence reduction / grid sync).
                    # 3. All increments of one counter form a single modification order; the program
                    #    that reads n_live - 1 comes after every other live program's release, and
                    #    its acquire half synchronises with all of them (release sequence of the
                    #    RMW chain): their partials happen-before whatever follows the atomic.
                    # 4. The atomic's result reaches the other threads of the program through shared
                    #    memory and a barrier (Triton's scalar-atomic broadcast; the explicit
                    #    debug_barrier below makes that independent of the lowering), which extends
                    #    the happens-before to every thread of the merging program; its loads use
                    #    .cg (L2, never a stale L1 line) for good measure.
                    # Reset: the merging program is the last increment of its counter in this launch
                    # (all n_live live programs have counted), so storing 0 cannot race with another
                    # increment; the next launch (or graph replay) sees it by kernel-boundary order.
                    tl.debug_barrier()
                    count = COUNTER + pid_bh * tl.num_programs(0) + pid_m
                    done = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
                    tl.debug_barrier()
                    if done == n_live - 1:
                        # Online merge of the live splits, starting from this program's own partial
                        # (in registers: its split is masked out of the loads), GROUP splits per step.
                        offs_g = tl.arange(0, GROUP)
                        base = (pid_bh * n_rows + rows) * n_splits  # [BLOCK_M]
                        for s0 in range(0, n_live, GROUP):
                            sp = s0 + offs_g  # [GROUP]
                            ok = ((sp < n_live) & (sp != pid_s))[:, None] & row_ok[None, :]  # [GROUP, BLOCK_M]
                            idx = base[None, :] + sp[:, None]
                            m_s = tl.load(M_PART + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
                            l_s = tl.load(L_PART + idx, mask=ok, other=0.0, cache_modifier=".cg")
                            a_s = tl.load(O_PART + idx[:, :, None] * BLOCK_D + offs_d[None, None, :],
                                          mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
                            m_new = tl.maximum(m_i, tl.max(m_s, 0))
                            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: weights 0
                            alpha = tl.exp2(m_i - m_ref)
                            w = tl.exp2(m_s - m_ref[None, :])  # [GROUP, BLOCK_M]
                            l_i = l_i * alpha + tl.sum(w * l_s, 0)
                            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * a_s, 0)
                            m_i = m_new
                        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with no key: 0, not NaN
                        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
                        tl.store(count, 0)
            else:
                out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with no key: 0, not NaN
                tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _merge_splits(O_PART, M_PART, L_PART, OUT, so_b, so_h, so_j, so_q, n_kv, n_rows, n_queries, n_splits,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, ROWS: tl.constexpr,
                      USE_PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
        """Program (ROWS rows, b * KV + h): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
        if USE_PDL:  # the partials come from the attention kernel launched just before
            gdc_wait()
            if EARLY:  # see TRIGGER_EARLY
                gdc_launch_dependents()
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        bh = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (rows < n_rows)[:, None] & (offs_s < n_splits)[None, :]  # [ROWS, S]
        part = (bh * n_rows + rows)[:, None] * n_splits + offs_s[None, :]
        m = tl.load(M_PART + part, mask=ok, other=float("-inf"))
        l = tl.load(L_PART + part, mask=ok, other=0.0)
        acc = tl.load(O_PART + part[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=ok[:, :, None], other=0.0)
        m_all = tl.max(m, 1)
        w = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all)[:, None])  # splits that saw nothing: 0
        denom = tl.sum(w * l, 1)
        out = tl.sum(acc * w[:, :, None], 1) / tl.where(denom > 0, denom, 1.0)[:, None]  # [ROWS, D]
        b = bh // n_kv
        h = bh % n_kv
        o_row = (rows // n_queries) * so_j + (rows % n_queries) * so_q
        tl.store(OUT + b * so_b + h * so_h + o_row[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])

    @triton.jit
    def _slot_attention_tma_fwd(Q_DESC, K_DESC, V_DESC, K, V, LIMIT, OUT, O_PART, M_PART, L_PART,
                                sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_j, so_q, s_lim,
                                n_kv, n_rows, n_queries, n_keys, chunk, n_splits, qk_scale,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                                USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0,
                                LINE: tl.constexpr = 64, EARLY: tl.constexpr = False):
        """Config(tma=True): program (row tile, b * KV + h, split) as in _slot_attention_fwd (two-kernel
        merge when SPLIT), but Q, K and V come through TMA tensor descriptors over [B, KV, N | R, D]
        (blocks [1, 1, rows, D]): bulk asynchronous copies into shared memory, which the compiler
        multi-buffers (num_stages) and the dots read in place, with no per-element addresses in
        registers. The descriptors end at the N key slots and the R rows, and TMA reads zeros past an
        end: the key tail needs no load mask (its scores are masked by the limits, which are <= N) and
        the last row tile no row mask. K / V (plain pointers) serve only the L2 prefetch before the
        PDL wait."""
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest tiles first, as in _slot_attention_fwd
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = pid_bh // n_kv
        h = pid_bh % n_kv
        if USE_PDL:  # see _slot_attention_fwd
            if PREFETCH > 0:
                _prefetch_chunk(K, V, b, h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, pid_s * chunk, n_keys,
                                HEAD_DIM, HEAD_DIM, BLOCK_N, PREFETCH, LINE)
            gdc_wait()
            if EARLY:  # see TRIGGER_EARLY
                gdc_launch_dependents()
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        limit = _row_limits(LIMIT, rows, row_ok, s_lim, n_queries, n_keys)
        tile_max = tl.max(limit, 0)
        # This program's keys: its chunk (all keys without a split), cut at the largest limit of the
        # tile. Blocks below the smallest limit of the real rows are seen whole by every row: no mask.
        lo = pid_s * chunk
        hi = tl.minimum(lo + chunk, tile_max)
        full = tl.minimum(tl.min(tl.where(row_ok, limit, n_keys), 0) // BLOCK_N * BLOCK_N, tile_max)
        mid = tl.maximum(lo, tl.minimum(hi, full))

        # A descriptor of batch extent 1 (a cache shared over the batch: stride 0) serves every b.
        q = Q_DESC.load([b % Q_DESC.shape[0], h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
        if UPCAST:  # Triton's interpreter gets tl.dot wrong on 16-bit inputs; fp32 is exact there
            q = q.to(tl.float32)
        kb = b % K_DESC.shape[0]
        vb = b % V_DESC.shape[0]
        offs_n = tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(lo, mid, BLOCK_N):
            k = K_DESC.load([kb, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = V_DESC.load([vb, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, start + offs_n, limit, qk_scale,
                                                 False, PRECISION)
        for start in range(mid, hi, BLOCK_N):
            k = K_DESC.load([kb, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = V_DESC.load([vb, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, start + offs_n, limit, qk_scale,
                                                 True, PRECISION)

        offs_d = tl.arange(0, HEAD_DIM)
        if SPLIT:  # partials for _merge_splits, laid out as _slot_attention_fwd writes them
            if USE_PDL and not EARLY:  # the merge may launch; it waits for our stores
                gdc_launch_dependents()
            part = (pid_bh * n_rows + rows) * n_splits + pid_s
            tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
            tl.store(M_PART + part, m_i, mask=row_ok)
            tl.store(L_PART + part, l_i, mask=row_ok)
        else:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with no key: 0, not NaN
            o_ptrs = _output_ptrs(OUT, b, h, rows, offs_d, so_b, so_h, so_j, so_q, n_queries)
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------ API

def available(t: torch.Tensor) -> bool:
    """True when the Triton kernel can run on tensor t: a CUDA tensor with triton importable, or
    any tensor while Triton's interpreter (TRITON_INTERPRET=1, set before import) is on."""
    return triton is not None and (t.is_cuda or _interpreting())


def check_head_dim(d: int) -> None:
    """Head dims the kernel runs: multiples of 8 (16-byte rows) from 16 to 256; others than powers of
    two are padded to the next power of two in registers (the vision tower's 72 -> 128 lanes)."""
    if d < 16 or d > 256 or d % 8:
        raise ValueError(f"head dim must be a multiple of 8 in [16, 256], got {d}")


def _prefetch_options(pdl: bool, q: torch.Tensor, block_d: int, block_n: int) -> dict:
    """Launch options of the few-rows kernel: PDL, with its K / V prefetch (PREFETCH_BLOCKS) when on."""
    if not pdl:
        return {}
    options = {"launch_pdl": True}
    if PREFETCH_BLOCKS > 0:
        options.update(PREFETCH=PREFETCH_BLOCKS, LINE=min(LINE_BYTES // q.element_size(), block_d))
    if TRIGGER_EARLY:
        options["EARLY"] = True
    return options


def slot_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_limit: torch.Tensor,
                   scale: float | None = None, config: Config | None = None,
                   heads_last: bool = False) -> torch.Tensor:
    """Attention of folded queries q [B, KV, R, D] over k/v [B, KV, N, D] (any strides, last dim
    contiguous; a batch-1 cache `.expand`ed over B is fine) where folded row r (query r % Q) sees
    the keys j < key_limit[r % Q]; key_limit: integer tensor [Q] on q's device. Softmax in fp32,
    result [B, KV, R, D] in q's dtype; a row that sees no key is 0. No host sync (graph-capturable).
    `config` overrides the automatic plan (tests, tuning). Without Triton: the reference.
    heads_last=True returns the same values as [B, Q, KV * g, D] (query-head h = kv * g + j, the
    layout the output projection reads after a view), written in place by the kernel: no copy."""
    if not available(q):
        out = slot_attention_reference(q, k, v, key_limit, scale)
        return _to_heads_last(out, key_limit.shape[0]) if heads_last else out
    b, n_kv, rows, d = q.shape
    n_keys = k.shape[2]
    if k.shape != (b, n_kv, n_keys, d) or v.shape != k.shape:
        raise ValueError(f"k/v must be [B, KV, N, D] = [{b}, {n_kv}, N, {d}], got {tuple(k.shape)} / {tuple(v.shape)}")
    check_head_dim(d)
    if key_limit.dim() != 1 or rows % key_limit.shape[0]:
        raise ValueError(f"key_limit must be [Q] with R = g * Q, got {tuple(key_limit.shape)} for R = {rows}")
    if key_limit.device != q.device or key_limit.dtype.is_floating_point:
        raise ValueError(f"key_limit must be an integer tensor on {q.device}, got {key_limit.dtype} on {key_limit.device}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last dim")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    n_q = key_limit.shape[0]
    g = rows // n_q
    if heads_last:  # [B, Q, KV, g, D]: kv stride g*D, j stride D, q stride KV*g*D
        out = torch.empty((b, n_q, n_kv * g, d), dtype=q.dtype, device=q.device)
        so_b, so_h, so_j, so_q = out.stride(0), g * d, d, out.stride(1)
    else:
        out = torch.empty((b, n_kv, rows, d), dtype=q.dtype, device=q.device)
        so_b, so_h, so_j, so_q = out.stride(0), out.stride(1), n_q * out.stride(2), out.stride(2)
    if rows == 0 or b * n_kv == 0 or n_keys == 0:
        return out.zero_()
    block_d = _pow2_at_least(d)  # padded lanes in registers for dims like 72
    p = plan(b * n_kv, rows, n_keys, sm_count(q), config, block_d)
    c = p.config
    upcast = _interpreting() and q.dtype != torch.float32
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"  # fp32 in: fp32-exact dots
    pdl = pdl_enabled(q)
    split = p.splits > 1
    if split:
        o_part = torch.empty((b * n_kv, rows, p.splits, block_d), dtype=torch.float32, device=q.device)
        m_part = torch.empty((b * n_kv, rows, p.splits), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
    else:  # unused pointers
        o_part = m_part = l_part = out
    if tma_applies(p, q, k, v):
        # Without a split (the prefill) no prefetch and no early trigger: the launch as measured for
        # MANY_ROWS. With one, the few-rows kernel's PDL options.
        options = _prefetch_options(pdl, q, block_d, c.block_n) if split else ({"launch_pdl": True} if pdl else {})
        _slot_attention_tma_fwd[(p.row_tiles, b * n_kv, p.splits)](
            _descriptor(q, c.block_m), _descriptor(k, c.block_n), _descriptor(v, c.block_n), k, v, key_limit, out,
            o_part, m_part, l_part, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            so_b, so_h, so_j, so_q, key_limit.stride(0), n_kv, rows, n_q, n_keys, p.chunk, p.splits,
            scale * math.log2(math.e),
            HEAD_DIM=d, BLOCK_M=c.block_m, BLOCK_N=c.block_n, SPLIT=split, UPCAST=upcast, PRECISION=precision,
            USE_PDL=pdl, num_warps=c.num_warps, num_stages=c.num_stages, **options)
    else:
        counter = split_counters(q.device, p.row_tiles * b * n_kv) if p.fused_merge else out
        _slot_attention_fwd[(p.row_tiles, b * n_kv, p.splits)](
            q, k, v, key_limit, out, o_part, m_part, l_part, counter,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), so_b, so_h, so_j, so_q,
            key_limit.stride(0), n_kv, rows, key_limit.shape[0], n_keys, p.chunk, p.splits,
            scale * math.log2(math.e),
            HEAD_DIM=d, BLOCK_D=block_d, PAD_D=block_d != d, BLOCK_M=c.block_m, BLOCK_N=c.block_n, SPLIT=split, FUSED=p.fused_merge,
            GROUP=p.merge_group, UPCAST=upcast, PRECISION=precision,
            USE_PDL=pdl, num_warps=c.num_warps, num_stages=c.num_stages, **_prefetch_options(pdl, q, block_d, c.block_n))
    if split and not p.fused_merge:
        mr, mw = MERGE
        _merge_splits[(_cdiv(rows, mr), b * n_kv)](
            o_part, m_part, l_part, out, so_b, so_h, so_j, so_q,
            n_kv, rows, n_q, p.splits, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=_pow2_at_least(p.splits), ROWS=mr,
            USE_PDL=pdl, num_warps=mw, **({"launch_pdl": True, "EARLY": TRIGGER_EARLY} if pdl else {}))
    return out


# ---------------------------------------------------------------------------- TMA (Config.tma)
# Host-side descriptors (triton.tools.tensor_descriptor), made per call: the launcher encodes each
# into a CUtensorMap kernel parameter on the host (no device work, no sync), which a CUDA graph
# captures like any other argument. Device-side descriptors (tl.make_tensor_descriptor) would need
# triton.set_allocator for their global scratch, a context variable that threads other than the one
# that set it (ROS executor threads) do not see.

def tma_applies(p: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether slot_attention runs the TMA kernel for this plan and these tensors: Config(tma=True), no
    fused merge (a split plan merges in the second kernel), a power-of-two head dim (no padded lanes:
    the descriptor's block is the head dim), hardware with TMA (sm_90+, or the interpreter) and q, k, v
    each addressable by a descriptor."""
    d = q.shape[-1]
    return (p.config.tma and not p.fused_merge and d == _pow2_at_least(d) and _tma_hardware(q)
            and all(_descriptor_layout(t) is not None for t in (q, k, v)))


def _tma_hardware(t: torch.Tensor) -> bool:
    if TensorDescriptor is None:
        return False
    if _interpreting():
        return True
    return t.is_cuda and _capability_major(t.device.index if t.device.index is not None
                                           else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def _descriptor_layout(t: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """(shape, strides) of a TMA descriptor over the [B, H, N, D] tensor t, or None where TMA cannot
    address it: it needs a 16-byte aligned base, strides that are positive multiples of 16 bytes, and
    a contiguous last dim. A batch expanded with stride 0 (the cache shared over B) becomes batch
    extent 1, which the kernel indexes with b % 1 = 0; a dim of extent 1 gets the packed stride (its
    one index never multiplies it), so a batch-1 view's stride does not matter either."""
    shape, strides = list(t.shape), list(t.stride())
    if strides[0] == 0:
        shape[0] = 1
    if t.data_ptr() % 16 or strides[-1] != 1:
        return None
    for i in (2, 1, 0):
        if shape[i] == 1:
            strides[i] = shape[i + 1] * strides[i + 1]
    if any(st <= 0 or st * t.element_size() % 16 for st in strides[:-1]):
        return None
    return shape, strides


def _descriptor(t: torch.Tensor, rows_per_block: int):
    """Descriptor over t (see _descriptor_layout) whose blocks are [1, 1, rows_per_block, D]."""
    shape, strides = _descriptor_layout(t)
    return TensorDescriptor(t, shape, strides, [1, 1, rows_per_block, shape[-1]])


# ------------------------------------------------------------------------- fused-merge counters
# One int32 counter per (row tile, b * KV + h) of a fused-merge call, zero between calls: the kernel's
# merging program resets its counter. They live in one zeroed buffer per device, allocated outside
# CUDA-graph capture and never freed (a captured graph keeps pointing into it):
#   eager calls share its first `eager` counters (calls on one stream run one after another);
#   each call captured in a graph gets counters of its own from the rest (bump allocation), so
#   graphs replayed on different streams never share a counter. When that space is used up, a
#   captured call gets torch.zeros of its own (allocated in the graph's pool and zeroed by a captured
#   memset at each replay: still correct, one more node).
COUNTERS_EAGER = 4096
COUNTERS_CAPTURED = 1 << 16


class _CounterArena:
    def __init__(self, device: torch.device, eager: int):
        self.buf = torch.zeros(eager + COUNTERS_CAPTURED, dtype=torch.int32, device=device)
        self.eager = eager
        self.next = eager  # first counter not yet handed to a captured call


_ARENAS: dict[str, _CounterArena] = {}
_RETIRED: list[torch.Tensor] = []  # grown-out buffers: graphs captured earlier still use them
_ARENA_LOCK = threading.Lock()
CAPTURE_FALLBACKS = 0  # captured calls that found no room (see above)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed int32 counters for one fused-merge launch on `device` (see above)."""
    key = str(device)
    with _ARENA_LOCK:
        arena = _ARENAS.get(key)
        if _capturing(device):
            if arena is not None and arena.next + n <= arena.buf.numel():
                arena.next += n
                return arena.buf[arena.next - n: arena.next]
            global CAPTURE_FALLBACKS
            CAPTURE_FALLBACKS += 1
            return torch.zeros(n, dtype=torch.int32, device=device)
        if arena is None or n > arena.eager:
            if arena is not None:
                _RETIRED.append(arena.buf)
            arena = _ARENAS[key] = _CounterArena(device, max(COUNTERS_EAGER, 2 * n))
        return arena.buf[:n]


def _to_heads_last(out: torch.Tensor, n_q: int) -> torch.Tensor:
    """[B, KV, g*Q, D] -> [B, Q, KV*g, D] (a copy): what heads_last=True returns."""
    b, n_kv, rows, d = out.shape
    return out.reshape(b, n_kv, rows // n_q, n_q, d).permute(0, 3, 1, 2, 4).reshape(b, n_q, rows // n_q * n_kv, d)


def slot_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_limit: torch.Tensor,
                             scale: float | None = None) -> torch.Tensor:
    """The specification in plain PyTorch: additive mask (0 where j < key_limit[r % Q], -inf
    elsewhere), fp32 scores, softmax and weighted sum, cast back to q's dtype; rows without a
    visible key are 0."""
    rows, d, n_keys = q.shape[2], q.shape[3], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    limit = key_limit.to(q.device, torch.long)[torch.arange(rows, device=q.device) % key_limit.shape[0]]
    visible = torch.arange(n_keys, device=q.device)[None, :] < limit[:, None]  # [R, N]
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill(~visible, float("-inf"))
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + mask
    p = torch.softmax(s, dim=-1)
    p = torch.where(visible.any(-1, keepdim=True), p, torch.zeros((), device=q.device))  # NaN rows -> 0
    return torch.matmul(p, v.float()).to(q.dtype)
