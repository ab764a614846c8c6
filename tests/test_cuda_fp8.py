"""FP8 kernels (cuda/fp8.cu, fp8_fused.cu, cuBLASLt) against the numpy twin engine/model/fp8.py
(GPU only).

Quantization is bit-exact (codes and scales); products agree within the output's rounding to the
compute dtype plus fp32 summation-order error (K * 2^-24 of the sum of |terms|) for our kernels.
NOTE: cuBLASLt's FP8 tensor cores keep fewer bits than fp32 in their running sums (about 14 on
Hopper, as DeepSeek-V3's report measured), so its products get LT_SLACK of the sum of |terms|
(measured on the H200: fp16 outputs fail the fp32 bound, bf16 ones pass); still 32x below the
2^-4 of one E4M3 rounding."""

from __future__ import annotations

import types

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor.ops import cuda_fp8  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.logs import weights_nbytes  # noqa: E402
from engine.model import fp8  # noqa: E402
from engine.model.config import EngineConfig, ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402

REF = NumpyOps()
ROUND = {"float16": 2.0**-10, "bfloat16": 2.0**-7}  # > half an ulp of the output, relative
LT_SLACK = 2.0**-9


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)


def upload(ops, x):
    d = ops.from_host(np.asarray(x, np.float32))
    return d, ops.to_host(d)


def activations(rng, rows, k):
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, 3] *= 60  # an outlier channel pushes small values into E4M3's subnormals
    if rows > 2:
        x[1] = 0  # a padding row
    return x


def assert_quantized_equal(q, s, x_host):
    want_q, want_s = fp8.quantize_rows(x_host)
    np.testing.assert_array_equal(cupy.asnumpy(s), want_s)
    np.testing.assert_array_equal(cupy.asnumpy(q), want_q)


@pytest.fixture(params=[1, 4])
def words(request, monkeypatch):
    """cuda_fp8.QUANT_WORDS: one 8-element word per thread, or 4 (the QC = 4 kernels)."""
    monkeypatch.setattr(cuda_fp8, "QUANT_WORDS", request.param)
    monkeypatch.setattr(cuda_fp8, "QUANT_WORDS_MIN_ELEMENTS", 0)
    return request.param


# 20480: more words than a thread keeps in registers (2 x 1024 threads): some are read again
@pytest.mark.parametrize("cluster", [0, 4, 8])  # rows <= 8: split over a cluster unless 0
@pytest.mark.parametrize("rows, k", [(1, 64), (5, 1008), (300, 4096), (2, 14336), (3, 20480)])
def test_quantize_rows_bit_exact(ops, rows, k, words, cluster, monkeypatch):
    monkeypatch.setattr(cuda_fp8, "PLAIN_CLUSTER", cluster)
    x, x_h = upload(ops, activations(np.random.default_rng(k), rows, k))
    q, s = cuda_fp8.quantize_rows(x, ops.ctype)
    assert_quantized_equal(q, s, x_h)
    qw = ops.quantize_fp8(x)  # weights: the same kernel, a row per output channel
    np.testing.assert_array_equal(cupy.asnumpy(qw.data), fp8.quantize_weight(x_h).data)


@pytest.mark.parametrize("cluster", [0, 4])
def test_quantize_rows_with_nan_and_inf_bit_exact(ops, words, cluster, monkeypatch):
    """Rows holding a NaN, an inf, only NaN: codes and scales the twin's bit for bit (the twin's
    np.max had made a NaN row's scale and codes NaN where fmaxf leaves the NaN out)."""
    monkeypatch.setattr(cuda_fp8, "PLAIN_CLUSTER", cluster)
    x_h = activations(np.random.default_rng(9), 4, 1024)
    x_h[0, 17], x_h[1, 700], x_h[2] = np.nan, -np.inf, np.nan
    x, x_h = upload(ops, x_h)
    q, s = cuda_fp8.quantize_rows(x, ops.ctype)
    assert_quantized_equal(q, s, x_h)
    assert np.isfinite(cupy.asnumpy(s)[[0, 2, 3]]).all()


def test_quantize_needs_k_divisible_by_16(ops):
    with pytest.raises(ValueError, match="divisible by 16"):
        ops.quantize_fp8(upload(ops, np.ones((4, 1000)))[0])


