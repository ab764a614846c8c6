"""The FP8 GEMV with the activation's quantization in its prologue (cuda/fp8_gemv_fused.cu,
cuda_fp8.FUSED) against the quantize kernel + fp8.cu GEMV pair it replaces: bit for bit, since
the twin (engine/model/fp8.py, held to the pair by test_cuda_fp8.py) is unchanged (GPU only)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.executor.ops import cuda_fp8, cuda_kernels  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.model import fp8  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402

EPS = 1e-5


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)


def bits(a) -> np.ndarray:
    return cupy.asnumpy(a).view(np.uint16)


def upload(ops, rng, shape, scale=1.0, shift=0.0):
    x = rng.standard_normal(shape) * scale + shift
    if len(shape) == 2 and shape[1] > 3:
        x[:, 3] *= 60  # an outlier channel: small values land in E4M3's subnormals
    return ops.from_host(x.astype(np.float32))


def unfused(ops, pro, qw, x, res, nw):
    """(y, residual or None) of the two-launch path (res updated in place)."""
    if pro == cuda_fp8.PRO_NORM:
        q, s, res = cuda_fp8.norm_quantize(x, res, nw, EPS, ops.ctype)
    else:
        q, s = (cuda_fp8.silu_quantize if pro == cuda_fp8.PRO_SILU
                else cuda_fp8.quantize_rows)(x, ops.ctype)
        res = None
    y = cupy.empty((x.shape[0], qw.data.shape[0]), ops.storage)
    return cuda_fp8.gemv(q, s, qw, y, ops.ctype), res


# K: 48 (3 words: most threads idle), 592 (37 words), 4096 (Llama-3-8B: 2 words a thread, the norm
# summed by 512 virtual threads), 4112 (norm: 544 virtual threads over a 160-thread block),
# 14336 (SiLU: 4 words a thread, all kept), 20480 (every prologue past its kept words; the norm's
# virtual threads sum 2-3 words each)
CASES = ([(cuda_fp8.PRO_NORM, k) for k in (48, 592, 4096, 4112, 20480)]
         + [(cuda_fp8.PRO_QUANTIZE, k) for k in (592, 4096, 20480)]
         + [(cuda_fp8.PRO_SILU, k) for k in (592, 14336, 20480)])


@pytest.mark.parametrize("pro, k", CASES)
def test_fused_gemv_equals_quantize_then_gemv(ops, pro, k):
    """Every compiled M and (R, MINB) variant, N = 1030 (a partial last block),
    launched as programmatic dependent launches: y bit for bit the pair's; the norm's residual
    too, with and without an incoming residual (the first layer)."""
    rng = np.random.default_rng(k + 7 * pro)
    n = 1030
    qw = ops.quantize_fp8(upload(ops, rng, (n, k), 0.05))
    nw = upload(ops, rng, (k,), 0.5, 1.0)
    with cuda_kernels.programmatic_launches():
        for m in range(1, cuda_fp8.FUSED_MAX_M + 1):
            x = upload(ops, rng, (m, 2 * k if pro == cuda_fp8.PRO_SILU else k))
            res = upload(ops, rng, (m, k))
            for incoming in (res, None) if pro == cuda_fp8.PRO_NORM else (None,):
                want_y, want_r = unfused(ops, pro, qw, x,
                                         None if incoming is None else incoming.copy(), nw)
                for config in cuda_kernels.FP8_FUSED_CONFIGS[m]:
                    y, r = cuda_fp8.fused_gemv(ops, pro, qw, x, incoming,
                                               nw if pro == cuda_fp8.PRO_NORM else None, EPS,
                                               config)
                    where = f"m={m} config={config}"
                    np.testing.assert_array_equal(bits(y), bits(want_y), err_msg=where)
                    if pro == cuda_fp8.PRO_NORM:
                        np.testing.assert_array_equal(bits(r), bits(want_r), err_msg=where)
                    else:
                        assert r is None


def test_fused_ops_chain_equals_unfused(ops, monkeypatch):
    """The three ops as a layer chains them (o, add + norm + gate_up, SiLU-mul + down), each
    reading the previous one's output, as PDL launches: FUSED gives the unfused values bit for
    bit and launches one kernel per op."""
    rng = np.random.default_rng(5)
    hidden, inter = 1024, 1536
    w_o = ops.quantize_fp8(upload(ops, rng, (hidden, hidden), 0.03))
    w_gu = ops.quantize_fp8(upload(ops, rng, (2 * inter, hidden), 0.03))
    w_d = ops.quantize_fp8(upload(ops, rng, (hidden, inter), 0.03))
    nw = upload(ops, rng, (hidden,), 0.2, 1.0)
    for m in range(1, cuda_fp8.FUSED_MAX_M + 1):
        attn, res = upload(ops, rng, (m, hidden)), upload(ops, rng, (m, hidden))
        outs = {}
        for on in (False, True):
            monkeypatch.setattr(cuda_fp8, "FUSED", frozenset(cuda_fp8.FUSED_OPS if on else ()))
            with cuda_kernels.programmatic_launches():
                o = ops.linear(attn, w_o)
                gate_up, r = ops.add_rms_norm_linear(o, res.copy(), nw, EPS, w_gu)
                down = ops.silu_mul_linear(gate_up, w_d)
            outs[on] = [bits(a) for a in (o, gate_up, r, down)]
        for got, want in zip(outs[True], outs[False], strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"m={m}")
    calls = []
    with monkeypatch.context() as mp:
        mp.setattr(cuda_fp8, "launch", lambda fn, *a, **kw: calls.append(fn))
        ops.linear(attn, w_o)
        ops.add_rms_norm_linear(attn, res, nw, EPS, w_gu)
        ops.silu_mul_linear(gate_up, w_d)
    assert len(calls) == 3


def test_fused_linears_are_chosen_by_name(monkeypatch):
    """PAGEDSERVE_FP8_GEMV_FUSED names the linears; gate_up is the norm prologue's tall weight,
    and gemv_wins' caps still apply."""
    assert cuda_fp8._fused_ops("1") == set(cuda_fp8.FUSED_OPS) and not cuda_fp8._fused_ops("0")
    assert cuda_fp8._fused_ops("o,down") == {"o", "down"}
    with pytest.raises(ValueError, match="PAGEDSERVE_FP8_GEMV_FUSED.*'gate'"):
        cuda_fp8._fused_ops("o,gate")

    def weight(n):
        return fp8.QuantizedWeight("fp8", (n, 16), cupy.zeros((n, 16), cupy.uint8),
                                   cupy.ones(n, cupy.float32))

    tall, square = weight(28672), weight(4096)
    monkeypatch.setattr(cuda_fp8, "FUSED", frozenset({"gate_up", "o"}))
    assert cuda_fp8.use_fused(2, tall, cuda_fp8.PRO_NORM)
    assert not cuda_fp8.use_fused(3, tall, cuda_fp8.PRO_NORM)  # cuBLASLt's rows
    assert not cuda_fp8.use_fused(1, square, cuda_fp8.PRO_NORM)  # qkv
    assert cuda_fp8.use_fused(4, square, cuda_fp8.PRO_QUANTIZE)
    assert not cuda_fp8.use_fused(5, square, cuda_fp8.PRO_QUANTIZE)
    assert not cuda_fp8.use_fused(1, square, cuda_fp8.PRO_SILU)  # down
    assert not cuda_fp8.use_fused(1, tall, cuda_fp8.PRO_QUANTIZE)  # the lm_head: by name only
    assert "lm_head" not in cuda_fp8._fused_ops("1") and cuda_fp8._fused_ops("lm_head")


