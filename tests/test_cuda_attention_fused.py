"""The decode attention's split reduce fused into the last split block (cuda_attention.FUSED_REDUCE,
PAGEDSERVE_DECODE_FUSED_REDUCE=1) against the two-kernel path (bit for bit: merge_splits repeats
decode_reduce_kernel's order of float operations) and the numpy twin, eagerly and inside CUDA
graphs replayed with other context lengths (GPU only).

    python -m pytest -q -m gpu tests/test_cuda_attention_fused.py
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_device_memory")]
cupy = require_gpu()

from engine.executor.ops import AttentionMetadata, cuda_kernels  # noqa: E402
from engine.executor.ops import cuda_attention as ca  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402

REF = NumpyOps()
BS = 16
CONTEXTS = (1, 63, 64, 65, 513, 4097, 32532)


@pytest.fixture(scope="module")
def ops():
    return CudaOps("bfloat16")  # the kernels' merge is dtype-blind; one dtype keeps compiles few


@pytest.fixture(autouse=True)
def mma(monkeypatch):
    monkeypatch.setattr(ca, "DECODE_KERNEL", "mma")


def make_meta(num_new, ctx, num_blocks, rng) -> AttentionMetadata:
    """Sequences with num_new[s] new tokens and ctx[s] keys, on shuffled cache blocks."""
    nb = [-(-c // BS) for c in ctx]
    perm = rng.permutation(num_blocks)
    tables = np.zeros((len(ctx), max(nb)), np.int32)
    used = 0
    for s, k in enumerate(nb):
        tables[s, :k] = perm[used : used + k]
        used += k
    qsl = np.concatenate([[0], np.cumsum(num_new)]).astype(np.int32)
    return AttentionMetadata(np.full(qsl[-1], -1, np.int32), qsl, np.array(ctx, np.int32),
                             tables, max(num_new), max(ctx))


def inputs(ops, ctx, num_new, nkv, group, hd, rng):
    nh = nkv * group
    meta = make_meta(num_new, ctx, sum(-(-c // BS) for c in ctx) + 2, rng)
    num_blocks = int(meta.block_tables.max()) + 3
    cache = ops.from_host(rng.standard_normal((2, num_blocks, nkv, BS, hd)).astype(np.float32))
    qkv = ops.from_host(rng.standard_normal((sum(num_new), (nh + 2 * nkv) * hd))
                        .astype(np.float32))
    return meta, cache, qkv


def attend(ops, qkv, cache, meta, nh, nkv, fused, num_splits=None, dmeta=None):
    """(T, nh * hd) on the host; num_splits: a CUDA graph's fixed grid, else the eager choice."""
    ca.FUSED_REDUCE = fused
    try:
        if dmeta is None:
            dmeta = ops.prepare_metadata(meta)
            dmeta.num_splits = num_splits
        hd = cache.shape[-1]
        return ops.to_host(ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5))
    finally:
        ca.FUSED_REDUCE = False


def counters_are_zero() -> bool:
    cupy.cuda.Device().synchronize()
    return all(not bool(cupy.any(b)) for b in ca._COUNTERS.get(cupy.cuda.Device().id, []))


def rel_err(got, want) -> float:
    assert np.isfinite(got).all(), "NaN/inf in the output (unwritten)"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("group", [2, 4])
def test_fused_reduce_equals_reduce_kernel_and_twin(ops, group, hd):
    rng = np.random.default_rng(group * 1000 + hd)
    nkv = 2
    nh = nkv * group
    # batch 1 at each context, a mixed decode batch, and decodes beside prefill chunks
    cases = [([1], [c]) for c in CONTEXTS]
    cases += [([1] * 6, [65, 1, 4097, 64, 513, 63]), ([1, 5, 1, 40, 1], [700, 90, 1, 40, 2049])]
    for num_new, ctx in cases:
        meta, cache, qkv = inputs(ops, ctx, num_new, nkv, group, hd, rng)
        want = REF.attention(ops.to_host(qkv), ops.to_host(cache[0]), ops.to_host(cache[1]),
                             meta, nh, nkv, hd**-0.5)
        # the decode graphs' 48-split grid, the widest grids the kernels take, the eager choice
        for num_splits in (ca.decode_plan(1, nkv, group, 32768).num_splits, 264, 512, None):
            old = attend(ops, qkv, cache, meta, nh, nkv, False, num_splits)
            new = attend(ops, qkv, cache, meta, nh, nkv, True, num_splits)
            where = f"ctx {ctx} new {num_new} splits {num_splits}"
            np.testing.assert_array_equal(new, old, err_msg=where)
            assert rel_err(new, want) < 1e-2, where
        assert counters_are_zero()


