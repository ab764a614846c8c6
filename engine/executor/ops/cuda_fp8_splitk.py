"""Split-K FP8 products for decode batches, a candidate family of cuda_fp8_tune.Fp8Tuner.

At M = 8..64 a product's output is a few dozen 128-row tiles (down: 4096 / 128 = 32 on the H200's
132 SMs), so cuBLASLt reads the weights with a quarter of the GPU: FP8 down at M = 8 took 40 us
against bf16's 33 (device run B), for half the bytes. When cuBLASLt's own split K is refused with
outer-vector scales, this runs the product as one strided batch of S partial products over K / S
features each (fp32 out, scales 1; S times the tiles), then cuda/lt_splitk.cu sums the S slices
and applies the per-token and per-channel scales. Plans are ("splitk", heuristic result, S).
"""

from __future__ import annotations

import ctypes

import cupy
import numpy as np

from engine.executor.ops.cuda_blas import WORKSPACE_BYTES
from engine.executor.ops.cuda_blaslt import CUDA_R_8F_E4M3, CUDA_R_32F, _Heuristic, check_status
from engine.executor.ops.cuda_kernels import CTYPES, kernel, launch

SPLITS = (2, 3, 4, 6, 8)  # K / S must stay a multiple of 16 (16-byte aligned slices)
MAX_M = 128  # above this the tiles of one output fill the GPU
LAYOUT_BATCH_COUNT, LAYOUT_BATCH_OFFSET = 5, 6  # cublasLtMatrixLayoutAttribute_t
HEURISTIC_ALGOS = 2


class SplitK:
    def __init__(self, lt):
        self._lt = lt  # the Fp8Gemm: its handle, descriptors, workspace and layout cache
        lib = lt._lib
        lib.cublasLtMatrixLayoutSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                                         ctypes.c_void_p, ctypes.c_size_t]
        self._lib = lib

    def _layout(self, dtype: int, rows: int, cols: int, ld: int, count: int, offset: int) -> int:
        key = (dtype, rows, cols, ld, count, offset)
        cache = self._lt._layouts  # destroyed with the Fp8Gemm's
        if key not in cache:
            layout = ctypes.c_void_p()
            check_status(self._lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows,
                                                              cols, ld), "MatrixLayoutCreate")
            cache[key] = layout.value
            for attr, value in ((LAYOUT_BATCH_COUNT, ctypes.c_int32(count)),
                                (LAYOUT_BATCH_OFFSET, ctypes.c_int64(offset))):
                check_status(self._lib.cublasLtMatrixLayoutSetAttribute(
                    layout.value, attr, ctypes.byref(value), ctypes.sizeof(value)),
                    "MatrixLayoutSetAttribute")
        return cache[key]

    def _abd(self, m: int, n: int, k: int, splits: int):
        # As Fp8Gemm._layouts_for, batched over K: slice s of qw (N, K) is its columns
        # [s K/S, (s+1) K/S), i.e. column-major (K/S, N) with ld K at offset s K/S; the same for
        # qx; slice s of the fp32 output is (N, M) column-major at offset s N M.
        part = k // splits
        return (self._layout(CUDA_R_8F_E4M3, part, n, k, splits, part),
                self._layout(CUDA_R_8F_E4M3, part, m, k, splits, part),
                self._layout(CUDA_R_32F, n, m, n, splits, n * m))

    def candidates(self, m: int, n: int, k: int) -> list[tuple]:
        """("splitk", heuristic result, S) for each S that divides K into 16-byte slices."""
        if m > MAX_M:
            return []
        lt, plans = self._lt, []
        for splits in SPLITS:
            if k % (16 * splits):
                continue
            a, b, d = self._abd(m, n, k, splits)
            results, count = (_Heuristic * HEURISTIC_ALGOS)(), ctypes.c_int(0)
            status = lt._heuristic(lt._gemm.handle, lt._desc(False), a, b, d, d, lt._pref,
                                   HEURISTIC_ALGOS, results, ctypes.byref(count))
            if status == 0:
                plans += [("splitk", _Heuristic.from_buffer_copy(results[i]), splits)
                          for i in range(count.value) if results[i].state == 0
                          and results[i].workspace_size <= WORKSPACE_BYTES]
        return plans

    def runs_at(self, plan: tuple, m: int, n: int, k: int) -> bool:
        """Whether cuBLASLt accepts the plan's algorithm at this shape."""
        _, h, splits = plan
        if k % (16 * splits):
            return False
        a, b, d = self._abd(m, n, k, splits)
        result = _Heuristic()
        status = self._lib.cublasLtMatmulAlgoCheck(self._lt._gemm.handle, self._lt._desc(False),
                                                   a, b, d, d, ctypes.byref(h),
                                                   ctypes.byref(result))
        return status == 0 and result.workspace_size <= WORKSPACE_BYTES

    def run(self, plan: tuple, qx, sx, qw, sw, out, dtype: str) -> int:
        """out (M, N) = (qx . qw^T) * sx * sw on the plan: the cuBLAS status (nothing queued
        when it is not 0)."""
        _, h, splits = plan
        lt = self._lt
        m, k = qx.shape
        n = qw.shape[0]
        acc = cupy.empty((splits, m, n), cupy.float32)
        a, b, d = self._abd(m, n, k, splits)
        status = lt._matmul(
            lt._gemm.handle, lt._desc(False), ctypes.byref(lt._one), qw.data.ptr, a,
            qx.data.ptr, b, ctypes.byref(lt._zero), acc.data.ptr, d, acc.data.ptr, d,
            ctypes.byref(h), lt._gemm._workspace.data.ptr, WORKSPACE_BYTES,
            cupy.cuda.get_current_stream().ptr)
        if status == 0:
            ctype = CTYPES[dtype]
            launch(kernel("lt_splitk.cu", f"fp8_splitk_scale_kernel<{ctype}>", ctype),
                   (-(-(m * n) // 256),), (256,),
                   (out, acc, sx, sw, np.int64(m * n), np.int32(n), np.int32(splits)), pdl=True)
        return status
