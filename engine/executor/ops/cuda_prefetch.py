"""Weights requested into L2 ahead of the ops that read them (cuda/prefetch.cu): a hint, no value
changes.

A batch-1 decode layer reads its weights one GEMV after another, and each GEMV can request its
weights early only as far as its blocks fit beside the running kernel (gemv.cu streams them
before its PDL wait). They often do not: Qwen3-0.6B's gate_up GEMV (add + norm + SiLU fused,
1536 blocks of 64 threads at 80 registers, sm_90 ptxas) fills 11.6 of the 12 block slots its
registers leave per SM, so the down GEMV's blocks become resident only as it exits, and their
6 MB come from HBM on the critical path. Between the qkv GEMV and the o GEMV, the q/k-norm +
RoPE kernel and the attention read little (2 MB of K/V at a 512-token context) for several
microseconds, and HBM idles. prefetch() launches one small kernel there that asks L2 for the
next weights, up to PREFETCH_MAX_BYTES (L2 holds 50 MB on an H200: Qwen3-0.6B's o + gate_up +
down are 22 MB, Llama-3-8B's o alone 34 MB in bf16), so that the o, gate_up and down GEMVs find
them in L2.
Off (0) until tools/kernel_check.py --only decode1 measures it: at a long context the attention
streams its K/V through L2 and may evict the prefetched lines first (HBM read twice).
"""

from __future__ import annotations

import os

import numpy as np

from engine.executor.ops.cuda_kernels import kernel, launch
from engine.model.quantized import QuantizedWeight

PREFETCH_MAX_BYTES = int(float(os.environ.get("PAGEDSERVE_L2_PREFETCH_MB", "0")) * 2**20)
CHUNK = 64 << 10  # prefetch.cu's PF_CHUNK: bytes a request asks for
MAX_RANGES = 8  # prefetch.cu's PF_RANGES: arrays per launch
MAX_BLOCKS = 1024


def ranges(weights, max_bytes: int) -> list[tuple[int, int]]:
    """(device pointer, bytes) of the weights' arrays in order, the first max_bytes of them,
    sizes rounded down to 16 bytes (the bulk request's unit); unaligned arrays are skipped."""
    out, budget = [], max_bytes
    for w in weights:
        arrays = (w.data, w.scale) if isinstance(w, QuantizedWeight) else (w,)
        for a in arrays:
            if a is None or budget < 16 or len(out) == MAX_RANGES or a.data.ptr % 16:
                continue
            n = min(int(a.nbytes), budget) // 16 * 16
            if n:
                out.append((a.data.ptr, n))
                budget -= n
    return out


def prefetch(weights) -> None:
    """Ask L2 for the weights (device arrays or QuantizedWeight), PREFETCH_MAX_BYTES at most;
    one launch, none when off or empty."""
    todo = ranges(weights, PREFETCH_MAX_BYTES) if PREFETCH_MAX_BYTES > 0 else []
    if not todo:
        return
    chunks = sum(-(-n // CHUNK) for _, n in todo)
    todo += [(0, 0)] * (MAX_RANGES - len(todo))
    args = tuple(np.uint64(p) for p, _ in todo) + tuple(np.uint64(n) for _, n in todo)
    launch(kernel("prefetch.cu", "l2_prefetch_kernel"), (min(chunks, MAX_BLOCKS),), (32,), args,
           pdl=True)
