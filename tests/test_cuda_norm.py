"""What PAGEDSERVE_NORM_VEC (on by default) turns on (engine/executor/ops/cuda_norm.py), GPU only:
the 16-byte RMSNorm against the numpy twin and the scalar kernel at Qwen3 / Llama widths and odd
ones, the row gather, and NORM_W_EARLY in the GGUF GEMVs and the q/k norm + RoPE + KV kernel
(bit-identical to without).

    python -m pytest -q -m gpu tests/test_cuda_norm.py
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_device_memory")]
cupy = require_gpu()

from test_cuda_ops import rel_err, upload  # noqa: E402

from engine.executor.ops import cuda_kernels, cuda_norm  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402

TOL = {"float16": 2e-3, "bfloat16": 1e-2}  # relative L2 error vs the fp32 reference
REF = NumpyOps()
EPS = 1e-6


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)


@pytest.fixture
def vec_on(monkeypatch):
    monkeypatch.setattr(cuda_norm, "NORM_VEC", True)




def ulps(a, b) -> np.ndarray:
    """|a - b| in units in the last place of the 16-bit dtype (same-sign values)."""
    ia = cupy.asnumpy(a).view(np.int16).astype(np.int32)
    ib = cupy.asnumpy(b).view(np.int16).astype(np.int32)
    return np.abs(ia - ib)


def run(ops, x, residual, w, mode, vec):
    out = cupy.empty_like(x)
    cuda_norm.rms_norm(out, residual, x, w, EPS, mode, ops.ctype, vec=vec)
    return out


# 1004 and 12: not a multiple of 8 (scalar fallback); 16392 > 8 * 4 * 512 (scalar fallback);
# 4104 and 2056: a partial last warp; 24: a block of one short warp
@pytest.mark.parametrize("hidden", [24, 1004, 1024, 2056, 4096, 4104, 5120, 8192, 16384, 16392,
                                    12])
@pytest.mark.parametrize("rows", [1, 37])
def test_vec_norm_matches_twin_and_scalar_kernel(ops, hidden, rows):
    rng = np.random.default_rng(hidden + rows)
    x, x_h = upload(ops, rng.standard_normal((rows, hidden)) * 3)
    r, r_h = upload(ops, rng.standard_normal((rows, hidden)))
    w, w_h = upload(ops, rng.standard_normal(hidden))
    for mode in (0, 1, 2):
        outs, residuals = [], []
        for vec in (False, True):
            res = None if mode == 0 else cupy.empty_like(x) if mode == 1 else r.copy()
            outs.append(run(ops, x, res, w, mode, vec))
            residuals.append(res)
        want_res = x_h if mode < 2 else REF.add_rms_norm(x_h, r_h, w_h, EPS)[1]
        want = REF.rms_norm(x_h if mode < 2 else ops.to_host(residuals[1]), w_h, EPS)
        assert rel_err(ops.to_host(outs[1]), want) < TOL[ops.dtype], mode
        # the same per-element arithmetic: only the sum of squares' order differs
        assert ulps(outs[1], outs[0]).max() <= 1, mode
        if mode:
            np.testing.assert_array_equal(cupy.asnumpy(residuals[1]), cupy.asnumpy(residuals[0]))
            assert rel_err(ops.to_host(residuals[1]), want_res) < TOL[ops.dtype]


def test_ops_take_the_vector_kernel_when_switched_on(ops, vec_on, monkeypatch):
    names = []
    real = cuda_norm.kernel
    monkeypatch.setattr(cuda_norm, "kernel", lambda f, n, c: names.append(n) or real(f, n, c))
    x, x_h = upload(ops, np.random.default_rng(0).standard_normal((5, 1024)))
    w, w_h = upload(ops, np.ones(1024))
    out, res = ops.add_rms_norm(x, None, w, EPS)
    np.testing.assert_array_equal(ops.to_host(res), x_h)
    assert rel_err(ops.to_host(out), REF.rms_norm(x_h, w_h, EPS)) < TOL[ops.dtype]
    assert names == [f"rms_norm_vec_kernel<{ops.ctype}, 1>"]
    # a row that is not 16-byte aligned (a view 1 element in) takes the scalar kernel
    flat, flat_h = upload(ops, np.random.default_rng(1).standard_normal(5 * 1024 + 1))
    x2, x2_h = flat[1:].reshape(5, 1024), flat_h[1:].reshape(5, 1024)
    out, res = ops.add_rms_norm(x2, res, w, EPS)
    want_out, want_res = REF.add_rms_norm(x2_h, x_h, w_h, EPS)
    assert rel_err(ops.to_host(out), want_out) < TOL[ops.dtype]
    assert rel_err(ops.to_host(res), want_res) < TOL[ops.dtype]
    assert names[-1] == f"rms_norm_kernel<{ops.ctype}>"


def test_gather_with_wide_blocks(ops, vec_on):
    rng = np.random.default_rng(2)
    for width in (8, 256, 4096, 8200):  # 1, 32, 512 and 1025 words a row (blocks of <= 512)
        table, table_h = upload(ops, rng.standard_normal((300, width)))
        ids = rng.integers(0, 300, 19).astype(np.int32)
        np.testing.assert_array_equal(ops.to_host(ops.embedding(ids, table)), table_h[ids])


def test_vec_norm_chain_is_the_same_with_pdl(ops, vec_on, monkeypatch):
    """Eight add + norms, each reading the previous one's output and residual, launched as
    programmatic dependent launches on a stream: bit-identical to plain launches (the weight is
    read before the PDL wait, everything else after)."""
    if cuda_kernels._launch_ex() is None:
        pytest.skip("no PDL on this GPU / driver (sm_90+ wanted)")
    rng = np.random.default_rng(3)
    x0, _ = upload(ops, rng.standard_normal((16, 4096)))
    ws = [upload(ops, rng.standard_normal(4096))[0] for _ in range(8)]
    ids = cupy.asarray(rng.integers(0, 16, 16).astype(np.int32))
    results = []
    for on in (False, True):
        monkeypatch.setattr(cuda_kernels, "PDL", on)
        stream = cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.Device().synchronize()
        with stream, cuda_kernels.programmatic_launches():
            h, res = ops.embedding(ids, x0), None
            for w in ws:
                h, res = ops.add_rms_norm(h, res, w, EPS)
        stream.synchronize()
        results.append((cupy.asnumpy(h), cupy.asnumpy(res)))
    for got, want in zip(results[1], results[0], strict=True):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ GGUF fused norm


def _gguf_weight(kind, rows, cols):
    from engine.model import gguf_quants as gq
    from engine.model.quantized import QuantizedWeight

    host = gq.random_blocks(kind, (rows, cols), 0.02, np.random.default_rng(rows + cols))
    return QuantizedWeight(kind, (rows, cols), cupy.asarray(host))


def _both_ways(monkeypatch, fn):
    """fn() with cuda_norm.NORM_VEC off, then on (NORM_W_EARLY in the GGUF GEMVs), on the host."""
    got = []
    for on in (False, True):
        monkeypatch.setattr(cuda_norm, "NORM_VEC", on)
        got.append([cupy.asnumpy(a) for a in fn()])
    return got


@pytest.mark.parametrize("k", [2048, 4096, 6144])  # 6144: two passes, the weight loaded late
def test_gguf_x_quantization_with_the_norm_weight_early_is_the_same(ops, monkeypatch, k):
    from engine.executor.ops import cuda_quant_gguf as cq

    rng = np.random.default_rng(k)
    x, r = (upload(ops, rng.standard_normal((1, k)))[0] for _ in range(2))
    g = upload(ops, rng.uniform(0.5, 2, k))[0]
    late, early = _both_ways(monkeypatch, lambda: cq.quantize_x(x, ops.ctype, r, g, 1e-5))
    for a, b in zip(early, late, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("version, kind, big", [("v3", "Q4_K", False), ("v3", "Q4_K", True),
                                                ("v3", "Q8_0", False), ("v3", "Q8_0", True),
                                                ("v3", "Q6_K", True), ("v2", "Q4_K", None),
                                                ("v2", "Q8_0", None)])
def test_gguf_gemv_with_the_norm_weight_early_is_the_same(ops, monkeypatch, version, kind, big):
    """The fused add + norm GEMVs (gguf.cu v2, gguf_dp4a.cu v3) at M = 1, K = 4096 (one pass):
    bit-identical output and residual with the norm weight loaded early."""
    from engine.executor.ops import cuda_quant_gguf as cq

    monkeypatch.setattr(cq, "GEMV_KERNEL", version)
    monkeypatch.setattr(cq, "GEMV3_BIG", big)
    rng = np.random.default_rng(11)
    w = _gguf_weight(kind, 300, 4096)
    x, r = (upload(ops, rng.standard_normal((1, 4096)))[0] for _ in range(2))
    g = upload(ops, rng.uniform(0.5, 2, 4096))[0]
    for residual in (r, None):
        late, early = _both_ways(monkeypatch, lambda residual=residual: ops.add_rms_norm_linear(
            x, None if residual is None else residual.copy(), g, 1e-5, w))
        for a, b in zip(early, late, strict=True):
            np.testing.assert_array_equal(a, b)
        h, _ = ops.add_rms_norm(x, None if residual is None else residual.copy(), g, 1e-5)
        want = cq.gemv(h, w, cupy.empty((1, 300), ops.storage), ops.ctype, version=version)
        assert rel_err(ops.to_host(cupy.asarray(early[0])), ops.to_host(want)) < 2e-3


# ------------------------------------------------------------------ q/k norm + RoPE + KV write


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("variant", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("tokens", [1, 13])
def test_qk_rope_kv_with_weights_early_is_the_same(ops, monkeypatch, head_dim, variant, tokens):
    """NORM_W_EARLY (norm weights and bias before the PDL wait, cos/sin with the qkv row):
    q, k, v and both caches bit for bit the kernel's without it, and the twin's to rounding;
    fp32 and compute-dtype cos/sin tables; a slot of -1 stores nothing."""
    from engine.executor.transformer import rope_cos_sin
    from engine.model.config import ModelConfig

    rng = np.random.default_rng(head_dim + tokens)
    nh, nkv, bs, num_blocks = 8, 2, 16, 4
    width = (nh + 2 * nkv) * head_dim
    cos_sin = rope_cos_sin(ModelConfig("LlamaForCausalLM", 1, 64, 64, 1, 1, 1, head_dim,
                                       rope_theta=1e6), 4096)
    positions = rng.integers(0, 4096, tokens).astype(np.int32)
    slots = rng.permutation(num_blocks * bs)[:tokens].astype(np.int32)
    slots[-1] = -1
    qkv, qkv_h = upload(ops, rng.standard_normal((tokens, width)))
    norm = variant == "qwen3"
    qw, qw_h = upload(ops, rng.standard_normal(head_dim)) if norm else (None, None)
    kw, kw_h = upload(ops, rng.standard_normal(head_dim)) if norm else (None, None)
    bias, bias_h = (upload(ops, rng.standard_normal(width)) if variant == "qwen2"
                    else (None, None))
    cache, cache_h = upload(ops, rng.standard_normal((2, num_blocks, nkv, bs, head_dim)))
    want, k_h, v_h = qkv_h.copy(), cache_h[0].copy(), cache_h[1].copy()
    REF.qk_norm_rope_kv_write(want, positions, cos_sin, qw_h, kw_h, 1e-6, k_h, v_h, slots, nh,
                              nkv, bias=bias_h)
    for table in (cupy.asarray(cos_sin), ops.from_host(cos_sin)):
        def run_once(table=table):
            got, c = qkv.copy(), cache.copy()
            ops.qk_norm_rope_kv_write(got, positions, table, qw, kw, 1e-6, c[0], c[1], slots,
                                      nh, nkv, bias=bias)
            return got, c
        late, early = _both_ways(monkeypatch, run_once)
        for a, b in zip(early, late, strict=True):
            np.testing.assert_array_equal(a, b)
        got = ops.to_host(cupy.asarray(early[0]))
        kv = (nh + nkv) * head_dim  # q and k rotated; v as stored (with its bias)
        assert rel_err(got[:, :kv], want[:, :kv]) < 2 * TOL[ops.dtype]
        c = ops.to_host(cupy.asarray(early[1]))
        assert rel_err(c[0], k_h) < 2 * TOL[ops.dtype]
        assert rel_err(c[1], v_h) < TOL[ops.dtype]
