"""Issue 12's kernels against their numpy twins (GPU only): the fused q/k-norm + RoPE + KV write,
flash-decoding splits sized per sequence, the small-batch GEMV, and the one-pass sampling select."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import capture_and_replay, require_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_device_memory")]
cupy = require_gpu()

from test_cuda_ops import (  # noqa: E402
    TOL,
    check_sample,
    decode_kernel,  # noqa: F401 (a fixture: each decode kernel in turn)
    make_batch,
    randn,
    rel_err,
    tensors,
    upload,
)

from engine.executor.ops.cuda_kernels import (  # noqa: E402
    DECODE_CLUSTER_CONFIGS,
    DECODE_MMA_CONFIGS,
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
@pytest.mark.parametrize("group", [1, 2, 4, 8, 24])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.usefixtures("decode_kernel")
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


@pytest.mark.parametrize("config", DECODE_CLUSTER_CONFIGS, ids=str)
@pytest.mark.parametrize("group", [2, 4, 16])
def test_decode_cluster_kernel(ops, group, config, monkeypatch):
    """The cluster form of the decode kernel (short-context graphs) against the twin: a
    (sequence, kv head)'s splits are one cluster's blocks, combined in distributed shared memory;
    contexts shorter than the cluster (blocks without keys), ending inside a tile, and long
    enough that every warp loops."""
    import cupy

    from engine.executor.ops import cuda_attention as ca

    if int(cupy.cuda.Device().compute_capability) < 90:
        pytest.skip("thread-block clusters need sm_90")
    monkeypatch.setattr(ca, "DECODE_KERNEL", "mma")
    nw, st, cl = config
    nkv, nh, meta, cache, qkv, want = _decode_case(ops, group, [1, 3, 16, 17, 65, 200, 1000, 3000])
    dmeta = ops.prepare_metadata(meta)
    plan = ca.make_plan(meta.query_start_loc, nkv, group, 4096, cl)
    plan.decode_config, plan.decode_cluster = (nw, st), cl
    dmeta.work[group] = plan
    got = ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, 128**-0.5)
    assert rel_err(ops.to_host(got), want) < TOL[ops.dtype]


# Copies a cache over another after spinning ~`spin` clocks, having let the next kernel launch at
# once: a programmatic dependent launch after it runs its pre-wait part meanwhile.
_LATE_COPY = r"""
extern "C" __global__ void late_copy(unsigned short* dst, const unsigned short* src, long n,
                                     long long spin) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const long long t0 = clock64();
  while (clock64() - t0 < spin) {
  }
  const long stride = (long)gridDim.x * blockDim.x;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = src[i];
}
"""


@pytest.mark.parametrize("form", ["split", "cluster", "tma"])
def test_decode_waits_for_the_steps_own_keys(ops, form, monkeypatch):
    """Under PDL the mma decode kernel copies its first K/V tiles before it waits for the kernel
    before it; the last `fresh_keys` keys of a row are the step's own (a verify step's decode
    rows read their drafts' keys) and come after the wait. A kernel that writes those keys late
    precedes it: with fresh_keys covering them attention equals the twin on the new cache; with
    1 it reads the stale keys (the race this guards against). Forms: one block a sequence, a
    cluster's blocks, the stages filled by TMA (tiles holding such keys after the wait)."""
    from engine.executor.ops import cuda_attention as ca
    from engine.executor.ops import cuda_kernels as ck

    if int(cupy.cuda.Device().compute_capability) < 90:
        pytest.skip("programmatic dependent launches need sm_90")
    cluster = form == "cluster"
    monkeypatch.setattr(ca, "DECODE_MMA_TMA", "1" if form == "tma" else "0")
    monkeypatch.setattr(ca, "DECODE_KERNEL", "mma")
    rng = np.random.default_rng(7)
    fresh, nkv, group, bs, hd = 5, 2, 4, 16, 128
    nh = nkv * group
    ctx = [5, 9, 17, 40, 64, 100, 130]  # the fresh keys lie in the early tiles
    num_blocks = sum(-(-c // bs) for c in ctx) + 2
    meta = make_batch(rng, [1] * len(ctx), ctx, bs, num_blocks)
    old_h = ops.to_host(ops.from_host(randn(2, num_blocks, nkv, bs, hd, rng=rng)))
    new_h = old_h.copy()
    for s, c in enumerate(ctx):  # new values for keys c - fresh .. c - 1 of every row
        for key in range(max(0, c - fresh), c):
            blk = meta.block_tables[s, key // bs]
            new_h[:, blk, :, key % bs] = randn(2, nkv, hd, rng=rng, scale=4.0)
    new_h = ops.to_host(ops.from_host(new_h))
    qkv, qkv_h = upload(ops, randn(len(ctx), (nh + 2 * nkv) * hd, rng=rng, scale=3.0))
    want = REF.attention(qkv_h, new_h[0], new_h[1], meta, nh, nkv, hd**-0.5)
    stale = REF.attention(qkv_h, old_h[0], old_h[1], meta, nh, nkv, hd**-0.5)
    assert rel_err(stale, want) > 10 * TOL[ops.dtype]
    copy = cupy.RawKernel(_LATE_COPY, "late_copy")
    new_d = ops.from_host(new_h)
    splits = ca.SHORT_DECODE_CLUSTER if cluster else 1

    def run(fresh_keys: int):
        cache = ops.from_host(old_h)
        dmeta = ops.prepare_metadata(meta)
        plan = ca.make_plan(meta.query_start_loc, nkv, group, 256, splits)
        if cluster:
            plan.decode_config, plan.decode_cluster = ca.SHORT_DECODE_CONFIG, splits
        plan.fresh_keys = fresh_keys
        dmeta.work[group] = plan
        out = cupy.empty((len(ctx), nh * hd), qkv.dtype)

        def step():
            ck.launch(copy, (64,), (256,), (cache, new_d, np.int64(cache.size),
                                            np.int64(20_000_000)), pdl=True)
            ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5, out=out)

        # captured as the decode graphs are: a programmatic edge from the copy to attention
        with ck.programmatic_launches():
            capture_and_replay(step)
        return ops.to_host(out)

    got = run(fresh)
    err = [rel_err(got[r], want[r]) for r in range(len(ctx))]
    assert max(err) < TOL[ops.dtype], (err, rel_err(got, stale))
    if ck.PDL:  # launched programmatically: the early copies ran during the spin
        got = run(1)
        assert rel_err(got, want) > 10 * TOL[ops.dtype], (rel_err(got, want), rel_err(got, stale))


def _decode_case(ops, group: int, ctx: list[int], bs: int = 16, nkv: int = 2, hd: int = 128):
    """One decode token per sequence of these contexts on random caches: (nkv, nh, metadata,
    cache, qkv on the device, the twin's attention output)."""
    rng = np.random.default_rng()
    nh = nkv * group
    num_blocks = sum(-(-c // bs) for c in ctx) + 2
    meta = make_batch(rng, [1] * len(ctx), ctx, bs, num_blocks)
    cache, cache_h = upload(ops, randn(2, num_blocks, nkv, bs, hd, rng=rng))
    qkv, qkv_h = upload(ops, randn(len(ctx), (nh + 2 * nkv) * hd, rng=rng, scale=3.0))
    return nkv, nh, meta, cache, qkv, REF.attention(qkv_h, cache_h[0], cache_h[1], meta, nh, nkv,
                                                    hd**-0.5)


@pytest.mark.parametrize("tma", ["0", "1"], ids=["cp_async", "tma"])
@pytest.mark.parametrize("config", DECODE_MMA_CONFIGS, ids=str)
@pytest.mark.parametrize("group", [2, 4, 16])
@pytest.mark.parametrize("bs", [16, 8])
def test_decode_mma_configs(ops, bs, group, config, tma, monkeypatch):
    """Every (warps, stages) variant of the tensor-core decode kernel, its stages filled by
    cp.async or TMA (whole 16-key tiles; half ones fall back to cp.async), against
    the twin: contexts that end inside a warp's tile (NaN in their block's slots past them), wrap
    each warp's stage ring many times, or give a warp none; cache blocks that hold
    whole 16-key tiles (one table read per tile) and half ones."""
    from engine.executor.ops import cuda_attention as ca

    if tma == "1" and not ca.sm90_device():
        pytest.skip("TMA copies need sm_90")
    monkeypatch.setattr(ca, "DECODE_MMA_TMA", tma)
    assert ca.decode_tma(bs) == (tma == "1" and bs % 16 == 0 and not ca.sm90_missing())
    monkeypatch.setattr(ca, "DECODE_KERNEL", "mma")
    monkeypatch.setattr(ca, "DECODE_MMA_CONFIG", config)  # split grids
    monkeypatch.setattr(ca, "DECODE_MMA_FULL_CONFIG", config)  # grids of one split
    ctx = [3, 16, 17, 63, 64, 65, 200, 3000]
    nkv, nh, meta, cache, qkv, want = _decode_case(ops, group, ctx, bs)
    bits = cache.view(cupy.uint16)  # (bf16 is stored as 16-bit words)
    for s, c in enumerate(ctx):  # the slots past each context: NaN, which must not reach O
        if c % bs:
            bits[:, int(meta.block_tables[s, c // bs]), :, c % bs:] = 0xFFFF
    for splits in (1, 5, 256):
        dmeta = ops.prepare_metadata(meta)
        dmeta.num_splits = splits
        got = ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, 128**-0.5)
        assert rel_err(ops.to_host(got), want) < TOL[ops.dtype], splits


def _cos_sin(max_pos: int, hd: int) -> np.ndarray:
    """A RoPE table as the model's (rope_cos_sin): cos of hd / 2 frequencies, then their sin."""
    angles = np.arange(max_pos)[:, None] * 10000.0 ** (-np.arange(hd // 2) * 2 / hd)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


@pytest.mark.parametrize("tma", ["0", "1"], ids=["cp_async", "tma"])
@pytest.mark.parametrize("config", DECODE_MMA_CONFIGS, ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_rope_fold(ops, head_dim, group, config, tma, monkeypatch):
    """The RoPE fold: attention(rope=...) of a decode-only step does qk_norm_rope_kv_write's job
    (RoPE on q and k, k and v into the cache) in the mma decode kernel. Against the twin, and
    against the two launches it replaces: the same output, the same cache (the step's own slots
    were NaN before: the kernel must take the new key from the qkv row, not the cache), qkv
    left as it was; contexts whose new key starts, ends or sits inside a warp's tile, on grids
    of 1, 5 and 256 splits."""
    from engine.executor.ops import cuda_attention as ca

    if tma == "1" and not ca.sm90_device():
        pytest.skip("TMA copies need sm_90")
    monkeypatch.setattr(ca, "DECODE_MMA_TMA", tma)
    monkeypatch.setattr(ca, "DECODE_KERNEL", "mma")
    monkeypatch.setattr(ca, "DECODE_MMA_CONFIG", config)
    monkeypatch.setattr(ca, "DECODE_MMA_FULL_CONFIG", config)
    rng = np.random.default_rng()
    nkv, bs = 2, 16
    nh = nkv * group
    ctx = [1, 16, 17, 63, 64, 65, 200, 3000]
    num_blocks = sum(-(-c // bs) for c in ctx) + 2
    meta = make_batch(rng, [1] * len(ctx), ctx, bs, num_blocks)
    cache0 = ops.from_host(randn(2, num_blocks, nkv, bs, head_dim, rng=rng))
    bits = cache0.view(cupy.uint16)
    for s, c in enumerate(ctx):  # the new key's slot: NaN until the step writes it
        bits[:, int(meta.block_tables[s, (c - 1) // bs]), :, (c - 1) % bs] = 0xFFFF
    qkv, qkv_h = upload(ops, randn(len(ctx), (nh + 2 * nkv) * head_dim, rng=rng, scale=3.0))
    positions = np.array(ctx, np.int32) - 1
    cos_sin = ops.from_host(_cos_sin(4096, head_dim))
    pos_d = cupy.asarray(positions)
    scale = head_dim**-0.5
    for splits in (1, 5, 256):
        dmeta = ops.prepare_metadata(meta)
        dmeta.num_splits = splits
        assert ops.folds_rope(dmeta, nh, nkv)
        cache = cache0.copy()
        got = ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, scale,
                            rope=(pos_d, cos_sin))
        assert np.array_equal(ops.to_host(qkv), qkv_h), "the fold leaves qkv as it was"
        # the twin: RoPE and the write on the host, then attention
        cache_h = ops.to_host(cache0)
        want = REF.attention(qkv_h, cache_h[0], cache_h[1], meta, nh, nkv, scale,
                             rope=(positions, ops.to_host(cos_sin)))
        assert rel_err(ops.to_host(got), want) < TOL[ops.dtype], splits
        # the two launches it replaces
        ref_qkv, ref_cache = qkv.copy(), cache0.copy()
        ops.qk_norm_rope_kv_write(ref_qkv, pos_d, cos_sin, None, None, 1e-6, ref_cache[0],
                                  ref_cache[1], meta.slot_mapping, nh, nkv)
        dref = ops.prepare_metadata(meta)
        dref.num_splits = splits
        ref = ops.attention(ref_qkv, ref_cache[0], ref_cache[1], dref, nh, nkv, scale)
        a, b = ops.to_host(got), ops.to_host(ref)
        assert np.mean(a == b) > 0.99 and rel_err(a, b) < TOL[ops.dtype] / 8, splits
        a, b = cache.view(cupy.uint16).get(), ref_cache.view(cupy.uint16).get()
        new = np.zeros(a.shape, bool)  # the step's own slots
        for slot in meta.slot_mapping:
            new[:, slot // bs, :, slot % bs] = True
        assert np.array_equal(a[~new], b[~new]), "the fold wrote outside the step's slots"
        a, b = ops.to_host(cache)[new], ops.to_host(ref_cache)[new]
        assert not np.isnan(a).any() and np.mean(a == b) > 0.99, splits
        assert rel_err(a, b) < TOL[ops.dtype] / 8, splits


@pytest.mark.parametrize("fold", [False, True], ids=["plain", "rope_fold"])
@pytest.mark.parametrize("group", [2, 8, 16])
def test_decode_cluster_merge(ops, group, fold, monkeypatch):
    """PAGEDSERVE_DECODE_CLUSTER_MERGE: a split grid of 2..8 splits runs as clusters of its
    splits (rounded up to 2, 4 or 8) merged in distributed shared memory, no reduce launch;
    against the twin, with and without the RoPE fold, contexts shorter than the cluster (blocks
    without keys), ending inside a tile, and long; grids of 9+ splits keep the reduce launch."""
    from engine.executor.ops import cuda_attention as ca

    if not ca.sm90_device() or ca.sm90_missing():
        pytest.skip("clusters with TMA need sm_90")
    monkeypatch.setattr(ca, "DECODE_KERNEL", "mma")
    monkeypatch.setattr(ca, "DECODE_MMA_TMA", "1")
    monkeypatch.setattr(ca, "DECODE_CLUSTER_MERGE", True)
    assert [ca.merge_cluster(s) for s in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 1]
    rng = np.random.default_rng(group)
    nkv, bs, hd = 2, 16, 128
    nh = nkv * group
    ctx = [1, 3, 16, 17, 65, 200, 1000, 3000]
    num_blocks = sum(-(-c // bs) for c in ctx) + 2
    meta = make_batch(rng, [1] * len(ctx), ctx, bs, num_blocks)
    cache0 = ops.from_host(randn(2, num_blocks, nkv, bs, hd, rng=rng))
    qkv, qkv_h = upload(ops, randn(len(ctx), (nh + 2 * nkv) * hd, rng=rng, scale=3.0))
    positions = np.array(ctx, np.int32) - 1
    cos_sin = ops.from_host(_cos_sin(4096, hd))
    cache_h = ops.to_host(cache0)
    rope = (positions, ops.to_host(cos_sin)) if fold else None
    want = REF.attention(qkv_h, cache_h[0], cache_h[1], meta, nh, nkv, hd**-0.5, rope=rope)
    for splits in (2, 3, 5, 8, 9):
        dmeta = ops.prepare_metadata(meta)
        dmeta.num_splits = splits
        cache = cache0.copy()
        if fold:
            if not ops.folds_rope(dmeta, nh, nkv):
                pytest.skip("the fold takes 8 query heads a block (group <= 8, TR tiles)")
            got = ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5,
                                rope=(cupy.asarray(positions), cos_sin))
        else:
            got = ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5)
        assert rel_err(ops.to_host(got), want) < TOL[ops.dtype], splits


def test_choose_splits_fills_the_gpu_from_one_long_sequence():
    from engine.executor.ops import cuda_attention as ca

    # one long sequence: every split the grid may have, at least one block per SM of an H200
    assert ca.choose_splits(1, 8, 32768) == ca.MAX_SPLITS and ca.MAX_SPLITS * 8 >= 132
    assert ca.choose_splits(1, 8, 100) == 1  # one short one: nothing to split
    assert ca.choose_splits(256, 8, 32768) == 1  # a full batch fills the GPU already
    # eager steps: from the contexts themselves
    splits, keys = ca.splits_for_contexts(np.array([32768] + [100] * 15), 8)
    assert splits == ca.MAX_SPLITS  # the long one alone fills the GPU
    assert ca.splits_for_contexts(np.array([50] * 4), 8) == (1, ca.MIN_KEYS_PER_SPLIT)
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
    # NOTE: / 2, not tighter: the one-pass kernel does not round the normalized row to the dtype
    # before the product as the unfused pair does (gemv.cu)
    assert rel_err(ops.to_host(y), unfused) < TOL[ops.dtype] / 2
    np.testing.assert_array_equal(ops.to_host(new_res), ops.to_host(unfused_res))
    from engine.executor.ops import cuda_gemv

    res = None if first else upload(ops, res_before)[0]
    if cuda_gemv.norm_gemv_fits(x, res, nw, w):  # the kernel itself, where ops would not take it
        y2, res2 = cuda_gemv.norm_gemv(x, res, nw, w, 1e-6, ops.ctype)
        assert rel_err(ops.to_host(y2), want_y) < TOL[ops.dtype]
        np.testing.assert_array_equal(ops.to_host(res2), ops.to_host(unfused_res))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("first", [True, False])  # first layer: no residual yet
def test_mlp(ops, m, first):
    """mlp(): the SiLU-and-mul on the gate_up GEMV's output (with the add + norm fused in at
    M = 1), the down GEMV after; the unfused ops above the caps."""
    from engine.executor.ops import cuda_gemv

    rng = np.random.default_rng()
    hidden, inter = 1032, 1540  # inter / 2 rows per block: the last GLU block is half full
    x, x_h = upload(ops, randn(m, hidden, rng=rng))
    res, res_h = (None, None) if first else upload(ops, randn(m, hidden, rng=rng))
    nw, nw_h = upload(ops, randn(hidden, rng=rng))
    gu, gu_h = upload(ops, randn(2 * inter, hidden, rng=rng, scale=hidden**-0.5))
    down, down_h = upload(ops, randn(hidden, inter, rng=rng, scale=inter**-0.5))
    want_y, want_res = REF.mlp(x_h, res_h, nw_h, 1e-6, gu_h, down_h)
    res_before = None if first else ops.to_host(res).copy()
    y, new_res = ops.mlp(x, res, nw, 1e-6, gu, down)
    assert rel_err(ops.to_host(y), want_y) < TOL[ops.dtype]
    assert rel_err(ops.to_host(new_res), want_res) < TOL[ops.dtype]
    # the kernels themselves, where ops would not take them
    h, _ = ops.add_rms_norm(x, None if first else upload(ops, res_before)[0], nw, 1e-6)
    unfused_act = ops.to_host(ops.silu_and_mul(ops.linear(h, gu)))
    if m <= 4:
        act = ops.to_host(cuda_gemv.glu_gemv(h, gu, ops.ctype))
        if m <= cuda_gemv.gemv_max_rows(*gu.shape):  # the same GEMV sums, then the same SiLU
            np.testing.assert_array_equal(act, unfused_act)
        assert rel_err(act, unfused_act) < TOL[ops.dtype] / 4
        act, res2 = cuda_gemv.norm_gemv(x, None if first else upload(ops, res_before)[0], nw,
                                        gu, 1e-6, ops.ctype, glu=True)
        assert rel_err(ops.to_host(act), unfused_act) < TOL[ops.dtype]
        np.testing.assert_array_equal(ops.to_host(res2), ops.to_host(new_res))


def test_silu_mul_linear(ops):
    rng = np.random.default_rng()
    gu, gu_h = upload(ops, randn(2, 2 * 1536, rng=rng))
    w, w_h = upload(ops, randn(520, 1536, rng=rng, scale=1536**-0.5))
    assert rel_err(ops.to_host(ops.silu_mul_linear(gu, w)),
                   REF.silu_mul_linear(gu_h, w_h)) < TOL[ops.dtype]


# Device run 2 (tools/kernel_check.py): (N, K) -> cuBLAS time / GEMV time at M = 1, 2, 4, 8.
GEMV_RATIOS = {
    (4096, 1024): (1.28, 1.20, 0.81, 0.59), (1024, 2048): (4.18, 2.34, 2.46, 1.01),
    (6144, 1024): (1.15, 1.04, 0.71, 0.50), (1024, 3072): (2.02, 1.81, 1.52, 1.14),
    (151936, 1024): (1.09, 0.95, 0.61, 0.40), (6144, 4096): (1.15, 1.07, 0.73, 0.53),
    (4096, 4096): (1.28, 1.13, 0.86, 0.63), (28672, 4096): (1.04, 1.10, 0.68, 0.48),
    (4096, 14336): (1.10, 1.04, 0.84, 0.58), (128256, 4096): (1.07, 1.06, 0.69, 0.49),
}


def test_gemv_choice_fits_the_measurements():
    """The GEMV / cuBLAS rule picks the faster path at every measured (shape, M), and the fused
    prologues only where they were measured faster."""
    from engine.executor.ops import cuda_gemv

    for (n, k), ratios in GEMV_RATIOS.items():
        for m, ratio in zip((1, 2, 4, 8), ratios, strict=True):
            assert (m <= cuda_gemv.gemv_max_rows(n, k)) == (ratio > 1), (n, k, m, ratio)
    x1, x2 = cupy.zeros((1, 1024), cupy.uint16), cupy.zeros((2, 1024), cupy.uint16)
    nw = cupy.zeros(1024, cupy.uint16)
    w_qkv, w_gate_up = cupy.zeros((4096, 1024), cupy.uint16), cupy.zeros((6144, 1024), cupy.uint16)
    assert cuda_gemv.use_norm_gemv(x1, None, nw, w_qkv)  # 1.25x
    assert cuda_gemv.use_norm_gemv(x1, x1, nw, w_gate_up)  # 1.06x
    assert not cuda_gemv.use_norm_gemv(x2, x2, nw, w_qkv)  # 0.75x
    assert cuda_gemv.use_glu_gemv(x2, w_gate_up) and not cuda_gemv.use_glu_gemv(
        cupy.zeros((4, 1024), cupy.uint16), w_gate_up)  # gate_up on the GEMV at M <= 2
    # 64 threads per block only at one row and K < 2048 (device run 2)
    assert [cuda_gemv.gemv_threads(m, k) for m, k in ((1, 1024), (2, 1024), (1, 4096))] == [
        64, 128, 256]


# ------------------------------------------------------------------ sampling select


@pytest.fixture(params=["select", "twopass"])
def sampler(request):
    """cuda_sampling.SAMPLER for the test, restored after it."""
    from engine.executor.ops import cuda_sampling

    saved, cuda_sampling.SAMPLER = cuda_sampling.SAMPLER, request.param
    yield request.param
    cuda_sampling.SAMPLER = saved


@pytest.mark.parametrize("scale", [0.05, 3.0, 12.0])  # flat (the bisection fallback), peaked
def test_sample_select_matches_numpy(ops, scale, sampler):
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
    # NOTE: at scale 0.05 a row is nearly uniform over 152k tokens: a draw lands within float32
    # rounding of a neighbour's cumulative mass more often (measured 43 of 48 rows agree).
    check_sample(ops, logits, t, min_agree=0.8 if scale < 1 else 0.9)


@pytest.mark.parametrize("vocab", [151936, 151933])  # 16-byte rows, and element-wise loads
@pytest.mark.parametrize("scale", [3.0, 1.0])  # flatter rows: the second histogram level
def test_sample_select_window_matches_numpy(ops, vocab, scale, sampler):
    """Rows whose kept set is thousands of tokens (top-p alone on a spread row, a large top-k):
    only the window of bins around each cut is sorted, the p above it counted and summed."""
    rng = np.random.default_rng()
    rows = 32
    logits = randn(rows, vocab, rng=rng, scale=scale)
    logits[::4, 200:220] = logits[::4, 200:201]  # ties
    t = tensors(rows)
    t.temperature = np.full(rows, 0.8, np.float32)
    t.top_k = rng.choice([0, 0, 3000], rows).astype(np.int32)
    t.top_p = rng.choice([0.95, 0.99, 0.8], rows).astype(np.float32)
    t.min_p = rng.choice([0.0, 0.0, 1e-4], rows).astype(np.float32)
    t.seeds = rng.integers(1, 2**63, rows).astype(np.uint64)
    # NOTE: at scale 1 the kept sets are ~100k tokens of p ~ 1e-5, about the rounding of numpy's
    # own float32 cumsum over them: the draws may differ there without either being wrong.
    check_sample(ops, logits, t, min_agree=0.95 if scale > 2 else 0.6)


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
    saved, cuda_sampling.SAMPLER = cuda_sampling.SAMPLER, "bisect"
    try:
        old = ops.sample(logits, t).token_ids
    finally:
        cuda_sampling.SAMPLER = saved
    assert np.mean(new == old) >= 0.95, (new, old)


def renorm_rows(vocab, rows=64):
    """Logits and SamplingTensors whose draws tell vLLM's order from the one before it: peaked
    rows (p 0.5 / 0.3 / 0.1 / 0.1 at four ids past 0, the rest ~1e-13) and token 0 biased by
    +30.5 and in the prompt, at repetition penalty 2. Biased first it is (-30 + 30.5) / 2 and
    takes p 0.56 (penalized first, -30 * 2 + 30.5, it stays ~0); top-k 2 or min-p 0.25 then keep
    it and the 0.5 token (0.22), and top-p 0.6 / 0.65 of their mass 0.78 keeps token 0 alone
    (over the whole row's mass, 0.56 < 0.6 would keep the other too): every row draws 0."""
    rng = np.random.default_rng(vocab)
    logits = np.full((rows, vocab), -30.0, np.float32)
    for r in range(rows):
        logits[r, rng.choice(np.arange(1, vocab), 4, replace=False)] = np.log([0.5, 0.3, 0.1,
                                                                                 0.1])
    t = tensors(rows)
    t.temperature = np.ones(rows, np.float32)
    t.top_k = np.where(np.arange(rows) % 2, 2, 0).astype(np.int32)
    t.min_p = np.where(np.arange(rows) % 2, 0.0, 0.25).astype(np.float32)
    t.top_p = rng.choice([0.6, 0.65], rows).astype(np.float32)
    t.seeds = rng.integers(1, 2**63, rows).astype(np.uint64)
    t.repetition_penalty = np.full(rows, 2.0, np.float32)
    t.prompt_ids = np.zeros((rows, 1), np.int32)
    t.output_ids = np.full((rows, 1), -1, np.int32)
    t.bias_ids = np.zeros((rows, 1), np.int32)
    t.bias_values = np.full((rows, 1), 30.5, np.float32)
    return logits, t


@pytest.mark.parametrize("kind", ["select", "twopass", "bisect"])
@pytest.mark.parametrize("vocab", [151936, 1000])
def test_top_p_measures_what_top_k_and_min_p_keep(ops, kind, vocab):
    """vLLM's order on every sampler: the logit bias before the penalties, top-p's mass taken of
    what top-k and min-p keep (renorm_rows)."""
    from engine.executor.ops import cuda_sampling

    logits, t = renorm_rows(vocab)
    want = REF.sample(logits, t).token_ids
    assert not want.any()
    saved, cuda_sampling.SAMPLER = cuda_sampling.SAMPLER, kind
    try:
        got = ops.sample(cupy.asarray(logits), t).token_ids
    finally:
        cuda_sampling.SAMPLER = saved
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows, vocab", [(140, 151936), (40, 151933), (16, 1000)])
def test_sample_twopass_top_k_matches_numpy(ops, rows, vocab):
    """The two-pass cut (cuda/sampling_twopass.cuh): rows with a top-k of at most half the block
    (512 threads above 132 rows), or a top-p the thread maxima reach, take it, on peaked and
    flat rows, with ties at the top and across the cut; larger top-k without such a top-p,
    spread top-p, rows with fewer finite values than k and the division temperature path fall
    back to the histogram steps. Same ids as numpy, and as the select sampler, on half / bf16
    logits."""
    from engine.executor.ops import cuda_sampling

    rng = np.random.default_rng(rows)
    scales = rng.choice([0.05, 1.0, 3.0, 12.0], rows).astype(np.float32)
    logits = randn(rows, vocab, rng=rng) * scales[:, None]
    logits[::5, 100:110] = logits[::5, 100:101]  # ties, somewhere
    top = logits[1::6].max(axis=1, keepdims=True)
    logits[1::6, 300:304] = top  # ties at the top
    logits[2, 10:] = -np.inf  # 10 finite values: fewer than most top-k
    t = tensors(rows)
    t.temperature = rng.choice([0.5, 0.8, 1.3], rows).astype(np.float32)
    t.temperature[3] = 1e-35  # the division path: the histogram steps
    t.top_k = rng.choice([0, 1, 2, 20, 50, 256, 257, 600], rows).astype(np.int32)
    t.top_p = rng.choice([1.0, 0.95, 0.5], rows).astype(np.float32)
    t.min_p = rng.choice([0.0, 0.0, 0.05], rows).astype(np.float32)
    t.seeds = rng.integers(1, 2**63, rows).astype(np.uint64)
    dev = ops.from_host(logits)  # the compute dtype, as the lm_head leaves it
    want = REF.sample(ops.to_host(dev), t)
    saved = cuda_sampling.SAMPLER
    try:
        cuda_sampling.SAMPLER = "twopass"
        got = ops.sample(dev, t)
        cuda_sampling.SAMPLER = "select"
        old = ops.sample(dev, t).token_ids
    finally:
        cuda_sampling.SAMPLER = saved
    new = got.token_ids
    assert np.mean(new == want.token_ids) >= 0.9, (new, want.token_ids)
    assert np.mean(new == old) >= 0.95, (new, old)
    one = t.top_k == 1  # one kept token (ties aside): no summation order can move the draw
    np.testing.assert_array_equal(new[one], want.token_ids[one])
    same = new == want.token_ids
    np.testing.assert_allclose(got.logprobs[same], want.logprobs[same], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset,per_layer", [("qwen3-0.6b", 7), ("llama3-8b", 6)])
def test_decode_step_launches(ops, preset, per_layer):
    """Kernel launches of a batch-1 decode step shaped like a CUDA graph's, per layer: the
    fused add+norm qkv GEMV, the fused q/k norm + RoPE + KV write (Llama: none, its RoPE and
    KV write folded into the attention), attention (decode + reduce), the o GEMV, the fused
    add+norm gate_up GEMV with the SiLU-and-mul on its output, the down GEMV; outside the
    layers: embedding, final norm, lm_head."""
    from tools.kernel_check import launches_per_step

    one, two = (launches_per_step(ops, preset, n) for n in (1, 2))
    layer = two - one
    assert sum(layer.values()) == per_layer, layer
    assert sum((one - layer).values()) == 3, one
    assert "cublas" not in two, two
