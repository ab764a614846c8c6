"""The small per-token kernels of a decode step without their chains of memory latencies:
launch shapes and the switch (PAGEDSERVE_NORM_VEC) for all of them.

At batch 1 these kernels move a few KB each, so their time is how many memory latencies they
wait one after another, not bytes over bandwidth. H200, kernel_check --only w1: add_rms_norm at
16..256 x 4096 7.2-7.6 us whatever the rows, 1.95 TB/s at 2048 rows (rms_norm_kernel waits a
latency per 2-byte element it loads: 16 per 4096 row). With PAGEDSERVE_NORM_VEC (the default):
- rms_norm_vec_kernel (rms_norm.cu): every 16-byte word of a row loaded at once, the row kept in
  registers between the sum of squares and the write, the weight read before the PDL wait;
- NORM_W_EARLY in the GGUF GEMVs with the fused norm (gguf.cu, gguf_dp4a.cu: the norm weight
  loaded with x, not after the sum of squares) and in qk_rope_kv.cu (the q/k norm weights, the
  bias, the position's cos/sin and the slot read before the PDL wait; session 14, with the FP8
  GEMV's scales requested early: the Llama-3-8B FP8 batch-1 step graph 2.567 -> 2.509 ms);
  bit-identical;
- the row gather (embedding) with a 16-byte word per thread instead of four in a chain.
On by default (PAGEDSERVE_NORM_VEC=0: the scalar kernels). H200, session 7, `kernel_check.py
--only norms` (each against its twin and the old kernel): add_rms_norm 1..256 x 4096 2.1-2.9 us
against 7.1-7.5 (2.6-3.3x), 2048 x 4096 16.9 against 34.8 us; the FP8 and GGUF forms and
qk_rope_kv bit-identical and within 1.00-1.13x; the gather 1.0-1.5x. Rows rms_norm_vec_kernel
cannot take (hidden % 8, a row not 16-byte aligned, hidden > 8 * max(NORM_VEC_WIDTHS) *
NORM_VEC_THREADS) keep the scalar kernel.
"""

from __future__ import annotations

import os

import numpy as np

from engine.executor.ops.cuda_kernels import NORM_VEC_WIDTHS, kernel, launch

NORM_VEC = os.environ.get("PAGEDSERVE_NORM_VEC", "1") == "1"
NORM_VEC_THREADS = 512  # the vector kernels' __launch_bounds__: longer rows take V > 1 words
GATHER_THREADS = 512  # row gather block with NORM_VEC (128 before: 4 dependent words a thread)
NORM_W_EARLY = 2  # a kernel's `flags` bit (common.cuh): weights read before what depends on them
_NULL = np.uint64(0)
MAX_PARTIALS = 8  # reduce_rms_norm_vec_kernel's unrolled splits (cuda_gemm_sm90.MAX_SPLITS)


def vec_launch(hidden: int, *arrays) -> tuple[int, int] | None:
    """(V, threads) of rms_norm_vec_kernel for rows of `hidden` in `arrays` (None entries
    skipped): the fewest 16-byte words a thread (V) that fit the block, so that a decode row is
    one load per thread; None where the vector kernel cannot run it."""
    if hidden % 8 or any(a is not None and a.data.ptr % 16 for a in arrays):
        return None
    words = hidden // 8
    for v in NORM_VEC_WIDTHS:
        threads = -(-words // v)
        if threads <= NORM_VEC_THREADS:
            return v, max(32, -(-threads // 32) * 32)
    return None


def rms_norm(out, residual, x, weight, eps: float, mode: int, ctype: str,
             vec: bool | None = None) -> None:
    """rms_norm.cu's modes (0: out = norm(x); 1: residual = x, out = norm(x); 2: residual += x,
    out = norm(residual)) on (rows, hidden) arrays the caller checked. vec None: NORM_VEC; True /
    False picks the kernel (kernel_check's old-vs-new timing; True falls back where it must)."""
    rows, hidden = x.shape
    if not rows:
        return
    args = (out, _NULL if residual is None else residual, x, weight, np.float32(eps),
            np.int32(hidden), np.int32(mode))
    shape = vec_launch(hidden, out, residual, x, weight) if (
        NORM_VEC if vec is None else vec) else None
    if shape is None:
        launch(kernel("rms_norm.cu", f"rms_norm_kernel<{ctype}>", ctype), (rows,), (256,), args,
               pdl=True)
    else:
        v, threads = shape
        launch(kernel("rms_norm.cu", f"rms_norm_vec_kernel<{ctype}, {v}>", ctype), (rows,),
               (threads,), args, pdl=True)


def reduce_rms_norm(out, residual, partial, weight, eps: float, ctype: str) -> bool:
    """rms_norm's mode 2 where x is still split-K partial sums (splits, rows, hidden) in fp32
    (cuda_gemm_sm90.PendingSum): reduced, added and normed in one launch, bit-identical to the
    reduce kernel then rms_norm. False (nothing launched) where the vector kernel cannot run."""
    splits, rows, hidden = partial.shape
    shape = vec_launch(hidden, out, residual, weight) if NORM_VEC else None
    if shape is None or splits > MAX_PARTIALS:  # (the scalar norm sums in another order)
        return False
    if rows:
        v, threads = shape
        launch(kernel("rms_norm.cu", f"reduce_rms_norm_vec_kernel<{ctype}, {v}>", ctype),
               (rows,), (threads,),
               (out, residual, partial, weight, np.float32(eps), np.int32(hidden),
                np.int32(splits), np.int64(rows * hidden)), pdl=True)
    return True


def norm_flags(norm: bool) -> np.int32:
    """The NORM_W_EARLY `flags` bit of a kernel with a fused norm where NORM_VEC: the GGUF GEMVs
    (gguf.cu v2, gguf_dp4a.cu v3: the norm weight loaded with x, not after the sum of squares)
    and qk_rope_kv.cu (the q/k norm weights, the bias, cos/sin and the slot before the PDL
    wait)."""
    return np.int32(NORM_W_EARLY if norm and NORM_VEC else 0)


def gather_threads(words: int, vec: bool | None = None) -> int:
    """Block of gather.cu's gather_rows_kernel for rows of `words` 16-byte words."""
    if not (NORM_VEC if vec is None else vec):
        return 128
    return min(GATHER_THREADS, max(32, -(-words // 32) * 32))
