"""cuda_gemm_plan.PlannedGemm (on unless PAGEDSERVE_LEAN_GEMM=0): a cuBLASLt plan per exact shape
computes linear()'s numpy twin and cublasGemmEx's product (up to summation order), is made once
per shape, stays out of CUDA graph captures, and an eager mixed step (8 decodes + a prompt) with
it gives the logits of the cublasGemmEx path (GPU only)."""

from __future__ import annotations

import pytest
from conftest import capture_and_replay, require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from test_cuda_gemm_tune import operands, rel  # noqa: E402

from engine.executor.ops.cuda_gemm_plan import PlannedGemm  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402

TOL = {"float16": 2e-3, "bfloat16": 1e-2}  # relative (Frobenius) error, as test_cuda_gemm_tune


@pytest.fixture(scope="module", params=["bfloat16"])
def ops(request):
    ops = CudaOps(request.param)
    ops._gemm.tuned = PlannedGemm(ops._gemm)
    return ops


@pytest.mark.parametrize("m, n, k", [(9, 4096, 1024), (72, 1024, 2048), (264, 6144, 1024),
                                     (520, 1024, 3072), (9, 151936, 1024)])
def test_planned_gemm_matches_twin_and_gemm_ex(ops, m, n, k):
    x, w, want = operands(ops, m, n, k)
    planned = ops._gemm.tuned
    y = ops.linear(x, w)
    plan = planned.plans[(m, n, k, ops.dtype)]
    assert plan is not None, "cuBLASLt offered no plan: the path would be cublasGemmEx"
    assert rel(ops.to_host(y), want) < TOL[ops.dtype]
    ref = cupy.empty_like(y)
    ops._gemm.gemm_ex(x, w, ref, ops.dtype)
    assert rel(ops.to_host(y), ops.to_host(ref)) < TOL[ops.dtype]
    again = ops.linear(x, w)
    assert planned.plans[(m, n, k, ops.dtype)] is plan and cupy.array_equal(again, y)


def test_capture_runs_gemm_ex_and_makes_no_plan(ops):
    m, n, k = 80, 1024, 1024
    x, w, _ = operands(ops, m, n, k)
    want = cupy.empty((m, n), ops.storage)
    ops._gemm.gemm_ex(x, w, want, ops.dtype)
    got = cupy.zeros((m, n), ops.storage)
    capture_and_replay(lambda: ops._gemm(x, w, got, ops.dtype))
    assert (m, n, k, ops.dtype) not in ops._gemm.tuned.plans
    assert cupy.array_equal(got, want)


def test_refused_plan_falls_back_to_gemm_ex(ops):
    m, n, k = 40, 512, 1024
    x, w, want = operands(ops, m, n, k)
    ops._gemm.tuned.plans[(m, n, k, ops.dtype)] = None  # as after a refusal
    y = ops.linear(x, w)
    ref = cupy.empty_like(y)
    ops._gemm.gemm_ex(x, w, ref, ops.dtype)
    assert cupy.array_equal(y, ref) and rel(ops.to_host(y), want) < TOL[ops.dtype]


def test_lean_gemm_is_on_by_default(monkeypatch):
    """Alone (PAGEDSERVE_GEMM_TUNE=0), or above the tuned rows (cuda_gemm_tune's `beyond`)."""
    monkeypatch.delenv("PAGEDSERVE_LEAN_GEMM", raising=False)
    monkeypatch.delenv("PAGEDSERVE_GEMM_TUNE", raising=False)
    assert isinstance(CudaOps("bfloat16")._gemm.tuned.beyond, PlannedGemm)
    monkeypatch.setenv("PAGEDSERVE_GEMM_TUNE", "0")
    assert isinstance(CudaOps("bfloat16")._gemm.tuned, PlannedGemm)
    monkeypatch.setenv("PAGEDSERVE_LEAN_GEMM", "0")
    assert CudaOps("bfloat16")._gemm.tuned is None


def test_check_still_refuses_a_strided_array(ops):
    x = cupy.zeros((4, 8), ops.storage)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        ops._check(x, "x", 2)


def test_mixed_step_logits_match_the_gemm_ex_path():
    """8 decodes + a 100-token prompt through 2 Qwen3-0.6B layers, the step packed and uploaded
    as the runner does (tools/profile_prefill_host.py times the same step at 28 layers)."""
    from engine.executor.transformer import Transformer
    from engine.model.config import ModelConfig
    from engine.model.loader import dummy_weights
    from tools.profile_prefill_host import BLOCK, host_step, run_step

    ops = CudaOps("bfloat16")
    config = ModelConfig.from_preset("qwen3-0.6b").cut(2, 4096)
    model = Transformer(config, dummy_weights(config, ops, seed=0), ops, 1024)
    cache = ops.alloc_kv_cache(2, 256, config.num_kv_heads, BLOCK, config.head_dim)
    step = host_step(100, 1024 // BLOCK)
    # cublasGemmEx alone: a CudaOps' default gemm.tuned (TunedGemm, PlannedGemm beyond its rows)
    # would be the path under test
    ops._gemm.tuned = None
    ref = ops.to_host(run_step(ops, model, cache, *step))
    ops._gemm.tuned = PlannedGemm(ops._gemm)
    got = ops.to_host(run_step(ops, model, cache, *step))
    assert got.shape == (9, 4096)
    assert rel(got, ref) < 2e-2
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 2 / 3
