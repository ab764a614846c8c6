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

# cuda_kernels.kernel_names compiles M = 1..8 (1..4 with the activation): the caps stay within.
GEMV_MAX_M = 8  # rows (tokens) up to which linear() takes the GEMV; 0 = always cuBLAS
GEMV_SILU_MAX_M = 4  # rows up to which silu_mul_linear() fuses the activation into the GEMV
GEMV_R = 4  # gemv.cu's weight rows per block


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

