"""Every cuda op against its numpy twin, on fresh random inputs with poisoned outputs (GPU only)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_device_memory")]
cupy = require_gpu()

from engine.executor.ops import AttentionMetadata, SamplingTensors  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402

TOL = {"float16": 2e-3, "bfloat16": 1e-2}  # relative L2 error vs the fp32 reference
REF = NumpyOps()


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)


@pytest.fixture(params=["v1", "mma"])
def decode_kernel(request, monkeypatch):
    """Each decode attention kernel in turn (cuda_attention.DECODE_KERNEL)."""
    from engine.executor.ops import cuda_attention

    monkeypatch.setattr(cuda_attention, "DECODE_KERNEL", request.param)
    return request.param



def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), "NaN/inf in the output (unwritten or overflowed)"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def upload(ops, x):
    """(device array, the same values rounded to the dtype, as fp32 on the host)."""
    d = ops.from_host(np.asarray(x, np.float32))
    return d, ops.to_host(d)


def randn(*shape, rng=None, scale=1.0):
    rng = rng or np.random.default_rng()
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------ layers


def test_from_host_rounds_to_nearest(ops):
    x = randn(1000)
    back = ops.to_host(ops.from_host(x))
    if ops.dtype == "float16":
        np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float32))
    else:  # round to nearest even on the top 16 bits
        bits = x.view(np.uint32)
        bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        np.testing.assert_array_equal(back, (bits & np.uint32(0xFFFF0000)).view(np.float32))
    assert ops.to_host(ops.ones((3,))).tolist() == [1.0, 1.0, 1.0]


def test_embedding_and_gather_rows(ops):
    table, table_h = upload(ops, randn(500, 256))
    ids = np.random.default_rng().integers(0, 500, 37).astype(np.int32)
    np.testing.assert_array_equal(ops.to_host(ops.embedding(ids, table)), table_h[ids])
    x, x_h = upload(ops, randn(37, 256))
    idx = np.array([36, 0, 5], np.int32)
    np.testing.assert_array_equal(ops.to_host(ops.gather_rows(x, idx)), x_h[idx])


@pytest.mark.parametrize("hidden", [64, 1024, 4096])
def test_rms_norm_and_fused_residual(ops, hidden):
    x, x_h = upload(ops, randn(9, hidden))
    w, w_h = upload(ops, randn(hidden))
    want = REF.rms_norm(x_h, w_h, 1e-6)
    assert rel_err(ops.to_host(ops.rms_norm(x, w, 1e-6)), want) < TOL[ops.dtype]
    out, res = ops.add_rms_norm(x, None, w, 1e-6)
    np.testing.assert_array_equal(ops.to_host(res), x_h)
    assert rel_err(ops.to_host(out), REF.rms_norm(x_h, w_h, 1e-6)) < TOL[ops.dtype]
    y, y_h = upload(ops, randn(9, hidden))
    out, res = ops.add_rms_norm(y, res, w, 1e-6)
    want_out, want_res = REF.add_rms_norm(y_h, x_h, w_h, 1e-6)
    assert rel_err(ops.to_host(res), want_res) < TOL[ops.dtype]
    assert rel_err(ops.to_host(out), want_out) < TOL[ops.dtype]


@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_linear(ops, tokens):
    x, x_h = upload(ops, randn(tokens, 384))
    w, w_h = upload(ops, randn(640, 384, scale=0.05))
    b, b_h = upload(ops, randn(640))
    assert rel_err(ops.to_host(ops.linear(x, w)), REF.linear(x_h, w_h)) < TOL[ops.dtype]
    assert rel_err(ops.to_host(ops.linear(x, w, b)), REF.linear(x_h, w_h, b_h)) < TOL[ops.dtype]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_qk_norm_rope_silu(ops, head_dim):
    from engine.executor.transformer import rope_cos_sin
    from engine.model.config import ModelConfig

    nh, nkv, t = 8, 2, 11
    qkv, qkv_h = upload(ops, randn(t, (nh + 2 * nkv) * head_dim))
    qw, qw_h = upload(ops, randn(head_dim))
    kw, kw_h = upload(ops, randn(head_dim))
    ops.qk_norm(qkv, qw, kw, 1e-6, nh, nkv)
    want = qkv_h.copy()
    REF.qk_norm(want, qw_h, kw_h, 1e-6, nh, nkv)
    assert rel_err(ops.to_host(qkv), want) < TOL[ops.dtype]

    cfg = ModelConfig("LlamaForCausalLM", 10, 64, 64, 1, 1, 1, head_dim, rope_theta=1e6)
    cos_sin = rope_cos_sin(cfg, 4096)
    positions = np.random.default_rng().integers(0, 4096, t).astype(np.int32)
    qkv, qkv_h = upload(ops, randn(t, (nh + 2 * nkv) * head_dim))
    want = qkv_h.copy()
    REF.rope(want, positions, cos_sin, nh, nkv)
    for table in (cupy.asarray(cos_sin), ops.from_host(cos_sin)):  # fp32 and compute-dtype tables
        got = qkv.copy()
        ops.rope(got, positions, table, nh, nkv)
        assert rel_err(ops.to_host(got), want) < 2 * TOL[ops.dtype]

    gu, gu_h = upload(ops, randn(t, 2 * 3 * head_dim))
    assert rel_err(ops.to_host(ops.silu_and_mul(gu)), REF.silu_and_mul(gu_h)) < TOL[ops.dtype]


# ------------------------------------------------------------------------------ attention


def make_batch(rng, num_new, ctx, block_size, num_blocks):
    """Metadata for sequences with num_new[s] new tokens and ctx[s] tokens after the write."""
    max_blocks = max(-(-c // block_size) for c in ctx)
    perm = rng.permutation(num_blocks)
    tables = np.full((len(ctx), max_blocks), -1, np.int32)
    slots, used = [], 0
    for s, (n, c) in enumerate(zip(num_new, ctx, strict=True)):
        k = -(-c // block_size)
        tables[s, :k] = perm[used : used + k]
        used += k
        pos = np.arange(c - n, c)
        slots.append(tables[s, pos // block_size] * block_size + pos % block_size)
    qsl = np.concatenate([[0], np.cumsum(num_new)]).astype(np.int32)
    return AttentionMetadata(np.concatenate(slots).astype(np.int32), qsl,
                             np.array(ctx, np.int32), tables, max(num_new), max(ctx))


BATCHES = {
    "decode": ([1, 1, 1, 1], [1, 17, 1000, 4096]),  # split contexts, some splits empty
    "mixed": ([1, 37, 20, 1, 5], [300, 337, 20, 64, 5]),  # decodes, a chunk with a cached prefix
    # prefill tiles of 64 queries over several 64-key tiles, diagonal inside a tile, short tail
    "long": ([130, 2, 65, 1], [200, 2, 65, 129]),
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_write_kv_cache_and_attention(ops, head_dim, block_size, group, batch, decode_kernel):
    rng = np.random.default_rng()
    num_new, ctx = BATCHES[batch]
    nkv, num_blocks = 2, sum(-(-c // block_size) for c in ctx) + 3
    nh = nkv * group
    meta = make_batch(rng, num_new, ctx, block_size, num_blocks)
    meta.slot_mapping[0] = -1  # a token whose k/v is not stored
    cache, cache_h = upload(ops, randn(1, 2, num_blocks, nkv, block_size, head_dim))
    qkv, qkv_h = upload(ops, randn(sum(num_new), (nh + 2 * nkv) * head_dim))
    k, v = cache[0, 0], cache[0, 1]
    k_h, v_h = cache_h[0, 0].copy(), cache_h[0, 1].copy()
    ops.write_kv_cache(qkv, k, v, meta.slot_mapping, nh, nkv)
    REF.write_kv_cache(qkv_h, k_h, v_h, meta.slot_mapping, nh, nkv)
    np.testing.assert_array_equal(ops.to_host(k), k_h)
    np.testing.assert_array_equal(ops.to_host(v), v_h)
    scale = head_dim**-0.5
    want = REF.attention(qkv_h, k_h, v_h, meta, nh, nkv, scale)
    got = ops.attention(qkv, k, v, ops.prepare_metadata(meta), nh, nkv, scale)
    assert rel_err(ops.to_host(got), want) < TOL[ops.dtype]


@pytest.mark.parametrize("num_new, ctx", [([1, 1, 1, 1], [1, 17, 1000, 4096]),
                                          ([1, 37, 1, 20, 1], [64, 337, 900, 20, 300])])
def test_longest_first_decode_order_is_bit_identical(ops, num_new, ctx, decode_kernel,
                                                      monkeypatch):
    """PAGEDSERVE_DECODE_ORDER=longest reorders the decode grid's rows, longest context first;
    every row's output is the same bits as in batch order."""
    from engine.executor.ops import cuda_attention

    rng = np.random.default_rng(5)
    nkv, group, hd, bs = 2, 4, 128, 16
    nh, num_blocks = nkv * group, sum(-(-c // bs) for c in ctx) + 3
    meta = make_batch(rng, num_new, ctx, bs, num_blocks)
    cache, _ = upload(ops, randn(2, num_blocks, nkv, bs, hd, rng=rng))
    qkv, qkv_h = upload(ops, randn(sum(num_new), (nh + 2 * nkv) * hd, rng=rng))
    outs, rows = {}, {}
    for order in ("batch", "longest"):
        monkeypatch.setattr(cuda_attention, "DECODE_ORDER", order)
        dmeta = ops.prepare_metadata(meta)
        outs[order] = ops.to_host(ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv,
                                                hd**-0.5))
        rows[order] = cupy.asnumpy(dmeta.work[group].decode_seqs).tolist()
    decodes = [s for s, n in enumerate(num_new) if n == 1]
    assert rows["batch"] == decodes
    assert rows["longest"] == sorted(decodes, key=lambda s: -ctx[s]) != decodes
    np.testing.assert_array_equal(outs["longest"], outs["batch"])
    want = REF.attention(qkv_h, ops.to_host(cache[0]), ops.to_host(cache[1]), meta, nh, nkv,
                         hd**-0.5)
    assert rel_err(outs["longest"], want) < TOL[ops.dtype]


def test_attention_padding_rows_are_zero(ops, decode_kernel):
    """CUDA-graph padding rows (context 0) attend to nothing: zeros, not NaN; the others exact."""
    from engine.executor.ops.cuda_attention import DeviceAttentionMetadata, decode_plan

    rng = np.random.default_rng()
    nkv, group, hd, bs = 2, 2, 128, 16
    nh = nkv * group
    ctx = [700, 0, 33, 0]
    meta = make_batch(rng, [1, 1, 1, 1], [700, 1, 33, 1], bs, 64)
    cache, cache_h = upload(ops, randn(2, 64, nkv, bs, hd))
    qkv, qkv_h = upload(ops, randn(4, (nh + 2 * nkv) * hd))
    up = cupy.asarray
    plan = decode_plan(4, nkv, group, 2048)
    assert plan.num_splits > 1
    dmeta = DeviceAttentionMetadata(
        up(meta.slot_mapping), up(meta.query_start_loc), up(np.array(ctx, np.int32)),
        up(meta.block_tables), 1, 2048, host=None, work={group: plan},
        num_splits=plan.num_splits)
    got = ops.to_host(ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5))
    assert np.all(got[[1, 3]] == 0)
    live = [0, 2]
    sub = AttentionMetadata(meta.slot_mapping[live], np.arange(3, dtype=np.int32),
                            np.array([700, 33], np.int32), meta.block_tables[live], 1, 700)
    want = REF.attention(qkv_h[live], cache_h[0], cache_h[1], sub, nh, nkv, hd**-0.5)
    assert rel_err(got[live], want) < TOL[ops.dtype]


