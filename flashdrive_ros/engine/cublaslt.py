"""cuBLASLt matmuls with a chosen algorithm, through ctypes (no build step, no extension).

F.linear asks cuBLASLt's heuristic for one algorithm and runs it. For the engine's fixed shapes (the
vision tower's 2 880-row GEMMs with a K of 1 152, the streaming prefill's ~800 rows, the action expert's
64) another of the heuristic's candidates can be faster: the first pick is a model's guess, the others
are only a timing away. `Plan` lists the candidates of one GEMM shape and runs any of them, inside CUDA
graph capture too (the workspace is preallocated, scalars are host values read at call time).
scripts/gpu_cublaslt_check.py times them on the device and writes the records graphs.dense runs.

Layout: torch's row-major y[M, N] = x[M, K] @ w[N, K]^T + b is cuBLAS's column-major
D[N, M] = op(A) op(B) with A = w seen as K x N (transposed), B = x seen as K x M: the "TN" GEMM that
torch's own cuBLAS calls run, so the bias epilogue adds b per row of D, i.e. per output feature.

Beyond the heuristic's list, `Plan.enumerate` builds configurations itself: every algorithm id cuBLASLt has
for these types (cublasLtMatmulAlgoGetIds), each one's tiles, stages, split-K, CTA swizzling, custom options
and cluster shapes as its capabilities allow, kept where cublasLtMatmulAlgoCheck accepts them.

An algorithm is cuBLAS's 64-byte cublasLtMatmulAlgo_t. The library says it may be stored and reused
with the same cuBLAS version, so records carry the version and the algorithm is re-checked
(cublasLtMatmulAlgoCheck) before it is used; a mismatch means the record is not used (F.linear runs).
"""
from __future__ import annotations

import ctypes
import itertools
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

import torch

# cuBLAS / CUDA enum values (cublasLt.h, library_types.h)
CUBLAS_COMPUTE_32F = 68
CUDA_R_32F = 0
CUDA_TYPES = {torch.float16: 2, torch.bfloat16: 14}
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
PREF_MAX_WORKSPACE_BYTES = 1
EPILOGUES = {"none": 1, "bias": 4, "gelu_bias": 36}  # gelu: the tanh approximation (gelu_pytorch_tanh)

# Algorithm configuration and capabilities. Values: cublasLt.h (CUDA 11.x-13.x; enum values are only ever
# appended) and the cuBLAS documentation, sections cublasLtMatmulAlgoCapAttributes_t,
# cublasLtMatmulAlgoConfigAttributes_t, cublasLtReductionScheme_t and cublasLtClusterShape_t
# (docs.nvidia.com/cuda/cublas; the same numbers as nvmath.bindings.cublasLt's enums).
# cublasLtMatmulAlgoConfigAttributes_t: ID is int32_t (read-only), CLUSTER_SHAPE_ID (and INNER_SHAPE_ID = 7,
# not used here) uint16_t, the others uint32_t; a set or get with another size is refused.
ALGO_CONFIG_ID, ALGO_CONFIG_TILE_ID, ALGO_CONFIG_SPLITK_NUM = 0, 1, 2
ALGO_CONFIG_REDUCTION_SCHEME, ALGO_CONFIG_CTA_SWIZZLING, ALGO_CONFIG_CUSTOM_OPTION = 3, 4, 5
ALGO_CONFIG_STAGES_ID, ALGO_CONFIG_CLUSTER_SHAPE_ID = 6, 8
# cublasLtMatmulAlgoCapAttributes_t: SPLITK_SUPPORT int32_t, REDUCTION_SCHEME_MASK uint32_t,
# CTA_SWIZZLING_SUPPORT uint32_t, TILE_IDS uint32_t[], CUSTOM_OPTION_MAX int32_t, STAGES_IDS uint32_t[].
# There is no capability that lists cluster shapes (the enum's last entries are POINTER_ARRAY_BATCH_SUPPORT
# 21 and FLOATING_POINT_EMULATION_SUPPORT 22): cluster shapes are tried from CLUSTER_SHAPES and
# cublasLtMatmulAlgoCheck says which apply.
ALGO_CAP_SPLITK_SUPPORT, ALGO_CAP_REDUCTION_SCHEME_MASK, ALGO_CAP_CTA_SWIZZLING_SUPPORT = 0, 1, 2
ALGO_CAP_TILE_IDS, ALGO_CAP_CUSTOM_OPTION_MAX, ALGO_CAP_STAGES_IDS = 6, 7, 13
# cublasLtReductionScheme_t (the split-K partial sums; NONE is the only one with splitK 1)
REDUCTION_NONE, REDUCTION_INPLACE, REDUCTION_COMPUTE_TYPE, REDUCTION_OUTPUT_TYPE = 0, 1, 2, 4
REDUCTION_NAMES = {REDUCTION_NONE: "none", REDUCTION_INPLACE: "inplace", REDUCTION_COMPUTE_TYPE: "compute",
                   REDUCTION_OUTPUT_TYPE: "output"}
