"""16-bit GEMMs of eager steps through cuBLASLt with a plan kept per exact shape.

An eager step (one that holds a prompt: W2's time to first token) runs ~112 GEMMs on Qwen3-0.6B,
and cublasGemmEx spends ~30 us of host time on each (session 5's cProfile of a 64-token prefill:
3.5 ms of a 12.6 ms forward) choosing its algorithm again at every call. PlannedGemm asks
cuBLASLt's heuristic once per (M, N, K, dtype) for its first algorithm, keeps it with the shape's
matrix layouts, and then makes one cublasLtMatmul call with everything prepared.

Outside CUDA graph capture only: the decode graphs keep cublasGemmEx's kernels (their replays pay
no host time). A plan cuBLASLt refuses, at planning or at run time, sends that shape back to
cublasGemmEx for good. One plan per distinct M an engine meets (at most max_num_batched_tokens of
them per weight shape, ~100 bytes each).

    PAGEDSERVE_LEAN_GEMM=0    cublasGemmEx instead (where no tuned plan runs). H200, session 7
                              (tools/profile_prefill_host.py): 13.0 against 16.8 us of host time
                              a call, bit-equal output; with mixed_graphs.py most eager GEMMs
                              are replayed, so what is left is the steps beyond its buckets.
                              Session 18, W1 Llama-3-8B (its 8,192-token prompt steps run eagerly):
                              186.2 ms a prompt step planned against 186.5 through cublasGemmEx,
                              10,181 against 10,196 tok/s (noise); timed alone at 8,192 rows
                              (kernel_check --only gemm-m) the plan's gate_up and down kernels
                              were 3% and 9% slower, a difference the step does not show.
"""

from __future__ import annotations

import ctypes
import os

import cupy

from engine.executor.ops.cuda_blas import DATA_TYPES, WORKSPACE_BYTES, Gemm
from engine.executor.ops.cuda_blaslt import _Heuristic
from engine.executor.ops.cuda_gemm_tune import TunedGemm


def lean_gemm_enabled() -> bool:
    return os.environ.get("PAGEDSERVE_LEAN_GEMM", "1") == "1"


class PlannedGemm:
    """gemm.tuned: __call__ runs y = x @ w^T on the shape's plan and returns True, or returns
    False (Gemm then runs cublasGemmEx)."""

    def __init__(self, gemm: Gemm):
        # TunedGemm owns the cuBLASLt descriptor, preference and layout cache; nothing is timed.
        self._lt = TunedGemm(gemm)
        self._matmul = self._lt._lib.cublasLtMatmul
        self._heuristic = self._lt._lib.cublasLtMatmulAlgoGetHeuristic
        self._handle, self._desc, self._pref = gemm.handle, self._lt._desc, self._lt._pref
        self._workspace = gemm._workspace  # Gemm's: GEMMs of a stream run one after another
        self._one = ctypes.addressof(self._lt._one)
        self._zero = ctypes.addressof(self._lt._zero)
        # (M, N, K, dtype) -> (layout a, b, d, address of the algo, its heuristic result) or None
        self.plans: dict[tuple, tuple | None] = {}

    def __call__(self, x: cupy.ndarray, w: cupy.ndarray, out: cupy.ndarray, dtype: str) -> bool:
        m, k = x.shape
        key = (m, w.shape[0], k, dtype)
        plan = self.plans.get(key, False)
        stream = cupy.cuda.get_current_stream()
        if stream.is_capturing():
            return False
        if plan is False:
            plan = self.plans[key] = self._plan(*key)
        if plan is None:
            return False
        a, b, d, algo, _ = plan
        status = self._matmul(self._handle, self._desc, self._one, w.data.ptr, a, x.data.ptr, b,
                              self._zero, out.data.ptr, d, out.data.ptr, d, algo,
                              self._workspace.data.ptr, WORKSPACE_BYTES, stream.ptr)
        if status != 0:  # refused at run time: nothing was queued; cublasGemmEx from now on
            self.plans[key] = None
            return False
        return True

    def _plan(self, m: int, n: int, k: int, dtype: str) -> tuple | None:
        """cuBLASLt's first heuristic algorithm for the shape, within Gemm's workspace."""
        a, b, d = self._lt._abd(m, n, k, DATA_TYPES[dtype])
        result, count = _Heuristic(), ctypes.c_int(0)
        status = self._heuristic(self._handle, self._desc, a, b, d, d, self._pref, 1,
                                 ctypes.byref(result), ctypes.byref(count))
        if status != 0 or count.value < 1 or result.state != 0 \
                or result.workspace_size > WORKSPACE_BYTES:
            return None
        # the result's first field is the algo: its address is the algo's
        return a, b, d, ctypes.addressof(result), result
