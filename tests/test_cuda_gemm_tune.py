"""cuda_gemm_tune.TunedGemm (PAGEDSERVE_GEMM_TUNE, on up to 128 rows): every cuBLASLt algorithm it
may pick computes linear()'s numpy twin (only the summation order differs), its plans replay in
CUDA graphs, a shape first met inside a capture runs cublasGemmEx without timing anything, and
rows above its limit run on the planned path untimed; activation.cu's 8-wide
SiLU-mul (on by default; PAGEDSERVE_SILU_VEC8=0: scalar) equals the scalar kernel bit for bit
(GPU only)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import capture_and_replay, require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.executor.ops import cuda_gemm_tune  # noqa: E402
from engine.executor.ops.cuda_gemm_plan import PlannedGemm  # noqa: E402
from engine.executor.ops.cuda_gemm_tune import PLANS, TunedGemm, bucket  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402

REF = NumpyOps()
# relative (Frobenius) error of a product of unit-variance inputs: the output's rounding dominates
TOL = {"float16": 2e-3, "bfloat16": 1e-2}


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    ops = CudaOps(request.param)
    ops._gemm.tuned = TunedGemm(ops._gemm, max_m=1 << 30)  # every M tuned: the tests' shapes
    return ops


@pytest.fixture(autouse=True)
def fresh_plans():
    saved = dict(PLANS)
    PLANS.clear()
    yield
    PLANS.clear()
    PLANS.update(saved)


def operands(ops, m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    x = ops.from_host(rng.standard_normal((m, k)))
    w = ops.from_host(rng.standard_normal((n, k)) * k**-0.5)
    return x, w, REF.linear(ops.to_host(x), ops.to_host(w))


def rel(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_bucket_follows_the_graph_sizes_then_256_rows():
    assert [bucket(m) for m in (1, 5, 8, 9, 17, 32, 33, 48, 250, 256, 257, 8192, 8193)] == \
        [1, 5, 8, 16, 24, 32, 40, 48, 256, 256, 512, 8192, 8448]


@pytest.mark.parametrize("m, n, k", [(64, 1024, 512), (200, 1536, 1024), (600, 512, 2048)])
def test_linear_tunes_once_and_matches_twin(ops, m, n, k):
    x, w, want = operands(ops, m, n, k)
    y = ops.linear(x, w)
    key = (bucket(m), n, k, ops.dtype)
    assert key in PLANS and key in cuda_gemm_tune.TIMINGS
    assert rel(ops.to_host(y), want) < TOL[ops.dtype]
    plan = PLANS[key]
    assert plan is None or plan[0] == m  # tuned on the rows it met first
    again = ops.linear(x, w)
    assert PLANS[key] is plan and cupy.array_equal(again, y)  # no re-tuning, same algorithm


@pytest.mark.parametrize("m, n, k", [(48, 4096, 1024), (256, 1024, 4096)])
def test_every_candidate_matches_twin(ops, m, n, k):
    """Whatever timing picks (split K, any tile), the product is the twin's."""
    x, w, want = operands(ops, m, n, k, seed=1)
    tuner = ops._gemm.tuned
    candidates = tuner.candidates(m, n, k, ops.dtype)
    assert candidates, "cuBLASLt offered no algorithm"
    for h in candidates:
        out = cupy.empty((m, n), ops.storage)
        out.view(cupy.uint16).fill(0x7FC0)  # NaN until written
        tuner._matmul(x, w, out, ops.dtype, h)
        assert rel(ops.to_host(out), want) < TOL[ops.dtype], tuner.describe(h)


def test_plan_of_a_bucket_runs_at_its_other_row_counts(ops):
    n, k = 1536, 1024
    x, w, _ = operands(ops, 200, n, k)
    ops.linear(x, w)  # tunes bucket 208 at 200 rows
    tuner = ops._gemm.tuned
    PLANS[(208, n, k, ops.dtype)] = (200, tuner.candidates(200, n, k, ops.dtype)[0])
    x2, w2, want = operands(ops, 193, n, k, seed=2)
    y = ops.linear(x2, w2)
    assert tuner._valid[(193, n, k, ops.dtype)] is True
    assert rel(ops.to_host(y), want) < TOL[ops.dtype]