# cublasLtClusterShape_t: AUTO lets the library pick; then the shapes of up to 4 CTAs (a bound chosen here to
# keep the count down; the enum goes on to 16x1x1). Values: AUTO 0, 1x1x1 2, 2x1x1 3, 4x1x1 4, 1x2x1 5,
# 2x2x1 6, 1x4x1 8.
CLUSTER_SHAPE_AUTO = 0
CLUSTER_SHAPE_NAMES = {0: "auto", 2: "1x1x1", 3: "2x1x1", 5: "1x2x1", 6: "2x2x1", 4: "4x1x1", 8: "1x4x1"}
CLUSTER_SHAPES = tuple(CLUSTER_SHAPE_NAMES)
SPLIT_K_VALUES = (2, 3, 4)  # tried (after all splitK 1 configurations) where an algorithm supports split-K
CUSTOM_OPTIONS_TRIED = 16   # custom options 0 .. 15 at most, whatever CUSTOM_OPTION_MAX says
MAX_ALGO_IDS = 1024         # room for cublasLtMatmulAlgoGetIds' answer

WORKSPACE_BYTES = 32 * 1024 * 1024  # what torch gives cuBLASLt on Hopper; candidates needing more are skipped
ALIGNMENT = 16  # bytes; every pointer the records were tuned with is at least this aligned


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLtError(RuntimeError):
    pass


_STATE: dict = {"lib": None, "handles": {}, "workspaces": {}}


