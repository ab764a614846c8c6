"""Small-batch matrix products (cuda/gemv.cu) and when to use them instead of cuBLAS.

At decode batch sizes a linear layer is a read of its weight matrix. Which path wins depends on
the rows M and the weight's shape (N outputs x K inputs); the rules below fit the H200
measurements of tools/kernel_check.py (device run 2), time of the alternative / time of the GEMV,
so > 1 means the GEMV path wins:

| weight (N x K)              | M=1  | M=2  | M=4  | M=8  |
|-----------------------------|------|------|------|------|
| qwen3 qkv 4096 x 1024       | 1.28 | 1.20 | 0.81 | 0.59 |
| qwen3 o 1024 x 2048         | 4.18 | 2.34 | 2.46 | 1.01 |
| qwen3 gate_up 6144 x 1024   | 1.15 | 1.04 | 0.71 | 0.50 |
| qwen3 down 1024 x 3072      | 2.02 | 1.81 | 1.52 | 1.14 |
| qwen3 lm_head 151936 x 1024 | 1.09 | 0.95 | 0.61 | 0.40 |
| llama3 qkv 6144 x 4096      | 1.15 | 1.07 | 0.73 | 0.53 |
| llama3 o 4096 x 4096        | 1.28 | 1.13 | 0.86 | 0.63 |
| llama3 gate_up 28672 x 4096 | 1.04 | 1.10 | 0.68 | 0.48 |
| llama3 down 4096 x 14336    | 1.10 | 1.04 | 0.84 | 0.58 |
| llama3 lm_head 128256 x 4096 | 1.07 | 1.06 | 0.69 | 0.49 |

| fused prologue, vs the unfused pair     | M=1  | M=2  | M=4  |
|-----------------------------------------|------|------|------|
| add+norm, qwen3 qkv 4096 x 1024         | 1.25 | 0.75 | 0.61 |
| add+norm, qwen3 gate_up 6144 x 1024     | 1.06 | 0.78 | 0.61 |
| add+norm, llama3 qkv 6144 x 4096        | 1.15 | 0.71 | 0.51 |
| add+norm, llama3 gate_up 28672 x 4096   | 0.88 | 0.49 | 0.38 |
| SiLU, qwen3 down 1024 x 3072            | 1.81 | 1.39 | 0.93 |
| SiLU, llama3 down 4096 x 14336          | 0.83 | 0.53 | 0.31 |
(add+norm against add_rms_norm + GEMV; SiLU against silu_and_mul + cuBLAS.)

- Plain GEMV (gemv_max_rows): M <= 2, and up to 8 rows when N <= 1024 (cuBLAS gets too few
  output tiles to fill the GPU); 1 row when N >= 64 K (a tall lm_head over a small hidden size).
- The fused prologues are recomputed by every one of the N / GEMV_R blocks, for all M rows: the
  add + RMSNorm only pays at M = 1 and N <= 8192 (NORM_GEMV_MAX_N; device run B's batch-1
  decode steps: unfusing it cost Qwen3-0.6B 65 us and Llama-3-8B's qkv 94 us per token); the
  SiLU while M * N <= 2048 (SILU_GEMV_MAX_MN).
The *_MAX_M caps below bound all of these (0 turns a path off: tools/kernel_check.py does).
"""

from __future__ import annotations

import cupy
import numpy as np

from engine.executor.ops.cuda_kernels import kernel, launch

# cuda_kernels.kernel_names compiles M = 1..8 (1..4 with the activation or the norm): the caps
# stay within.
GEMV_MAX_M = 8  # rows (tokens) up to which linear() may take the GEMV; 0 = always cuBLAS
GEMV_SILU_MAX_M = 4  # rows up to which silu_mul_linear() may fuse the activation into the GEMV
NORM_GEMV_MAX_M = 4  # rows up to which add_rms_norm_linear() may fuse the residual add and norm
NORM_GEMV_MAX_N = 8192  # outputs up to which the fused add + norm pays (at M = 1)
SILU_GEMV_MAX_MN = 2048  # rows x outputs up to which the fused SiLU pays
GEMV_R = 4  # gemv.cu's weight rows per block
# norm_gemv_kernel stages M x K inputs in shared memory; with its ~1 KB of static shared memory
# this stays under the 48 KB a block gets without opting in.
NORM_SMEM_BYTES = 40 << 10


