"""Skinny linear layers, y = x @ w^T (+ bias) with few rows, at weight bandwidth (issue 7).

    y = skinny_linear(x, w, bias=None)     # x [..., K] with M = prod(leading dims) <= 128, w [N, K]

Why a kernel: the action expert runs its GEMMs on M = 64 token rows (the LM verify pass on 8, decode
on 1), so every one of them is a stream of the weight matrix from HBM with almost no arithmetic per
byte. cuBLAS gets 1.3-2.2 TB/s of the H100's ~3 TB/s on the expert shapes (o_proj [2048 x 2048] worst:
too few thread blocks; down [2048 x 8256] pays a separate split-K reduce).

Design: one program owns BLOCK_N output columns for all M rows (BLOCK_M = M padded to a power of two
>= 16, tl.dot's minimum) and streams its BLOCK_N weight rows once, BLOCK_K at a time through a
num_stages-deep pipeline. The dot is computed transposed, acc[BLOCK_N, BLOCK_M] = w_tile @ x_tile^T,
so that the big side of the tile is the MMA's M dimension (the weight is the K-major A operand; on
Hopper that is a wgmma shape even for M = 1). For narrow N the K axis is split over SPLIT_K programs
(grid (N / BLOCK_N, SPLIT_K)): each writes an fp32 partial [M, BLOCK_N], and a small second kernel sums
the partials, adds the bias and casts. The x rows (at most 128 x K) come from L2.

Balanced mode (Config.programs = P, split_k 0; "stream-K"): where column blocks x splits do not divide
evenly over the SMs (96 or 192 programs on 132 SMs leave a part of a wave idle) or the K split is
coarse, a fixed grid of P programs (SMs x 1 or 2) shares the (column block, K block) units out in
contiguous ranges of equal length (+-1 unit), column-block major (`balanced_range`), so every SM streams
the same weight bytes. A program runs one flat loop over its units, so its pipeline streams on across
column blocks; a column block it streams whole it finishes itself (bias, cast), a part of one leaves an
fp32 partial in a fixed slot, and `_reduce_balanced` sums a split block's partials in program order:
bitwise reproducible, no atomics. The reduce is launched only when some block is split.

Tuning: per shape key (device, dtype, M, N, K, bias?, swiglu?) the first call outside CUDA-graph capture
times the `candidates` of the shape (split-K grids and balanced grids; triton.testing.do_bench, L2
flushed between runs, so weights come from HBM as in the model) and caches the winner (also the cuBLAS
time of the same call, for the caller's choice; Tuned.sweep keeps every timed candidate's time;
TUNE_BUDGET_S caps the wall-clock time per shape). This is what triton.autotune does, done by hand
because the workspace and the reduce launch depend on the config. After that a call is a dict lookup,
an allocation and one or two launches: no host synchronisation, capturable. A call during capture for a
shape never tuned does not benchmark (that would break the capture): it runs F.linear. Under Triton's
interpreter (or `tune=False`) the heuristic `default_config` is cached instead of timing anything.
`export_tuned()` / `load_tuned()` keep the choices across processes.

Pipelining: the W and x tiles go through cp.async multi-buffering only when Triton knows the pointers
and K-offsets are 16-byte aligned, which its JIT specializes on at launch (pointers % 16, K, row
strides and the split chunk % 16; the balanced mode's K offsets are multiples of BLOCK_K): true for
every model weight (also row slices of fused buffers, K * 2 bytes per row). Other shapes stay correct
but unpipelined.

`skinny_linear_reference` is the specification: F.linear in fp32, cast back.

SwiGLU epilogue: `skinny_swiglu(x, w_gate_up)` = silu(x @ Wg^T) * (x @ Wu^T) for an MLP's fused gate|up
weight [2I, K] (gate rows [0, I), up rows [I, 2I); the layout is not changed). Each program streams the
gate rows and the up rows of its BLOCK_N output columns (two weight tiles per K step, two fp32
accumulators), applies the SwiGLU in fp32 and stores [M, I] once, instead of the [M, 2I] GEMM output
plus a separate SwiGLU kernel (~2-3 us per layer in a CUDA graph). Split K writes the fp32 partials of
g and u; the reduce applies the SwiGLU to the full sums. Configs as above with two weight tiles in the
shared memory budget (`candidates(..., tiles=2)`); tuned choices are cached under their own key
(swiglu=True; records carry the flag, records without it are plain GEMMs), timed against cuBLAS +
SwiGLU. It has no balanced mode: its candidates are the split-K grids only. Programmatic dependent
launch as for the plain kernels. `skinny_swiglu_reference` is its specification (fp32 GEMM and SwiGLU,
rounded once).

`fused_linear` (second half of this file) is the same kernel structure, split_k 1, with a decoder
layer's elementwise neighbours folded in (RMSNorm or SwiGLU prologue, residual-add epilogue) for the
few-row layers of graphs._decoder_stack_fused; `fused_linear_reference` is its specification.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
import functools
import itertools
import time

import torch
import torch.nn.functional as F

from flashdrive_ros.engine.attention_kernel import _interpreting, _patch_interpreter_for_numpy_2_4, pdl_enabled, sm_count

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    from flashdrive_ros.engine.attention_kernel import _prefetch_l2
except ImportError:  # CPU-only installs: F.linear still works, available() says False
    triton = None
    tl = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


# Programmatic dependent launch lets a kernel start before its producer has finished; the weights do not
# depend on the producer, so before waiting (gdc_wait) each program hints its first PREFETCH_TILES K steps
# of weight rows into L2 (PTX prefetch.global.L2). The weight stream then starts during the producer's
# tail instead of after it. 0: no prefetch (the kernel waits first, as without PDL).
PREFETCH_TILES = 1
# Where a GEMM lets its successor launch: False, once its K loop is done; True, right after its own wait, so
# the successor's programs (small ones fit beside a GEMM program) are resident and waiting when it ends.
TRIGGER_EARLY = True
LINE_BYTES = 128  # one prefetch per L2 line
MAX_ROWS = 128  # above this the GEMM is not weight-bandwidth bound; skinny_linear defers to F.linear
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class Config:
    """block_n: output columns (weight rows) per program; block_k: K per pipeline step; split_k:
    programs along K per column block (1 = no split, no partials). programs: 0 for that grid, or P > 0
    for the balanced mode (split_k 0: K is split wherever the shares fall), a grid of P programs with
    equal shares of the work (`balanced_range`). Records without `programs` load as the default 0."""
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    programs: int = 0
    tma: bool = False  # split-K grids only: W and x tiles through TMA tensor descriptors (sm_90+)

    def __post_init__(self):
        if (self.split_k == 0) != (self.programs > 0):
            raise ValueError(f"{self}: split_k 0 goes with programs > 0 (balanced mode), and only it")
        if self.tma and self.balanced:
            raise ValueError(f"{self}: the balanced mode has no TMA variant")

    @property
    def balanced(self) -> bool:
        return self.programs > 0


# (block_n, block_k, num_warps, num_stages): tiles of 16-64 KB of weight per stage, 3-5 stages deep;
# each is tried with split_k 1 / 2 / 4 / 8 where the program count calls for it (`candidates`).
TILES = (
    (32, 256, 4, 4), (32, 256, 4, 5),
    (64, 128, 4, 4), (64, 128, 4, 5),
    (64, 256, 4, 3), (64, 256, 4, 4), (64, 256, 8, 4),
    (128, 64, 4, 5),
    (128, 128, 4, 3), (128, 128, 8, 4), (128, 128, 8, 5),
    (128, 256, 8, 3),
)
SPLITS = (1, 2, 4, 8)
CONFIGS = tuple(Config(bn, bk, s, w, st) for (bn, bk, w, st), s in itertools.product(TILES, SPLITS))
# Balanced mode: every tile with programs = SMs x 1 (one program per SM when the tile's buffers allow
# only one) and x 2 (two co-resident: twice the loads in flight). Made per GPU by `candidates`.
BALANCED_PER_SM = (1, 2)
# Programs wanted per SM: below MIN_PROGRAMS_PER_SM a config leaves SMs idle (split K instead); at or
# above MAX_PROGRAMS_PER_SM without splitting, splitting only adds partial traffic.
MIN_PROGRAMS_PER_SM = 0.9
MAX_PROGRAMS_PER_SM = 2
SMEM_BYTES = 200 * 1024  # per-program pipeline buffers must fit (H100: 227 KB per block)
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 25  # do_bench per candidate
# Time the TMA variant (Config.tma) of every split-K candidate too, where the operands allow TMA.
TMA_CANDIDATES = True
# Wall-clock cap on one shape's tuning, compiles included (None: every candidate is timed). A script with
# a time limit sets it; the candidates are timed alternately from the split-K and the balanced lists, so
# that a cut leaves both kinds represented.
TUNE_BUDGET_S: float | None = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_m(m: int) -> int:
    """Rows of the tile: M padded to a power of two, at least 16 (tl.dot)."""
    return max(16, 1 << max(0, (m - 1).bit_length()))


def _programs(c: Config, n: int, k: int) -> int:
    if c.balanced:
        return min(c.programs, _units(c, n, k))
    return _cdiv(n, c.block_n) * _n_splits(c, k)


def _chunk(c: Config, k: int) -> int:
    """K per split, a multiple of block_k (so only the last block of K can be partial)."""
    return _cdiv(_cdiv(k, c.split_k), c.block_k) * c.block_k


def _n_splits(c: Config, k: int) -> int:
    return _cdiv(k, _chunk(c, k))


def _smem(c: Config, m: int, elt: int, tiles: int = 1) -> int:
    """Pipeline buffers per program: num_stages x (`tiles` weight tiles + the x tile) x block_k."""
    return c.num_stages * (tiles * c.block_n + block_m(m)) * c.block_k * elt


def _fits(c: Config, m: int, k: int, elt: int, tiles: int = 1) -> bool:
    """Pipeline buffers fit in shared memory and block_k is no longer than K needs."""
    return _smem(c, m, elt, tiles) <= SMEM_BYTES and (c.block_k <= 64 or c.block_k // 2 < k)


def candidates(m: int, n: int, k: int, sms: int, elt: int = 2, tiles: int = 1, tma: bool = False) -> list[Config]:
    """The configs worth timing for this shape: the split-K grids of `split_candidates` (with tma, each
    also as its TMA variant), then the balanced ones of `balanced_candidates`. Never empty. n: output
    columns; tiles: weight tiles streamed per output column block (2: skinny_swiglu's gate and up rows;
    its kernel has no balanced mode, so it gets the split-K grids only)."""
    split = split_candidates(m, n, k, sms, elt, tiles)
    if tma:
        split = split + [replace(c, tma=True) for c in split]
    if tiles > 1:
        return split
    return split + balanced_candidates(m, n, k, sms, elt)


def split_candidates(m: int, n: int, k: int, sms: int, elt: int = 2, tiles: int = 1) -> list[Config]:
    """The CONFIGS worth timing for this shape: pipeline buffers (`tiles` weight tiles) fit, block_k no
    longer than K needs, and a program count that fills the GPU without needless splitting. Never empty."""
    fit = [c for c in CONFIGS if _fits(c, m, k, elt, tiles) and (c.split_k == 1 or _n_splits(c, k) == c.split_k)]
    good = [c for c in fit if _programs(c, n, k) >= MIN_PROGRAMS_PER_SM * sms
            and (c.split_k == 1 or _cdiv(n, c.block_n) * (c.split_k // 2) < MAX_PROGRAMS_PER_SM * sms)]
    if good:
        return good
    if not fit:  # tiny K with fp32 rows: one small config
        return [Config(32, 64, 1, 4, 2)]
    most = max(_programs(c, n, k) for c in fit)  # small problems: the configs with the most programs
    return [c for c in fit if _programs(c, n, k) == most]


def balanced_candidates(m: int, n: int, k: int, sms: int, elt: int = 2) -> list[Config]:
    """Every tile that fits, in balanced mode with programs = sms x BALANCED_PER_SM, where the shape
    has at least a work unit per program. (The balanced kernel's in-loop epilogue stages the accumulator
    through up to BLOCK_N x 128 bytes of shared memory beyond _smem: within the 227 KB that SMEM_BYTES
    leaves room for; test_balanced_kernel_compiles_for_hopper_with_a_multi_buffered_pipeline.)"""
    cands = (Config(bn, bk, 0, w, st, programs=per_sm * sms) for (bn, bk, w, st) in TILES for per_sm in BALANCED_PER_SM)
    return [c for c in cands if _fits(c, m, k, elt) and c.programs <= _units(c, n, k) < 2 ** 31 // c.programs]


def default_config(m: int, n: int, k: int, sms: int, elt: int = 2, tiles: int = 1) -> Config:
    """Heuristic pick without timing (interpreter, tune=False): 64 x 128 tiles, 4 stages, split K
    until there is a program per SM."""
    cands = candidates(m, n, k, sms, elt, tiles)
    for pref in (Config(64, 128, s, 4, 4) for s in SPLITS):
        if pref in cands:
            return pref
    return cands[0]


# ---------------------------------------------------------------------- balanced mode: the partition
# The work of a shape is n_blocks x k_blocks units (BLOCK_N weight rows x BLOCK_K), numbered column-block
# major: unit u = column block u // k_blocks, K block u % k_blocks. Program p of P streams units
# balanced_range(p): contiguous, in order, every program within one unit of units / P. A program's range
# falls into segments, one per column block it touches. A segment that is the whole column block is
# finished in place (bias, cast, y); the others leave an fp32 partial in slot p + column block, and
# _reduce_balanced sums a split column block's partials, those of programs owner(first unit) ..
# owner(last unit), in that order: deterministic. (p + column block grows by 1 or 2 from one segment to
# the next along the ranges, so no two segments share a slot: P + n_blocks - 1 slots.)
# The kernels compute the same integer formulas; these are the specification and the launcher's plan.

def _units(c: Config, n: int, k: int) -> int:
    return _cdiv(n, c.block_n) * _cdiv(k, c.block_k)


def balanced_range(p: int, units: int, programs: int) -> range:
    """The work units of program p."""
    return range(p * units // programs, (p + 1) * units // programs)


def balanced_owner(u: int, units: int, programs: int) -> int:
    """The program whose balanced_range holds unit u (the last p with p * units // programs <= u;
    with programs <= units no range is empty)."""
    return ((u + 1) * programs - 1) // units


def balanced_segments(p: int, units: int, programs: int, k_blocks: int) -> list[tuple[int, range]]:
    """Program p's work as (column block, its K blocks) segments, in order."""
    r = balanced_range(p, units, programs)
    cols = range(r.start // k_blocks, (r.stop - 1) // k_blocks + 1) if r else range(0)
    return [(col, range(max(r.start - col * k_blocks, 0), min(r.stop - col * k_blocks, k_blocks))) for col in cols]


@functools.lru_cache(maxsize=1024)
def balanced_splits_a_block(units: int, programs: int, k_blocks: int) -> bool:
    """Does some program boundary fall inside a column block (partials and the reduce needed)?"""
    return any(balanced_range(p, units, programs).start % k_blocks for p in range(1, programs))


# ---------------------------------------------------------------------------------------- kernels

if triton is not None:
    if _interpreting():
        _patch_interpreter_for_numpy_2_4()

    @triton.jit
    def _prefetch_weight_rows(W, offs_n, n_ok, stride_wn, lo, hi, SPAN: tl.constexpr, LINE: tl.constexpr):
        """Prefetch W[offs_n, lo : min(lo + SPAN, hi)] into L2, one hint per LINE elements (rows out of
        range or past hi hint W's first line instead)."""
        k = lo + tl.arange(0, SPAN // LINE) * LINE
        ok = n_ok[:, None] & (k < hi)[None, :]
        _prefetch_l2(tl.where(ok, W + offs_n[:, None] * stride_wn + k[None, :], W))

    @triton.jit
    def _program_tile(N, M, K, chunk, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """Program (column block, split) of the split-K grid: its output columns and rows (with their
        in-range masks) and its K range [lo, hi)."""
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        lo = tl.program_id(1) * chunk
        return pid_n, offs_n, offs_m, offs_n < N, offs_m < M, lo, tl.minimum(lo + chunk, K)

    @triton.jit
    def _wait_for_producer(W, W2, offs_n, n_ok, stride_wn, lo, hi, SPAN: tl.constexpr, LINE: tl.constexpr,
                           TWO: tl.constexpr, EARLY: tl.constexpr):
        """PDL start of a weight-streaming program: hint its first SPAN of K of its weight rows (W, and W2
        when TWO) into L2 (SPAN 0: none), wait for the producer's memory, and with EARLY let the next
        kernel launch right away (see PREFETCH_TILES, TRIGGER_EARLY)."""
        if SPAN > 0:
            _prefetch_weight_rows(W, offs_n, n_ok, stride_wn, lo, hi, SPAN, LINE)
            if TWO:
                _prefetch_weight_rows(W2, offs_n, n_ok, stride_wn, lo, hi, SPAN, LINE)
        gdc_wait()
        if EARLY:
            gdc_launch_dependents()

    @triton.jit
    def _k_step_tile(ptrs, DESC, row0, start, rows_ok, k_ok, EVEN_ROWS: tl.constexpr, EVEN_K: tl.constexpr,
                     TMA: tl.constexpr, UPCAST: tl.constexpr):
        """One K step's tile of a weight (rows: its output columns) or of x (rows: the token rows, row0 0):
        through the descriptor (TMA: zeros past the ends), else through the pointers, masked where rows or
        K may run past the end."""
        if TMA:
            t = DESC.load([row0, start])
        elif EVEN_K:
            if EVEN_ROWS:
                t = tl.load(ptrs)
            else:
                t = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            t = tl.load(ptrs, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # Triton's interpreter gets tl.dot wrong on 16-bit inputs; fp32 is exact there
            t = t.to(tl.float32)
        return t

    @triton.jit(do_not_specialize=["M"])
    def _skinny_linear_fwd(X, W, B, Y, P, M, N, K, stride_xm, stride_wn, chunk, X_DESC, W_DESC,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
                           EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                           USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 64,
                           EARLY: tl.constexpr = False, TMA: tl.constexpr = False):
        """Program (column block, split): acc[n, m] = sum over its K chunk of W[n, k] X[m, k].
        SPLIT: store the fp32 partial at P[split, m, n] (for _reduce_splits); otherwise add the bias
        and store Y[m, n] in Y's dtype. USE_PDL: launched early (programmatic dependent launch); x is
        read only after the previous kernel is done (its first PREFETCH K steps of weight rows are
        hinted into L2 before that, LINE elements per hint), and the next one may launch once the K
        loop ends (EARLY: right after the wait). TMA (Config.tma): the W tile [BLOCK_N, BLOCK_K] and the
        x tile [BLOCK_M, BLOCK_K] come through the descriptors W_DESC / X_DESC (bulk copies into shared
        memory, no per-element addresses or masks: TMA reads zeros past N, M and K); else (None) through
        the pointers."""
        pid_n, offs_n, offs_m, n_ok, m_ok, lo, hi = _program_tile(N, M, K, chunk, BLOCK_N, BLOCK_M)
        pid_s = tl.program_id(1)
        offs_k = tl.arange(0, BLOCK_K)
        if USE_PDL:
            _wait_for_producer(W, W, offs_n, n_ok, stride_wn, lo, hi, PREFETCH * BLOCK_K, LINE, False, EARLY)
        w_ptrs = W + offs_n[:, None] * stride_wn + (lo + offs_k)[None, :]
        x_ptrs = X + offs_m[:, None] * stride_xm + (lo + offs_k)[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_K):  # chunk is a multiple of BLOCK_K: only K's end is partial
            k_ok = (start + offs_k) < K
            w = _k_step_tile(w_ptrs, W_DESC, pid_n * BLOCK_N, start, n_ok, k_ok, EVEN_N, EVEN_K, TMA, UPCAST)
            x = _k_step_tile(x_ptrs, X_DESC, 0, start, m_ok, k_ok, False, EVEN_K, TMA, UPCAST)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if USE_PDL and not EARLY:
            gdc_launch_dependents()
        out_mask = n_ok[:, None] & m_ok[None, :]
        if SPLIT:
            tl.store(P + (pid_s * M + offs_m[None, :]) * N + offs_n[:, None], acc, mask=out_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(Y + offs_m[None, :] * N + offs_n[:, None], acc.to(Y.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _reduce_splits(P, B, Y, total, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                       USE_PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
        """Y[i] = sum_s P[s, i] (+ bias[i % N]) over the flattened [M, N] outputs."""
        if USE_PDL:
            gdc_wait()
            if EARLY:  # see TRIGGER_EARLY
                gdc_launch_dependents()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < total
        acc = tl.load(P + offs, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLITS):
            acc += tl.load(P + s * total + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(B + offs % N, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["M", "units", "programs", "k_blocks"])
    def _balanced_linear_fwd(X, W, B, Y, P, M, N, K, stride_xm, stride_wn, units, programs, k_blocks,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                             UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False):
        """Program p streams the units of balanced_range(p) in one flat loop (the pipeline runs on
        across column blocks) with _skinny_linear_fwd's tile and transposed dot. At the end of each
        segment: a whole column block gets the bias and is stored to Y[m, n] in Y's dtype; a part is
        stored as the fp32 partial P[p + column block, m, :BLOCK_N] for _reduce_balanced."""
        if USE_PDL:  # see _skinny_linear_fwd
            gdc_wait()
        pid = tl.program_id(0)
        lo = pid * units // programs
        hi = (pid + 1) * units // programs
        offs_m = tl.arange(0, BLOCK_M)
        offs_j = tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for u in range(lo, hi):
            col = u // k_blocks
            kb = u - col * k_blocks
            offs_n = col * BLOCK_N + offs_j
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)  # a multiple of BLOCK_K: 16-byte aligned
            w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :]
            x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
            if EVEN_K:
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                if EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=(offs_n < N)[:, None], other=0.0)
            else:
                k_ok = offs_k < K
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=(offs_n < N)[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # Triton's interpreter gets tl.dot wrong on 16-bit inputs; fp32 is exact there
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
            if (kb == k_blocks - 1) | (u == hi - 1):  # the end of this program's segment of column block col
                if (kb == k_blocks - 1) & (col * k_blocks >= lo):  # the whole column block: finish it here
                    if HAS_BIAS:
                        acc += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
                    tl.store(Y + offs_m[None, :] * N + offs_n[:, None], acc.to(Y.dtype.element_ty),
                             mask=(offs_n < N)[:, None] & m_ok[None, :])
                else:
                    tl.store(P + ((pid + col) * M + offs_m[None, :]) * BLOCK_N + offs_j[:, None], acc,
                             mask=m_ok[None, :])
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if USE_PDL:
            gdc_launch_dependents()

    @triton.jit(do_not_specialize=["M", "units", "programs", "k_blocks"])
    def _reduce_balanced(P, B, Y, M, N, units, programs, k_blocks, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr = False):
        """Program (column block, ROWS rows): if the column block was split, Y = the sum of its partials
        in program order (+ bias), cast to Y's dtype; a column block with one owner is already in Y."""
        if USE_PDL:
            gdc_wait()
        col = tl.program_id(0)
        first = ((col * k_blocks + 1) * programs - 1) // units  # balanced_owner of its first unit
        last = ((col + 1) * k_blocks * programs - 1) // units  # ... and of its last
        if first < last:
            offs_m = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
            offs_j = tl.arange(0, BLOCK_N)
            offs_n = col * BLOCK_N + offs_j
            ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
            acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for p in range(first, last + 1):
                acc += tl.load(P + ((p + col) * M + offs_m[:, None]) * BLOCK_N + offs_j[None, :], mask=ok, other=0.0)
            if HAS_BIAS:
                acc += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + offs_m[:, None] * N + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _round(x, dt: tl.constexpr, RNE_BF16: tl.constexpr):
        """fp32 x -> dt, round to nearest even. Triton's interpreter truncates fp32 -> bf16 casts (the
        GPU rounds): with RNE_BF16 the rounding is done on the bits first, so the cast is exact."""
        if RNE_BF16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
        return x.to(dt)

    @triton.jit(do_not_specialize=["M"])
    def _skinny_swiglu_fwd(X, WG, WU, Y, P, M, I, K, stride_xm, stride_wn, chunk, X_DESC, WG_DESC, WU_DESC,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr, RNE_BF16: tl.constexpr,
                           USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, LINE: tl.constexpr = 64,
                           EARLY: tl.constexpr = False, TMA: tl.constexpr = False):
        """_skinny_linear_fwd over two weights at once: program (column block, split) streams gate rows
        WG[n] and up rows WU[n] (= gate row I + n of the fused buffer) against one x tile per K step.
        SPLIT: store the fp32 partials at P[split, m, n] (gate) and P[split, m, I + n] (up), for
        _reduce_swiglu_splits; otherwise store Y[m, n] = silu(g) * u, computed in fp32, rounded once.
        TMA: the gate, up and x tiles through the descriptors (as in _skinny_linear_fwd)."""
        pid_n, offs_n, offs_m, n_ok, m_ok, lo, hi = _program_tile(I, M, K, chunk, BLOCK_N, BLOCK_M)
        pid_s = tl.program_id(1)
        offs_k = tl.arange(0, BLOCK_K)
        if USE_PDL:  # see _skinny_linear_fwd
            _wait_for_producer(WG, WU, offs_n, n_ok, stride_wn, lo, hi, PREFETCH * BLOCK_K, LINE, True, EARLY)
        w_offs = offs_n[:, None] * stride_wn + (lo + offs_k)[None, :]
        wg_ptrs = WG + w_offs
        wu_ptrs = WU + w_offs
        x_ptrs = X + offs_m[:, None] * stride_xm + (lo + offs_k)[None, :]
        acc_g = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_K):
            k_ok = (start + offs_k) < K
            x = _k_step_tile(x_ptrs, X_DESC, 0, start, m_ok, k_ok, False, EVEN_K, TMA, UPCAST)
            wg = _k_step_tile(wg_ptrs, WG_DESC, pid_n * BLOCK_N, start, n_ok, k_ok, EVEN_N, EVEN_K, TMA, UPCAST)
            wu = _k_step_tile(wu_ptrs, WU_DESC, pid_n * BLOCK_N, start, n_ok, k_ok, EVEN_N, EVEN_K, TMA, UPCAST)
            acc_g = tl.dot(wg, tl.trans(x), acc_g, input_precision=PRECISION)
            acc_u = tl.dot(wu, tl.trans(x), acc_u, input_precision=PRECISION)
            wg_ptrs += BLOCK_K
            wu_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if USE_PDL and not EARLY:
            gdc_launch_dependents()
        out_mask = n_ok[:, None] & m_ok[None, :]
        if SPLIT:
            p_ptrs = P + (pid_s * M + offs_m[None, :]) * (2 * I) + offs_n[:, None]
            tl.store(p_ptrs, acc_g, mask=out_mask)
            tl.store(p_ptrs + I, acc_u, mask=out_mask)
        else:
            y = _round(acc_g * tl.sigmoid(acc_g) * acc_u, Y.dtype.element_ty, RNE_BF16)
            tl.store(Y + offs_m[None, :] * I + offs_n[:, None], y, mask=out_mask)

    @triton.jit
    def _reduce_swiglu_splits(P, Y, total, I, SPLITS: tl.constexpr, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr,
                              USE_PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
        """Y[m, n] = silu(g) * u over the flattened [M, I] outputs, g and u the sums over the splits of
        the partials P[s, m, n] and P[s, m, I + n] (P: [SPLITS, M, 2I]): the SwiGLU sees the full sums."""
        if USE_PDL:
            gdc_wait()
            if EARLY:  # see TRIGGER_EARLY
                gdc_launch_dependents()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < total
        g_offs = offs + (offs // I) * I  # m * 2I + n for offs = m * I + n
        g = tl.load(P + g_offs, mask=ok, other=0.0)
        u = tl.load(P + g_offs + I, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLITS):
            g += tl.load(P + s * 2 * total + g_offs, mask=ok, other=0.0)
            u += tl.load(P + s * 2 * total + g_offs + I, mask=ok, other=0.0)
        tl.store(Y + offs, _round(g * tl.sigmoid(g) * u, Y.dtype.element_ty, RNE_BF16), mask=ok)


# ------------------------------------------------------------------------------------------ API

def available(t: torch.Tensor) -> bool:
    """True when the Triton kernel can run on tensor t: a CUDA tensor with triton importable, or
    any tensor while Triton's interpreter (TRITON_INTERPRET=1, set before import) is on."""
    return triton is not None and (t.is_cuda or _interpreting())


@dataclass(frozen=True)
class Tuned:
    config: Config
    kernel_us: float | None = None  # do_bench median of the winner (None: not timed)
    cublas_us: float | None = None  # do_bench median of F.linear on the same call (swiglu: + F.silu(g) * u)
    sweep: tuple = field(default=(), compare=False, repr=False)  # (Config, us) of every candidate timed


# (device, dtype, M, N, K, bias?, swiglu?) -> Tuned; N is the weight's row count (skinny_swiglu: 2I)
_TUNED: dict[tuple, Tuned] = {}


def _key(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, swiglu: bool = False) -> tuple:
    dev = x2.device.index if x2.is_cuda else -1
    return (dev, str(x2.dtype)[6:], x2.shape[0], w.shape[0], w.shape[1], bias is not None, swiglu)


def _capturing() -> bool:
    """Is the current CUDA stream capturing a graph? (a function so that tests can pretend)"""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _supported(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    m = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    return (available(x) and x.dtype in DTYPES and w.dtype == x.dtype and w.dim() == 2 and x.dim() >= 1
            and w.device == x.device and w.stride(1) == 1 and w.stride(0) >= w.shape[1]
            and 0 < m <= MAX_ROWS and w.shape[0] > 0 and w.shape[1] > 0 and x.shape[-1] == w.shape[1]
            and (bias is None or (bias.shape == (w.shape[0],) and bias.device == x.device)))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] with unit column stride (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _cached_config(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, swiglu: bool,
                   tune: bool) -> Config | None:
    """The shape's cached config, tuned on its first call outside capture (tune=False, or not on a GPU:
    the heuristic default). None for a never-tuned shape during capture: benchmarking would break it."""
    key = _key(x2, w, bias, swiglu)
    t = _TUNED.get(key)
    if t is None:
        if _capturing():
            return None
        if tune and x2.is_cuda:
            t = _tune(x2, w, bias, swiglu=swiglu)
        else:
            (m, k), n = x2.shape, w.shape[0]
            t = Tuned(default_config(m, n // 2, k, sm_count(x2), x2.element_size(), tiles=2) if swiglu
                      else default_config(m, n, k, sm_count(x2), x2.element_size()))
        _TUNED[key] = t
    return t.config


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  config: Config | None = None, tune: bool = True) -> torch.Tensor:
    """F.linear(x, w, bias) for x [..., K] with M = prod(leading dims) <= MAX_ROWS rows and w [N, K]
    with unit column stride (a row slice of a bigger fused weight is fine: base pointer + row stride),
    bf16 / fp16 / fp32 (x and w alike), fp32 accumulation, bias added in fp32, output in x's dtype.
    `config` forces a launch config (tests, sweeps); otherwise the shape's tuned one (timed on the first
    call outside capture; `tune=False`: the heuristic default). Anything else (more rows, mixed dtypes,
    no Triton, an untuned shape during graph capture): F.linear."""
    if not _supported(x, w, bias):
        return F.linear(x, w, bias)
    x2 = _rows(x)
    if config is None:
        config = _cached_config(x2, w, bias, False, tune)
    if config is None:
        return F.linear(x, w, bias)
    return _launch(x2, w, bias, config).reshape(*x.shape[:-1], w.shape[0])


def _pdl_options(t: torch.Tensor) -> dict:
    """Programmatic dependent launch (attention_kernel.PDL, sm_90+): every kernel here waits first."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl_enabled(t) else {}


def _reduce_pdl_options(t: torch.Tensor) -> dict:
    """_pdl_options for the split-K reduces (TRIGGER_EARLY applies to them too)."""
    options = _pdl_options(t)
    if options and TRIGGER_EARLY:
        options["EARLY"] = True
    return options


def _gemm_pdl_options(t: torch.Tensor, block_k: int) -> dict:
    """_pdl_options for the weight-streaming kernels, with their weight prefetch before the wait
    (PREFETCH_TILES K steps, at most what one program streams is clamped in the kernel)."""
    options = _pdl_options(t)
    if options and PREFETCH_TILES > 0:
        line = LINE_BYTES // t.element_size()
        options.update(PREFETCH=PREFETCH_TILES, LINE=min(line, block_k))
    if options and TRIGGER_EARLY:
        options["EARLY"] = True
    return options


def _tma_usable(x2: torch.Tensor, w: torch.Tensor) -> bool:
    """Config.tma can run on these operands: descriptors available, TMA hardware (sm_90+, or the
    interpreter), 16-byte aligned bases and row strides, unit column strides. Otherwise the pointer
    kernel runs the same config."""
    if TensorDescriptor is None:
        return False
    if not _interpreting() and not (x2.is_cuda and torch.cuda.get_device_capability(x2.device)[0] >= 9):
        return False
    elt = x2.element_size()
    return all(t.data_ptr() % 16 == 0 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]
               and (t.stride(0) * elt) % 16 == 0 for t in (x2, w))


def _desc(t: torch.Tensor, rows: int, cols: int):
    """Host-side TMA descriptor over the 2-D tensor t with [rows, cols] blocks (see attention_kernel:
    encoded by the launcher, so a CUDA graph captures it like any argument)."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [rows, cols])


def _launch(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, c: Config) -> torch.Tensor:
    if c.balanced:
        return _launch_balanced(x2, w, bias, c)
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    chunk = _chunk(c, k)
    splits = _cdiv(k, chunk)
    split = splits > 1
    p = torch.empty((splits, m, n), dtype=torch.float32, device=x2.device) if split else y
    b = bias if bias is not None else y  # unused pointer
    upcast = _interpreting() and x2.dtype != torch.float32
    tma = c.tma and _tma_usable(x2, w)
    _skinny_linear_fwd[(_cdiv(n, c.block_n), splits)](
        x2, w, b, y, p, m, n, k, x2.stride(0), w.stride(0), chunk,
        _desc(x2, block_m(m), c.block_k) if tma else None, _desc(w, c.block_n, c.block_k) if tma else None,
        BLOCK_M=block_m(m), BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT=split, HAS_BIAS=bias is not None,
        EVEN_N=n % c.block_n == 0, EVEN_K=k % c.block_k == 0, UPCAST=upcast,
        PRECISION="ieee" if x2.dtype == torch.float32 or upcast else "tf32", TMA=tma,
        num_warps=c.num_warps, num_stages=c.num_stages, **_gemm_pdl_options(x2, c.block_k))
    if split:
        block = 1024
        _reduce_splits[(_cdiv(m * n, block),)](p, b, y, m * n, n, SPLITS=splits, HAS_BIAS=bias is not None,
                                                 BLOCK=block, num_warps=4, **_reduce_pdl_options(x2))
    return y


def _launch_balanced(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, c: Config) -> torch.Tensor:
    m, k = x2.shape
    n = w.shape[0]
    n_blocks, k_blocks = _cdiv(n, c.block_n), _cdiv(k, c.block_k)
    units = n_blocks * k_blocks
    programs = min(c.programs, units)  # more would get empty ranges
    if units * programs >= 2 ** 31:  # the kernels' int32 share arithmetic
        raise ValueError(f"balanced mode: {units} units x {programs} programs overflow int32")
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    split = balanced_splits_a_block(units, programs, k_blocks)
    p = torch.empty((programs + n_blocks - 1, m, c.block_n), dtype=torch.float32, device=x2.device) if split else y
    b = bias if bias is not None else y  # unused pointer
    upcast = _interpreting() and x2.dtype != torch.float32
    _balanced_linear_fwd[(programs,)](
        x2, w, b, y, p, m, n, k, x2.stride(0), w.stride(0), units, programs, k_blocks,
        BLOCK_M=block_m(m), BLOCK_N=c.block_n, BLOCK_K=c.block_k, HAS_BIAS=bias is not None,
        EVEN_N=n % c.block_n == 0, EVEN_K=k % c.block_k == 0, UPCAST=upcast,
        PRECISION="ieee" if x2.dtype == torch.float32 or upcast else "tf32",
        num_warps=c.num_warps, num_stages=c.num_stages, **_pdl_options(x2))
    if split:
        rows = min(block_m(m), 4096 // c.block_n)  # a tile of at most 4096 sums per reduce program
        _reduce_balanced[(n_blocks, _cdiv(m, rows))](p, b, y, m, n, units, programs, k_blocks, BLOCK_N=c.block_n,
                                                    ROWS=rows, HAS_BIAS=bias is not None, num_warps=4,
                                                    **_pdl_options(x2))
    return y


def skinny_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, config: Config | None = None,
                  tune: bool = True) -> torch.Tensor:
    """silu(x @ Wg^T) * (x @ Wu^T) -> [..., I] in x's dtype, for the fused gate|up weight w_gate_up
    [2I, K] = Wg (rows [0, I)) over Wu (rows [I, 2I)), as graphs.fuse_projections lays it out: the
    gate|up GEMM with the SwiGLU as its epilogue, so the [M, 2I] intermediate is never written (with
    split K only the fp32 partials are; the reduce applies the SwiGLU to the full sums). Each program
    streams BLOCK_N gate rows and the BLOCK_N up rows of the same columns. = skinny_swiglu_reference:
    fp32 accumulation, silu(g) * u in fp32, rounded once. Rows, dtypes, weight strides, `config` and
    tuning as skinny_linear (own cache entries, swiglu=True; the tuner times cuBLAS + SwiGLU as the
    alternative). Where the kernel cannot run (or an untuned shape during capture): F.linear, then the
    SwiGLU in fp32 (swiglu_reference), i.e. the two-kernel path."""
    w = w_gate_up
    if w.dim() != 2 or w.shape[0] % 2:
        raise ValueError(f"skinny_swiglu: w_gate_up must be [2I, K] (gate rows, then up rows), got {tuple(w.shape)}")
    if config is not None and config.balanced:
        raise ValueError(f"skinny_swiglu has no balanced mode (split_k >= 1 configs only), got {config}")
    if not _supported(x, w, None):
        return swiglu_reference(F.linear(x, w))
    x2 = _rows(x)
    if config is None:
        config = _cached_config(x2, w, None, True, tune)
    if config is None:
        return swiglu_reference(F.linear(x, w))
    return _launch_swiglu(x2, w, config).reshape(*x.shape[:-1], w.shape[0] // 2)


def _launch_swiglu(x2: torch.Tensor, w: torch.Tensor, c: Config) -> torch.Tensor:
    if c.balanced:  # e.g. a hand-edited record: the swiglu candidates are split-K grids only
        raise ValueError(f"skinny_swiglu has no balanced mode, got {c}")
    m, k = x2.shape
    i = w.shape[0] // 2
    y = torch.empty((m, i), dtype=x2.dtype, device=x2.device)
    chunk = _chunk(c, k)
    splits = _cdiv(k, chunk)
    split = splits > 1
    p = torch.empty((splits, m, 2 * i), dtype=torch.float32, device=x2.device) if split else y
    upcast = _interpreting() and x2.dtype != torch.float32
    rne = _interpreting() and x2.dtype == torch.bfloat16
    # gate and up as two row-slice views: each base pointer is 16-byte aligned on its own (the JIT's
    # pipelining condition), whatever I is
    wg, wu = w[:i], w[i:]
    tma = c.tma and _tma_usable(x2, wg) and _tma_usable(x2, wu)
    _skinny_swiglu_fwd[(_cdiv(i, c.block_n), splits)](
        x2, wg, wu, y, p, m, i, k, x2.stride(0), w.stride(0), chunk,
        *((_desc(x2, block_m(m), c.block_k), _desc(wg, c.block_n, c.block_k), _desc(wu, c.block_n, c.block_k))
          if tma else (None, None, None)),
        BLOCK_M=block_m(m), BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT=split,
        EVEN_N=i % c.block_n == 0, EVEN_K=k % c.block_k == 0, UPCAST=upcast,
        PRECISION="ieee" if x2.dtype == torch.float32 or upcast else "tf32", RNE_BF16=rne, TMA=tma,
        num_warps=c.num_warps, num_stages=c.num_stages, **_gemm_pdl_options(x2, c.block_k))
    if split:
        block = 1024
        _reduce_swiglu_splits[(_cdiv(m * i, block),)](p, y, m * i, i, SPLITS=splits, BLOCK=block, RNE_BF16=rne,
                                                        num_warps=4, **_reduce_pdl_options(x2))
    return y


def _tune(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, swiglu: bool = False) -> Tuned:
    """Time the candidates on this very call (outside capture; synchronises) and keep the fastest, with the
    cuBLAS alternative's time: F.linear (swiglu: F.linear of gate|up, then plain F.silu(g) * u)."""
    from triton.testing import do_bench
    m, k = x2.shape
    n, tiles = (w.shape[0] // 2, 2) if swiglu else (w.shape[0], 1)

    def kernel(c: Config) -> torch.Tensor:
        return _launch_swiglu(x2, w, c) if swiglu else _launch(x2, w, bias, c)

    def cublas() -> torch.Tensor:
        y = F.linear(x2, w, bias)
        if swiglu:
            g, u = y.chunk(2, dim=-1)
            y = F.silu(g) * u
        return y

    def bench(fn) -> float:
        return 1000.0 * do_bench(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, return_mode="median")

    tma = TMA_CANDIDATES and (_tma_usable(x2, w[:n]) and _tma_usable(x2, w[n:]) if swiglu else _tma_usable(x2, w))
    cands = candidates(m, n, k, sm_count(x2), x2.element_size(), tiles, tma=tma)
    deadline = None if TUNE_BUDGET_S is None else time.perf_counter() + TUNE_BUDGET_S
    times: dict[Config, float] = {}
    for c in _alternating_kinds(cands):
        if deadline is not None and time.perf_counter() > deadline:
            break
        try:
            times[c] = bench(lambda: kernel(c))
        except Exception:  # out of shared memory / registers for this shape: not a candidate
            continue
    cublas_us = bench(cublas)
    if not times:
        return Tuned(default_config(m, n, k, sm_count(x2), x2.element_size(), tiles), None, cublas_us)
    sweep = tuple((c, times[c]) for c in cands if c in times)
    best, best_us = min(sweep, key=lambda t: t[1])  # the first of equals, in candidates' order
    return Tuned(best, best_us, cublas_us, sweep)


def _alternating_kinds(cands: list[Config]) -> list[Config]:
    """cands in the order split-K 1, TMA split-K 1, balanced 1, split-K 2, ... (each kind in its own
    order), so that a time budget cut leaves every kind represented."""
    kinds = ([c for c in cands if not c.balanced and not c.tma], [c for c in cands if c.tma],
             [c for c in cands if c.balanced])
    return [c for group in itertools.zip_longest(*kinds) for c in group if c is not None]


def tuned(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, swiglu: bool = False) -> Tuned | None:
    """The cached choice for this call's shape (None: never called outside capture); swiglu: skinny_swiglu's."""
    return _TUNED.get(_key(x.reshape(-1, x.shape[-1]), w, bias, swiglu))


RECORD_KEY = ("device", "dtype", "m", "n", "k", "bias", "swiglu")


def export_tuned() -> list[dict]:
    """The tuned choices as JSON-able records (load_tuned takes them back)."""
    return [dict(zip(RECORD_KEY, key), **asdict(t.config), kernel_us=t.kernel_us, cublas_us=t.cublas_us)
            for key, t in _TUNED.items()]


def load_tuned(records: list[dict]) -> None:
    """Seed the cache (e.g. from export_tuned on the same GPU model): those shapes skip timing. A record
    without "swiglu" (written before skinny_swiglu existed) is a plain skinny_linear record."""
    fields = Config.__dataclass_fields__
    for r in records:
        _TUNED[record_key(r)] = Tuned(Config(**{f: r[f] for f in fields if f in r}), r.get("kernel_us"),
                                      r.get("cublas_us"))


def record_key(r: dict) -> tuple:
    """The cache key of a tuning record (its "device" set)."""
    return (r["device"], r["dtype"], r["m"], r["n"], r["k"], r["bias"], bool(r.get("swiglu", False)))


def clear_tuned() -> None:
    _TUNED.clear()


def skinny_linear_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The specification: F.linear in fp32, cast back to x's dtype."""
    return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)


def skinny_swiglu_reference(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """The specification of skinny_swiglu: the gate|up GEMM in fp32, silu(g) * u in fp32, cast back to
    x's dtype once (the two-kernel path rounds g|u to x's dtype before the SwiGLU)."""
    return swiglu_reference(F.linear(x.float(), w_gate_up.float())).to(x.dtype)


# =========================================================================================
# Fused few-row layers: the elementwise neighbours of a decoder layer's GEMMs folded into them
# =========================================================================================
#
#     y = fused_linear(x, w, norm_weight=nw, eps=eps)          # rmsnorm(x) @ w^T      (qkv, gate|up)
#     y = fused_linear(a, w, residual=r)                        # r + a @ w^T           (o_proj)
#     y = fused_linear(gu, w, swiglu=True, residual=r)          # r + swiglu(gu) @ w^T  (down_proj)
#
# With M = 8 rows the GEMMs stream their weight from HBM and do almost no arithmetic, so the RMSNorm,
# the SwiGLU and the residual add cost next to nothing inside them, where standalone they are a kernel
# (and a launch gap) each. Same structure as _skinny_linear_fwd (one program per BLOCK_N weight rows,
# all M rows, the transposed dot), split_k 1 only (no partials: the epilogue needs the whole sum).
#
# Rounding, step by step as the eager stage functions (graphs._rms, fused_add_rms_norm, fused_swiglu):
# * norm prologue: h = bf16(nw * bf16(x * rstd)), rstd = rsqrt(mean(x^2) + eps) in fp32, per row. Each
#   program computes its rows' rstd in a pre-pass over x (M x K from L2: 64 KB at M = 8, K = 4096;
#   NORM_PRE_K-wide tiles, two in flight, ~0.5-1 us per program, partly hidden behind co-resident
#   programs' weight streams) before the K loop, so the A operand is the very bf16 h the eager norm produces. Only the row sum
#   of squares is summed in another order than torch's, which can move rstd by an fp32 ulp (and so,
#   rarely, one element of h by a bf16 ulp); with an exactly summable x it is bit-exact (tests).
# * residual epilogue: y = bf16(r + bf16(acc)), the GEMM output rounded first, then the add, as
#   `x + linear(...)` in eager.
# * swiglu prologue: a = bf16(silu(g) * u) computed in fp32 and rounded once, as the torch.compile'd
#   graphs.fused_swiglu on CUDA does (inductor keeps the chain in fp32). The eager CPU fallback
#   F.silu(g) * u on bf16 tensors rounds twice (after silu, after the product): it differs from this
#   (and from the GPU path) by up to a bf16 ulp in some elements. exp/sigmoid implementations differ
#   by fp32 ulps as well, so this prologue is matched to a tolerance, not bitwise.
# The `*_reference` functions below are the specification.

FUSED_DEFAULT = Config(64, 128, 1, 4, 4)
NORM_PRE_K = 512  # width of the norm pre-pass tiles (x columns per load; two loads in flight)


if triton is not None:

    @triton.jit(do_not_specialize=["M"])
    def _fused_linear_fwd(X, NW, W, R, Y, M, N, K, stride_xm, stride_wn, stride_rm, eps,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                          EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr, RNE_BF16: tl.constexpr, PRE_K: tl.constexpr,
                          NORM_SCALE: tl.constexpr):
        """Program (column block): Y[m, n] = (R[m, n] +) sum_k W[n, k] A[m, k], A = the prologue of X:
        NORM: rmsnorm(X) * NW; SWIGLU: silu(X[:, :K]) * X[:, K:2K]; neither: X. Every rounding to
        the 16-bit dtype goes through _round (RNE_BF16: the interpreter's fp32 -> bf16 cast truncates)."""
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        m_ok = offs_m < M
        dt = X.dtype.element_ty
        if NORM_SCALE:  # the norm as a row scale after the GEMM: sum of squares gathered in the K loop
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        if NORM:
            # Pre-pass: the rows' 1 / rms in fp32 over x (from L2; padded rows read nothing). PRE_K-wide
            # tiles, the next one loaded before this one is reduced: two tiles in flight per program.
            offs_p = tl.arange(0, PRE_K)
            p_ptrs = X + offs_m[:, None] * stride_xm + offs_p[None, :]
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
            xs = tl.load(p_ptrs, mask=m_ok[:, None] & (offs_p < K)[None, :], other=0.0)
            for start in range(PRE_K, K + PRE_K, PRE_K):
                nxt = tl.load(p_ptrs + start, mask=m_ok[:, None] & ((start + offs_p) < K)[None, :], other=0.0)
                xf = xs.to(tl.float32)
                ss += tl.sum(xf * xf, axis=1)
                xs = nxt
            rstd = tl.math.rsqrt(ss / K + eps)
        w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :]
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            if EVEN_K:
                x_mask = m_ok[:, None]
                if EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k_ok = (start + offs_k) < K
                x_mask = m_ok[:, None] & k_ok[None, :]
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=x_mask, other=0.0)
            if NORM:
                if EVEN_K:
                    nw = tl.load(NW + start + offs_k)
                else:
                    nw = tl.load(NW + start + offs_k, mask=(start + offs_k) < K, other=0.0)
                xn = _round(x.to(tl.float32) * rstd[:, None], dt, RNE_BF16)
                x = _round(nw.to(tl.float32)[None, :] * xn.to(tl.float32), dt, RNE_BF16)
            if NORM_SCALE:
                if EVEN_K:
                    nw = tl.load(NW + start + offs_k)
                else:
                    nw = tl.load(NW + start + offs_k, mask=(start + offs_k) < K, other=0.0)
                xf = x.to(tl.float32)
                ss += tl.sum(xf * xf, axis=1)
                x = _round(nw.to(tl.float32)[None, :] * xf, dt, RNE_BF16)
            if SWIGLU:
                g = x.to(tl.float32)
                u = tl.load(x_ptrs + K, mask=x_mask, other=0.0).to(tl.float32)
                x = _round(g * tl.sigmoid(g) * u, dt, RNE_BF16)
            if UPCAST:  # Triton's interpreter gets tl.dot wrong on 16-bit inputs; fp32 is exact there
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if NORM_SCALE:
            acc = acc * tl.math.rsqrt(ss / K + eps)[None, :]
        out_mask = n_ok[:, None] & m_ok[None, :]
        y = _round(acc, Y.dtype.element_ty, RNE_BF16)
        if RESIDUAL:
            r = tl.load(R + offs_m[None, :] * stride_rm + offs_n[:, None], mask=out_mask, other=0.0)
            y = _round(y.to(tl.float32) + r.to(tl.float32), Y.dtype.element_ty, RNE_BF16)
        tl.store(Y + offs_m[None, :] * N + offs_n[:, None], y, mask=out_mask)


def _fused_smem(c: Config, m: int, elt: int, swiglu: bool) -> int:
    """Pipeline buffers of the fused kernel per stage: the weight tile, one (swiglu: two) x tiles and a
    row of norm weight (counted always: a bound)."""
    return c.num_stages * (c.block_n + (2 if swiglu else 1) * block_m(m) + 1) * c.block_k * elt


def fused_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, sms: int,
                 swiglu: bool = False) -> Config:
    """The fused kernel's launch config for an [m, k] x [n, k]^T GEMM: the shape's cached plain
    skinny_linear choice (tuned or loaded from a shipped record) when it is split_k 1 and fits, else
    the best split_k 1 candidate by the same heuristic as default_config. A dict lookup: never times
    anything (capture-safe)."""
    elt = torch.empty((), dtype=dtype).element_size()
    dev = device.index if device.type == "cuda" else -1
    t = _TUNED.get((dev, str(dtype)[6:], m, n, k, False, False))
    if t is not None and t.config.split_k == 1 and _fused_smem(t.config, m, elt, swiglu) <= SMEM_BYTES:
        return t.config
    ones = [c for c in candidates(m, n, k, sms, elt) if c.split_k == 1 and _fused_smem(c, m, elt, swiglu) <= SMEM_BYTES]
    if FUSED_DEFAULT in ones:
        return FUSED_DEFAULT
    if ones:
        return ones[0]
    fit = [c for c in CONFIGS if c.split_k == 1 and _fused_smem(c, m, elt, swiglu) <= SMEM_BYTES]
    most = max(_programs(c, n, k) for c in fit)  # narrow N: the config with the most programs
    return next(c for c in fit if _programs(c, n, k) == most)


def _fused_supported(x2: torch.Tensor, w: torch.Tensor, k: int, norm_weight, residual) -> bool:
    m = x2.shape[0]
    return (available(x2) and x2.dtype in DTYPES and w.dtype == x2.dtype and w.dim() == 2
            and w.device == x2.device and w.stride(1) == 1 and w.stride(0) >= w.shape[1] and w.shape[1] == k
            and 0 < m <= MAX_ROWS and w.shape[0] > 0 and k > 0
            and (norm_weight is None or (norm_weight.shape == (k,) and norm_weight.dtype == x2.dtype
                                         and norm_weight.device == x2.device))
            and (residual is None or (residual.dtype == x2.dtype and residual.device == x2.device)))


def fused_linear(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                 swiglu: bool = False, residual: torch.Tensor | None = None,
                 config: Config | None = None, norm_scale: bool = False) -> torch.Tensor:
    """One few-row linear layer with its elementwise neighbours, = fused_linear_reference:

        A = rms_norm_reference(x, norm_weight, eps)   if norm_weight is given  (x [..., K])
          = swiglu_reference(x)                        if swiglu               (x [..., 2K]: gate | up)
          = x                                          otherwise
        y = A @ w^T  (fp32 accumulation, rounded to x's dtype),  then  y = residual + y  if given

    norm_scale=True computes the norm instead as a row scale after the GEMM (no pre-pass over x):
        y = rsqrt(mean(x^2) + eps) * ((x * norm_weight) @ w^T)   (= rms_scale_reference)
    the same function as the norm prologue up to where bf16 rounding happens (x * norm_weight is rounded
    instead of the normed row), which the layers tolerate like any other bf16 rounding.

    w [N, K] with unit column stride (row slices of fused buffers are fine); x, w, norm_weight and
    residual ([..., N]) of one dtype; no bias. `config` forces a launch config (split_k must be 1);
    otherwise fused_config picks one without timing, so every call is capturable. Where the kernel
    cannot run (no Triton / CPU without the interpreter, > MAX_ROWS rows, mixed dtypes), the reference
    composition runs instead."""
    if norm_weight is not None and swiglu:
        raise ValueError("fused_linear: norm_weight and swiglu are exclusive prologues")
    if config is not None and config.split_k != 1:
        raise ValueError(f"fused_linear needs a split_k 1 config, got {config}")
    k = x.shape[-1] // 2 if swiglu else x.shape[-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    n = w.shape[0]
    r2 = None
    if residual is not None:
        if residual.shape != (*x.shape[:-1], n):
            raise ValueError(f"fused_linear: residual {tuple(residual.shape)} for output {(*x.shape[:-1], n)}")
        r2 = residual.reshape(-1, n)
        if r2.stride(1) != 1:
            r2 = r2.contiguous()
    if (swiglu and x.shape[-1] % 2) or not _fused_supported(x2, w, k, norm_weight, residual):
        return fused_linear_reference(x, w, norm_weight=norm_weight, eps=eps, swiglu=swiglu, residual=residual,
                                      norm_scale=norm_scale)
    m = x2.shape[0]
    if config is None:
        config = fused_config(m, n, k, x2.dtype, x2.device, sm_count(x2), swiglu)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    upcast = _interpreting() and x2.dtype != torch.float32
    c = config
    _fused_linear_fwd[(_cdiv(n, c.block_n),)](
        x2, norm_weight if norm_weight is not None else w, w, r2 if r2 is not None else y, y,
        m, n, k, x2.stride(0), w.stride(0), r2.stride(0) if r2 is not None else n, float(eps),
        BLOCK_M=block_m(m), BLOCK_N=c.block_n, BLOCK_K=c.block_k, NORM=norm_weight is not None and not norm_scale,
        NORM_SCALE=norm_weight is not None and norm_scale,
        SWIGLU=bool(swiglu), RESIDUAL=r2 is not None, EVEN_N=n % c.block_n == 0, EVEN_K=k % c.block_k == 0,
        UPCAST=upcast, PRECISION="ieee" if x2.dtype == torch.float32 or upcast else "tf32",
        RNE_BF16=_interpreting() and x2.dtype == torch.bfloat16, PRE_K=min(NORM_PRE_K, triton.next_power_of_2(k)),
        num_warps=c.num_warps, num_stages=c.num_stages)
    return y.reshape(*x.shape[:-1], n)


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """graphs._rms / text_model.RMSNorm: normalise in fp32, round to x's dtype, then scale (rounded)."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu_reference(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over gu = gate | up (graphs.fused_swiglu's chunking), in fp32, rounded once
    (the compiled GPU path; the eager bf16 F.silu(g) * u rounds twice)."""
    g, u = gu.float().chunk(2, dim=-1)
    return (F.silu(g) * u).to(gu.dtype)


def rms_scale_reference(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fused_linear(norm_scale=True) before the residual: the row's 1/rms (fp32) times the fp32 GEMM of
    the rounded x * norm_weight, rounded once to x's dtype."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xw = (xf * norm_weight.float()).to(x.dtype).float()
    return (rstd * F.linear(xw, w.float())).to(x.dtype)


def fused_linear_reference(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
                           eps: float = 1e-6, swiglu: bool = False,
                           residual: torch.Tensor | None = None, norm_scale: bool = False) -> torch.Tensor:
    """The specification of fused_linear: prologue, fp32 GEMM rounded to x's dtype, then the residual
    add (a second rounding, as `residual + linear(...)` in eager)."""
    if norm_weight is not None and norm_scale:
        y = rms_scale_reference(x, w, norm_weight, eps)
        return y if residual is None else residual + y
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps)
    elif swiglu:
        x = swiglu_reference(x)
    y = skinny_linear_reference(x, w)
    return y if residual is None else residual + y