# ------------------------------------------------------------------------------ sampling


def tensors(rows, **kw):
    t = SamplingTensors(
        temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32),
        top_p=np.ones(rows, np.float32), min_p=np.zeros(rows, np.float32),
        # NOTE: seed 0 at step 0 draws u = 0 exactly, which picks the first id whose p is a
        # denormal on the host; the GPU's expf may flush those, so tests avoid that seed.
        seeds=np.arange(1, rows + 1, dtype=np.uint64) * np.uint64(0x1234567887654321),
        steps=np.arange(rows, dtype=np.uint32), presence_penalty=np.zeros(rows, np.float32),
        frequency_penalty=np.zeros(rows, np.float32),
        repetition_penalty=np.ones(rows, np.float32))
    for key, value in kw.items():
        setattr(t, key, value)
    return t


def check_sample(ops, logits, t, min_agree=1.0):
    want = REF.sample(logits, t)
    got = ops.sample(cupy.asarray(logits), t)
    agree = np.mean(got.token_ids == want.token_ids)
    assert agree >= min_agree, (got.token_ids, want.token_ids)
    same = got.token_ids == want.token_ids  # logprobs of the same tokens must agree
    np.testing.assert_allclose(got.logprobs[same], want.logprobs[same], rtol=1e-4, atol=1e-4)
    if t.num_logprobs:
        np.testing.assert_array_equal(got.top_ids, want.top_ids)
        np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vocab", [1000, 151936])
