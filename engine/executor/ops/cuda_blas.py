"""cuBLAS GEMMs through ctypes, on the handle and library CuPy already loaded.

CuPy's own cuBLAS wrappers refuse to run inside CUDA graph capture; calling libcublas directly
works once a workspace and the stream are set, so every GEMM goes through here.
"""

from __future__ import annotations

import ctypes
import os
import weakref

import cupy

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
DATA_TYPES = {"float16": CUDA_R_16F, "bfloat16": CUDA_R_16BF, "float32": CUDA_R_32F}
WORKSPACE_BYTES = 32 << 20


def load_cupys_library(name: str) -> ctypes.CDLL:
    """`name` ("libcublas", "libcublasLt") as CuPy's cuBLAS loaded it: the copy CuPy runs on,
    found in this process's memory maps, rather than whichever one the loader would find."""
    cupy.cuda.device.get_cublas_handle()  # makes CuPy load libcublas, which loads libcublasLt
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith(name + ".so"):
                return ctypes.CDLL(path)
    return ctypes.CDLL(name + ".so")


class Gemm:
    """y (T, out) = x (T, in) @ w (out, in)^T with fp32 accumulation (CUBLAS_COMPUTE_32F)."""

    def __init__(self):
        lib = load_cupys_library("libcublas")
        self._gemm = lib.cublasGemmEx
        p, i = ctypes.c_void_p, ctypes.c_int
        self._gemm.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
        self._set_stream = lib.cublasSetStream_v2
        self._set_stream.argtypes = [p, p]
        self._set_workspace = lib.cublasSetWorkspace_v2
        self._set_workspace.argtypes = [p, p, ctypes.c_size_t]
        destroy = lib.cublasDestroy_v2
        destroy.argtypes = [p]
        # NOTE: a handle of its own, not CuPy's per-device one: the workspace set below would
        # otherwise stay on the shared handle after this Gemm (and its workspace) is gone, and
        # the next user of that handle - another engine, or CuPy - would write freed memory.
        handle = ctypes.c_void_p()
        self._check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate_v2")
        self.handle = handle.value
        # Destroyed by close(), or when this Gemm is collected; not at interpreter exit, when
        # the CUDA context may already be gone.
        self._destroy = weakref.finalize(self, destroy, self.handle)
        self._destroy.atexit = False
        # A fixed workspace: cuBLAS must not allocate while a CUDA graph is being captured.
        self._workspace = cupy.empty(WORKSPACE_BYTES, cupy.uint8)
        self._stream = None  # the stream the handle was last bound to
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        # cuda_gemm_tune.TunedGemm (PAGEDSERVE_GEMM_TUNE, on) or cuda_gemm_plan.PlannedGemm: runs
        # a shape on a cuBLASLt algorithm (measured fastest / the heuristic's first), or answers
        # False (then cublasGemmEx runs)
        self.tuned = None
        # cuda_blaslt.Fp8Gemm sharing this handle and workspace (cuda_fp8.fp8_gemm), made at
        # first use: an attribute, so that the two go together (a reference cycle the collector
        # frees; a dict keyed weakly by the Gemm would hold it forever through its value)
        self.fp8 = None

    def _bind(self, stream_ptr: int):
        # NOTE: cublasSetStream resets the handle's workspace to cuBLAS's own pool, which a
        # captured graph must not use (its replays then fault), so the workspace is set again
        # after every stream change.
        if stream_ptr == self._stream:
            return
        self._check(self._set_stream(self.handle, stream_ptr), "cublasSetStream_v2")
        self._check(self._set_workspace(self.handle, self._workspace.data.ptr, WORKSPACE_BYTES),
                    "cublasSetWorkspace_v2")
        self._stream = stream_ptr

    def close(self) -> None:
        """Destroy the handle and let the workspace go (idempotent); the caller has synchronized."""
        if self._destroy.alive:
            self._check(self._destroy(), "cublasDestroy_v2")
        self.handle = self._workspace = self.tuned = self.fp8 = None

    @staticmethod
    def _check(status: int, what: str):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def __call__(self, x: cupy.ndarray, w: cupy.ndarray, out: cupy.ndarray, dtype: str):
        if self.tuned is None or not self.tuned(x, w, out, dtype):
            self.gemm_ex(x, w, out, dtype)

    def gemm_ex(self, x: cupy.ndarray, w: cupy.ndarray, out: cupy.ndarray, dtype: str):
        # cuBLAS is column-major: row-major y (T, out) is column-major C (out, T) = W^T X, where
        # the stored w (out, in) reads as column-major (in, out), hence OP_T with lda = in, and
        # x (T, in) reads as column-major (in, T) with ldb = in.
        num_tokens, k = x.shape
        n_out = w.shape[0]
        t = DATA_TYPES[dtype]
        self._bind(cupy.cuda.get_current_stream().ptr)
        self._check(self._gemm(self.handle, CUBLAS_OP_T, CUBLAS_OP_N, n_out, num_tokens, k,
                               ctypes.byref(self._one), w.data.ptr, t, k, x.data.ptr, t, k,
                               ctypes.byref(self._zero), out.data.ptr, t, n_out,
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmEx")

