"""The batch-1 GEMV's PRE form (cuda_gemv.GEMV_PREFETCH_X, cuda/gemv.cu) on the GPU: the same bits
as the default kernel in each fusion (plain, add + norm, SiLU-and-mul, both), with and without a
residual, K in one pass of the block and in several; and its numpy twin's values."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_device_memory")]
cupy = require_gpu()

from test_cuda_ops import TOL, randn, rel_err, upload  # noqa: E402

from engine.executor.ops import cuda_gemv  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402

REF = NumpyOps()


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)


def both(monkeypatch, fn):
    """fn() with the default kernel, then with PRE: (default, prefetched) host arrays."""
    out = []
    for pre in (False, True):
        monkeypatch.setattr(cuda_gemv, "GEMV_PREFETCH_X", pre)
        got = fn()
        out.append(tuple(cupy.asnumpy(a) for a in got) if isinstance(got, tuple)
                   else cupy.asnumpy(got))
    return out


# K: 8 (one word), 1000 (64 threads, the second word of some threads only), 1024 (Qwen3-0.6B),
# 3072 (256 threads, a partial second word), 4096 (one full pass), 14336 (four passes)
@pytest.mark.parametrize("k", [8, 1000, 1024, 3072, 4096, 14336])
def test_plain_gemv_same_bits(ops, monkeypatch, k):
    rng = np.random.default_rng(k)
    n = 1003  # the last block has 3 rows
    x, x_h = upload(ops, randn(1, k, rng=rng))
    w, w_h = upload(ops, randn(n, k, rng=rng, scale=k**-0.5))
    old, new = both(monkeypatch, lambda: cuda_gemv.gemv(x, w, cupy.empty((1, n), x.dtype),
                                                        ops.ctype))
    np.testing.assert_array_equal(new, old)
    assert rel_err(ops.to_host(new), REF.linear(x_h, w_h)) < TOL[ops.dtype]


@pytest.mark.parametrize("k", [1000, 1024, 4096, 14336])
@pytest.mark.parametrize("first", [True, False])  # first layer: no residual
@pytest.mark.parametrize("glu", [False, True])
def test_norm_gemv_same_bits(ops, monkeypatch, k, first, glu):
    rng = np.random.default_rng(k + glu)
    n = 2 * 515 if glu else 1001
    x, x_h = upload(ops, randn(1, k, rng=rng))
    res, res_h = (None, None) if first else upload(ops, randn(1, k, rng=rng))
    nw, nw_h = upload(ops, randn(k, rng=rng))
    w, w_h = upload(ops, randn(n, k, rng=rng, scale=k**-0.5))
    (y0, r0), (y1, r1) = both(monkeypatch, lambda: cuda_gemv.norm_gemv(
        x, res, nw, w, 1e-6, ops.ctype, glu=glu))
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(r1, r0)
    want_y, want_res = REF.add_rms_norm_linear(x_h, res_h, nw_h, 1e-6, w_h)
    want_y = REF.silu_and_mul(want_y) if glu else want_y
    assert rel_err(ops.to_host(y1), want_y) < TOL[ops.dtype]
    assert rel_err(ops.to_host(r1), want_res) < TOL[ops.dtype]


def test_glu_gemv_same_bits(ops, monkeypatch):
    rng = np.random.default_rng(3)
    k, inter = 1024, 1540
    x, x_h = upload(ops, randn(1, k, rng=rng))
    gu, gu_h = upload(ops, randn(2 * inter, k, rng=rng, scale=k**-0.5))
    old, new = both(monkeypatch, lambda: cuda_gemv.glu_gemv(x, gu, ops.ctype))
    np.testing.assert_array_equal(new, old)
    assert rel_err(ops.to_host(new), REF.silu_and_mul(REF.linear(x_h, gu_h))) < TOL[ops.dtype]


def test_linear_takes_it_at_one_row_only(ops, monkeypatch):
    """linear() with the switch on: the PRE kernel at one row, the default at two (PRE is
    compiled for M = 1 only); both equal the twin."""
    rng = np.random.default_rng(5)
    names = []
    original = cuda_gemv.kernel

    def recording(file, name, ctype="float"):
        names.append(name)
        return original(file, name, ctype)

    monkeypatch.setattr(cuda_gemv, "kernel", recording)
    monkeypatch.setattr(cuda_gemv, "GEMV_PREFETCH_X", True)
    w, w_h = upload(ops, randn(512, 1024, rng=rng, scale=1024**-0.5))
    for m in (1, 2):
        x, x_h = upload(ops, randn(m, 1024, rng=rng))
        assert rel_err(ops.to_host(ops.linear(x, w)), REF.linear(x_h, w_h)) < TOL[ops.dtype]
    assert names == [f"gemv_kernel<{ops.ctype}, 1, false, false, true>",
                     f"gemv_kernel<{ops.ctype}, 2, false, false, false>"]
