"""FP8 (E4M3) GEMMs through cuBLASLt, by ctypes on the libcublasLt that CuPy's cuBLAS loaded.

y (M, N) = (qx (M, K) . qw (N, K)^T) * sx[m] * sw[n], fp32 accumulation. Two ways to apply the
per-token and per-channel scales, picked per shape at first use:
- "outer": cuBLASLt's outer-vector scale mode (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, cuBLAS
  12.9+): one vector per operand, applied in the GEMM's epilogue, bf16/fp16 written directly.
- "fp32+scale": no scale pointers (scale 1), fp32 output, then fp8_scale_kernel (cuda/fp8.cu)
  rounds acc * sx * sw to the compute dtype; works on every cuBLASLt with FP8 (12.x, sm_89+).
CUBLASLT_MATMUL_DESC_FAST_ACCUM is set (PAGEDSERVE_FP8_FAST_ACCUM=0 turns it off): Hopper's FP8
tensor cores then accumulate without promoting partial sums to fp32 every few K steps (faster,
less exact: vLLM's CUTLASS FP8 kernels run this way). The outer-vector plans' candidates are
timed per shape (cuda_fp8_tune.py; PAGEDSERVE_FP8_TUNE=0 keeps the heuristic's first). Session 9
on the H200, W1 on Llama-3-8B shapes: FP8 1.15x the bf16 output tok/s with neither, 1.27x with
both (README, FP8).
The handle is the cuBLAS handle of ops/cuda_blas.Gemm (cuBLAS documents a cublasHandle_t as usable
where a cublasLtHandle_t is expected) and so is the workspace; cublasLtMatmul takes the stream and
workspace per call, so captured CUDA graphs replay it like cublasGemmEx.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref

import cupy

from engine.executor.ops.cuda_blas import DATA_TYPES, WORKSPACE_BYTES, Gemm, load_cupys_library

logger = logging.getLogger("pagedserve." + __name__)
CUDA_R_8F_E4M3 = 28
CUBLAS_COMPUTE_32F = 68
CUDA_R_32F = DATA_TYPES["float32"]
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
# cublasLtMatmulDescAttributes_t
DESC_TRANSA, DESC_TRANSB = 3, 4
DESC_A_SCALE_POINTER, DESC_B_SCALE_POINTER = 17, 18
DESC_A_SCALE_MODE, DESC_B_SCALE_MODE = 31, 32
DESC_FAST_ACCUM = 25  # int8
SCALE_OUTER_VEC_32F = 3  # cublasLtMatmulMatrixScale_t
PREF_MAX_WORKSPACE_BYTES = 1


class _Heuristic(ctypes.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t),
                ("state", ctypes.c_int), ("waves_count", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


def check_status(status: int, what: str) -> None:
    """RuntimeError naming the cuBLASLt call (`what`, e.g. "Matmul") that returned `status`."""
    if status != 0:
        raise RuntimeError(f"cublasLt{what} failed with cuBLAS status {status}")


def matrix_layout(lib, cache: dict, dtype: int, rows: int, cols: int, ld: int) -> int:
    """The cublasLtMatrixLayout_t of this shape, created once into `cache` (its owner destroys
    them)."""
    key = (dtype, rows, cols, ld)
    if key not in cache:
        layout = ctypes.c_void_p()
        check_status(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, ld),
                     "MatrixLayoutCreate")
        cache[key] = layout.value
    return cache[key]


def workspace_preference(lib) -> int:
    """A cublasLtMatmulPreference_t that lets the heuristic use cuda_blas's workspace."""
    pref = ctypes.c_void_p()
    check_status(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
    ws = ctypes.c_uint64(WORKSPACE_BYTES)
    check_status(lib.cublasLtMatmulPreferenceSetAttribute(
        pref.value, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8), "PreferenceSetAttribute")
    return pref.value


class Fp8Gemm:
    def __init__(self, gemm: Gemm):
        self._gemm = gemm
        lib = load_cupys_library("libcublasLt")
        p, i, u64, i64, sz = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64,
                              ctypes.c_size_t)
        self._matmul = lib.cublasLtMatmul
        self._matmul.argtypes = [p, p, p, p, p, p, p, p, p, p, p, p, p, p, sz, p]
        self._set_desc = lib.cublasLtMatmulDescSetAttribute
        self._set_desc.argtypes = [p, i, p, sz]
        self._heuristic = lib.cublasLtMatmulAlgoGetHeuristic
        self._heuristic.argtypes = [p, p, p, p, p, p, p, i, p, ctypes.POINTER(i)]
        self._lib = lib
        lib.cublasLtMatmulDescCreate.argtypes = [p, i, i]
        lib.cublasLtMatrixLayoutCreate.argtypes = [p, i, u64, u64, i64]
        lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [p, i, p, sz]
        self._descs: dict[tuple, int | None] = {}  # (outer, fast) -> cublasLtMatmulDesc_t
        self._layouts: dict[tuple, int] = {}  # (type, rows, cols, ld) -> cublasLtMatrixLayout_t
        self.plans: dict[tuple, tuple | None] = {}  # (M, N, K, dtype) -> (mode, algo) or None
        self.modes = ("outer", "fp32+scale")  # tried in this order (tests narrow it)
        # plans and descriptors are made per value: a change needs plans cleared (kernel_check)
        self.fast_accum = os.environ.get("PAGEDSERVE_FP8_FAST_ACCUM", "1") == "1"
        self.tuner = None  # cuda_fp8_tune.Fp8Tuner unless PAGEDSERVE_FP8_TUNE=0 (cuda_fp8 sets it)
        self._logged: set[tuple] = set()
        self._pref = workspace_preference(lib)
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._free = weakref.finalize(self, _destroy, lib, self._pref, self._descs,
                                      self._layouts)
        self._free.atexit = False  # the CUDA context may be gone at interpreter exit

    _check = staticmethod(check_status)

    def _desc(self, outer: bool) -> int | None:
        """The matmul descriptor (TN, fp32 compute); None when this cuBLASLt has no outer mode."""
        key = (outer, self.fast_accum)
        if key not in self._descs:
            desc = ctypes.c_void_p()
            self._check(self._lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F,
                                                           CUDA_R_32F), "MatmulDescCreate")
            self._descs[key] = desc.value
            for attr, value in ((DESC_TRANSA, CUBLAS_OP_T), (DESC_TRANSB, CUBLAS_OP_N)):
                self._check(self._set_int(desc.value, attr, value), "MatmulDescSetAttribute")
            if self.fast_accum:
                flag = ctypes.c_int8(1)
                self._check(self._set_desc(desc.value, DESC_FAST_ACCUM, ctypes.byref(flag), 1),
                            "MatmulDescSetAttribute(FAST_ACCUM)")
            if outer and any(self._set_int(desc.value, attr, SCALE_OUTER_VEC_32F)
                             for attr in (DESC_A_SCALE_MODE, DESC_B_SCALE_MODE)):
                self._descs[key] = None  # older cuBLASLt: the attribute does not exist
                self._lib.cublasLtMatmulDescDestroy(ctypes.c_void_p(desc.value))
        return self._descs[key]

    def _set_int(self, desc: int, attr: int, value: int) -> int:
        v = ctypes.c_int32(value)
        return self._set_desc(desc, attr, ctypes.byref(v), 4)

    def _set_ptr(self, desc: int, attr: int, ptr: int) -> None:
        v = ctypes.c_void_p(ptr)
        self._check(self._set_desc(desc, attr, ctypes.byref(v), 8), "MatmulDescSetAttribute")

    def _layout(self, dtype: int, rows: int, cols: int, ld: int) -> int:
        return matrix_layout(self._lib, self._layouts, dtype, rows, cols, ld)

    def _plan(self, m: int, n: int, k: int, dtype: str, scales: tuple[int, int],
              modes: tuple[str, ...] | None = None):
        """("outer" | "fp32+scale", algo) for this shape, or None if cuBLASLt has neither."""
        key = (m, n, k, dtype)
        if key in self.plans and modes is None:
            return self.plans[key]
        self.plans[key] = None
        for mode in self.modes if modes is None else modes:
            desc = self._desc(mode == "outer")
            if desc is None:
                continue
            a, b, d = self._layouts_for(m, n, k, self.out_type(dtype, mode == "outer"))
            if mode == "outer":  # the heuristic may refuse a scaled plan with no pointers set
                self._set_ptr(desc, DESC_A_SCALE_POINTER, scales[1])
                self._set_ptr(desc, DESC_B_SCALE_POINTER, scales[0])
            result, count = _Heuristic(), ctypes.c_int(0)
            status = self._heuristic(self._gemm.handle, desc, a, b, d, d, self._pref, 1,
                                     ctypes.byref(result), ctypes.byref(count))
            if status == 0 and count.value > 0:
                self.plans[key] = (mode, result)
                break
        if key[1:] not in self._logged:  # once per weight shape: which way the scales go
            self._logged.add(key[1:])
            logger.info("cuBLASLt FP8 %s x %s (M=%d): %s", n, k, m,
                        "no plan, GEMV fallback" if self.plans[key] is None
                        else self.plans[key][0])
        return self.plans[key]

    @staticmethod
    def out_type(dtype: str, outer: bool) -> int:
        """D's cudaDataType: the compute dtype with outer-vector scales, else fp32."""
        return DATA_TYPES[dtype] if outer else CUDA_R_32F

    def _layouts_for(self, m: int, n: int, k: int, out_type: int):
        # Column-major view: C (N, M) = op(A) (N, K) . B (K, M). A is qw (N, K) row-major, i.e.
        # column-major (K, N), taken transposed; B is qx (M, K) row-major = column-major (K, M).
        # This "TN" form is the one FP8 cuBLASLt accepts.
        return (self._layout(CUDA_R_8F_E4M3, k, n, k), self._layout(CUDA_R_8F_E4M3, k, m, k),
                self._layout(out_type, n, m, n))

    def __call__(self, qx: cupy.ndarray, sx: cupy.ndarray, qw: cupy.ndarray, sw: cupy.ndarray,
                 out: cupy.ndarray, dtype: str, scale_kernel) -> str | None:
        """out (M, N) = (qx . qw^T) * sx * sw; the mode used, or None (no plan: the caller falls
        back). scale_kernel(acc, out) applies the scales in the "fp32+scale" mode."""
        m, k = qx.shape
        n = qw.shape[0]
        plan = self._plan(m, n, k, dtype, (sx.data.ptr, sw.data.ptr))
        if plan is None:
            return None
        outer = plan[0] == "outer"
        d_array = out if outer else cupy.empty((m, n), cupy.float32)

        def run(plan) -> int:
            if plan[0] == "splitk":  # a tuned plan (cuda_fp8_splitk.py)
                return self.tuner.splitk.run(plan, qx, sx, qw, sw, out, dtype)
            mode, heuristic = plan  # the algo is its first field: a pointer to it is one to it
            desc = self._desc(mode == "outer")
            if mode == "outer":
                self._set_ptr(desc, DESC_A_SCALE_POINTER, sw.data.ptr)  # per row of op(A): channels
                self._set_ptr(desc, DESC_B_SCALE_POINTER, sx.data.ptr)  # per column of B: tokens
            a, b, d = self._layouts_for(m, n, k, self.out_type(dtype, mode == "outer"))
            return self._matmul(
                self._gemm.handle, desc, ctypes.byref(self._one), qw.data.ptr, a, qx.data.ptr, b,
                ctypes.byref(self._zero), d_array.data.ptr, d, d_array.data.ptr, d,
                ctypes.byref(heuristic), self._gemm._workspace.data.ptr, WORKSPACE_BYTES,
                cupy.cuda.get_current_stream().ptr)

        base = plan
        if self.tuner is not None:
            plan = self.tuner.plan(base, m, n, k, dtype, run)
        status = run(plan)
        if status != 0 and plan is not base:  # a tuned plan refused at run time
            logger.warning("cuBLASLt FP8 %s x %s (M=%d): the tuned %s plan failed (cuBLAS status "
                           "%d); the heuristic's plan from now on", n, k, m, plan[0], status)
            self.tuner.drop(m, n, k, dtype)
            plan = base
            status = run(plan)
        mode = plan[0]
        if status != 0 and mode == "outer":  # refused at run time: scale by kernel instead
            logger.info("cuBLASLt FP8 outer-vector scaling refused (status %d): fp32+scale",
                        status)
            self._plan(m, n, k, dtype, (sx.data.ptr, sw.data.ptr), modes=("fp32+scale",))
            return self(qx, sx, qw, sw, out, dtype, scale_kernel)
        self._check(status, "Matmul")
        if mode == "fp32+scale":
            scale_kernel(d_array, out)
        return mode


def _destroy(lib, pref: int, descs: dict, layouts: dict) -> None:
    for desc in descs.values():
        if desc is not None:
            lib.cublasLtMatmulDescDestroy(ctypes.c_void_p(desc))
    for layout in layouts.values():
        lib.cublasLtMatrixLayoutDestroy(ctypes.c_void_p(layout))
    lib.cublasLtMatmulPreferenceDestroy(ctypes.c_void_p(pref))
