"""The experimental Hopper prefill kernel (attention_prefill_sm90.cu: S = Q K^T on wgmma) against
the numpy twin, each compiled variant, fp16 and bf16 (GPU only; skipped below compute 9.0). Its
own file, run after tests/test_cuda_prefill.py: a fault here must not hide the others' results."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from test_cuda_prefill import CASES, TOL, batch  # noqa: E402

from engine.executor.ops import cuda_prefill as cpf  # noqa: E402
from engine.executor.ops.cuda_kernels import SM90_CONFIGS  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402

REF = NumpyOps()

if cupy.cuda.Device().compute_capability != "90":
    pytest.skip("wgmma needs an sm_90 GPU", allow_module_level=True)


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_sm90_prefill_matches_the_twin(ops, case):
    nh, nkv, hd, bs, num_new, ctx = CASES[case]
    rng = np.random.default_rng(len(case))
    meta, num_blocks = batch(rng, num_new, ctx, bs)
    cache = ops.from_host(rng.standard_normal((2, num_blocks, nkv, bs, hd)).astype(np.float32))
    qkv = ops.from_host(rng.standard_normal((sum(num_new), (nh + 2 * nkv) * hd)).astype(
        np.float32))
    cache_h, qkv_h = ops.to_host(cache), ops.to_host(qkv)
    want = REF.attention(qkv_h, cache_h[0], cache_h[1], meta, nh, nkv, hd**-0.5)
    saved = cpf.PREFILL_KERNEL, cpf.PREFILL_CONFIG
    try:
        for config in SM90_CONFIGS:
            cpf.PREFILL_KERNEL, cpf.PREFILL_CONFIG = "sm90", config
            dmeta = ops.prepare_metadata(meta)
            got = ops.to_host(ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5))
            assert dmeta.work[nh // nkv].prefill_kernel == "sm90"
            assert np.isfinite(got).all(), f"{config}: NaN/inf"
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert err < TOL[ops.dtype], f"{config}: relative error {err:.2e}"
    finally:
        cpf.PREFILL_KERNEL, cpf.PREFILL_CONFIG = saved