def test_sample_greedy_and_logprobs(ops, vocab):
    logits = randn(6, vocab, scale=3.0)
    logits[0, [5, 9]] = logits[0].max() + 1  # a tie: lowest id wins
    check_sample(ops, logits, tensors(6, num_logprobs=5))


@pytest.mark.parametrize("vocab", [1000, 32000])
def test_sample_seeded_filters(ops, vocab):
    rows = 64
    rng = np.random.default_rng()
    logits = randn(rows, vocab, scale=4.0)
    t = tensors(rows)
    t.temperature = rng.uniform(0.3, 1.5, rows).astype(np.float32)
    t.top_k = rng.choice([0, 1, 5, 50], rows).astype(np.int32)
    t.top_p = rng.choice([1.0, 0.9, 0.5], rows).astype(np.float32)
    t.min_p = rng.choice([0.0, 0.05], rows).astype(np.float32)
    t.seeds = rng.integers(0, 2**63, rows).astype(np.uint64)
    # numpy's float32 cumsum runs in id order; the GPU sums chunks in parallel. Near-flat rows
    # over a large vocab can then land the draw on the neighbouring kept id: allow a few rows.
    check_sample(ops, logits, t, min_agree=0.95)


def test_sample_penalties_and_bias(ops):
    rows, vocab = 4, 2000
    rng = np.random.default_rng()
    logits = randn(rows, vocab, scale=2.0)
    t = tensors(rows)
    t.repetition_penalty = np.array([1.0, 1.3, 2.0, 0.8], np.float32)
    t.frequency_penalty = np.array([0.5, 0.0, 1.0, 0.2], np.float32)
    t.presence_penalty = np.array([0.0, 1.0, 0.5, 0.3], np.float32)
    t.prompt_ids = rng.integers(-1, vocab, (rows, 30)).astype(np.int32)
    t.output_ids = rng.integers(-1, 50, (rows, 40)).astype(np.int32)
    t.bias_ids = np.array([[7, 7, -1], [3, 4, 5], [-1, -1, -1], [1999, 0, 2]], np.int32)
    t.bias_values = np.array([[50, 20, 0], [-100, 30, 40], [0, 0, 0], [60, 1, 2]], np.float32)
    check_sample(ops, logits, t)
    t.temperature = np.full(rows, 0.7, np.float32)
    check_sample(ops, logits, t, min_agree=0.75)