def test_fused_reduce_in_a_cuda_graph_replayed_with_other_contexts(ops):
    """Two layers' attention captured in one graph with PDL (as the decode graphs are), replayed
    with context lengths other than the capture's: the counters come back to zero each time."""
    rng = np.random.default_rng(7)
    nkv, group, hd = 2, 4, 128
    nh = nkv * group
    runs = [[65, 4097, 1, 64], [4097, 513, 64, 32532], [1, 1, 63, 700]]
    longest = [max(r[i] for r in runs) for i in range(4)]
    meta, cache, qkv = inputs(ops, longest, [1] * 4, nkv, group, hd, rng)
    cache2 = ops.from_host(rng.standard_normal(cache.shape).astype(np.float32))
    dmeta = ops.prepare_metadata(meta)
    dmeta.num_splits = ca.decode_plan(4, nkv, group, 32768).num_splits

    def step():
        return [ops.attention(qkv, c[0], c[1], dmeta, nh, nkv, hd**-0.5) for c in (cache, cache2)]

    saved_pdl, cuda_kernels.PDL = cuda_kernels.PDL, True
    ca.FUSED_REDUCE = True
    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with stream, cuda_kernels.programmatic_launches():
            dmeta.context_lens[:] = cupy.asarray(np.array(runs[0], np.int32))
            step()  # warm-up: compiles, makes the counters
            stream.synchronize()
            stream.begin_capture()
            outs = step()
            graph = stream.end_capture()
            for ctx in runs[1:] + runs[:1]:
                dmeta.context_lens[:] = cupy.asarray(np.array(ctx, np.int32))
                graph.launch(stream)
                stream.synchronize()
                got = [ops.to_host(o) for o in outs]
                assert counters_are_zero(), ctx
                sub = AttentionMetadata(meta.slot_mapping, meta.query_start_loc,
                                        np.array(ctx, np.int32), meta.block_tables, 1, max(ctx))
                for out, c in zip(got, (cache, cache2), strict=True):
                    old = attend(ops, qkv, c, sub, nh, nkv, False, dmeta.num_splits)
                    np.testing.assert_array_equal(out, old, err_msg=str(ctx))
                    want = REF.attention(ops.to_host(qkv), ops.to_host(c[0]), ops.to_host(c[1]),
                                         sub, nh, nkv, hd**-0.5)
                    assert rel_err(out, want) < 1e-2, ctx
    finally:
        ca.FUSED_REDUCE, cuda_kernels.PDL = False, saved_pdl


def test_decode_graph_logits_are_bit_identical_fused_or_not(ops, monkeypatch):
    """The engine's decode graphs (PDL on) with and without the fused reduce, two replays with
    different contexts each: the same logits, bit for bit."""
    from engine.executor.cuda_graph import DecodeGraphs
    from engine.executor.transformer import Transformer
    from engine.model.config import ModelConfig
    from engine.model.loader import dummy_weights

    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, 4096
    model = Transformer(config, dummy_weights(config, ops, seed=1), ops, 4096)
    rng = np.random.default_rng(3)
    nb = 200
    cache = ops.alloc_kv_cache(2, 4 * nb, config.num_kv_heads, BS, config.head_dim)
    cache[:] = ops.from_host(rng.standard_normal(cache.shape).astype(np.float32) * 0.5)
    start = cache.copy()  # each run from the same cache: a step writes its tokens' k/v
    tables = (np.arange(4)[:, None] * nb + np.arange(nb)).astype(np.int32)
    steps = [np.array([3000, 64, 1, 700]), np.array([65, 3100, 512, 0])]
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(ca, "FUSED_REDUCE", fused)
        cache[:] = start
        graphs = DecodeGraphs(model, cache, max_num_seqs=4, max_blocks_per_seq=nb)
        graphs.capture()
        for i, ctx in enumerate(steps):
            meta = AttentionMetadata((tables[np.arange(4), ctx // BS] * BS + ctx % BS)
                                     .astype(np.int32), np.arange(5, dtype=np.int32),
                                     (ctx + 1).astype(np.int32), tables, 1, int(ctx.max()) + 1)
            ids = np.array([5, 9, 11, 13], np.int32)
            results[fused, i] = cupy.asnumpy(graphs.run(ids, ctx.astype(np.int32), meta))
        del graphs
    assert counters_are_zero()
    for i in range(len(steps)):
        np.testing.assert_array_equal(results[True, i], results[False, i])