def test_captured_plan_replays_the_eager_result(ops):
    m, n, k = 96, 2048, 1024
    x, w, _ = operands(ops, m, n, k)
    tuner = ops._gemm.tuned
    # the last candidate: an algorithm other than cublasGemmEx's own choice, where there is one
    PLANS[(m, n, k, ops.dtype)] = (m, tuner.candidates(m, n, k, ops.dtype)[-1])
    eager = cupy.empty((m, n), ops.storage)
    ops._gemm(x, w, eager, ops.dtype)
    captured = cupy.zeros((m, n), ops.storage)
    capture_and_replay(lambda: ops._gemm(x, w, captured, ops.dtype))
    assert cupy.array_equal(captured, eager)


def test_shape_first_met_in_a_capture_runs_gemm_ex_untimed(ops):
    m, n, k = 80, 1024, 1024
    x, w, _ = operands(ops, m, n, k)
    want = cupy.empty((m, n), ops.storage)
    ops._gemm.gemm_ex(x, w, want, ops.dtype)
    got = cupy.zeros((m, n), ops.storage)
    capture_and_replay(lambda: ops._gemm(x, w, got, ops.dtype))
    assert (m, n, k, ops.dtype) not in PLANS
    assert cupy.array_equal(got, want)


def test_tuning_is_on_by_default_up_to_128_rows_then_planned(monkeypatch):
    for var in ("PAGEDSERVE_GEMM_TUNE", "PAGEDSERVE_LEAN_GEMM"):
        monkeypatch.delenv(var, raising=False)
    tuned = CudaOps("bfloat16")._gemm.tuned
    assert isinstance(tuned, TunedGemm) and isinstance(tuned.beyond, PlannedGemm)
    assert tuned.max_m == cuda_gemm_tune.TUNE_MAX_M == int(
        os.environ.get("PAGEDSERVE_GEMM_TUNE_MAX_M", "128"))
    monkeypatch.setenv("PAGEDSERVE_LEAN_GEMM", "0")
    assert CudaOps("bfloat16")._gemm.tuned.beyond is None  # cublasGemmEx above the limit
    monkeypatch.setenv("PAGEDSERVE_GEMM_TUNE", "0")
    assert CudaOps("bfloat16")._gemm.tuned is None
    monkeypatch.setenv("PAGEDSERVE_LEAN_GEMM", "1")
    assert isinstance(CudaOps("bfloat16")._gemm.tuned, PlannedGemm)


def test_rows_above_max_m_run_on_beyond_untimed(ops):
    n, k = 1024, 512
    planned = PlannedGemm(ops._gemm)
    saved, ops._gemm.tuned = ops._gemm.tuned, TunedGemm(ops._gemm, max_m=64, beyond=planned)
    try:
        for m in (64, 65, 200):
            x, w, want = operands(ops, m, n, k, seed=m)
            assert rel(ops.to_host(ops.linear(x, w)), want) < TOL[ops.dtype]
    finally:
        ops._gemm.tuned = saved
    assert (64, n, k, ops.dtype) in PLANS  # tuned
    assert {key for key in PLANS if key[1:] == (n, k, ops.dtype)} == {(64, n, k, ops.dtype)}
    assert (65, n, k, ops.dtype) in planned.plans and (200, n, k, ops.dtype) in planned.plans
    assert (64, n, k, ops.dtype) not in planned.plans


@pytest.mark.parametrize("rows, inter", [(1, 64), (37, 1536), (256, 14336)])
def test_silu_and_mul_vec8_is_bit_identical_to_the_scalar_kernel(ops, monkeypatch, rows, inter):
    from engine.executor.ops import cuda_ops

    gate_up = ops.from_host(np.random.default_rng(rows).standard_normal((rows, 2 * inter)) * 4)
    monkeypatch.setattr(cuda_ops, "SILU_MUL_VEC8", False)
    want = ops.silu_and_mul(gate_up)
    monkeypatch.setattr(cuda_ops, "SILU_MUL_VEC8", True)
    got = ops.silu_and_mul(gate_up)
    assert cupy.array_equal(got, want)
    assert rel(ops.to_host(got), REF.silu_and_mul(ops.to_host(gate_up))) < TOL[ops.dtype]