def test_sample_conditional_bias_with_placeholders(ops):
    """bad_words' entries: a bias that adds only after a given previous token, which may be a
    placeholder of the previous step's sampled ids, resolved on the device (numpy_ops twin)."""
    rows, vocab = 5, 3000
    logits = randn(rows, vocab, scale=2.0)
    logits[:, 11] = -10.0  # taken only when boosted
    top = logits.argmax(axis=1).astype(np.int32)  # what greedy takes without a ban
    t = tensors(rows)
    t.bias_ids = np.stack([top, np.full(rows, 11, np.int32)], axis=1)  # (R, 2)
    t.bias_values = np.array([[-np.inf, 40.0]] * rows, np.float32)
    # rows 0, 1: known previous tokens 4 and 5; rows 2-4: pending, rows 1, 0 and 2 of prev
    t.bias_after = np.array([[4, 9], [9, 5], [8, 3], [8, 7], [-1, 8]], np.int32)
    t.last_ids = np.array([4, 5, -3, -2, -4], np.int32)
    prev = cupy.asarray(np.array([7, 8, 9], np.int32))  # the previous step's ids
    on_gpu = dataclasses.replace(t)  # the reference swaps in resolved copies of its ids
    want = REF.sample_start(logits, t, np.array([7, 8, 9], np.int32)).wait()
    got = ops.sample_start(cupy.asarray(logits), on_gpu, prev).wait()
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    # rows 0, 2 (last 4, then 8 from the placeholder) and 4 (always): the top banned, 11 not
    # boosted; rows 1, 3 (last 5, then 7): 11 boosted, the top kept
    assert want.token_ids[1] == want.token_ids[3] == 11
    for r in (0, 2, 4):
        assert want.token_ids[r] not in (top[r], 11)
    np.testing.assert_array_equal(on_gpu.last_ids, [4, 5, -3, -2, -4])  # resolved on the device


def test_copy_blocks(ops):
    rng = np.random.default_rng(0)
    host = rng.standard_normal((2, 2, 9, 2, 16, 64)).astype(np.float32)
    cache = ops.from_host(host)
    want = ops.to_host(cache).copy()  # the same bits, rounded to the storage dtype once
    copies = [(1, 4), (7, 0), (3, 8)]
    REF.copy_blocks(want, copies)
    ops.copy_blocks(cache, copies)
    np.testing.assert_array_equal(ops.to_host(cache), want)
    assert not np.array_equal(want[:, :, 4], want[:, :, 5])  # the copy did something


def test_unsupported_head_dim_is_refused_by_name(ops):
    from engine.model.config import ModelConfig

    config = ModelConfig("LlamaForCausalLM", 256, 96 * 4, 512, 1, 4, 2, 96)
    with pytest.raises(ValueError, match="head_dim 96"):
        ops.check_model(config)
    config.head_dim = 128
    ops.check_model(config)  # a compiled variant: no error
