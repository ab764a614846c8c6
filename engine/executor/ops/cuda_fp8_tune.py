"""FP8 cuBLASLt GEMMs on the fastest measured configuration of their shape.

With outer-vector scales cuBLASLt's heuristic offers one algorithm per shape (session 7), and at
decode batches between its tile sizes it is a poor one: H200, Llama-3-8B gate_up at M = 144 took
78 us in FP8 against 67 us in bf16 (device run B), the token dimension padded to its 128-column
tile. Fp8Tuner widens the choice: the heuristic's results and its first choices at other row
counts (PROBE_ROWS), then the variants of its algorithm that cublasLtMatmulAlgoCheck accepts
(every tile the algorithm lists, split K 1/2/4, cluster as given / 1x1 / 2x1), ranked by how
full their last wave is, and at M <= 128 the split-K batches of
cuda_fp8_splitk.py (fp32 partial products + a summing epilogue); up to CANDIDATES are timed once
on the real operands with the L2 flushed before each call (a layer's weights arrive cold), and
the fastest kept unless the heuristic's first is within MIN_GAIN of it.

Tuning happens at the first eager call of a bucket size (cuda_gemm_tune.bucket: the decode
graphs' padded sizes); the graphs' warm-up forward runs each size eagerly before its capture, so
captures find their plans made. A shape first met inside a capture, or an M that is not a bucket
size and whose bucket's plan cublasLtMatmulAlgoCheck refuses at M, runs the heuristic's plan.
Results differ from the heuristic plan's only by summation order (tile, split K).

    PAGEDSERVE_FP8_TUNE=0            turn it off (on: W1 FP8 / bf16 1.15x -> 1.27x with fast
                                     accumulation, session 9 on the H200)
    PAGEDSERVE_FP8_TUNE_MAX_M=256    tune only up to this many rows (prefill chunks: heuristic)
    PAGEDSERVE_FP8_TUNE_LARGE=1      ... and above it one plan per weight shape, tuned at the
                                     first larger M (kernel_check --only fp8w1 times M = 8192)
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import time

import cupy

from engine.executor.ops.cuda_blas import WORKSPACE_BYTES
from engine.executor.ops.cuda_blaslt import _Heuristic
from engine.executor.ops.cuda_fp8_splitk import SplitK
from engine.executor.ops.cuda_gemm_tune import CONFIG_NAMES, FLUSH_BYTES, bucket, flushed_median

logger = logging.getLogger("pagedserve." + __name__)
CANDIDATES = int(os.environ.get("PAGEDSERVE_FP8_TUNE_CANDIDATES", "48"))
MIN_GAIN = 0.02  # a tuned plan replaces the heuristic's only when this much faster (noise)
HEURISTIC_ALGOS = 16
PROBE_ROWS = (16, 32, 64, 128, 192, 256, 512, 2048, 8192)
# host time for cublasLtMatmulAlgoCheck over an algorithm's variants at a weight shape's first M
VARIANT_SECONDS = 1.0
# cublasLtMatmulAlgoCapAttributes_t / cublasLtMatmulAlgoConfigAttributes_t
CAP_SPLITK_SUPPORT, CAP_REDUCTION_MASK, CAP_TILE_IDS, CAP_STAGES_IDS = 0, 1, 6, 13
CONFIG_ID, CONFIG_TILE, CONFIG_SPLITK, CONFIG_REDUCTION = 0, 1, 2, 3
CONFIG_STAGES, CONFIG_CLUSTER = 6, 8
REDUCTION_COMPUTE_TYPE, REDUCTION_INPLACE = 2, 1
CLUSTER_1X1, CLUSTER_2X1 = 2, 3
SPLITS = (1, 2, 4)


def tuning_enabled() -> bool:
    return os.environ.get("PAGEDSERVE_FP8_TUNE", "1") == "1"


TUNE_MAX_M = int(os.environ.get("PAGEDSERVE_FP8_TUNE_MAX_M", "256"))
# Prefill chunks: one plan per weight shape for every M above TUNE_MAX_M, tuned at the first
# such M met eagerly (cublasLtMatmulAlgoCheck says where else it runs).
TUNE_LARGE = os.environ.get("PAGEDSERVE_FP8_TUNE_LARGE", "0") == "1"
LARGE = -1  # the bucket of every M above TUNE_MAX_M under TUNE_LARGE


class Fp8Tuner:
    """Fp8Gemm.tuner: plan() answers the plan to run a shape with (tuned, or the heuristic's)."""

    def __init__(self, lt):
        self._lt = lt  # the Fp8Gemm: its handle, layouts, and _run(plan, ...) -> status
        lib = lt._lib
        p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.cublasLtMatmulAlgoCapGetAttribute.argtypes = [p, i, p, sz, p]
        lib.cublasLtMatmulAlgoConfigSetAttribute.argtypes = [p, i, p, sz]
        lib.cublasLtMatmulAlgoConfigGetAttribute.argtypes = [p, i, p, sz, p]
        lib.cublasLtMatmulAlgoCheck.argtypes = [p, p, p, p, p, p, p, p]
        self._lib = lib
        # (bucket M or LARGE, N, K, dtype, fast accum) -> the fastest plan, ("outer", heuristic
        # result) or ("splitk", heuristic result, S), or None: the heuristic's own is as fast
        self.plans: dict[tuple, tuple | None] = {}
        self.timings: dict[tuple, list[tuple[float, str]]] = {}  # same key -> [(us, label)]
        self._valid: dict[tuple, bool] = {}  # (M, N, K, dtype, fast) -> bucket plan runs at M
        # (N, K, dtype, fast, algorithm id) -> the variants cuBLASLt accepted at the first M
        self._accepted: dict[tuple, list[tuple]] = {}
        self._flush: cupy.ndarray | None = None
        self.splitk = SplitK(lt)  # its plans run there (Fp8Gemm hands them over)

    def plan(self, first: tuple, m: int, n: int, k: int, dtype: str, run) -> tuple:
        """The plan for (m, n, k): `first` is the heuristic's; run(plan) -> cuBLAS status runs the
        product on the real operands (its output is scratch until the caller's own call)."""
        if first[0] != "outer" or (m > TUNE_MAX_M and not TUNE_LARGE):
            return first
        rows = bucket(m) if m <= TUNE_MAX_M else LARGE
        key = (rows, n, k, dtype, self._lt.fast_accum)
        if key not in self.plans:
            if (m != rows and rows != LARGE) or cupy.cuda.get_current_stream().is_capturing():
                return first  # tuned at the bucket size (or any large M), outside captures
            self.plans[key] = self.tune(key, m, first, run)
            self._valid[(m, n, k, dtype, self._lt.fast_accum)] = True  # tuned here
        plan = self.plans[key]
        if plan is None or not (m == rows or self._runs_at(plan, m, n, k, dtype)):
            return first  # the heuristic's own algorithm for this M
        return plan

    def drop(self, m: int, n: int, k: int, dtype: str) -> None:
        """Forget the tuned plan of m's bucket (it failed at run time): plan() then answers
        the heuristic's for every M of the bucket."""
        rows = bucket(m) if m <= TUNE_MAX_M else LARGE
        self.plans[(rows, n, k, dtype, self._lt.fast_accum)] = None

    def _runs_at(self, plan: tuple, m: int, n: int, k: int, dtype: str) -> bool:
        shape = (m, n, k, dtype, self._lt.fast_accum)
        if shape not in self._valid:
            self._valid[shape] = (self.splitk.runs_at(plan, m, n, k) if plan[0] == "splitk"
                                  else self._check(plan[1], m, n, k, dtype) is not None)
        return self._valid[shape]

    def _check(self, h: _Heuristic, m: int, n: int, k: int, dtype: str) -> _Heuristic | None:
        """h with cuBLASLt's workspace and waves count at this shape, or None if refused."""
        desc = self._lt._desc(True)
        a, b, d = self._lt._layouts_for(m, n, k, self._lt.out_type(dtype, True))
        result = _Heuristic()
        status = self._lib.cublasLtMatmulAlgoCheck(self._lt._gemm.handle, desc, a, b, d, d,
                                                   ctypes.byref(h), ctypes.byref(result))
        if status != 0 or result.workspace_size > WORKSPACE_BYTES:
            return None
        checked = _Heuristic.from_buffer_copy(h)
        checked.workspace_size, checked.waves_count = result.workspace_size, result.waves_count
        return checked

    def heuristics(self, m: int, n: int, k: int, dtype: str) -> list[_Heuristic]:
        """cuBLASLt's top HEURISTIC_ALGOS for the outer-vector plan, within the workspace."""
        lt = self._lt
        a, b, d = lt._layouts_for(m, n, k, lt.out_type(dtype, True))
        results, count = (_Heuristic * HEURISTIC_ALGOS)(), ctypes.c_int(0)
        status = lt._heuristic(lt._gemm.handle, lt._desc(True), a, b, d, d, lt._pref,
                               HEURISTIC_ALGOS, results, ctypes.byref(count))
        if status != 0:
            return []
        return [_Heuristic.from_buffer_copy(results[i]) for i in range(count.value)
                if results[i].state == 0 and results[i].workspace_size <= WORKSPACE_BYTES]

    def variants(self, base: _Heuristic, m: int, n: int, k: int, dtype: str) -> list:
        """The (tile, split K, cluster) variants of base's algorithm that cuBLASLt accepts here
        (with base's stages, else the first of the algorithm's others that it accepts), the
        fullest last waves first. The first M of a weight shape tries every combination the
        algorithm lists (for at most VARIANT_SECONDS); later ones only those accepted then."""
        key = (n, k, dtype, self._lt.fast_accum, self._get(base, CONFIG_ID))
        combinations = self._accepted[key] if key in self._accepted else self._combinations(base)
        accepted, found = [], []
        deadline = time.perf_counter() + VARIANT_SECONDS
        for tile, split, reduction, cluster, stages in combinations:
            if time.perf_counter() > deadline:
                logger.info("FP8 GEMM M=%d N=%d K=%d: variant search cut at %.1f s", m, n, k,
                            VARIANT_SECONDS)
                break
            h = _Heuristic.from_buffer_copy(base)
            if not (self._set(h, CONFIG_TILE, tile) and self._set(h, CONFIG_SPLITK, split)
                    and self._set(h, CONFIG_REDUCTION, reduction)
                    and self._set(h, CONFIG_CLUSTER, cluster)):
                continue
            for stage in stages:
                checked = (self._check(h, m, n, k, dtype) if self._set(h, CONFIG_STAGES, stage)
                           else None)
                if checked is not None:
                    found.append((split, checked))
                    accepted.append((tile, split, reduction, cluster, (stage,)))
                    break
        self._accepted.setdefault(key, accepted)

        def fullness(item) -> tuple:
            split, h = item
            waves = h.waves_count
            last = waves - int(waves) if waves > 1 else waves
            return (-(last if last > 0 else 1.0), split)

        return [h for _, h in sorted(found, key=fullness)]

    def _combinations(self, base: _Heuristic) -> list[tuple]:
        """(tile, split K, reduction scheme, cluster, stages to try) of base's algorithm."""
        tiles = self._cap_array(base, CAP_TILE_IDS) or [self._get(base, CONFIG_TILE) or 0]
        stages = tuple(dict.fromkeys([self._get(base, CONFIG_STAGES) or 0]
                                     + self._cap_array(base, CAP_STAGES_IDS)))
        splits = SPLITS if self._cap(base, CAP_SPLITK_SUPPORT) else (1,)
        mask = self._cap(base, CAP_REDUCTION_MASK)
        reduction = REDUCTION_COMPUTE_TYPE if mask & REDUCTION_COMPUTE_TYPE else REDUCTION_INPLACE
        clusters = dict.fromkeys((self._get(base, CONFIG_CLUSTER) or 0, CLUSTER_1X1, CLUSTER_2X1))
        return [(tile, split, reduction if split > 1 else 0, cluster, stages)
                for tile, split, cluster in itertools.product(tiles, splits, clusters)]

    def candidates(self, first: tuple, m: int, n: int, k: int, dtype: str) -> list:
        """What tune() times after `first` (outer-vector plans; the split-K batches come after):
        the heuristic's other results, its first choices at PROBE_ROWS, then the variants of each
        algorithm among its results, without repeats."""
        heuristics = self.heuristics(m, n, k, dtype)
        # the heuristic's first choice at other row counts, where cuBLASLt accepts it at m
        probes = [self._check(h, m, n, k, dtype) for rows in PROBE_ROWS if rows != m
                  for h in self.heuristics(rows, n, k, dtype)[:1]]
        bases = {self._get(h, CONFIG_ID): h for h in reversed(heuristics)}  # each algorithm's best
        pool, seen = [], {bytes(first[1])[:64]}  # the algo is the result's first 64 bytes
        for h in heuristics + [h for h in probes if h is not None] + [
                v for base in bases.values() for v in self.variants(base, m, n, k, dtype)]:
            algo = bytes(h)[:64]
            if algo not in seen:
                seen.add(algo)
                pool.append(h)
        return pool

    def tune(self, key: tuple, m: int, first: tuple, run) -> tuple | None:
        """The fastest of the heuristic's plan, its other results and the variants at m rows, or
        None when the heuristic's is within MIN_GAIN of it; the timings (us, label) in
        self.timings[key]."""
        n, k, dtype = key[1:4]
        self._flush = cupy.empty(FLUSH_BYTES, cupy.uint8)
        big = 2 * m * n * k >= 2e11
        reps = 2 if big else 4
        pool = self.candidates(first, m, n, k, dtype)
        default = self._time(lambda: run(first), reps)
        timed = [(default, "heuristic", first)]
        for plan in [("outer", h) for h in pool[:CANDIDATES]] + self.splitk.candidates(m, n, k):
            t = self._time(lambda plan=plan: run(plan), reps)
            if t is not None:
                timed.append((t, self.describe(plan), plan))
        self._flush = None
        ok = [t for t in timed if t[0] is not None]
        self.timings[key] = sorted((t * 1e6, label) for t, label, _ in ok)
        if not ok:
            return None
        best = min(ok, key=lambda t: t[0])
        logger.info("FP8 GEMM M=%d N=%d K=%d: heuristic %s us, best %s %.1f us (%d timed)", m, n,
                    k, "refused" if default is None else f"{default * 1e6:.1f}", best[1],
                    best[0] * 1e6, len(ok))
        if default is not None and best[0] > default * (1 - MIN_GAIN):
            return None
        return best[2]

    def _time(self, run, reps: int) -> float | None:
        """Median seconds of run() after an L2 flush, or None if cuBLASLt refuses it."""
        if run() != 0:  # warm-up: loads the kernel; refused at run time: not a candidate
            return None
        return flushed_median(run, reps, self._flush)

    def describe(self, plan: tuple) -> str:
        """'algo=.. tile=.. splitk=.. waves=..' of a plan, its batch split first if it has one."""
        h, parts = plan[1], [f"batch split K {plan[2]}:"] if plan[0] == "splitk" else []
        for name, attr in CONFIG_NAMES.items():
            v = self._get(h, attr)
            if v is not None:
                parts.append(f"{name}={v}")
        return " ".join(parts) + f" waves={h.waves_count:.2f}"

    # ------------------------------------------------------------------ algo attributes

    def _set(self, h: _Heuristic, attr: int, value: int) -> bool:
        for t in (ctypes.c_uint32, ctypes.c_uint16):  # the attribute's own size is accepted
            v = t(value)
            if self._lib.cublasLtMatmulAlgoConfigSetAttribute(
                    ctypes.byref(h), attr, ctypes.byref(v), ctypes.sizeof(v)) == 0:
                return True
        return False

    def _get(self, h: _Heuristic, attr: int) -> int | None:
        for size in (4, 2):  # the size must match the attribute's (uint32 or uint16)
            v, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
            if self._lib.cublasLtMatmulAlgoConfigGetAttribute(
                    ctypes.byref(h), attr, ctypes.byref(v), size, ctypes.byref(written)) == 0:
                return v.value
        return None

    def _cap(self, h: _Heuristic, attr: int) -> int:
        v, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
        status = self._lib.cublasLtMatmulAlgoCapGetAttribute(
            ctypes.byref(h), attr, ctypes.byref(v), 4, ctypes.byref(written))
        return v.value if status == 0 else 0

    def _cap_array(self, h: _Heuristic, attr: int) -> list[int]:
        written = ctypes.c_size_t(0)
        if self._lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(h), attr, None, 0,
                                                       ctypes.byref(written)) != 0:
            return []
        count = written.value // 4
        values = (ctypes.c_uint32 * max(count, 1))()
        if count == 0 or self._lib.cublasLtMatmulAlgoCapGetAttribute(
                ctypes.byref(h), attr, values, 4 * count, ctypes.byref(written)) != 0:
            return []
        return [v for v in values[:count] if v != 0]  # 0: CUBLASLT_MATMUL_TILE_UNDEFINED
