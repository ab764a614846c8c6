"""cuda/gguf.cu against its numpy twin (engine/model/gguf_quants.py), GPU only: dequantization bit
for bit in float32, the fused GEMV and the dequantize + cuBLAS path within bf16/fp16 rounding,
embeddings by row gather, and the ops' dispatch on QuantizedWeight."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import capture_and_replay, require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.executor.ops import cuda_quant_gguf as cq  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.model import gguf_dot  # noqa: E402
from engine.model import gguf_quants as gq  # noqa: E402
from engine.model.quantized import QuantizedWeight  # noqa: E402

TOL = {"float16": 3e-3, "bfloat16": 1.5e-2}  # relative L2 error vs the fp32 reference


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)


def weight(kind, rows, cols, seed=0, random_scales=True):
    host = gq.random_blocks(kind, (rows, cols), 0.02, np.random.default_rng(seed),
                            random_scales=random_scales)
    twin = gq.dequantize_gguf(QuantizedWeight(kind, (rows, cols), host))
    return QuantizedWeight(kind, (rows, cols), cupy.asarray(host)), twin


def rel(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# cols: 16-byte rows and rows that are not (Q4_1 at 576 is the default model's 360-byte rows)
@pytest.mark.parametrize("kind", gq.KINDS)
@pytest.mark.parametrize("blocks", [3, 8, 18])
def test_dequantize_is_the_twin_bit_for_bit(ops, kind, blocks):
    cols = blocks * gq.BLOCKS[kind][0]
    w, twin = weight(kind, 7, cols)
    got = cq.dequantize(w, ops.ctype, exact=True).get()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), twin.view(np.uint32))
    # in the compute type: the twin rounded once (what the prefill scratch holds)
    np.testing.assert_array_equal(ops.to_host(cq.dequantize(w, ops.ctype)),
                                  ops.to_host(ops.from_host(twin)))


@pytest.mark.parametrize("kind", gq.KINDS)
def test_embedding_dequantizes_the_gathered_rows(ops, kind):
    w, twin = weight(kind, 40, 2 * gq.BLOCKS[kind][0])
    ids = np.array([3, 39, 0, 3, 17], np.int32)
    got = cq.dequantize(w, ops.ctype, exact=True, ids=cupy.asarray(ids)).get()
    np.testing.assert_array_equal(got.view(np.uint32), twin[ids].view(np.uint32))
    np.testing.assert_array_equal(ops.to_host(ops.embedding(ids, w)),
                                  ops.to_host(ops.from_host(twin[ids])))


@pytest.mark.parametrize("kind", gq.KINDS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 33])
@pytest.mark.parametrize("blocks", [4, 18, 56])
def test_linear_matches_the_twin(ops, kind, m, blocks):
    """M <= 8 takes the fused GEMV, more rows dequantize + cuBLAS; odd rows (N = 37) and rows not
    on 16 bytes (blocks = 18 for the 32-value formats) included."""
    cols = blocks * gq.BLOCKS[kind][0]
    if cols > 8192:
        pytest.skip("enough with the K-quants at 4 and 18 blocks")
    w, twin = weight(kind, 37, cols, seed=m, random_scales=False)
    x_h = np.random.default_rng(m).standard_normal((m, cols)).astype(np.float32)
    x = ops.from_host(x_h)
    want = ops.to_host(x) @ twin.T
    assert (m <= cq.GGUF_GEMV_MAX_M) == cq.gemv_fits(x, w)
    if cq.gemv_fits(x, w) and cq.gemv_version(x, w) == "v3":  # x quantized: its own twin
        want = gguf_dot.linear(ops.to_host(x), QuantizedWeight(kind, w.shape, w.data.get()))
    got = ops.to_host(ops.linear(x, w))
    assert rel(got, want) < TOL[ops.dtype]


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0"])
@pytest.mark.parametrize("m, rows, cols", [(m, 37, k) for m in (1, 2, 3, 8) for k in (2048, 6144)]
                         + [(1, 5000, 2048), (3, 5000, 2048)])
def test_gemv_v2_matches_the_twin(ops, kind, m, rows, cols):
    """The second GEMV (x staged per block, K in steps of 2048): odd N, several steps per row,
    and more rows than the grid has warps (each warp then takes several rows)."""
    assert cq.gemv2_fits(kind, 8 if m > 4 else m, cols)
    w, twin = weight(kind, rows, cols, seed=m, random_scales=False)
    x = ops.from_host(np.random.default_rng(m).standard_normal((m, cols)).astype(np.float32))
    want = ops.to_host(x) @ twin.T
    for version, rows2 in (("v2", 1), ("v2", 2), ("v1", None)):
        if rows2 == 2 and (kind != "Q4_K" or m != 1):
            continue  # Q4_K's 2 weight rows per warp are compiled for M = 1
        out = cupy.full((m, rows), np.nan, ops.storage)
        got = ops.to_host(cq.gemv(x, w, out, ops.ctype, version=version, rows2=rows2))
        assert rel(got, want) < TOL[ops.dtype], (version, rows2)


def test_linear_takes_the_gemv_auto_picks(ops, monkeypatch):
    """auto (PAGEDSERVE_GGUF_GEMV unset): v3 where GEMV3_AUTO_MAX_M has the kind, else v2 where
    GEMV2_AUTO_MAX_M has it, else v1."""
    monkeypatch.setattr(cq, "GEMV_KERNEL", "auto")
    w, twin = weight("Q4_K", 64, 4096, random_scales=False)
    x = ops.from_host(np.random.default_rng(3).standard_normal((1, 4096)).astype(np.float32))
    version = cq.gemv_version(x, w)
    assert version == ("v3" if cq.GEMV3_AUTO_MAX_M.get("Q4_K", 0) >= 1 else "v2")
    got = ops.to_host(ops.linear(x, w))
    out = cupy.empty((1, 64), ops.storage)
    np.testing.assert_array_equal(got, ops.to_host(cq.gemv(x, w, out, ops.ctype,
                                                           version=version)))
    assert rel(got, ops.to_host(x) @ twin.T) < 3e-2
    assert not cq.gemv2_fits("Q4_K", 1, 4096 + 256) and not cq.gemv2_fits("Q6_K", 1, 4096)


@pytest.mark.parametrize("kind, m", [("Q4_K", 1), ("Q8_0", 1), ("Q4_K", 3), ("Q8_0", 8)])
def test_gemv_v2_fuses_the_norm(ops, monkeypatch, kind, m):
    """add_rms_norm_linear in one launch at M = 1 (the unfused ops above): the GEMV of what the
    unfused ops hand it (the sum and the norm rounded to the dtype where rms_norm.cu rounds
    them)."""
    monkeypatch.setattr(cq, "GEMV_KERNEL", "v2")
    rng = np.random.default_rng(m)
    w, _ = weight(kind, 300, 2048, random_scales=False)
    x, r, g = (ops.from_host(rng.standard_normal(s).astype(np.float32))
               for s in ((m, 2048), (m, 2048), (2048,)))
    r_copy = r.copy()
    for residual in (r, None):
        y, res = ops.add_rms_norm_linear(x, residual, g, 1e-5, w)
        h, res_ref = ops.add_rms_norm(x, None if residual is None else r_copy.copy(), g, 1e-5)
        np.testing.assert_array_equal(ops.to_host(res), ops.to_host(res_ref))
        y_ref = cq.gemv(h, w, cupy.empty_like(y), ops.ctype, version="v2")
        # the norm's sum may round differently in its last bit: at most an ulp of a few inputs
        assert rel(ops.to_host(y), ops.to_host(y_ref)) < 1e-3


def test_fused_ops_take_quantized_weights(ops):
    """add_rms_norm_linear and silu_mul_linear: the unfused ops then the quantized linear."""
    from engine.executor.ops.numpy_ops import NumpyOps

    ref = NumpyOps()
    rng = np.random.default_rng(5)
    w, twin = weight("Q4_K", 64, 512, random_scales=False)
    x_h, r_h, n_h = (rng.standard_normal(s).astype(np.float32) for s in ((2, 512), (2, 512),
                                                                       (512,)))
    y, res = ops.add_rms_norm_linear(ops.from_host(x_h), ops.from_host(r_h), ops.from_host(n_h),
                                     1e-5, w)
    y_ref, res_ref = ref.add_rms_norm_linear(x_h, r_h, n_h, 1e-5, twin)
    assert rel(ops.to_host(y), y_ref) < TOL[ops.dtype]
    assert rel(ops.to_host(res), res_ref) < TOL[ops.dtype]
    gate_up = rng.standard_normal((3, 1024)).astype(np.float32)
    got = ops.to_host(ops.silu_mul_linear(ops.from_host(gate_up), w))
    assert rel(got, ref.silu_mul_linear(gate_up, twin)) < TOL[ops.dtype]


def test_large_weights_go_through_the_scratch_in_passes(ops, monkeypatch):
    monkeypatch.setattr(cq, "SCRATCH_ELEMS", 10 * 256)  # 10 rows of 256 per pass
    w, twin = weight("Q6_K", 37, 256, random_scales=False)
    x_h = np.random.default_rng(1).standard_normal((12, 256)).astype(np.float32)
    x = ops.from_host(x_h)
    got = ops.to_host(cq.GGUFLinear(ops).linear(x, w))
    assert rel(got, ops.to_host(x) @ twin.T) < TOL[ops.dtype]


@pytest.mark.parametrize("version, cols", [("v1", 256), ("v2", 2048)])
def test_linear_is_capturable_in_a_cuda_graph(ops, monkeypatch, version, cols):
    """Decode steps replay graphs: the GEMV and the scratch path launch nothing that syncs."""
    monkeypatch.setattr(cq, "GEMV_KERNEL", version)
    w, twin = weight("Q8_0", 64, cols, random_scales=False)
    for m in (1, 16):
        x = ops.from_host(np.random.default_rng(m).standard_normal((m, cols)).astype(np.float32))
        eager = ops.to_host(ops.linear(x, w))  # grows the scratch before the capture
        out = capture_and_replay(lambda x=x: ops.linear(x, w))
        np.testing.assert_array_equal(ops.to_host(out), eager)
