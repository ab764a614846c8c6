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


def test_a_pending_sum_is_spent_once_taken():
    """A fused kernel that takes the partial sums spends the PendingSum: resolving it after
    would hand out a product nobody wrote, so it raises instead."""
    from engine.executor.ops.cuda_gemm_sm90 import PendingSum

    pending = PendingSum(partial="partials", out="out", ctype="__nv_bfloat16")
    assert pending.take() == "partials"
    with pytest.raises(RuntimeError, match="already consumed"):
        pending.resolve()
    with pytest.raises(RuntimeError, match="already consumed"):
        pending.take()


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    from conftest import require_gpu

    cupy = require_gpu()
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the skinny GEMM is sm_90a code")
    from engine.executor.ops.cuda_ops import CudaOps

    return CudaOps(request.param)


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [1, 2])
@pytest.mark.parametrize("m,n,k,splits", [
    (1, 128, 64, None), (7, 256, 256, None), (64, 384, 1024, 1), (100, 384, 1024, 3),
    (144, 1024, 4096, None), (200, 512, 4096, 2), (256, 4096, 1024, None)])
def test_matches_the_twin(ops, m, n, k, splits, cluster):
    """cluster 2: pairs of blocks share x by multicast (an odd N / 128 falls back to 1)."""
    import cupy

    from engine.executor.ops.cuda_gemm_sm90 import skinny_gemm

    rng = np.random.default_rng(m + n + k)
    x = ops.from_host(rng.standard_normal((m, k)).astype(np.float32))
    w = ops.from_host((rng.standard_normal((n, k)) * k**-0.5).astype(np.float32))
    out = cupy.full((m, n), 0x7FFF, ops.storage)  # NaN bits: every output must be written
    skinny_gemm(x, w, out, ops.ctype, splits=splits, cluster=cluster)
    want = REF.linear(ops.to_host(x), ops.to_host(w))
    got = ops.to_host(out)
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < TOL[ops.dtype], err


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [1, 2])
@pytest.mark.parametrize("m,inter,k", [(1, 64, 64), (37, 192, 512), (144, 256, 4096),
                                       (256, 128, 1024)])
def test_glu_matches_the_twin(ops, m, inter, k, cluster):
    """skinny_glu: silu(x gate^T) * (x up^T) from [gate; up] in one kernel."""
    import cupy

    from engine.executor.ops.cuda_gemm_sm90 import skinny_glu

    rng = np.random.default_rng(m + inter + k)
    x = ops.from_host(rng.standard_normal((m, k)).astype(np.float32))
    gate_up = ops.from_host((rng.standard_normal((2 * inter, k)) * k**-0.5).astype(np.float32))
    out = cupy.full((m, inter), 0x7FFF, ops.storage)
    skinny_glu(x, gate_up, out, ops.ctype, cluster=cluster)
    want = REF.silu_and_mul(REF.linear(ops.to_host(x), ops.to_host(gate_up)))
    got = ops.to_host(out)
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < TOL[ops.dtype], err


@pytest.mark.gpu
def test_the_engine_takes_it_when_asked(ops, monkeypatch):
    """PAGEDSERVE_SKINNY_GEMM=1 (ENABLED): linear() and mlp() at 16..256 rows run it, and agree
    with cuBLAS's path."""
    import engine.executor.ops.cuda_gemm_sm90 as sk

    rng = np.random.default_rng(5)
    m, hidden, inter = 48, 256, 384
    x = ops.from_host(rng.standard_normal((m, hidden)).astype(np.float32))
    res = ops.from_host(rng.standard_normal((m, hidden)).astype(np.float32))
    norm = ops.from_host(rng.standard_normal(hidden).astype(np.float32))
    gate_up = ops.from_host((rng.standard_normal((2 * inter, hidden)) * 0.06).astype(np.float32))
    down = ops.from_host((rng.standard_normal((hidden, inter)) * 0.05).astype(np.float32))
    calls = []
    for name in ("skinny_gemm", "skinny_glu"):
        real = getattr(sk, name)
        monkeypatch.setattr(sk, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n)
                            or _r(*a, **kw))
    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(sk, "ENABLED", enabled)
        calls.clear()
        y, r = ops.mlp(x, ops.from_host(ops.to_host(res)), norm, 1e-5, gate_up, down)
        runs[enabled] = (ops.to_host(y), ops.to_host(r), list(calls))
    assert runs[False][2] == [] and runs[True][2] == ["skinny_glu", "skinny_gemm"]
    np.testing.assert_array_equal(runs[True][1], runs[False][1])  # the same residual
    err = np.linalg.norm(runs[True][0] - runs[False][0]) / np.linalg.norm(runs[False][0])
    assert err < TOL[ops.dtype], err


@pytest.mark.gpu
def test_a_deferred_sum_normed_in_one_launch_is_bit_identical(ops, monkeypatch):
    """linear(..., defer_sum=True) leaves a split product in partial sums; add_rms_norm reduces,
    adds and norms it in one launch, bit-identical to the reduce kernel then the norm; mlp and
    add_rms_norm_linear take it the same way."""
    import cupy

    import engine.executor.ops.cuda_gemm_sm90 as sk

    monkeypatch.setattr(sk, "ENABLED", True)
    rng = np.random.default_rng(9)
    m, k, n = 48, 1024, 512  # 4 blocks of 128 rows: K split 4 ways
    assert sk.gemm_plan(m, n, k, sk.num_sms())[1] > 1
    x = ops.from_host(rng.standard_normal((m, k)).astype(np.float32))
    w = ops.from_host((rng.standard_normal((n, k)) * k**-0.5).astype(np.float32))
    res_h = rng.standard_normal((m, n)).astype(np.float32)
    norm = ops.from_host(rng.standard_normal(n).astype(np.float32))
    pending = ops.linear(x, w, defer_sum=True)
    assert isinstance(pending, sk.PendingSum)
    res_fused = ops.from_host(res_h)
    h_fused, _ = ops.add_rms_norm(pending, res_fused, norm, 1e-5)
    res_plain = ops.from_host(res_h)
    whole = ops.linear(x, w)
    assert isinstance(whole, cupy.ndarray)
    h_plain, _ = ops.add_rms_norm(whole, res_plain, norm, 1e-5)
    np.testing.assert_array_equal(ops.to_host(res_fused), ops.to_host(res_plain))
    np.testing.assert_array_equal(ops.to_host(h_fused), ops.to_host(h_plain))
    # the ops that start with add_rms_norm take a PendingSum too
    q = ops.from_host((rng.standard_normal((256, n)) * 0.05).astype(np.float32))
    y, _ = ops.add_rms_norm_linear(ops.linear(x, w, defer_sum=True), ops.from_host(res_h),
                                   norm, 1e-5, q)
    np.testing.assert_array_equal(ops.to_host(y), ops.to_host(ops.linear(h_plain, q)))


@pytest.mark.gpu
def test_refuses_shapes_it_cannot_tile(ops):
    import cupy

    from engine.executor.ops.cuda_gemm_sm90 import skinny_gemm

    x, w = cupy.zeros((300, 64), ops.storage), cupy.zeros((128, 64), ops.storage)
    with pytest.raises(ValueError, match="1..256 rows"):
        skinny_gemm(x, w, cupy.zeros((300, 128), ops.storage), ops.ctype)
    with pytest.raises(ValueError, match="N % 128"):
        skinny_gemm(x[:8], w[:100], cupy.zeros((8, 100), ops.storage), ops.ctype)
