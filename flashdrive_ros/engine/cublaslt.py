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

An algorithm is cuBLAS's 64-byte cublasLtMatmulAlgo_t. The library says it may be stored and reused
with the same cuBLAS version, so records carry the version and the algorithm is re-checked
(cublasLtMatmulAlgoCheck) before it is used; a mismatch means the record is not used (F.linear runs).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

# cuBLAS / CUDA enum values (cublasLt.h, library_types.h)
CUBLAS_COMPUTE_32F = 68
CUDA_R_32F = 0
CUDA_TYPES = {torch.float16: 2, torch.bfloat16: 14}
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
PREF_MAX_WORKSPACE_BYTES = 1
EPILOGUES = {"none": 1, "bias": 4, "gelu_bias": 36}  # gelu: the tanh approximation (gelu_pytorch_tanh)
ALGO_CONFIG_ID, ALGO_CONFIG_TILE_ID, ALGO_CONFIG_SPLITK_NUM = 0, 1, 2

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
    """One algorithm the heuristic offered: its 64 bytes (hex), workspace need, and what it is."""
    rank: int           # position in the heuristic's list (0: what F.linear would most likely run)
    algo_hex: str
    workspace: int
    waves: float
    algo_id: int
    tile_id: int
    split_k: int

    def describe(self) -> str:
        return f"#{self.rank} algo {self.algo_id} tile {self.tile_id} splitK {self.split_k} waves {self.waves:.2f}"


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
            out.append(Candidate(i, _algo_hex(r.algo), int(r.workspace_size), float(r.waves),
                                 _config(r.algo, ALGO_CONFIG_ID), _config(r.algo, ALGO_CONFIG_TILE_ID),
                                 _config(r.algo, ALGO_CONFIG_SPLITK_NUM)))
        return out

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


def _config(algo: _Algo, attr: int) -> int:
    value, written = ctypes.c_int32(-1), ctypes.c_size_t(0)
    status = library().cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(value),
                                                            ctypes.sizeof(value), ctypes.byref(written))
    return int(value.value) if status == 0 else -1
