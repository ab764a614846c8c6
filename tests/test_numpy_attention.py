"""NumpyOps.attention (the reference every CUDA attention kernel is held to) against attention
written out densely in float64 from contiguous keys and values, with no cache and no paging."""

import numpy as np
import pytest

from engine.executor.ops import AttentionMetadata, numpy_ops
from engine.executor.ops.numpy_ops import NumpyOps

NH, NKV, HD, BS = 6, 2, 16, 16  # a group of 3 query heads per kv head


def dense(q, k, v, num_new, scale):
    """q (new, NH, HD) at the last num_new positions of k, v (ctx, NKV, HD) -> (new, NH, HD)."""
    ctx = len(k)
    out = np.empty(q.shape)
    for h in range(NH):
        kv = h // (NH // NKV)
        for i in range(num_new):
            pos = ctx - num_new + i
            s = (k[: pos + 1, kv] @ q[i, h]) * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[: pos + 1, kv]
    return out


def batch(rng, cases):
    """cases: (context, new tokens) a sequence. The caches' blocks are handed out shuffled, as a
    block manager that has run a while would; returns (qkv, k_cache, v_cache, meta, keys,
    values) where keys / values hold each sequence's contiguous copy."""
    blocks_each = [-(-ctx // BS) for ctx, _ in cases]
    order = rng.permutation(sum(blocks_each)).astype(np.int32)
    k_cache = rng.standard_normal((len(order), NKV, BS, HD)).astype(np.float32)
    v_cache = rng.standard_normal((len(order), NKV, BS, HD)).astype(np.float32)
    tables = np.full((len(cases), max(blocks_each)), -1, np.int32)
    keys, values, at = [], [], 0
    for s, ((ctx, _), nb) in enumerate(zip(cases, blocks_each, strict=True)):
        tables[s, :nb] = order[at:at + nb]
        at += nb
        keys.append(k_cache[tables[s, :nb]].transpose(0, 2, 1, 3).reshape(-1, NKV, HD)[:ctx])
        values.append(v_cache[tables[s, :nb]].transpose(0, 2, 1, 3).reshape(-1, NKV, HD)[:ctx])
    new = [n for _, n in cases]
    qkv = rng.standard_normal((sum(new), (NH + 2 * NKV) * HD)).astype(np.float32)
    meta = AttentionMetadata(
        slot_mapping=np.zeros(sum(new), np.int32),
        query_start_loc=np.concatenate([[0], np.cumsum(new)]).astype(np.int32),
        context_lens=np.array([c for c, _ in cases], np.int32), block_tables=tables,
        max_query_len=max(new), max_context_len=max(c for c, _ in cases))
    return qkv, k_cache, v_cache, meta, keys, values


# a prompt chunk over more than two row groups on top of a cached part, a decode row, a whole
# short prompt, a chunk of exactly one row group, a decode row at a one-token context
CASES = [(900, 600), (37, 1), (20, 20), (512, 256), (1, 1)]


@pytest.mark.parametrize("rows", [256, 7])
def test_paged_attention_matches_dense_attention(monkeypatch, rows):
    monkeypatch.setattr(numpy_ops, "ATTENTION_ROWS", rows)
    rng = np.random.default_rng(5)
    qkv, k_cache, v_cache, meta, keys, values = batch(rng, CASES)
    scale = HD**-0.5
    got = NumpyOps().attention(qkv, k_cache, v_cache, meta, NH, NKV, scale)
    assert got.shape == (len(qkv), NH * HD) and got.dtype == np.float32
    q = qkv[:, : NH * HD].reshape(-1, NH, HD).astype(np.float64)
    for s, (_, num_new) in enumerate(CASES):
        lo, hi = meta.query_start_loc[s], meta.query_start_loc[s + 1]
        want = dense(q[lo:hi], keys[s].astype(np.float64), values[s].astype(np.float64),
                     num_new, scale)
        np.testing.assert_allclose(got[lo:hi].reshape(-1, NH, HD), want, atol=2e-6, rtol=0)


def test_longest_first_orders_decode_rows_for_the_grid():
    # The decode rows of a step (here rows 0, 2, 3, 5 of six) by context, longest first, ties in
    # batch order: the order PAGEDSERVE_DECODE_ORDER=longest gives the GPU's decode grid.
    from engine.executor.ops import longest_first

    ctx = np.array([300, 9, 1200, 300, 77, 4000], np.int32)
    assert longest_first(np.array([0, 2, 3, 5]), ctx).tolist() == [5, 2, 0, 3]
    assert longest_first(np.arange(6), ctx).tolist() == [5, 2, 0, 3, 4, 1]
    assert longest_first(np.array([], np.int64), ctx).tolist() == []
