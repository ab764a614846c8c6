"""Issue 12's kernels against their numpy twins (GPU only): the fused q/k-norm + RoPE + KV write,
flash-decoding splits sized per sequence, the small-batch GEMV, and the one-pass sampling select."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from test_cuda_ops import (  # noqa: E402
    TOL,
    check_sample,
    make_batch,
    poison,  # noqa: F401 (autouse: every device allocation starts as NaN)
    randn,
    rel_err,
    tensors,
    upload,
)

from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402

REF = NumpyOps()


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)


# ------------------------------------------------------------------ q/k norm + RoPE + KV write


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("variant", ["qwen3", "qwen2", "llama"])
def test_qk_norm_rope_kv_write(ops, head_dim, group, variant):
    from engine.executor.transformer import rope_cos_sin
    from engine.model.config import ModelConfig

    rng = np.random.default_rng()
    nkv, t, bs, num_blocks = 2, 13, 16, 6
    nh = nkv * group
    width = (nh + 2 * nkv) * head_dim
    cfg = ModelConfig("LlamaForCausalLM", 10, 64, 64, 1, 1, 1, head_dim, rope_theta=1e6)
    cos_sin = rope_cos_sin(cfg, 4096)
    positions = rng.integers(0, 4096, t).astype(np.int32)
    slots = rng.permutation(num_blocks * bs)[:t].astype(np.int32)
    slots[3] = -1  # not stored
    qkv, qkv_h = upload(ops, randn(t, width, rng=rng))
    norm = variant == "qwen3"
    qw, qw_h = upload(ops, randn(head_dim, rng=rng)) if norm else (None, None)
    kw, kw_h = upload(ops, randn(head_dim, rng=rng)) if norm else (None, None)
    bias, bias_h = upload(ops, randn(width, rng=rng)) if variant == "qwen2" else (None, None)
    cache, cache_h = upload(ops, randn(2, num_blocks, nkv, bs, head_dim, rng=rng))
    want, k_h, v_h = qkv_h.copy(), cache_h[0].copy(), cache_h[1].copy()
    REF.qk_norm_rope_kv_write(want, positions, cos_sin, qw_h, kw_h, 1e-6, k_h, v_h, slots, nh,
                              nkv, bias=bias_h)
    for table in (cupy.asarray(cos_sin), ops.from_host(cos_sin)):  # fp32 and compute-dtype tables
        got, c = qkv.copy(), cache.copy()
        ops.qk_norm_rope_kv_write(got, positions, table, qw, kw, 1e-6, c[0], c[1], slots, nh, nkv,
                                  bias=bias)
        q_size = nh * head_dim
        assert rel_err(ops.to_host(got)[:, : q_size + nkv * head_dim],
                       want[:, : q_size + nkv * head_dim]) < 2 * TOL[ops.dtype]
        assert rel_err(ops.to_host(c[0]), k_h) < 2 * TOL[ops.dtype]
        assert rel_err(ops.to_host(c[1]), v_h) < TOL[ops.dtype]
        if bias is None:  # the unfused kernels it replaces, to the last bit but FMA placement
            ref, rc = qkv.copy(), cache.copy()
            if norm:
                ops.qk_norm(ref, qw, kw, 1e-6, nh, nkv)
            ops.rope(ref, positions, table, nh, nkv)
            ops.write_kv_cache(ref, rc[0], rc[1], slots, nh, nkv)
            for a, b in ((got, ref), (c, rc)):
                a, b = ops.to_host(a), ops.to_host(b)
                assert np.mean(a == b) > 0.99 and rel_err(a, b) < TOL[ops.dtype] / 8


# ------------------------------------------------------------------ flash-decoding splits


@pytest.mark.parametrize("grid_splits", [None, 1, 7, "max"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_splits_per_sequence(ops, head_dim, group, grid_splits):
    """Any grid split count (None: chosen from the step) gives the same attention, whatever
    mix of short (one split, no reduction) and long (many splits) contexts the batch holds."""
    from engine.executor.ops import cuda_attention as ca

    rng = np.random.default_rng()
    nkv, bs = 2, 16
    nh = nkv * group
    ctx = [1, 5, 127, 128, 129, 1000, 5000]
    num_blocks = sum(-(-c // bs) for c in ctx) + 2
    meta = make_batch(rng, [1] * len(ctx), ctx, bs, num_blocks)
    cache, cache_h = upload(ops, randn(2, num_blocks, nkv, bs, head_dim, rng=rng))
    qkv, qkv_h = upload(ops, randn(len(ctx), (nh + 2 * nkv) * head_dim, rng=rng))
    scale = head_dim**-0.5
    want = REF.attention(qkv_h, cache_h[0], cache_h[1], meta, nh, nkv, scale)
    dmeta = ops.prepare_metadata(meta)
    if grid_splits is not None:
        n = ca.MAX_SPLITS if grid_splits == "max" else grid_splits
        dmeta.num_splits = n
        assert ca.make_plan(meta.query_start_loc, nkv, group, 5000, n).num_splits == n
    got = ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, scale)
    assert rel_err(ops.to_host(got), want) < TOL[ops.dtype]


def test_choose_splits_fills_the_gpu_from_one_long_sequence():
    from engine.executor.ops import cuda_attention as ca

    assert ca.choose_splits(1, 8, 32768) * 8 >= ca.NUM_BLOCKS_TARGET  # one long sequence
    assert ca.choose_splits(1, 8, 100) == 1  # one short one: nothing to split
    assert ca.choose_splits(256, 8, 32768) == 1  # a full batch fills the GPU already
    # eager steps: from the contexts themselves
    splits, keys = ca.splits_for_contexts(np.array([32768] + [100] * 15), 8)
    assert splits * 8 >= ca.NUM_BLOCKS_TARGET * 0.9  # the long one alone fills the GPU
    assert ca.splits_for_contexts(np.array([100] * 4), 8) == (1, ca.MIN_KEYS_PER_SPLIT)
    splits, keys = ca.splits_for_contexts(np.array([4096] * 256), 8)
    assert splits <= 2 and keys >= 4096 // 2  # a full batch: few splits, long ones


# ------------------------------------------------------------------ small-batch GEMV


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", [(1001, 1000), (640, 4096), (8, 8)])
def test_gemv_linear(ops, m, n, k):
    from engine.executor.ops import cuda_gemv

    rng = np.random.default_rng()
    x, x_h = upload(ops, randn(m, k, rng=rng))
    w, w_h = upload(ops, randn(n, k, rng=rng, scale=k**-0.5))
    assert cuda_gemv.gemv_fits(x, w, 8)
    out = cupy.empty((m, n), x.dtype)
    got = ops.to_host(cuda_gemv.gemv(x, w, out, ops.ctype))
    assert rel_err(got, REF.linear(x_h, w_h)) < TOL[ops.dtype]
    assert rel_err(ops.to_host(ops.linear(x, w)), REF.linear(x_h, w_h)) < TOL[ops.dtype]


@pytest.mark.parametrize("m", [1, 3, 4, 6])
@pytest.mark.parametrize("k", [1024, 4096, 8192])  # 8192 x 4 rows: over the shared-memory cap
@pytest.mark.parametrize("first", [True, False])  # first layer: no residual yet
def test_add_rms_norm_linear(ops, m, k, first):
    """Fused into the GEMV up to NORM_GEMV_MAX_M rows, add_rms_norm + linear above."""
    rng = np.random.default_rng()
    n = 1000
    x, x_h = upload(ops, randn(m, k, rng=rng))
    res, res_h = (None, None) if first else upload(ops, randn(m, k, rng=rng))
    nw, nw_h = upload(ops, randn(k, rng=rng))
    w, w_h = upload(ops, randn(n, k, rng=rng, scale=k**-0.5))
    want_y, want_res = REF.add_rms_norm_linear(x_h, res_h, nw_h, 1e-6, w_h)
    res_before = None if first else ops.to_host(res).copy()
    y, new_res = ops.add_rms_norm_linear(x, res, nw, 1e-6, w)
    assert rel_err(ops.to_host(y), want_y) < TOL[ops.dtype]
    assert rel_err(ops.to_host(new_res), want_res) < TOL[ops.dtype]
    h, unfused_res = ops.add_rms_norm(x, None if first else upload(ops, res_before)[0], nw, 1e-6)
    unfused = ops.to_host(ops.linear(h, w))
    assert rel_err(ops.to_host(y), unfused) < TOL[ops.dtype] / 4
    np.testing.assert_array_equal(ops.to_host(new_res), ops.to_host(unfused_res))


@pytest.mark.parametrize("m", [1, 2, 4, 6])
def test_silu_mul_linear(ops, m):
    """Fused into the GEMV up to GEMV_SILU_MAX_M rows, silu_and_mul + linear above."""
    rng = np.random.default_rng()
    inter, hidden = 1536, 520
    gu, gu_h = upload(ops, randn(m, 2 * inter, rng=rng))
    w, w_h = upload(ops, randn(hidden, inter, rng=rng, scale=inter**-0.5))
    want = REF.silu_mul_linear(gu_h, w_h)
    assert rel_err(ops.to_host(ops.silu_mul_linear(gu, w)), want) < TOL[ops.dtype]
    unfused = ops.to_host(ops.linear(ops.silu_and_mul(gu), w))
    assert rel_err(ops.to_host(ops.silu_mul_linear(gu, w)), unfused) < TOL[ops.dtype] / 4


# ------------------------------------------------------------------ sampling select


@pytest.mark.parametrize("scale", [0.05, 3.0, 12.0])  # flat (the bisection fallback), peaked
def test_sample_select_matches_numpy(ops, scale):
    rng = np.random.default_rng()
    rows, vocab = 48, 151936
    logits = randn(rows, vocab, rng=rng, scale=scale)
    logits[::5, 100:110] = logits[::5, 100:101]  # ties across the thresholds
    t = tensors(rows)
    t.temperature = rng.choice([0.5, 0.8, 1.3], rows).astype(np.float32)
    t.top_k = rng.choice([0, 1, 50, 1000, 5000], rows).astype(np.int32)
    t.top_p = rng.choice([1.0, 0.95, 0.5], rows).astype(np.float32)
    t.min_p = rng.choice([0.0, 0.05], rows).astype(np.float32)
    t.seeds = rng.integers(1, 2**63, rows).astype(np.uint64)
    check_sample(ops, logits, t, min_agree=0.9)


def test_sample_select_agrees_with_the_bisection_kernel(ops):
    from engine.executor.ops import cuda_sampling

    rng = np.random.default_rng()
    rows, vocab = 64, 32000
    logits = cupy.asarray(randn(rows, vocab, rng=rng, scale=4.0))
    t = tensors(rows)
    t.temperature = np.full(rows, 0.8, np.float32)
    t.top_k = rng.choice([0, 5, 50], rows).astype(np.int32)
    t.top_p = rng.choice([1.0, 0.95], rows).astype(np.float32)
    t.seeds = rng.integers(1, 2**63, rows).astype(np.uint64)
    new = ops.sample(logits, t).token_ids
    cuda_sampling.SAMPLER = "bisect"
    try:
        old = ops.sample(logits, t).token_ids
    finally:
        cuda_sampling.SAMPLER = "select"
    assert np.mean(new == old) >= 0.95, (new, old)
