"""16-bit GEMMs on the fastest cuBLASLt algorithm for their shape, measured (up to 128 rows).

cublasGemmEx runs cuBLAS's first heuristic guess. At decode shapes (M = 16..256 rows against
4096..28672 weight rows) that guess can leave SMs idle (a 128 x 128 tile grid of 64-96 tiles on
132 SMs) where another tile, a split K or a stream-K kernel fills them. TunedGemm asks cuBLASLt for
its top CANDIDATES algorithms per (M bucket, N, K, dtype), times each (and cublasGemmEx) once on
the real operands with the L2 flushed between runs (in a step, a layer's weights arrive cold),
and keeps the fastest. Tuning happens on the first eager call of a shape: the decode graphs'
warm-up forward runs every captured size eagerly just before its capture, so captures find their
plans made; a shape first met during a capture runs cublasGemmEx.

Plans live in one table per process (PLANS), so every engine in a process makes the same choice
(one GPU per process: tensor-parallel ranks are processes). The result differs from
cublasGemmEx's only by summation order (split K, tile shape).

On by default up to TUNE_MAX_M (128) rows: the decode steps of small batches, where a layer's
weights stream once and cublasGemmEx's grid can leave SMs idle (H200 trace of W1 Llama-3-8B,
steps of 16-128 sequences: qkv on 96 blocks at 3.0-3.2 TB/s, o at 49-128 rows on 128 blocks at
2.3-2.9 TB/s, where the lm_head reaches 4.1-4.4). Above it, the shape's GEMMs run on `beyond`
(CudaOps gives PlannedGemm, cuBLASLt's first heuristic algorithm) or cublasGemmEx: there plans
timed alone lose at the power cap (session 24, H200: every M tuned, W1 Llama-3-8B 10,252
against 10,414; session 18: 9,777 against 9,907 / 9,936). Session 35, H100, W1 Llama-3-8B
interleaved in two calls: up to 128 rows 8,900 / 8,902 output tok/s against 8,815 / 8,800 with
PAGEDSERVE_GEMM_TUNE=0 (decode steps of 1-64 and 65-128 sequences 2.7-2.9% shorter), up to 64
rows 8,883, up to 192 rows 8,856. H100 and H200 have ranked such choices differently before
(README, Performance); the H200's A/B is `tools/h200_bench.sh w1-8b-ab`.

    PAGEDSERVE_GEMM_TUNE=0             cublasGemmEx / PlannedGemm only (nothing timed)
    PAGEDSERVE_GEMM_TUNE_MAX_M=128     tune only up to this many rows
"""

from __future__ import annotations

import ctypes
import logging
import os
import statistics
import weakref

import cupy

from engine.executor.ops.cuda_blas import DATA_TYPES, WORKSPACE_BYTES, Gemm, load_cupys_library
from engine.executor.ops.cuda_blaslt import (
    _Heuristic,
    check_status,
    matrix_layout,
    workspace_preference,
)

logger = logging.getLogger("pagedserve." + __name__)
CUBLAS_COMPUTE_32F, CUDA_R_32F = 68, DATA_TYPES["float32"]
DESC_TRANSA, DESC_TRANSB, CUBLAS_OP_N, CUBLAS_OP_T = 3, 4, 0, 1
# cublasLtMatmulAlgoConfigAttributes_t, for describing a plan
CONFIG_NAMES = {"algo": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5,
                "stages": 6, "cluster": 8}
CANDIDATES = 16  # heuristic results timed per shape
MIN_GAIN = 0.02  # an algorithm replaces cublasGemmEx only when this much faster (timing noise)
FLUSH_BYTES = 80 << 20  # > the H200's 60 MiB L2


def tuning_enabled() -> bool:
    return os.environ.get("PAGEDSERVE_GEMM_TUNE", "1") == "1"


TUNE_MAX_M = int(os.environ.get("PAGEDSERVE_GEMM_TUNE_MAX_M", "128"))
# (bucket M, N, K, dtype) -> (M tuned at, heuristic result) or None (cublasGemmEx was fastest)
PLANS: dict[tuple, tuple | None] = {}
TIMINGS: dict[tuple, list[tuple[float, str]]] = {}  # same key -> [(us, label)] (kernel_check)


