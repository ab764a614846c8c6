"""The sm90 skinny GEMM (cuda/gemm_sm90.cu, engine/executor/ops/cuda_gemm_sm90.py) against the
numpy twin's linear: token rows 1..256 (a partial last 64-row group, zeros past M), K in one
split and in several (the reduce kernel), fp16 and bf16 (Hopper only). Its plan and its shape
checks run everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from engine.executor.ops.numpy_ops import NumpyOps

REF = NumpyOps()
TOL = {"float16": 2e-3, "bfloat16": 1e-2}  # relative L2 error vs the fp32 reference


def plan(m, n, k, sms=132):
    from engine.executor.ops.cuda_gemm_sm90 import gemm_plan

    return gemm_plan(m, n, k, sms)


def test_plan_rounds_rows_and_splits_k_for_few_blocks():
    assert plan(144, 28672, 4096) == (192, 1)  # 224 blocks: enough without splits
    assert plan(256, 4096, 14336) == (256, 4)  # Llama-3-8B's down: 32 blocks x 4
    assert plan(1, 6144, 4096) == (64, 2)  # qkv: 48 blocks x 2
    assert plan(16, 4096, 256) == (64, 1)  # 4 slices of K: one split each at least


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    from conftest import require_gpu

    cupy = require_gpu()
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the skinny GEMM is sm_90a code")
    from engine.executor.ops.cuda_ops import CudaOps

    return CudaOps(request.param)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,splits", [
    (1, 128, 64, None), (7, 256, 256, None), (64, 384, 1024, 1), (100, 384, 1024, 3),
    (144, 1024, 4096, None), (200, 512, 4096, 2), (256, 4096, 1024, None)])
def test_matches_the_twin(ops, m, n, k, splits):
    import cupy

    from engine.executor.ops.cuda_gemm_sm90 import skinny_gemm

    rng = np.random.default_rng(m + n + k)
    x = ops.from_host(rng.standard_normal((m, k)).astype(np.float32))
    w = ops.from_host((rng.standard_normal((n, k)) * k**-0.5).astype(np.float32))
    out = cupy.full((m, n), 0x7FFF, ops.storage)  # NaN bits: every output must be written
    skinny_gemm(x, w, out, ops.ctype, splits=splits)
    want = REF.linear(ops.to_host(x), ops.to_host(w))
    got = ops.to_host(out)
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < TOL[ops.dtype], err


@pytest.mark.gpu
def test_refuses_shapes_it_cannot_tile(ops):
    import cupy

    from engine.executor.ops.cuda_gemm_sm90 import skinny_gemm

    x, w = cupy.zeros((300, 64), ops.storage), cupy.zeros((128, 64), ops.storage)
    with pytest.raises(ValueError, match="1..256 rows"):
        skinny_gemm(x, w, cupy.zeros((300, 128), ops.storage), ops.ctype)
    with pytest.raises(ValueError, match="N % 128"):
        skinny_gemm(x[:8], w[:100], cupy.zeros((8, 100), ops.storage), ops.ctype)
