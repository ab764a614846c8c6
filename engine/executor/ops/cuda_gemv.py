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
- The fused add + RMSNorm (NORM) is recomputed by every one of the N / GEMV_R blocks for all M
  rows: it pays at M = 1 only. The table above is the kernel before this one, which staged the
  normalized row in shared memory before its first FMA (and so paid only for N <= 8192); the
  one-pass kernel of today folds the norm into the stream (gemv.cu) and pays at any N. Device
  run 2 (kernel_check --only gemv1,step, PDL chains): Llama-3-8B gate_up 56.1 us against 61.8
  unfused, qkv 15.7 against 21.5; Qwen3-0.6B qkv 4.5 against 5.7; a Llama-3-8B batch-1 step
  4.33 ms against 4.62 with gate_up's norm unfused (4.93 with both).
- The SiLU-and-mul rides on the gate_up GEMV's output (GLU): the down projection is then a plain
  GEMV (the table's "SiLU" rows were the activation recomputed by each down-projection block,
  0.83x at Llama-3-8B's shapes). Run 2: Qwen3-0.6B add+norm+GLU gate_up 5.8 us against 8.0
  unfused; a batch-1 step 901 us against 927 with silu_and_mul as its own launch.
The *_MAX_M caps below bound all of these (0 turns a path off: tools/kernel_check.py does).
- GEMV_PREFETCH_X (on unless PAGEDSERVE_GEMV_PREFETCH=0): at one row the kernel's PRE form, the
  same bits with the x / residual words of a pass requested at once after the PDL wait, not one
  round trip to L2 per word (gemv.cu). H200, session 7, tools/kernel_check.py --only decode1:
  the batch-1 step graph 750.5 -> 736.0 us (Qwen3-0.6B, ctx 512), 1764 -> 1757 (ctx 32532),
  Llama-3-8B 0.984x; logits bit-identical.
"""

from __future__ import annotations

import os

import cupy
import numpy as np

from engine.executor.ops import cuda_kernels
from engine.executor.ops.cuda_kernels import kernel, launch

# cuda_kernels.kernel_names compiles M = 1..8 (1..4 with NORM or GLU): the caps stay within.
GEMV_MAX_M = 8  # rows (tokens) up to which linear() may take the GEMV; 0 = always cuBLAS
NORM_GEMV_MAX_M = 4  # rows up to which add_rms_norm_linear() may fuse the residual add and norm
NORM_GEMV_MAX_N = None  # outputs up to which the fused add + norm is used (None: any)
GLU_GEMV_MAX_M = 4  # rows up to which mlp() may fuse the SiLU-and-mul into the gate_up GEMV
GEMV_PREFETCH_X = os.environ.get("PAGEDSERVE_GEMV_PREFETCH", "1") == "1"  # PRE at M = 1
GEMV_R = 4  # gemv.cu's weight rows per block
# Threads per block for K < 2048 and for larger K; at one row and K < 2048, GEMV_THREADS_M1.
# Fewer threads make more, smaller blocks, more of them resident at once, so more of a GEMV's
# weights stream before its PDL wait (each thread requests GEMV_U words of each of its rows
# first). Device run 2 (kernel_check --only step,gemv1): 64 threads at M = 1 took a Qwen3-0.6B
# batch-1 step from 901 to 867 us (qkv 3.5 -> 3.2 us, gate_up 5.0 -> 4.7 in a PDL chain); 128 at
# K >= 2048 lost everywhere (Llama-3-8B down 28.0 -> 31.8 us).
GEMV_THREADS = (128, 256)
GEMV_THREADS_M1 = 64


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


def use_glu_gemv(x: cupy.ndarray, gate_up: cupy.ndarray) -> bool:
    """mlp(): x @ gate_up^T on the GEMV (use_gemv's rule), its output the SiLU-and-mul."""
    return gate_up.shape[0] % 2 == 0 and gemv_fits(
        x, gate_up, min(GLU_GEMV_MAX_M, GEMV_MAX_M, gemv_max_rows(*gate_up.shape)))


def norm_gemv_fits(x: cupy.ndarray, residual, norm_w: cupy.ndarray, w: cupy.ndarray,
                   max_m: int | None = None) -> bool:
    """Whether the NORM kernel can run (max_m rows, NORM_GEMV_MAX_M by default)."""
    arrays = [norm_w] + ([] if residual is None else [residual])
    max_m = NORM_GEMV_MAX_M if max_m is None else max_m
    return gemv_fits(x, w, max_m) and all(a.data.ptr % 16 == 0 for a in arrays)


def use_norm_gemv(x: cupy.ndarray, residual, norm_w: cupy.ndarray, w: cupy.ndarray) -> bool:
    """add_rms_norm_linear() and mlp(): the fused add + norm where it is faster (M = 1)."""
    return ((NORM_GEMV_MAX_N is None or w.shape[0] <= NORM_GEMV_MAX_N)
            and norm_gemv_fits(x, residual, norm_w, w, min(1, NORM_GEMV_MAX_M)))


def gemv_threads(m: int, k: int) -> int:
    return GEMV_THREADS_M1 if m == 1 and k < 2048 else GEMV_THREADS[k >= 2048]


def _launch(y, res_out, x, residual, norm_w, w, eps: float, ctype: str, glu: bool,
            pdl: bool = True):
    m, (n, k) = x.shape[0], w.shape
    norm = norm_w is not None
    pre = GEMV_PREFETCH_X and m == 1
    name = (f"gemv_kernel<{ctype}, {m}, {str(norm).lower()}, {str(glu).lower()}, "
            f"{str(pre).lower()}>")
    rows = GEMV_R // 2 if glu else GEMV_R
    outputs = n // 2 if glu else n
    null = np.uint64(0)
    flags = cuda_kernels.early_flag()
    threads = gemv_threads(m, k)
    launch(kernel("gemv.cu", name, ctype), (-(-outputs // rows),), (threads,),
           (y, null if res_out is None else res_out, x, null if residual is None else residual,
            null if norm_w is None else norm_w, w, np.int32(n), np.int32(k), np.float32(eps),
            np.int32(flags)), pdl=pdl)


def gemv(x: cupy.ndarray, w: cupy.ndarray, out: cupy.ndarray, ctype: str,
         w_is_fresh: bool = False):
    """out (M, N) = x (M, K) @ w (N, K)^T. One launch. NOTE: under PDL the kernel reads w
    before waiting for the previous kernel, so a w that a kernel of the same stream has just
    written (a dequantized scratch weight) needs w_is_fresh: a plain launch."""
    _launch(out, None, x, None, None, w, 0.0, ctype, glu=False, pdl=not w_is_fresh)
    return out


def glu_gemv(x: cupy.ndarray, gate_up: cupy.ndarray, ctype: str) -> cupy.ndarray:
    """silu_and_mul(x @ gate_up^T): (M, I) from x (M, K) and gate_up (2I, K). One launch."""
    act = cupy.empty((x.shape[0], gate_up.shape[0] // 2), x.dtype)
    _launch(act, None, x, None, None, gate_up, 0.0, ctype, glu=True)
    return act


def norm_gemv(x, residual, norm_w, w, eps: float, ctype: str, glu: bool = False):
    """(y, res_out): res_out = x + residual (x when residual is None), y = (rms_norm(res_out) *
    norm_w) @ w^T, with glu its silu_and_mul. One launch."""
    m, n = x.shape[0], w.shape[0]
    y = cupy.empty((m, n // 2 if glu else n), x.dtype)
    res_out = cupy.empty_like(x)
    _launch(y, res_out, x, residual, norm_w, w, eps, ctype, glu)
    return y, res_out