def bucket(m: int) -> int:
    """The rows a plan is tuned for: the decode graphs' padded sizes (cuda_graph.padded_sizes:
    multiples of 8 to 256), multiples of 256 above, so that a serving run's chunk sizes share a
    handful of plans."""
    if m <= 8:
        return m
    step = 8 if m <= 256 else 256
    return -(-m // step) * step


def flushed_median(run, reps: int, flush: cupy.ndarray) -> float:
    """Median seconds of `reps` calls of run() on the current stream, each after a memset of
    `flush` (FLUSH_BYTES: the weights arrive cold, as in a step)."""
    stream = cupy.cuda.get_current_stream()
    events = []
    for _ in range(reps):
        cupy.cuda.runtime.memsetAsync(flush.data.ptr, 0, FLUSH_BYTES, stream.ptr)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        run()
        end.record(stream)
        events.append((start, end))
    events[-1][1].synchronize()
    return statistics.median(cupy.cuda.get_elapsed_time(s, e) / 1e3 for s, e in events)


class TunedGemm:
    """gemm.tuned: __call__ runs y = x @ w^T on the tuned plan and returns True, or returns False
    (Gemm then runs cublasGemmEx). Above max_m rows nothing is tuned: `beyond` (another
    gemm.tuned, e.g. PlannedGemm) runs the product if given."""

    def __init__(self, gemm: Gemm, max_m: int = TUNE_MAX_M, beyond=None):
        self._gemm = gemm
        self.max_m = max_m
        self.beyond = beyond
        lib = self._lib = load_cupys_library("libcublasLt")
        p, i, u64, i64, sz = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64,
                              ctypes.c_size_t)
        lib.cublasLtMatmul.argtypes = [p, p, p, p, p, p, p, p, p, p, p, p, p, p, sz, p]
        lib.cublasLtMatmulDescCreate.argtypes = [p, i, i]
        lib.cublasLtMatmulDescSetAttribute.argtypes = [p, i, p, sz]
        lib.cublasLtMatrixLayoutCreate.argtypes = [p, i, u64, u64, i64]
        lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [p, i, p, sz]
        lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [p, p, p, p, p, p, p, i, p, p]
        lib.cublasLtMatmulAlgoCheck.argtypes = [p, p, p, p, p, p, p, p]
        lib.cublasLtMatmulAlgoConfigGetAttribute.argtypes = [p, i, p, sz, p]
        desc = ctypes.c_void_p()
        self._check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F,
                                                 CUDA_R_32F), "MatmulDescCreate")
        self._desc = desc.value
        for attr, value in ((DESC_TRANSA, CUBLAS_OP_T), (DESC_TRANSB, CUBLAS_OP_N)):
            v = ctypes.c_int32(value)
            self._check(lib.cublasLtMatmulDescSetAttribute(self._desc, attr, ctypes.byref(v), 4),
                        "MatmulDescSetAttribute")
        self._pref = workspace_preference(lib)
        self._layouts: dict[tuple, int] = {}  # (type, rows, cols, ld) -> cublasLtMatrixLayout_t
        self._valid: dict[tuple, bool] = {}  # (M, N, K, dtype) -> its bucket's algo runs there
        self._flush: cupy.ndarray | None = None
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._free = weakref.finalize(self, _destroy, lib, self._desc, self._pref, self._layouts)
        self._free.atexit = False  # the CUDA context may be gone at interpreter exit

    _check = staticmethod(check_status)

    def _layout(self, dtype: int, rows: int, cols: int, ld: int) -> int:
        return matrix_layout(self._lib, self._layouts, dtype, rows, cols, ld)

    def _abd(self, m: int, n: int, k: int, t: int):
        # Column-major, as cuda_blas.Gemm: C (N, M) = op(A) (N, K) . B (K, M) with A = w (N, K)
        # row-major read as column-major (K, N) and transposed, B = x (M, K) as (K, M).
        return self._layout(t, k, n, k), self._layout(t, k, m, k), self._layout(t, n, m, n)

    def __call__(self, x: cupy.ndarray, w: cupy.ndarray, out: cupy.ndarray, dtype: str) -> bool:
        m, k = x.shape
        n = w.shape[0]
        if m > self.max_m:
            return self.beyond is not None and self.beyond(x, w, out, dtype)
        key = (bucket(m), n, k, dtype)
        if key not in PLANS:
            if cupy.cuda.get_current_stream().is_capturing():
                return False  # no timing inside a capture: cublasGemmEx this once
            PLANS[key] = self.tune(x, w, out, dtype)
        plan = PLANS[key]
        if plan is None or not self._runs_at(plan, m, n, k, dtype):
            return False
        self._matmul(x, w, out, dtype, plan[1])
        return True

    def _runs_at(self, plan: tuple, m: int, n: int, k: int, dtype: str) -> bool:
        """Whether the plan tuned at plan[0] rows also runs at m rows (cublasLtMatmulAlgoCheck,
        within the workspace), asked once per shape."""
        if m == plan[0]:
            return True
        shape = (m, n, k, dtype)
        if shape not in self._valid:
            a, b, d = self._abd(m, n, k, DATA_TYPES[dtype])
            result = _Heuristic()
            status = self._lib.cublasLtMatmulAlgoCheck(
                self._gemm.handle, self._desc, a, b, d, d, ctypes.byref(plan[1]),
                ctypes.byref(result))
            self._valid[shape] = status == 0 and result.workspace_size <= WORKSPACE_BYTES
        return self._valid[shape]

    def _matmul(self, x, w, out, dtype: str, heuristic: _Heuristic) -> None:
        m, k = x.shape
        n = w.shape[0]
        a, b, d = self._abd(m, n, k, DATA_TYPES[dtype])
        # NOTE: the workspace is Gemm's: GEMMs run one after another on a stream, and a captured
        # graph replays them in the same order, so the two paths never use it at once.
        self._check(self._lib.cublasLtMatmul(
            self._gemm.handle, self._desc, ctypes.byref(self._one), w.data.ptr, a, x.data.ptr, b,
            ctypes.byref(self._zero), out.data.ptr, d, out.data.ptr, d, ctypes.byref(heuristic),
            self._gemm._workspace.data.ptr, WORKSPACE_BYTES, cupy.cuda.get_current_stream().ptr),
            "Matmul")

    def candidates(self, m: int, n: int, k: int, dtype: str) -> list[_Heuristic]:
        """cuBLASLt's top CANDIDATES algorithms for this shape that fit the workspace."""
        a, b, d = self._abd(m, n, k, DATA_TYPES[dtype])
        results, count = (_Heuristic * CANDIDATES)(), ctypes.c_int(0)
        status = self._lib.cublasLtMatmulAlgoGetHeuristic(
            self._gemm.handle, self._desc, a, b, d, d, self._pref, CANDIDATES, results,
            ctypes.byref(count))
        if status != 0:
            return []
        return [_Heuristic.from_buffer_copy(results[i]) for i in range(count.value)
                if results[i].state == 0 and results[i].workspace_size <= WORKSPACE_BYTES]

    def describe(self, heuristic: _Heuristic) -> str:
        """'algo=.. tile=.. splitk=..' of a plan (cublasLtMatmulAlgoConfigGetAttribute)."""
        parts = []
        for name, attr in CONFIG_NAMES.items():
            for size in (4, 2):  # the size must match the attribute's (uint32 or uint16)
                v, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
                if self._lib.cublasLtMatmulAlgoConfigGetAttribute(
                        ctypes.byref(heuristic), attr, ctypes.byref(v), size,
                        ctypes.byref(written)) == 0:
                    parts.append(f"{name}={v.value}")
                    break
        return " ".join(parts)

    def _time(self, run, reps: int) -> float:
        """Median seconds of run() on the current stream, the L2 flushed before each call."""
        run()  # warm-up (first-use set-up of the kernel)
        return flushed_median(run, reps, self._flush)

    def tune(self, x, w, out, dtype: str) -> tuple | None:
        """(rows, fastest heuristic result) for x @ w^T, or None when cublasGemmEx is as fast;
        `out` is scratch here (the caller writes it afterwards). TIMINGS keeps the table."""
        m, k = x.shape
        n = w.shape[0]
        self._flush = cupy.empty(FLUSH_BYTES, cupy.uint8)  # back to the pool after tuning
        # Big GEMMs take milliseconds each, with little noise: fewer runs and candidates (a
        # serving run tunes each 256-row bucket of chunk sizes it meets, mid-run).
        big = 2 * m * n * k >= 2e11
        reps, limit = (2, CANDIDATES // 2) if big else (5, CANDIDATES)
        default = self._time(lambda: self._gemm.gemm_ex(x, w, out, dtype), reps)
        timed = [(default, "cublasGemmEx", None)]
        for h in self.candidates(m, n, k, dtype)[:limit]:
            try:
                timed.append((self._time(lambda h=h: self._matmul(x, w, out, dtype, h), reps),
                              self.describe(h), h))
            except RuntimeError:  # refused at run time: not a candidate
                continue
        best = min(timed, key=lambda t: t[0])
        TIMINGS[(bucket(m), n, k, dtype)] = [(t * 1e6, label) for t, label, _ in timed]
        plan = None if best[2] is None or best[0] > default * (1 - MIN_GAIN) else (m, best[2])
        self._flush = None
        logger.info("GEMM M=%d N=%d K=%d %s: cublasGemmEx %.1f us, best %s %.1f us", m, n, k,
                    dtype, default * 1e6, best[1], best[0] * 1e6)
        return plan


def _destroy(lib, desc: int, pref: int, layouts: dict) -> None:
    for layout in layouts.values():
        lib.cublasLtMatrixLayoutDestroy(ctypes.c_void_p(layout))
    lib.cublasLtMatmulDescDestroy(ctypes.c_void_p(desc))
    lib.cublasLtMatmulPreferenceDestroy(ctypes.c_void_p(pref))