def _find_library_path() -> str | None:
    """The libcublasLt torch itself loaded (same version as its own calls), from this process's mappings."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "libcublasLt.so" in path:
                    return path
    except OSError:
        pass
    return None


def library():
    """The loaded libcublasLt (ctypes), or raise CublasLtError saying why it is not available."""
    if _STATE["lib"] is not None:
        return _STATE["lib"]
    if not torch.cuda.is_available():
        raise CublasLtError("cuBLASLt needs CUDA; this torch has none")
    path = _find_library_path()
    if path is None:  # torch loads cuBLASLt lazily: one small matmul maps it
        a = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
        (a @ a).sum().item()
        path = _find_library_path()
    names = [path] if path else []
    names += ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise CublasLtError(f"no libcublasLt found (tried {names})")
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    lib.cublasLtGetVersion.restype = sz
    lib.cublasLtMatmul.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, sz, vp]
    lib.cublasLtMatrixLayoutCreate.argtypes = [vp, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64]
    lib.cublasLtMatmulDescSetAttribute.argtypes = [vp, ctypes.c_int, vp, sz]
    lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [vp, ctypes.c_int, vp, sz]
    lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int, vp, vp]
    lib.cublasLtMatmulAlgoCheck.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp]
    lib.cublasLtMatmulAlgoConfigGetAttribute.argtypes = [vp, ctypes.c_int, vp, sz, vp]
    i = ctypes.c_int
    lib.cublasLtMatmulAlgoGetIds.argtypes = [vp, i, i, i, i, i, i, i, vp, vp]
    lib.cublasLtMatmulAlgoInit.argtypes = [vp, i, i, i, i, i, i, i, vp]
    lib.cublasLtMatmulAlgoCapGetAttribute.argtypes = [vp, i, vp, sz, vp]
    lib.cublasLtMatmulAlgoConfigSetAttribute.argtypes = [vp, i, vp, sz]
    _STATE["lib"] = lib
    return lib


def version() -> int:
    return int(library().cublasLtGetVersion())


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"{what} failed with cublasStatus {status}")


def _handle(device: int) -> ctypes.c_void_p:
    if device not in _STATE["handles"]:
        h = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(library().cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
        _STATE["handles"][device] = h
    return _STATE["handles"][device]


def _workspace(device: int) -> torch.Tensor:
    if device not in _STATE["workspaces"]:
        _STATE["workspaces"][device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=f"cuda:{device}")
    return _STATE["workspaces"][device]


@dataclass(frozen=True)
class Candidate:
    """One algorithm: its 64 bytes (hex), workspace need, and its configuration (-1: could not be read)."""
    rank: int           # heuristic: position in its list (0: what F.linear would most likely run);
    #                     enumerated: the plan's running count of enumerated configurations
    algo_hex: str
    workspace: int
    waves: float
    algo_id: int
    tile_id: int
    split_k: int
    stages_id: int = -1
    reduction: int = -1
    swizzle: int = -1
    custom: int = -1
    cluster: int = -1
    source: str = "heuristic"  # or "enumerated" (Plan.enumerate built it)

    @property
    def tag(self) -> str:
        return f"#{self.rank}" if self.source == "heuristic" else f"#e{self.rank}"

    @property
    def config(self) -> "Config":
        return Config(self.algo_id, self.tile_id, self.stages_id, self.split_k, self.reduction, self.swizzle,
                      self.custom, self.cluster)

    def describe(self) -> str:
        split = f"splitK {self.split_k}"
        if self.split_k > 1:
            split += f" ({REDUCTION_NAMES.get(self.reduction, self.reduction)})"
        cluster = CLUSTER_SHAPE_NAMES.get(self.cluster, str(self.cluster))
        return (f"{self.tag} algo {self.algo_id} tile {self.tile_id} stages {self.stages_id} {split} "
                f"swizzle {self.swizzle} custom {self.custom} cluster {cluster} waves {self.waves:.2f}")


class Config(NamedTuple):
    """The configuration attributes Plan.enumerate sets on an initialized algorithm."""
    algo_id: int
    tile: int
    stages: int
    split_k: int
    reduction: int
    swizzle: int
    custom: int
    cluster: int


@dataclass(frozen=True)
class AlgoCaps:
    """What one algorithm id says it can be configured with (cublasLtMatmulAlgoCapGetAttribute)."""
    algo_id: int
    tiles: tuple[int, ...]
    stages: tuple[int, ...]
    split_k: bool
    reduction_mask: int
    swizzle: bool
    custom_max: int


def _ids_to_try(ids: Iterable[int]) -> list[int]:
    """Tile or stages ids in the library's order, once each. 0 (UNDEFINED: the library picks) only where the
    capability lists nothing else: an explicit id covers what the library would pick, and the same kernel
    is not timed twice under two names."""
    unique = list(dict.fromkeys(int(i) for i in ids))
    explicit = [i for i in unique if i != 0]
    return explicit or [0]


def _extras(caps: AlgoCaps, cluster_shapes: Iterable[int], custom_options: int) -> dict[int, list[tuple]]:
    """(swizzle, custom, cluster) choices of one algorithm, grouped by how many differ from the default."""
    swizzles = (0, 1) if caps.swizzle else (0,)
    customs = range(min(max(caps.custom_max, 0), custom_options - 1) + 1)
    clusters = list(dict.fromkeys([CLUSTER_SHAPE_AUTO, *cluster_shapes]))
    by_count: dict[int, list[tuple]] = {n: [] for n in range(4)}
    for e in itertools.product(swizzles, customs, clusters):
        by_count[(e[0] != 0) + (e[1] != 0) + (e[2] != CLUSTER_SHAPE_AUTO)].append(e)
    return by_count


def _split_choices(caps: AlgoCaps, split_k_values: Iterable[int]) -> list[tuple[int, int]]:
    """(splitK, reduction scheme) pairs above splitK 1: every value with every scheme the mask allows."""
    if not caps.split_k:
        return []
    schemes = [r for r in (REDUCTION_INPLACE, REDUCTION_COMPUTE_TYPE, REDUCTION_OUTPUT_TYPE)
               if caps.reduction_mask & r] or [REDUCTION_NONE]
    return [(k, r) for k in dict.fromkeys(split_k_values) if k > 1 for r in schemes]


def _round_robin(streams: list[Iterator]) -> Iterator:
    """One from each stream in turn until all are spent."""
    active = list(streams)
    while active:
        still = []
        for stream in active:
            item = next(stream, None)
            if item is not None:
                yield item
                still.append(stream)
        active = still


def config_combinations(algos: Iterable[AlgoCaps], split_k_values: Iterable[int] = SPLIT_K_VALUES,
                        cluster_shapes: Iterable[int] = CLUSTER_SHAPES,
                        custom_options: int = CUSTOM_OPTIONS_TRIED) -> Iterator[Config]:
    """Every configuration the capabilities allow, each once, lazily, in the order worth checking first:
    splitK 1 before split-K; within that, configurations with no swizzle / custom option / explicit cluster
    before those with one of them, then two, then three; within one such tier the algorithms take turns (in
    the order given: Plan.enumerate puts the heuristic's algorithm ids first), each walking its tiles x
    stages in the library's order. A limit on the count thus spends itself on the plain configurations of
    all algorithms before the variations of any."""
    algos = list(algos)
    split_k_values = tuple(split_k_values)
    cluster_shapes = tuple(cluster_shapes)

    def stream(caps: AlgoCaps, extras: list[tuple], splits: list[tuple[int, int]]) -> Iterator[Config]:
        for tile in _ids_to_try(caps.tiles):
            for stages in _ids_to_try(caps.stages):
                for (swizzle, custom, cluster) in extras:
                    for (split_k, reduction) in splits:
                        yield Config(caps.algo_id, tile, stages, split_k, reduction, swizzle, custom, cluster)

    prepared = [(caps, _extras(caps, cluster_shapes, custom_options), _split_choices(caps, split_k_values))
                for caps in algos]
    for split_k_tier in (False, True):
        for n_extras in range(4):
            yield from _round_robin([
                stream(caps, extras[n_extras], splits if split_k_tier else [(1, REDUCTION_NONE)])
                for caps, extras, splits in prepared])


def config_retilings(base: Config, caps: AlgoCaps) -> list[Config]:
    """base with every other tile x stages its algorithm lists (the library's order), all else kept."""
    return [base._replace(tile=tile, stages=stages)
            for tile in _ids_to_try(caps.tiles) for stages in _ids_to_try(caps.stages)
            if (tile, stages) != (base.tile, base.stages)]


def config_variations(base: Config, caps: AlgoCaps, split_k_values: Iterable[int] = SPLIT_K_VALUES,
                      cluster_shapes: Iterable[int] = CLUSTER_SHAPES,
                      custom_options: int = CUSTOM_OPTIONS_TRIED) -> list[Config]:
    """The configurations that keep base's algorithm, tile and stages and change its swizzle, custom option,
    cluster shape or split-K (base itself excluded), nearest to base first (fewest of those four changed),
    then splitK 1 before split-K. For a second look around the fastest configurations of a first pass."""
    extras = _extras(caps, cluster_shapes, custom_options)
    everything = []
    for splits in ([(1, REDUCTION_NONE)], _split_choices(caps, split_k_values)):
        for n_extras in range(4):
            for (swizzle, custom, cluster) in extras[n_extras]:
                for (split_k, reduction) in splits:
                    everything.append(Config(base.algo_id, base.tile, base.stages, split_k, reduction, swizzle,
                                             custom, cluster))

    def changes(c: Config) -> int:
        return ((c.swizzle != base.swizzle) + (c.custom != base.custom) + (c.cluster != base.cluster)
                + ((c.split_k, c.reduction) != (base.split_k, base.reduction)))

    return sorted((c for c in everything if c != base), key=changes)  # sorted() keeps the order within


class Plan:
    """cuBLASLt descriptors of one GEMM y[m, n] = epilogue(x[m, k] @ w[n, k]^T (+ b)) in `dtype` on `device`."""

    def __init__(self, m: int, n: int, k: int, epilogue: str = "none", dtype: torch.dtype = torch.bfloat16,
                 device: int = 0):
        if epilogue not in EPILOGUES:
            raise ValueError(f"epilogue must be one of {sorted(EPILOGUES)}, got {epilogue!r}")
        if dtype not in CUDA_TYPES:
            raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
        lib = library()
        self.m, self.n, self.k, self.epilogue, self.dtype, self.device = m, n, k, epilogue, dtype, device
        self._handle = _handle(device)
        self._desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self._desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
               "cublasLtMatmulDescCreate")
        self._set_desc(DESC_TRANSA, ctypes.c_int32(CUBLAS_OP_T))
        self._set_desc(DESC_TRANSB, ctypes.c_int32(CUBLAS_OP_N))
        self._set_desc(DESC_EPILOGUE, ctypes.c_uint32(EPILOGUES[epilogue]))
        t = CUDA_TYPES[dtype]
        self._a, self._b, self._d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        for layout, rows, cols in ((self._a, k, n), (self._b, k, m), (self._d, n, m)):
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), t, rows, cols, rows),
                   "cublasLtMatrixLayoutCreate")
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._algos: dict[str, _Algo] = {}
        self._caps: dict[int, AlgoCaps] | None = None   # per algorithm id, see capabilities()
        self._initialized: dict[int, _Algo] = {}        # cublasLtMatmulAlgoInit's algorithm per id
        self._caps_skipped: Counter = Counter()         # why ids were left out
        self._enumerated = 0                            # ranks of enumerated candidates, plan-wide
        self.enumeration_report: dict = {}              # what the last enumerate() did

    def _set_desc(self, attr: int, value) -> None:
        _check(library().cublasLtMatmulDescSetAttribute(self._desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
               f"cublasLtMatmulDescSetAttribute({attr})")

    def candidates(self, count: int = 32) -> list[Candidate]:
        """The heuristic's algorithms for this shape that fit the workspace, best guess first."""
        lib = library()
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        ws = ctypes.c_uint64(WORKSPACE_BYTES)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8),
               "cublasLtMatmulPreferenceSetAttribute")
        results = (_Heuristic * count)()
        returned = ctypes.c_int(0)
        try:
            _check(lib.cublasLtMatmulAlgoGetHeuristic(self._handle, self._desc, self._a, self._b, self._d, self._d,
                                                      pref, count, results, ctypes.byref(returned)),
                   "cublasLtMatmulAlgoGetHeuristic")
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        out = []
        for i in range(returned.value):
            r = results[i]
            if r.state != 0 or r.workspace_size > WORKSPACE_BYTES:
                continue
            out.append(_candidate(r.algo, i, r.workspace_size, r.waves, "heuristic"))
        return out

    def capabilities(self) -> dict[int, AlgoCaps]:
        """Every algorithm id cuBLASLt has for this plan's compute, scale and matrix types, with what each
        can be configured with; ids whose initialization or capabilities fail are left out (the reasons
        count in enumeration_report["skipped"]). Raises CublasLtError only if no id can be listed."""
        if self._caps is not None:
            return self._caps
        lib = library()
        t = CUDA_TYPES[self.dtype]
        ids = (ctypes.c_int * MAX_ALGO_IDS)()
        returned = ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetIds(self._handle, CUBLAS_COMPUTE_32F, CUDA_R_32F, t, t, t, t, MAX_ALGO_IDS,
                                            ids, ctypes.byref(returned)), "cublasLtMatmulAlgoGetIds")
        caps = {}
        for algo_id in list(dict.fromkeys(ids[:min(returned.value, MAX_ALGO_IDS)])):
            try:
                algo = _Algo()
                _check(lib.cublasLtMatmulAlgoInit(self._handle, CUBLAS_COMPUTE_32F, CUDA_R_32F, t, t, t, t, algo_id,
                                                  ctypes.byref(algo)), "cublasLtMatmulAlgoInit")
                caps[algo_id] = AlgoCaps(
                    algo_id=algo_id,
                    tiles=_cap_ids(algo, ALGO_CAP_TILE_IDS),
                    stages=_cap_ids(algo, ALGO_CAP_STAGES_IDS),
                    split_k=_cap_value(algo, ALGO_CAP_SPLITK_SUPPORT, ctypes.c_int32) != 0,
                    reduction_mask=_cap_value(algo, ALGO_CAP_REDUCTION_SCHEME_MASK, ctypes.c_uint32),
                    swizzle=_cap_value(algo, ALGO_CAP_CTA_SWIZZLING_SUPPORT, ctypes.c_uint32) != 0,
                    custom_max=_cap_value(algo, ALGO_CAP_CUSTOM_OPTION_MAX, ctypes.c_int32))
                self._initialized[algo_id] = algo
            except Exception as e:  # one id that cannot be read is skipped, not the enumeration
                self._caps_skipped[f"algo id skipped: {_reason(e)}"] += 1
        self._caps = caps
        return caps

    def enumerate(self, limit: int | None = None, configs: Iterable[Config] | None = None, *,
                  include_heuristic: bool = True, heuristic_count: int = 32, max_checks: int | None = 50_000,
                  max_seconds: float | None = None, exclude: Iterable[str] = (),
                  base_hex: str | None = None) -> list[Candidate]:
        """The heuristic's candidates (include_heuristic) and then configurations built here that
        cublasLtMatmulAlgoCheck accepts within WORKSPACE_BYTES, each 64-byte algorithm once.

        configs: what to check, by default config_combinations over capabilities() with the heuristic's
        algorithm ids first (splitK 1 first; see there); config_retilings and config_variations give a second
        look around one configuration. limit caps the enumerated candidates returned, max_checks the
        AlgoCheck calls, max_seconds the host time spent checking; algorithms (hex) in exclude count as
        duplicates, not against the limit (what an earlier call already gave). base_hex: build every
        configuration on these 64 bytes (say a heuristic candidate's) instead of cublasLtMatmulAlgoInit's, so
        what no configuration attribute sets (the inner shape, say) stays as it was; configurations of
        another algorithm id are then skipped.

        Nothing here raises for one configuration or algorithm id: failures are counted by reason in
        self.enumeration_report; CublasLtError only without CUDA or where neither the heuristic nor the
        algorithm ids give anything at all."""
        library()  # without CUDA: CublasLtError, before anything else is touched
        skipped: Counter = Counter()
        out: list[Candidate] = []
        seen: set[str] = set(exclude)
        heuristic_ids: list[int] = []
        if include_heuristic:
            try:
                for c in self.candidates(heuristic_count):
                    if c.algo_hex not in seen:
                        seen.add(c.algo_hex)
                        out.append(c)
                        heuristic_ids.append(c.algo_id)
            except Exception as e:
                skipped[f"heuristic: {_reason(e)}"] += 1
        try:
            caps = self.capabilities()
        except Exception as e:
            caps = {}
            skipped[f"algorithm ids: {_reason(e)}"] += 1
        skipped.update(self._caps_skipped)
        if configs is None:
            first = [caps[i] for i in dict.fromkeys(heuristic_ids) if i in caps]
            configs = config_combinations(first + [c for i, c in caps.items() if i not in heuristic_ids])
        given_base = _algo_from_hex(base_hex) if base_hex is not None else None
        given_base_id = _config(given_base, ALGO_CONFIG_ID) if given_base is not None else None
        checked = valid = duplicates = enumerated = 0
        stopped = None
        start = time.monotonic()
        for config in configs:
            if limit is not None and enumerated >= limit:
                stopped = "limit"
                break
            if max_checks is not None and checked >= max_checks:
                stopped = "max_checks"
                break
            if max_seconds is not None and time.monotonic() - start > max_seconds:
                stopped = "max_seconds"
                break
            if given_base is not None:
                base = given_base if config.algo_id == given_base_id else None
            else:
                base = self._initialized.get(config.algo_id)
            if base is None:
                skipped["no base algorithm for the id"] += 1
                continue
            checked += 1
            try:
                checked_algo, result = self._check_config(base, config)
            except Exception as e:
                skipped[_reason(e)] += 1
                continue
            valid += 1
            text = _algo_hex(checked_algo)
            if text in seen:
                duplicates += 1
                continue
            seen.add(text)
            out.append(_candidate(checked_algo, self._enumerated, result.workspace_size, result.waves, "enumerated"))
            self._enumerated += 1
            enumerated += 1
        self.enumeration_report = {
            "algo_ids": len(caps), "heuristic": len(out) - enumerated, "checked": checked, "valid": valid,
            "duplicates": duplicates, "enumerated": enumerated, "stopped": stopped,
            "seconds": round(time.monotonic() - start, 3), "skipped": dict(skipped.most_common())}
        if not out and not caps:  # neither the heuristic nor the algorithm ids gave anything
            raise CublasLtError(f"no cuBLASLt algorithm for this plan: {dict(skipped)}")
        return out

    def _check_config(self, base: _Algo, config: Config) -> tuple[_Algo, _Heuristic]:
        """base with config's attributes set, and cublasLtMatmulAlgoCheck's result; CublasLtError where the
        library refuses an attribute or the whole, or the workspace would not fit."""
        lib = library()
        algo = _Algo.from_buffer_copy(bytes(base))
        for attr, name, value, ctype, default in (
                (ALGO_CONFIG_TILE_ID, "TILE_ID", config.tile, ctypes.c_uint32, 0),
                (ALGO_CONFIG_STAGES_ID, "STAGES_ID", config.stages, ctypes.c_uint32, 0),
                (ALGO_CONFIG_SPLITK_NUM, "SPLITK_NUM", config.split_k, ctypes.c_uint32, 1),
                (ALGO_CONFIG_REDUCTION_SCHEME, "REDUCTION_SCHEME", config.reduction, ctypes.c_uint32, 0),
                (ALGO_CONFIG_CTA_SWIZZLING, "CTA_SWIZZLING", config.swizzle, ctypes.c_uint32, 0),
                (ALGO_CONFIG_CUSTOM_OPTION, "CUSTOM_OPTION", config.custom, ctypes.c_uint32, 0),
                (ALGO_CONFIG_CLUSTER_SHAPE_ID, "CLUSTER_SHAPE_ID", config.cluster, ctypes.c_uint16, 0)):
            v = ctype(value)
            status = lib.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(algo), attr, ctypes.byref(v),
                                                              ctypes.sizeof(v))
            # a library without the attribute still runs the default (cluster shapes before CUDA 11.8)
            if status != 0 and value != default:
                raise CublasLtError(f"cublasLtMatmulAlgoConfigSetAttribute({name}) failed with cublasStatus {status}")
        result = _Heuristic()
        _check(lib.cublasLtMatmulAlgoCheck(self._handle, self._desc, self._a, self._b, self._d, self._d,
                                           ctypes.byref(algo), ctypes.byref(result)), "cublasLtMatmulAlgoCheck")
        if result.workspace_size > WORKSPACE_BYTES:
            raise CublasLtError("needs more workspace than WORKSPACE_BYTES")
        return algo, result

    def supports(self, algo_hex: str) -> bool:
        """Whether cuBLASLt accepts this stored algorithm for this shape (same library version, valid config)."""
        algo = _algo_from_hex(algo_hex)
        result = _Heuristic()
        status = library().cublasLtMatmulAlgoCheck(self._handle, self._desc, self._a, self._b, self._d, self._d,
                                                   ctypes.byref(algo), ctypes.byref(result))
        return status == 0 and result.workspace_size <= WORKSPACE_BYTES

    def __call__(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, algo_hex: str,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """epilogue(x @ w^T + bias) with the given algorithm, on the current stream. x [m, k], w [n, k]
        contiguous; bias [n] (epilogues bias / gelu_bias) or None."""
        m, n, k = self.m, self.n, self.k
        if x.shape != (m, k) or w.shape != (n, k):
            raise ValueError(f"plan is for x [{m}, {k}] and w [{n}, {k}], got {tuple(x.shape)} and {tuple(w.shape)}")
        if (bias is None) != (self.epilogue == "none"):
            raise ValueError(f"epilogue {self.epilogue!r} {'takes no' if bias is not None else 'needs a'} bias")
        if out is None:
            out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        for t in (x, w, out) + (() if bias is None else (bias,)):
            if not t.is_contiguous() or t.dtype != self.dtype or t.data_ptr() % ALIGNMENT:
                raise ValueError("x, w, out (and bias) must be contiguous, aligned and of the plan's dtype")
        algo = self._algos.get(algo_hex)
        if algo is None:
            algo = self._algos[algo_hex] = _algo_from_hex(algo_hex)
        if bias is not None:
            self._set_desc(DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        ws = _workspace(self.device)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _check(library().cublasLtMatmul(
            self._handle, self._desc, ctypes.byref(self._alpha), w.data_ptr(), self._a, x.data_ptr(), self._b,
            ctypes.byref(self._beta), out.data_ptr(), self._d, out.data_ptr(), self._d, ctypes.byref(algo),
            ws.data_ptr(), WORKSPACE_BYTES, stream), "cublasLtMatmul")
        return out


def _algo_hex(algo: _Algo) -> str:
    return bytes(algo).hex()


def _algo_from_hex(text: str) -> _Algo:
    raw = bytes.fromhex(text)
    if len(raw) != ctypes.sizeof(_Algo):
        raise ValueError(f"an algorithm is {ctypes.sizeof(_Algo)} bytes, got {len(raw)}")
    return _Algo.from_buffer_copy(raw)


def _config(algo: _Algo, attr: int, ctype=ctypes.c_int32) -> int:
    """One configuration attribute of an algorithm, -1 where the library does not give it."""
    value, written = ctype(0), ctypes.c_size_t(0)
    status = library().cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(value),
                                                            ctypes.sizeof(value), ctypes.byref(written))
    return int(value.value) if status == 0 else -1


def _candidate(algo: _Algo, rank: int, workspace: int, waves: float, source: str) -> Candidate:
    return Candidate(rank=rank, algo_hex=_algo_hex(algo), workspace=int(workspace), waves=float(waves),
                     algo_id=_config(algo, ALGO_CONFIG_ID), tile_id=_config(algo, ALGO_CONFIG_TILE_ID),
                     split_k=_config(algo, ALGO_CONFIG_SPLITK_NUM), stages_id=_config(algo, ALGO_CONFIG_STAGES_ID),
                     reduction=_config(algo, ALGO_CONFIG_REDUCTION_SCHEME),
                     swizzle=_config(algo, ALGO_CONFIG_CTA_SWIZZLING), custom=_config(algo, ALGO_CONFIG_CUSTOM_OPTION),
                     cluster=_config(algo, ALGO_CONFIG_CLUSTER_SHAPE_ID, ctypes.c_uint16), source=source)


def _cap_value(algo: _Algo, attr: int, ctype) -> int:
    """A scalar capability; CublasLtError where the library refuses it."""
    value, written = ctype(0), ctypes.c_size_t(0)
    _check(library().cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, ctypes.byref(value),
                                                       ctypes.sizeof(value), ctypes.byref(written)),
           f"cublasLtMatmulAlgoCapGetAttribute({attr})")
    return int(value.value)


def _cap_ids(algo: _Algo, attr: int) -> tuple[int, ...]:
    """A uint32_t[] capability (tile or stages ids): asked with size 0 for its byte count, then read."""
    lib = library()
    written = ctypes.c_size_t(0)
    _check(lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, None, 0, ctypes.byref(written)),
           f"cublasLtMatmulAlgoCapGetAttribute({attr}, size query)")
    count = written.value // ctypes.sizeof(ctypes.c_uint32)
    if count == 0:
        return ()
    ids = (ctypes.c_uint32 * count)()
    _check(lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, ids, ctypes.sizeof(ids),
                                                 ctypes.byref(written)),
           f"cublasLtMatmulAlgoCapGetAttribute({attr})")
    return tuple(int(v) for v in ids[:min(count, written.value // ctypes.sizeof(ctypes.c_uint32))])


def _reason(e: Exception) -> str:
    """A failure as a short reason to count (the cuBLAS call and status, or the exception's type)."""
    return str(e) if isinstance(e, CublasLtError) else f"{type(e).__name__}: {e}"
