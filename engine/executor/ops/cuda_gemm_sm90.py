"""The skinny GEMM for Hopper (cuda/gemm_sm90.cu): y = x w^T for up to 256 token rows, where
cuBLAS's tiles over the tokens round a batch of 144 up to 256 and a GEMM cannot start its weight
reads before the kernel ahead of it ends.

An experiment beside cuBLAS, off by default: `PAGEDSERVE_SKINNY_GEMM=1` makes CudaOps.linear
take it for 16-bit weights at 1..256 rows on Hopper (where no GEMV does), and
`tools/kernel_check.py --only skinny` times it against cublasGemmEx at every decode graph size
and checks it against cuBLAS's output. A block computes 128 weight rows against all the step's
tokens (rounded up to a multiple of 64); the weights' first K slices are requested before the
PDL wait. When the weight rows make too few blocks to fill the GPU (Llama-3-8B's o and down: 32
blocks), K is cut into splits whose fp32 partial sums a second kernel adds in a fixed order.

Session 18 on the H200 (first run): tests/test_cuda_gemm_sm90.py passes (52 cases); it is slower
than cuBLAS at every Llama-3-8B shape and row count timed (kernel_check --only skinny: at 256
rows qkv 31.3 against 22.5 us, o 22.2 / 17.3, gate_up with its SiLU-mul 99.7 / 97.7, down 50.1 /
48.7; a layer 0.79-0.97x of cuBLAS from 16 to 256 rows), and W1 Llama-3-8B gave 9,884 output tok/s
against 10,133 on cuBLAS (clusters of 2: 7,884). ncu at gate_up, 256 rows: 101 us, 714 MB
through the L2 (68% of its peak) against cuBLAS's persistent 132-block kernel's 96 us and 545 MB;
the pair form moved more (846 MB) and its SMs stayed active 1.7x longer (157 us), stalled on
the cluster-scope release fence of each remote arrive; with plain arrives (gemm_sm90.cu) it
takes 99 us at 256 rows against 98.5 for single blocks and 92.7 for cuBLAS, and 88 against 98 and
69 at 144 rows (gate_up; down level with single blocks). Qkv and o leave SMs idle (48 and 32
blocks of 128 rows, split 2 and 4 ways).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import numpy as np

from engine.executor.ops.cuda_kernels import kernel, launch, num_sms

BLOCK_N = 128  # weight rows a block (two consumer warpgroups of 64)
ROWS_STEP, MAX_ROWS = 64, 256  # token rows are rounded up to a multiple of ROWS_STEP
SLICE_K = 64  # K values a stage
STAGES = 4
MAX_SPLITS = 8  # (cuda_norm.MAX_PARTIALS: the fused norm's unrolled splits)
MIN_SLICES_PER_SPLIT = 4  # K slices a split streams at least (the pipeline's depth)
REDUCE_THREADS = 256
logger = logging.getLogger("pagedserve." + __name__)
ENABLED = os.environ.get("PAGEDSERVE_SKINNY_GEMM", "0") == "1"
# 2: neighbouring blocks share x's slices by TMA multicast (clusters of 2; N / 128 even), so the
# L2 serves x half as often; 1: every block copies its own (kernel_check --only skinny has both)
CLUSTER = int(os.environ.get("PAGEDSERVE_SKINNY_CLUSTER", "1"))


def shape_ok(m: int, n: int, k: int) -> bool:
    """Shapes the kernel takes: 1..256 rows, N a multiple of 128, K of 64."""
    return 1 <= m <= MAX_ROWS and n % BLOCK_N == 0 and k % SLICE_K == 0


@functools.cache
def _hopper_ready() -> bool:
    """sm_90 with what the kernel's launch needs (cuda_prefill.sm90_missing); a warning where
    PAGEDSERVE_SKINNY_GEMM=1 asked for it and something is missing."""
    from engine.executor.ops.cuda_prefill import sm90_missing

    missing = sm90_missing()
    if missing:
        logger.warning("the skinny GEMM needs %s: GEMMs run on cuBLAS", ", ".join(missing))
    return missing == ()


def takes(x, weight) -> bool:
    """Whether CudaOps.linear runs x @ weight^T here: PAGEDSERVE_SKINNY_GEMM=1, Hopper, a shape
    the kernel tiles, contiguous 16-bit operands."""
    return (ENABLED and shape_ok(x.shape[0], weight.shape[0], x.shape[1])
            and x.itemsize == 2 and weight.itemsize == 2 and x.flags.c_contiguous
            and weight.flags.c_contiguous and _hopper_ready())


def gemm_plan(m: int, n: int, k: int, sms: int) -> tuple[int, int]:
    """(token rows a block computes, K splits): splits so that N / 128 blocks times them come
    near the SM count without more than MAX_SPLITS, and each split streams at least
    MIN_SLICES_PER_SPLIT slices."""
    rows = -(-m // ROWS_STEP) * ROWS_STEP
    blocks = n // BLOCK_N
    splits = max(1, min(MAX_SPLITS, sms // blocks, (k // SLICE_K) // MIN_SLICES_PER_SPLIT))
    return rows, splits


def smem_bytes(rows: int) -> int:
    """1024 for the swizzle's alignment, the stages of (w, x) slices, full + empty mbarriers."""
    return 1024 + STAGES * (BLOCK_N + rows) * SLICE_K * 2 + 16 * STAGES