# 6 rows: each split over a cluster of `cluster` blocks (but 0: a block a row); 10: a block a row;
# 131072: more words than a cluster's threads keep in registers
@pytest.mark.parametrize("cluster", [0, 4, 8])
@pytest.mark.parametrize("rows, k", [(6, 576), (6, 4096), (10, 4096), (6, 20480), (1, 131072)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_quantize_equals_rms_norm_then_quantize(ops, with_residual, rows, k, words, cluster,
                                                     monkeypatch):
    """Codes bit-exact vs the twin's quantization of the kernel's own normalized row h; h within
    an ulp of rms_norm_kernel's (its sum of squares runs in another order); the residual equal."""
    monkeypatch.setattr(cuda_fp8, "NORM_CLUSTER", cluster)
    rng = np.random.default_rng(7)
    x, _ = upload(ops, activations(rng, rows, k))
    nw, _ = upload(ops, rng.standard_normal(k) + 1)
    res = upload(ops, rng.standard_normal((rows, k)))[0] if with_residual else None
    h_ref, res_ref = ops.add_rms_norm(x, None if res is None else res.copy(), nw, 1e-5)
    h = cupy.empty_like(x)
    q, s, res_out = cuda_fp8.norm_quantize(x, res, nw, 1e-5, ops.ctype, h_out=h)
    assert_quantized_equal(q, s, ops.to_host(h))
    np.testing.assert_allclose(ops.to_host(h), ops.to_host(h_ref), rtol=2 * ROUND[ops.dtype],
                               atol=1e-6)
    np.testing.assert_array_equal(ops.to_host(res_out), ops.to_host(res_ref))


# 1 and 7 rows: each split over a cluster of `cluster` blocks (but 0: a block a row); 12 rows: a
# block a row; 131072: more words than a cluster's threads keep in registers
@pytest.mark.parametrize("cluster", [0, 4, 8])
@pytest.mark.parametrize("rows", [1, 7, 12])
@pytest.mark.parametrize("k", [1536, 14336, 20480, 131072])
def test_silu_quantize_equals_silu_and_mul_then_quantize(ops, k, rows, cluster, words,
                                                         monkeypatch):
    monkeypatch.setattr(cuda_fp8, "SILU_CLUSTER", cluster)
    gu, _ = upload(ops, np.random.default_rng(8).standard_normal((rows, 2 * k)) * 3)
    q, s = cuda_fp8.silu_quantize(gu, ops.ctype)
    assert_quantized_equal(q, s, ops.to_host(ops.silu_and_mul(gu)))


def twin_product(q, s, qw, rel_slack=None):
    """(exact twin in float64, summation slack: rel_slack, by default fp32's K * 2^-24, of the sum
    of |terms|) for codes on the device."""
    dx, dw = fp8.decode(cupy.asnumpy(q)).astype(np.float64), fp8.decode(cupy.asnumpy(qw.data))
    scale = cupy.asnumpy(s)[:, None] * cupy.asnumpy(qw.scale)[None, :]
    rel_slack = dx.shape[1] * 2.0**-24 if rel_slack is None else rel_slack
    return (dx @ dw.T) * scale, rel_slack * (np.abs(dx) @ np.abs(dw).T) * scale


def assert_product_close(ops, y, q, s, qw, rel_slack=None):
    want, slack = twin_product(q, s, qw, rel_slack)
    got = ops.to_host(y).astype(np.float64)
    assert np.isfinite(got).all()
    bad = np.abs(got - want) > ROUND[ops.dtype] * np.abs(want) + slack + 1e-30
    assert not bad.any(), (got[bad][:5], want[bad][:5])


# fp8.cu's GEMV with cuda_fp8.FP8_GEMV_WORDS 2, 4 or 8 (160, 96 or 64 threads at K 4112); the
# tensor-core GEMV with (MMA_WARPS, MMA_STEPS): sized to the grid, one warp, more warps than K needs
GEMV_FORMS = [("fp8", 2), ("fp8", 4), ("fp8", 8), ("mma", (0, 2)), ("mma", (1, 2)),
              ("mma", (4, 2)), ("mma", (16, 2))]


@pytest.mark.parametrize("form", GEMV_FORMS, ids=str)
@pytest.mark.parametrize("m", range(1, 9))
def test_gemv_vs_twin(ops, m, form, monkeypatch):
    """Both GEMVs against the twin: K of 257 words (a partial last load; rows of 16 bytes that
    are not a multiple of the mma's 32), 1030 outputs (a partial 16-row tile). The tensor cores'
    sums get LT_SLACK, as cuBLASLt's."""
    kind, v = form
    if kind == "fp8":
        monkeypatch.setattr(cuda_fp8, "MMA_GEMV", False)
        monkeypatch.setattr(cuda_fp8, "FP8_GEMV_WORDS", v)
    else:
        if not cuda_fp8.use_mma_gemv(8):
            pytest.skip("the tensor-core FP8 GEMV needs sm_89")
        monkeypatch.setattr(cuda_fp8, "MMA_MIN_M", 1)  # the engine runs M = 1 on fp8.cu's
        monkeypatch.setattr(cuda_fp8, "MMA_WARPS", v[0])
        monkeypatch.setattr(cuda_fp8, "MMA_STEPS", v[1])
    rng = np.random.default_rng(m)
    k = 1024 if m > 4 else 4112  # 257 words: a partial last round of loads
    qw = ops.quantize_fp8(upload(ops, rng.standard_normal((1030, k)) * 0.05)[0])
    q, s = cuda_fp8.quantize_rows(upload(ops, activations(rng, m, k))[0], ops.ctype)
    y = cupy.empty((m, 1030), ops.storage)
    assert_product_close(ops, cuda_fp8.gemv(q, s, qw, y, ops.ctype), q, s, qw,
                         LT_SLACK if kind == "mma" else None)


# 4112: 257 words, a partial last chunk; 14336: 7 chunks a row; n odd: a half-empty row pair
@pytest.mark.parametrize("k", [4112, 14336])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("prologue", [0, 1, 2, 3])
def test_stream_gemv_vs_unfused(ops, prologue, m, k):
    """The streaming GEMV, quantization inside: plain and SiLU rows quantize to the unfused
    kernels' codes, so the product meets the twin's bound; the norm's codes may differ where h
    sits within an ulp of a rounding boundary (its own sum order), so that one is held to 1% (L2);
    the residual it writes equals norm_quantize's."""
    rng = np.random.default_rng(prologue * 7 + k + m)
    n = 1031
    qw = ops.quantize_fp8(upload(ops, rng.standard_normal((n, k)) * 0.05)[0])
    x, _ = upload(ops, activations(rng, m, 2 * k if prologue == cuda_fp8.PRO_SILU else k))
    if prologue == cuda_fp8.PRO_NORM:
        res, _ = upload(ops, rng.standard_normal((m, k)))
        nw, _ = upload(ops, rng.standard_normal(k) + 1)
        y, res_out = cuda_fp8.stream_gemv(ops, prologue, qw, x, res, nw, 1e-5)
        q, s, res_ref = cuda_fp8.norm_quantize(x, res.copy(), nw, 1e-5, ops.ctype)
        np.testing.assert_array_equal(ops.to_host(res_out), ops.to_host(res_ref))
        want, _ = twin_product(q, s, qw)
        got = ops.to_host(y)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01
        y0, r0 = cuda_fp8.stream_gemv(ops, prologue, qw, x, None, nw, 1e-5)  # the first layer
        np.testing.assert_array_equal(ops.to_host(r0), ops.to_host(x))
        q0, s0, _ = cuda_fp8.norm_quantize(x, None, nw, 1e-5, ops.ctype)
        want0, _ = twin_product(q0, s0, qw)
        assert np.linalg.norm(ops.to_host(y0) - want0) / np.linalg.norm(want0) < 0.01
        return
    q, s = (cuda_fp8.silu_quantize(x, ops.ctype) if prologue == cuda_fp8.PRO_SILU
            else cuda_fp8.quantize_rows(x, ops.ctype))
    if prologue == cuda_fp8.PRO_CODES:
        y, res_out = cuda_fp8.stream_gemv(ops, prologue, qw, q=q, s=s)
    else:
        y, res_out = cuda_fp8.stream_gemv(ops, prologue, qw, x)
    assert res_out is None and y.shape == (m, n)
    assert_product_close(ops, y, q, s, qw)


def test_stream_gemv_has_room(ops):
    """Llama-3-8B's shapes get at least two chunks in flight per warp at every compiled M."""
    for m in range(1, cuda_fp8.STREAM_MAX_M + 1):
        assert cuda_fp8.stream_stages(m, 14336) >= 2


@pytest.mark.parametrize("mode", ["outer", "fp32+scale", "gemv chunks"])
@pytest.mark.parametrize("m, n, k", [(16, 256, 512), (300, 6144, 4096), (37, 528, 1040)])
def test_gemm_vs_twin(ops, mode, m, n, k):
    rng = np.random.default_rng(m + n)
    qw = ops.quantize_fp8(upload(ops, rng.standard_normal((n, k)) * 0.05)[0])
    q, s = cuda_fp8.quantize_rows(upload(ops, activations(rng, m, k))[0], ops.ctype)
    lt = cuda_fp8.fp8_gemm(ops._gemm)
    saved = lt.modes
    lt.modes, lt.plans = (() if mode == "gemv chunks" else (mode,)), {}
    try:
        y = cuda_fp8.matmul(ops, q, s, qw)
        plan = lt.plans[(m, n, k, ops.dtype)]
    finally:
        lt.modes, lt.plans = saved, {}
    if mode == "outer" and (plan is None or plan[0] != "outer"):
        pytest.skip("this cuBLASLt has no outer-vector FP8 scaling for the shape")
    assert (plan is None) == (mode == "gemv chunks") and (plan is None or plan[0] == mode)
    assert_product_close(ops, y, q, s, qw, None if plan is None else LT_SLACK)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("m", [1, 4, 40])
def test_ops_match_numpy_twin(ops, m, stream, monkeypatch):
    """The three weight-taking ops with an fp8 weight vs NumpyOps on the same (rounded) inputs:
    the activations are quantized from the same values, so only rounding differs. stream: the
    streaming GEMV takes M <= 4."""
    monkeypatch.setattr(cuda_fp8, "STREAM", stream)
    rng = np.random.default_rng(m)
    w, w_h = upload(ops, rng.standard_normal((96, 256)) * 0.05)
    qw, qw_h = ops.quantize_fp8(w), fp8.quantize_weight(w_h)
    x, x_h = upload(ops, rng.standard_normal((m, 256)))
    y = ops.linear(x, qw)
    np.testing.assert_allclose(ops.to_host(y), REF.linear(x_h, qw_h), rtol=0.02, atol=0.02)
    res, res_h = upload(ops, rng.standard_normal((m, 256)))
    nw, nw_h = upload(ops, rng.standard_normal(256) + 1)
    y, new_res = ops.add_rms_norm_linear(x, res, nw, 1e-5, qw)
    want, want_res = REF.add_rms_norm_linear(x_h, res_h, nw_h, 1e-5, qw_h)
    np.testing.assert_allclose(ops.to_host(new_res), want_res, rtol=0.02, atol=0.02)
    assert np.linalg.norm(ops.to_host(y) - want) / np.linalg.norm(want) < 0.03
    down = ops.quantize_fp8(upload(ops, rng.standard_normal((64, 128)) * 0.05)[0])
    gu, gu_h = upload(ops, rng.standard_normal((m, 256)))
    y = ops.silu_mul_linear(gu, down)
    want = REF.silu_mul_linear(gu_h, _host(down))
    assert np.linalg.norm(ops.to_host(y) - want) / np.linalg.norm(want) < 0.03


def _host(qw):
    return fp8.QuantizedWeight("fp8", qw.shape, cupy.asnumpy(qw.data), cupy.asnumpy(qw.scale))


@pytest.mark.parametrize("stream", [False, True])
def test_engine_fp8_graphs_match_eager_and_weights_shrink(monkeypatch, stream):
    """A 2-layer Qwen3-0.6B-shaped model with dummy FP8 weights: decode CUDA graphs give the eager
    tokens at batches up to 4 (fused kernels and the GEMV: a row's sums do not depend on the
    batch); with 16 rows (cuBLASLt inside the graphs, whose algorithm may change with the padded
    batch) every request completes. The layers hold about half the bf16 bytes (the lm_head kept
    in bf16 here: the FP8 one has tests of its own). stream: the streaming GEMV at M <= 4."""
    monkeypatch.setattr(fp8, "LM_HEAD", False)
    monkeypatch.setattr(cuda_fp8, "STREAM", stream)
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, 4096
    ops = CudaOps("bfloat16")
    plain = dummy_weights(config, ops, seed=3)
    quantized = dummy_weights(config, ops, seed=3, quantization="fp8")
    def linear_bytes(weights):
        return sum(getattr(layer, f).nbytes for layer in weights.layers
                   for f in ("qkv", "o", "gate_up", "down"))

    ratio = linear_bytes(quantized) / linear_bytes(plain)
    assert 0.5 < ratio < 0.503, ratio  # 1 byte a weight + 4 bytes a row (K >= 1024), vs 2
    untouched = weights_nbytes(plain) - linear_bytes(plain)
    assert weights_nbytes(quantized) - linear_bytes(quantized) == untouched
    loaded = types.SimpleNamespace(config=config, tokenizer=None, weights=quantized)
    for max_num_seqs in (4, 16):
        tokens = {}
        for eager in (True, False):
            engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256,
                                            max_num_seqs=max_num_seqs, num_kv_blocks=256,
                                            enforce_eager=eager), loaded_model=loaded)
            prompts = [{"prompt_token_ids": [(13 * i + 7 * j) % 4096 for j in range(10 + 9 * i)]}
                       for i in range(12)]
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=10)
            outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
            tokens[eager] = [o.outputs[0].token_ids for o in outs]
            engine.shutdown()
        assert all(len(t) == 10 for t in tokens[False])
        if max_num_seqs == 4:
            assert tokens[False] == tokens[True]