def test_llama_step_logits_equal_fused_and_unfused(monkeypatch):
    """A 2-layer Llama-3-8B-shaped FP8 model: decode logits, eager and from CUDA graphs (PDL on,
    as the engine runs them), bit-identical with FUSED on and off at batches 1, 2, 4 (fused) and 8
    (cuBLASLt: the switch changes nothing there)."""
    from engine.executor.cuda_graph import DecodeGraphs
    from engine.executor.ops import AttentionMetadata
    from engine.executor.transformer import Transformer

    ops = CudaOps("bfloat16")
    config = ModelConfig.from_preset("llama3-8b")
    config.num_layers, config.vocab_size = 2, 4096
    model = Transformer(config, dummy_weights(config, ops, seed=2, quantization="fp8"), ops, 2048)
    rng = np.random.default_rng(2)
    bs, nb = 16, 40
    cache = ops.alloc_kv_cache(2, 8 * nb, config.num_kv_heads, bs, config.head_dim)
    cache[:] = ops.from_host(rng.standard_normal(cache.shape).astype(np.float32) * 0.5)
    for batch in (1, 2, 4, 8):
        ctx = rng.integers(100, nb * bs - 1, batch)
        tables = (np.arange(batch)[:, None] * nb + np.arange(nb)).astype(np.int32)
        meta = AttentionMetadata((tables[np.arange(batch), ctx // bs] * bs + ctx % bs)
                                 .astype(np.int32), np.arange(batch + 1, dtype=np.int32),
                                 (ctx + 1).astype(np.int32), tables, 1, int(ctx.max()) + 1)
        ids = rng.integers(0, config.vocab_size, batch).astype(np.int32)
        results = {}
        for on in (False, True):
            monkeypatch.setattr(cuda_fp8, "FUSED", frozenset(cuda_fp8.FUSED_OPS if on else ()))
            with cuda_kernels.programmatic_launches():
                eager = model.forward(ops.from_host(ids), ops.from_host(ctx.astype(np.int32)),
                                      cache, ops.prepare_metadata(meta), None)
            graphs = DecodeGraphs(model, cache, max_num_seqs=8, max_blocks_per_seq=nb)
            graphs.capture()
            replayed = graphs.run(ids, ctx.astype(np.int32), meta)
            results[on] = [bits(eager), bits(replayed)]
            del graphs
        for got, want in zip(results[True], results[False], strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"batch {batch}")