def gemv_max_rows(n: int, k: int) -> int:
    """The most rows for which the GEMV beats cuBLAS on an (n, k) weight (table above)."""
    if n <= 1024:
        return 8
    return 1 if n >= 64 * k else 2


def gemv_fits(x: cupy.ndarray, w: cupy.ndarray, max_m: int) -> bool:
    """Whether y = x @ w.T can take the GEMV: few rows, K in 16-byte words, aligned operands."""
    return (0 < x.shape[0] <= max_m and w.shape[1] % 8 == 0 and x.data.ptr % 16 == 0
            and w.data.ptr % 16 == 0)


def use_gemv(x: cupy.ndarray, w: cupy.ndarray) -> bool:
    """linear(): the GEMV where it can run and is faster."""
    return gemv_fits(x, w, min(GEMV_MAX_M, gemv_max_rows(*w.shape)))


def use_silu_gemv(gate_up: cupy.ndarray, w: cupy.ndarray) -> bool:
    """silu_mul_linear(): the activation fused into the GEMV where that is faster."""
    m, n = gate_up.shape[0], w.shape[0]
    return m * n <= SILU_GEMV_MAX_MN and gemv_fits(gate_up, w, GEMV_SILU_MAX_M)


def gemv(x: cupy.ndarray, w: cupy.ndarray, out: cupy.ndarray, ctype: str, act: bool = False):
    """out (M, N) = x (M, K) @ w (N, K)^T; with act, x is gate_up (M, 2K) and the input is
    silu(gate) * up. One launch. NOTE: under PDL the kernel reads w before waiting for the
    previous kernel: w must be a weight, never the output of a kernel of the same stream."""
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    threads = 256 if k >= 2048 else 128
    launch(kernel("gemv.cu", f"gemv_kernel<{ctype}, {m}, {'true' if act else 'false'}>", ctype),
           (-(-n // GEMV_R),), (threads,), (out, x, w, np.int32(n), np.int32(k)), pdl=True)
    return out


def norm_gemv_fits(x: cupy.ndarray, residual, norm_w: cupy.ndarray, w: cupy.ndarray,
                   max_m: int | None = None) -> bool:
    """Whether norm_gemv can run (max_m rows, NORM_GEMV_MAX_M by default)."""
    m, k = x.shape
    arrays = [x, norm_w, w] + ([] if residual is None else [residual])
    max_m = NORM_GEMV_MAX_M if max_m is None else max_m
    return (0 < m <= max_m and k % 8 == 0 and m * k * x.itemsize <= NORM_SMEM_BYTES
            and all(a.data.ptr % 16 == 0 for a in arrays))


def use_norm_gemv(x: cupy.ndarray, residual, norm_w: cupy.ndarray, w: cupy.ndarray) -> bool:
    """add_rms_norm_linear(): the fused add + norm + GEMV where it is faster (M = 1, N small)."""
    return (w.shape[0] <= NORM_GEMV_MAX_N
            and norm_gemv_fits(x, residual, norm_w, w, min(1, NORM_GEMV_MAX_M)))


def norm_gemv(x, residual, norm_w, w, eps: float, ctype: str):
    """(y, res_out): res_out = x + residual (x when residual is None), y = (rms_norm(res_out) *
    norm_w) @ w^T. One launch."""
    m, k = x.shape
    n = w.shape[0]
    y = cupy.empty((m, n), x.dtype)
    res_out = cupy.empty_like(x)
    launch(kernel("gemv.cu", f"norm_gemv_kernel<{ctype}, {m}>", ctype),
           (-(-n // GEMV_R),), (256 if k >= 2048 else 128,),
           (y, res_out, x, np.uint64(0) if residual is None else residual, norm_w, w,
            np.int32(n), np.int32(k), np.float32(eps)), shared_mem=m * k * x.itemsize, pdl=True)
    return y, res_out
