"""cuda/gguf_dp4a.cu (GEMV v3: x quantized to int8, integer dot products) against its numpy twin
engine/model/gguf_dot.py, GPU only: x's quantization bit for bit, the GEMV to the output's
rounding, the fused add + norm, and CUDA-graph capture."""

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

# relative L2 error vs the twin: the output's rounding (the integer products are exact)
TWIN_TOL = {"float16": 1e-3, "bfloat16": 6e-3}
FLOAT_TOL = 3e-2  # vs x (unquantized) times the dequantized weight: x's int8 step


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)


def weight(kind, rows, cols, seed=0):
    host = gq.random_blocks(kind, (rows, cols), 0.02, np.random.default_rng(seed))
    return QuantizedWeight(kind, (rows, cols), cupy.asarray(host)), QuantizedWeight(
        kind, (rows, cols), host)


def rel(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("m, cols", [(1, 2048), (3, 6144), (8, 2048), (2, 14336)])
def test_x_quantization_is_the_twin_bit_for_bit(ops, m, cols):
    rng = np.random.default_rng(m)
    x_h = rng.standard_normal((m, cols)).astype(np.float32) * rng.uniform(0.1, 10, (m, 1))
    x_h[0, 32:64] = 0  # a block of zeros: scale 0, quants 0
    x_h[0, 64:96] = 0.5  # ties: x * 127 / amax lands on .5 and rounds to even
    x_h[0, 64:96:3] = -1.0
    x = ops.from_host(x_h)
    q, dx, sums, _ = cq.quantize_x(x, ops.ctype)
    want = gguf_dot.quantize_x(ops.to_host(x))
    np.testing.assert_array_equal(q.get(), want[0])
    np.testing.assert_array_equal(dx.get().view(np.uint32), want[1].view(np.uint32))
    np.testing.assert_array_equal(sums.get(), want[2])


def test_nan_or_inf_in_x_makes_its_row_nan_as_the_twin(ops, monkeypatch):
    """fmaxf dropped a NaN of x from its group's amax: the NaN quantized to 0 in a group of
    finite dx and the row's products came out finite where the twin's (and the float GEMVs') are
    NaN (after an fp16 overflow the norm hands the GEMV NaN and zeros: y was all zeros). A group
    holding a NaN (an inf) has dx NaN (inf) and q 0, as gguf_dot.quantize_x: the row is NaN."""
    x_h = np.random.default_rng(5).standard_normal((3, 2048)).astype(np.float32)
    x_h[0, 40] = np.nan  # row 0, group 1
    x_h[1, 100] = -np.inf  # row 1, group 3
    x = ops.from_host(x_h)
    q, dx, sums, _ = cq.quantize_x(x, ops.ctype)
    want = gguf_dot.quantize_x(ops.to_host(x))
    assert np.isnan(want[1][0, 1]) and want[1][1, 3] == np.inf
    np.testing.assert_array_equal(q.get(), want[0])
    np.testing.assert_array_equal(dx.get(), want[1])  # NaN where the twin's is NaN
    np.testing.assert_array_equal(sums.get(), want[2])
    for kind in ("Q4_K", "Q8_0", "Q6_K"):
        w, host = weight(kind, 37, 2048)
        got = ops.to_host(cq.gemv(x, w, cupy.empty((3, 37), ops.storage), ops.ctype,
                                  version="v3"))
        twin = gguf_dot.linear(ops.to_host(x), host)
        assert np.isnan(twin[:2]).all() and np.isnan(got[:2]).all(), kind
        assert rel(got[2], twin[2]) < TWIN_TOL[ops.dtype], kind
        # the lm_head's two-term x (v3x2): the float product's NaN too
        w.quantize_x = False
        monkeypatch.setattr(cq, "GEMV3_X2", True)
        assert cq.gemv_version(x[:1], w) == "v3x2"
        assert np.isnan(ops.to_host(ops.linear(x[:1], w))).all(), kind


def test_x_quantization_with_the_fused_norm(ops):
    """The fused add + norm rounds where rms_norm.cu rounds: q is the twin's of what the unfused
    ops hand the GEMV, up to 1 where the norm's sum rounds differently in its last bit."""
    rng = np.random.default_rng(7)
    x, r = (ops.from_host(rng.standard_normal((1, 4096)).astype(np.float32)) for _ in range(2))
    g = ops.from_host(rng.uniform(0.5, 2, 4096).astype(np.float32))
    q, dx, _, res = cq.quantize_x(x, ops.ctype, r, g, 1e-5)
    h, res_ref = ops.add_rms_norm(x, r.copy(), g, 1e-5)
    np.testing.assert_array_equal(ops.to_host(res), ops.to_host(res_ref))
    want = gguf_dot.quantize_x(ops.to_host(h))
    diff = np.abs(q.get().astype(np.int32) - want[0])
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 8
    np.testing.assert_allclose(dx.get(), want[1], rtol=1e-6)


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("m, rows, cols", [(m, 37, k) for m in (1, 2, 3, 8) for k in (2048, 6144)]
                         + [(1, 5000, 2048), (4, 5000, 2048), (1, 96, 14336)])
def test_gemv_v3_matches_the_twin(ops, kind, m, rows, cols):
    """Odd N, several steps per row, more rows than the grid has warps."""
    assert cq.gemv3_fits(kind, 8 if m > 4 else m, cols)
    w, host = weight(kind, rows, cols, seed=m)
    x = ops.from_host(np.random.default_rng(m).standard_normal((m, cols)).astype(np.float32))
    assert cq.gemv_version(x, w, "v3") == "v3"
    x_h = ops.to_host(x)
    for big in (False, True) if m == 1 else (False,):  # one block per SM (cq.use_big)
        out = cupy.full((m, rows), np.nan, ops.storage)
        got = ops.to_host(cq.gemv(x, w, out, ops.ctype, version="v3", big=big))
        assert rel(got, gguf_dot.linear(x_h, host)) < TWIN_TOL[ops.dtype], big
        assert rel(got, x_h @ gq.dequantize_gguf(host).T) < FLOAT_TOL


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0"])
def test_gemv_v3_fill_grid_is_the_even_grid_bit_for_bit(ops, monkeypatch, kind):
    """PAGEDSERVE_GGUF_V3_GRID=fill launches more blocks (every resident slot); each row is
    still one warp's, summed in the same order."""
    w, _ = weight(kind, 4096, 14336)
    x = ops.from_host(np.random.default_rng(3).standard_normal((1, 14336)).astype(np.float32))
    got = {}
    for grid in ("even", "fill"):
        monkeypatch.setattr(cq, "GEMV3_GRID", grid)
        cq._gemv3_config.cache_clear()
        got[grid] = ops.to_host(cq.gemv(x, w, cupy.full((1, 4096), np.nan, ops.storage),
                                        ops.ctype, version="v3", big=True))
    cq._gemv3_config.cache_clear()
    np.testing.assert_array_equal(got["fill"], got["even"])


@pytest.mark.parametrize("kind, rows, cols, big", [("Q4_K", 4096, 14336, True),
                                                    ("Q8_0", 4096, 4096, False),
                                                    ("Q6_K", 1000, 6144, True)])
def test_gemv_v3_split_matches_the_twin(ops, kind, rows, cols, big):
    """SPLIT (PAGEDSERVE_GGUF_V3_SPLIT): a block's warps share its rows' loads, each row's sums
    added in order: the twin up to the output's rounding, the same bits run after run; taken
    where its warps read fewer loads than under the plain grid (Llama-3-8B's Q4_K down)."""
    w, host = weight(kind, rows, cols, seed=5)
    x = ops.from_host(np.random.default_rng(4).standard_normal((1, cols)).astype(np.float32))
    warps = cq.GGUF_GEMV3_BIG[kind] if big else cq.GEMV3_WARPS
    plain = f"gguf_gemv3_kernel<G3_{kind}, {ops.ctype}, 1, false, {warps}, false>"
    split = plain[:-1] + ", false, true>"
    blocks, _ = cq._gemv3_split_config(split, plain, ops.ctype, kind, rows, cols, warps)
    if kind == "Q4_K":
        assert blocks > 0
    runs = [ops.to_host(cq.gemv3(x, w, cupy.full((1, rows), np.nan, ops.storage), ops.ctype,
                                 big=big, split=True)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert rel(runs[0], gguf_dot.linear(ops.to_host(x), host)) < TWIN_TOL[ops.dtype]
    unsplit = ops.to_host(cq.gemv3(x, w, cupy.empty((1, rows), ops.storage), ops.ctype, big=big,
                                   split=False))
    assert rel(runs[0], unsplit) < TWIN_TOL[ops.dtype]


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("big", [False, True])
def test_gemv_v3_fuses_the_norm(ops, monkeypatch, kind, big):
    monkeypatch.setattr(cq, "GEMV_KERNEL", "v3")
    monkeypatch.setattr(cq, "GEMV3_BIG", big)
    rng = np.random.default_rng(1)
    w, _ = weight(kind, 300, 4096)
    x, r, g = (ops.from_host(rng.standard_normal(s).astype(np.float32))
               for s in ((1, 4096), (1, 4096), (4096,)))
    for residual in (r, None):
        y, res = ops.add_rms_norm_linear(x, residual, g, 1e-5, w)
        h, res_ref = ops.add_rms_norm(x, None if residual is None else r.copy(), g, 1e-5)
        np.testing.assert_array_equal(ops.to_host(res), ops.to_host(res_ref))
        y_ref = cq.gemv(h, w, cupy.empty_like(y), ops.ctype, version="v3")
        assert rel(ops.to_host(y), ops.to_host(y_ref)) < 2e-3


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("big", [False, True])
def test_gemv_v3_glu_is_the_unfused_ops_bit_for_bit(ops, monkeypatch, kind, big):
    """add + norm + gate_up + SiLU in one launch: the fused-norm GEMV, then silu_and_mul."""
    monkeypatch.setattr(cq, "GEMV_KERNEL", "v3")
    monkeypatch.setattr(cq, "GEMV3_BIG", big)
    rng = np.random.default_rng(2)
    w, _ = weight(kind, 2 * 300, 2048)
    x, r, g = (ops.from_host(rng.standard_normal(s).astype(np.float32))
               for s in ((1, 2048), (1, 2048), (2048,)))
    gl = cq.GGUFLinear(ops)
    assert gl.add_rms_norm_glu(x, r, g, 1e-5, w) is None or cq.GEMV3_GLU  # off by default
    act, res = gl.add_rms_norm_glu(x, r, g, 1e-5, w, glu=True)
    y, res_ref = gl.add_rms_norm_linear(x, r, g, 1e-5, w)
    np.testing.assert_array_equal(ops.to_host(res), ops.to_host(res_ref))
    np.testing.assert_array_equal(ops.to_host(act), ops.to_host(ops.silu_and_mul(y)))
    assert gl.add_rms_norm_glu(ops.from_host(np.ones((2, 2048), np.float32)), None, g, 1e-5, w,
                               glu=True) is None  # one row only


def test_mlp_takes_the_glu_gemv(ops, monkeypatch):
    monkeypatch.setattr(cq, "GEMV_KERNEL", "v3")
    monkeypatch.setattr(cq, "GEMV3_GLU", True)
    rng = np.random.default_rng(4)
    gate_up, _ = weight("Q4_K", 2 * 2048, 2048)
    down, _ = weight("Q4_K", 2048, 2048, seed=1)
    x, r, g = (ops.from_host(rng.standard_normal(s).astype(np.float32))
               for s in ((1, 2048), (1, 2048), (2048,)))
    y, res = ops.mlp(x, r, g, 1e-5, gate_up, down)
    monkeypatch.setattr(cq, "GEMV3_GLU", False)
    h, res_ref = ops.add_rms_norm_linear(x, r, g, 1e-5, gate_up)
    np.testing.assert_array_equal(ops.to_host(res), ops.to_host(res_ref))
    np.testing.assert_array_equal(ops.to_host(y),
                                  ops.to_host(ops.linear(ops.silu_and_mul(h), down)))


def test_gemv_v3_is_capturable_in_a_cuda_graph(ops, monkeypatch):
    monkeypatch.setattr(cq, "GEMV_KERNEL", "v3")
    w, _ = weight("Q4_K", 64, 4096)
    x = ops.from_host(np.random.default_rng(2).standard_normal((2, 4096)).astype(np.float32))
    eager = ops.to_host(ops.linear(x, w))
    out = capture_and_replay(lambda: ops.linear(x, w))
    np.testing.assert_array_equal(ops.to_host(out), eager)


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("rows, cols", [(37, 2048), (5000, 6144)])
def test_lm_head_x2_is_the_float_product(ops, monkeypatch, kind, rows, cols):
    """v3x2 (PAGEDSERVE_GGUF_LM_HEAD_X2): x as two int8 terms is x within ~amax / 32,000, so the
    lm_head's product is x times the dequantized weight up to the output's rounding (v3's one
    term: within x's int8 step, FLOAT_TOL); taken only at M = 1 for weights keeping x as it is."""
    w, host = weight(kind, rows, cols, seed=4)
    w.quantize_x = False
    rng = np.random.default_rng(6)
    x = ops.from_host(rng.standard_normal((1, cols)).astype(np.float32) * 3)
    monkeypatch.setattr(cq, "GEMV3_X2", None)  # the default: the formats in GEMV3_X2_KINDS
    assert (cq.gemv_version(x, w) == "v3x2") == (kind in cq.GEMV3_X2_KINDS)
    monkeypatch.setattr(cq, "GEMV3_X2", False)
    assert cq.gemv_version(x, w) != "v3x2"
    monkeypatch.setattr(cq, "GEMV3_X2", True)
    assert cq.gemv_version(x, w) == "v3x2"
    assert cq.gemv_version(ops.from_host(np.ones((2, cols), np.float32)), w) != "v3x2"
    w.quantize_x = True
    assert cq.gemv_version(x, w) == "v3"
    w.quantize_x = False
    want = ops.to_host(x) @ gq.dequantize_gguf(host).T
    got = ops.to_host(ops.linear(x, w))
    assert rel(got, want) < TWIN_TOL[ops.dtype]
    one_term = ops.to_host(cq.gemv3(x, w, cupy.empty((1, rows), ops.storage), ops.ctype))
    assert rel(got, want) < 0.75 * rel(one_term, want)


def test_forced_v3_falls_back_where_it_does_not_fit(ops):
    """Formats without it, K off its 2048 grid, and weights that keep x unquantized (the
    lm_head: QuantizedWeight.quantize_x)."""
    w, _ = weight("Q4_K", 8, 2048)
    w.quantize_x = False
    assert cq.gemv_version(ops.from_host(np.ones((1, 2048), np.float32)), w, "v3") == "v2"
    w, _ = weight("Q5_K", 8, 2048)
    x = ops.from_host(np.ones((1, 2048), np.float32))
    assert cq.gemv_version(x, w, "v3") == "v1"
    w, _ = weight("Q8_0", 8, 2048 + 32)
    assert cq.gemv_version(ops.from_host(np.ones((1, 2080), np.float32)), w, "v3") == "v1"


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "Q6_K"])
def test_model_with_v3_matches_the_numpy_twin(monkeypatch, kind):
    """Every linear of a 2-layer model at K = 2048 through v3 (the fused add + norm included)
    against the numpy backend, which multiplies these formats by the same twin (gguf_dot): the
    difference is bf16 activations, relative error < 3e-2."""
    from test_gguf_quantized import _prefill_logits

    from engine.executor.ops.numpy_ops import NumpyOps
    from engine.model.config import ModelConfig
    from engine.model.gguf_weights import dummy_quantized_weights

    monkeypatch.setattr(cq, "GEMV_KERNEL", "v3")
    config = ModelConfig("LlamaForCausalLM", vocab_size=256, hidden_size=2048,
                         intermediate_size=2048, num_layers=2, num_heads=16, num_kv_heads=4,
                         head_dim=128, max_position_embeddings=128)
    ops, ref = CudaOps("bfloat16"), NumpyOps()
    models = [type("Loaded", (), {"config": config,
                                  "weights": dummy_quantized_weights(config, o, kind, seed=3)})
              for o in (ops, ref)]
    x = ops.from_host(np.ones((1, 2048), np.float32))
    assert cq.gemv_version(x, models[0].weights.layers[0].down) == "v3"
    rng = np.random.default_rng(5)
    for t in (1, 5):  # M = 1 (the fused add + norm) and M = 5 (compiled for 8)
        ids = rng.integers(0, 256, t).astype(np.int32)
        want = _prefill_logits(models[1], ids)
        got = ops.to_host(_prefill_logits(models[0], ids, ops))
        assert rel(got, want) < 3e-2, (t, rel(got, want))
