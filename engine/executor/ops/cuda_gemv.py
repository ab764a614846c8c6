"""Small-batch matrix products (cuda/gemv.cu) and when to use them instead of cuBLAS.

At decode batch sizes a linear layer is a read of its weight matrix. GEMV_MAX_M is the largest
row count sent to the GEMV; tools/gpu_check.py --only gemv prints GEMV against cuBLAS per row
count and shape, from which this crossover is set. The SiLU-fused variant recomputes the
activation once per GEMV_R output rows, which costs exp() work growing with M: it stops at
GEMV_SILU_MAX_M.
"""

from __future__ import annotations

import cupy
import numpy as np

from engine.executor.ops.cuda_kernels import kernel

# cuda_kernels.kernel_names compiles M = 1..8 (1..4 with the activation or the norm): the caps
# stay within.
GEMV_MAX_M = 8  # rows (tokens) up to which linear() takes the GEMV; 0 = always cuBLAS
GEMV_SILU_MAX_M = 4  # rows up to which silu_mul_linear() fuses the activation into the GEMV
NORM_GEMV_MAX_M = 4  # rows up to which add_rms_norm_linear() fuses the residual add and norm
GEMV_R = 4  # gemv.cu's weight rows per block
# norm_gemv_kernel stages M x K inputs in shared memory; with its ~1 KB of static shared memory
# this stays under the 48 KB a block gets without opting in.
NORM_SMEM_BYTES = 40 << 10


def gemv_fits(x: cupy.ndarray, w: cupy.ndarray, max_m: int) -> bool:
    """Whether y = x @ w.T can take the GEMV: few rows, K in 16-byte words, aligned operands."""
    return (0 < x.shape[0] <= max_m and w.shape[1] % 8 == 0 and x.data.ptr % 16 == 0
            and w.data.ptr % 16 == 0)


def gemv(x: cupy.ndarray, w: cupy.ndarray, out: cupy.ndarray, ctype: str, act: bool = False):
    """out (M, N) = x (M, K) @ w (N, K)^T; with act, x is gate_up (M, 2K) and the input is
    silu(gate) * up. One launch."""
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    threads = 256 if k >= 2048 else 128
    kernel("gemv.cu", f"gemv_kernel<{ctype}, {m}, {'true' if act else 'false'}>", ctype)(
        (-(-n // GEMV_R),), (threads,), (out, x, w, np.int32(n), np.int32(k)))
    return out


def norm_gemv_fits(x: cupy.ndarray, residual, norm_w: cupy.ndarray, w: cupy.ndarray) -> bool:
    m, k = x.shape
    arrays = [x, norm_w, w] + ([] if residual is None else [residual])
    return (0 < m <= NORM_GEMV_MAX_M and k % 8 == 0 and m * k * x.itemsize <= NORM_SMEM_BYTES
            and all(a.data.ptr % 16 == 0 for a in arrays))


def norm_gemv(x, residual, norm_w, w, eps: float, ctype: str):
    """(y, res_out): res_out = x + residual (x when residual is None), y = (rms_norm(res_out) *
    norm_w) @ w^T. One launch."""
    m, k = x.shape
    n = w.shape[0]
    y = cupy.empty((m, n), x.dtype)
    res_out = cupy.empty_like(x)
    kernel("gemv.cu", f"norm_gemv_kernel<{ctype}, {m}>", ctype)(
        (-(-n // GEMV_R),), (256 if k >= 2048 else 128,),
        (y, res_out, x, np.uint64(0) if residual is None else residual, norm_w, w, np.int32(n),
         np.int32(k), np.float32(eps)), shared_mem=m * k * x.itemsize)
    return y, res_out