@pytest.mark.parametrize("stream", [False, True])
def test_fp8_decode_logits_equal_with_and_without_pdl(monkeypatch, stream):
    """The FP8 kernels as programmatic dependent launches (the GEMVs read weights before the
    wait): decode logits, eager and from CUDA graphs, bit-identical with PDL on and off, at
    batches 1, 2, 4 (GEMV) and 8 (cuBLASLt beside PDL kernels); the lm_head in FP8 as well.
    stream: the streaming GEMV (its weights requested before the wait) at M <= 4."""
    from engine.executor.cuda_graph import DecodeGraphs
    from engine.executor.ops import AttentionMetadata, cuda_kernels
    from engine.executor.transformer import Transformer

    monkeypatch.setattr(fp8, "LM_HEAD", True)
    monkeypatch.setattr(cuda_fp8, "STREAM", stream)
    ops = CudaOps("bfloat16")
    config = ModelConfig.from_preset("llama3-8b")
    config.num_layers, config.vocab_size = 2, 4096
    weights = dummy_weights(config, ops, seed=1, quantization="fp8")
    assert weights.lm_head.kind == "fp8"
    model = Transformer(config, weights, ops, 2048)
    rng = np.random.default_rng(1)
    bs, nb = 16, 40
    cache = ops.alloc_kv_cache(2, 8 * nb, config.num_kv_heads, bs, config.head_dim)
    cache[:] = ops.from_host(rng.standard_normal(cache.shape).astype(np.float32) * 0.5)
    saved = cuda_kernels.PDL
    try:
        for batch in (1, 2, 4, 8):
            ctx = rng.integers(100, nb * bs - 1, batch)
            tables = (np.arange(batch)[:, None] * nb + np.arange(nb)).astype(np.int32)
            meta = AttentionMetadata((tables[np.arange(batch), ctx // bs] * bs + ctx % bs)
                                     .astype(np.int32), np.arange(batch + 1, dtype=np.int32),
                                     (ctx + 1).astype(np.int32), tables, 1, int(ctx.max()) + 1)
            ids = rng.integers(0, config.vocab_size, batch).astype(np.int32)
            results = {}
            for on in (False, True):
                cuda_kernels.PDL = on
                with cuda_kernels.programmatic_launches():
                    eager = model.forward(ops.from_host(ids), ops.from_host(ctx.astype(np.int32)),
                                          cache, ops.prepare_metadata(meta), None)
                graphs = DecodeGraphs(model, cache, max_num_seqs=8, max_blocks_per_seq=nb)
                graphs.capture()
                replayed = [graphs.run(ids, ctx.astype(np.int32), meta) for _ in range(2)]
                results[on] = [cupy.asnumpy(x).view(np.uint16) for x in (eager, *replayed)]
                del graphs
                assert cuda_kernels.PDL == on  # no launch fell back to a plain one
            for got, want in zip(results[True], results[False], strict=True):
                np.testing.assert_array_equal(got, want)
    finally:
        cuda_kernels.PDL = saved