@dataclasses.dataclass
class PendingSum:
    """A split-K product whose last step, the sum of its partials, is left to the kernel that
    consumes it: CudaOps.add_rms_norm (and the ops that start with it) reduce, add the residual
    and norm in one launch (cuda_norm.reduce_rms_norm). Anything else calls resolve()."""

    partial: object  # cupy (splits, M, N) fp32
    out: object  # cupy (M, N): where resolve() writes the sum
    ctype: str
    pdl: bool = True

    consumed: bool = False  # take() handed the partials to a fused kernel

    @property
    def shape(self) -> tuple[int, int]:
        return self.out.shape

    def take(self):
        """The partials, for a kernel that finishes the sum itself; this object is spent."""
        if self.consumed:
            raise RuntimeError("PendingSum: its partial sums were already consumed")
        self.consumed = True
        partial, self.partial, self.out = self.partial, None, None  # nothing held past here
        return partial

    def resolve(self):
        """The (M, N) product (the reduce kernel, once)."""
        if self.consumed:
            raise RuntimeError("PendingSum: its partial sums were already consumed")
        if self.partial is not None:
            size = self.out.size
            red = kernel("gemm_sm90.cu", f"gemm_sm90_reduce_kernel<{self.ctype}>", self.ctype)
            launch(red, (-(-size // (4 * REDUCE_THREADS)),), (REDUCE_THREADS,),
                   (self.out, self.partial, np.int64(size), np.int32(len(self.partial))),
                   pdl=self.pdl)
            self.partial = None
        return self.out


def resolved(x):
    """x, or the product a PendingSum stands for."""
    return x.resolve() if isinstance(x, PendingSum) else x


def skinny_gemm(x, w, out, ctype: str, splits: int | None = None, pdl: bool = True,
                cluster: int | None = None, defer: bool = False):
    """out (M, N) = x (M, K) @ w (N, K)^T of cupy arrays of 16-bit values, fp32 accumulation;
    `splits` and `cluster` override gemm_plan's and CLUSTER (kernel_check). Every array
    contiguous. `defer`: a split product comes back as a PendingSum (its reduction to the
    consumer); otherwise, and unsplit, `out`."""
    import cupy

    m, k = x.shape
    n = w.shape[0]
    _check(x, w, out, (m, n))
    rows, planned = gemm_plan(m, n, k, num_sms())
    splits = splits or planned
    if not 1 <= splits <= k // SLICE_K:
        raise ValueError(f"skinny_gemm: {splits} splits of {k // SLICE_K} K slices")
    partial = cupy.empty((splits, m, n), cupy.float32) if splits > 1 else np.uint64(0)
    _launch(x, w, out, partial, rows, splits, ctype, False, pdl, cluster)
    if splits == 1:
        return out
    pending = PendingSum(partial, out, ctype, pdl)
    return pending if defer else pending.resolve()


def skinny_glu(x, gate_up, out, ctype: str, pdl: bool = True, cluster: int | None = None):
    """out (M, I) = silu(x @ gate^T) * (x @ up^T) for gate_up (2 I, K) = [gate; up]: the MLP's
    first product and its SiLU-and-mul in one kernel (I % 64 == 0); no K splits."""
    m, k = x.shape
    n = gate_up.shape[0]
    _check(x, gate_up, out, (m, n // 2))
    rows, _ = gemm_plan(m, n, k, num_sms())
    _launch(x, gate_up, out, np.uint64(0), rows, 1, ctype, True, pdl, cluster)
    return out


def _check(x, w, out, out_shape):
    m, k = x.shape
    if not shape_ok(m, w.shape[0], k) or w.shape[1] != k or out.shape != out_shape:
        raise ValueError(f"skinny_gemm: x {x.shape}, w {w.shape}, out {out.shape}: 1..256 rows, "
                         f"N % {BLOCK_N} == 0, K % {SLICE_K} == 0")
    for a, name in ((x, "x"), (w, "w"), (out, "out")):
        if not a.flags.c_contiguous or a.itemsize != 2:
            raise ValueError(f"skinny_gemm: {name} must be contiguous 16-bit values")


def _launch(x, w, out, partial, rows: int, splits: int, ctype: str, glu: bool, pdl: bool,
            cluster: int | None):
    """Grid (N / 128, splits) either way: a GLU block's 128 weight rows are 64 of gate and the
    same 64 of up (two TMA boxes of 64 rows). Clusters of 2 where N / 128 is even."""
    from engine.executor.ops.cuda_prefill import tma_map_2d

    (m, k), n = x.shape, w.shape[0]
    cl = cluster or CLUSTER
    if cl not in (1, 2):
        raise ValueError(f"skinny_gemm: clusters of 1 or 2 blocks, not {cl}")
    if (n // BLOCK_N) % cl:
        cl = 1
    fn = kernel("gemm_sm90.cu", f"gemm_sm90_{'pair_kernel' if cl == 2 else 'kernel'}<{ctype}, "
                f"{rows}, {STAGES}, {'true' if glu else 'false'}>", ctype)
    smem = smem_bytes(rows)
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    w_map = tma_map_2d(w.data.ptr, n, k, BLOCK_N // 2 if glu else BLOCK_N)
    x_map = tma_map_2d(x.data.ptr, m, k, rows // cl)
    i32 = np.int32
    launch(fn, (n // BLOCK_N, splits), (384,),
           (out, partial, w_map, x_map, i32(m), i32(n), i32(k), i32(splits)),
           shared_mem=smem, pdl=pdl)
