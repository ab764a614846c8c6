"""Penalty counts kept on the GPU (cuda_sampling.DeviceTokenCounts) against numpy's TokenCounts:
the rebuild, the draws' updates and the bitmap, the sparse penalty path (vectorized and not) and
the dense one (with a logit bias), then the engine's tokens equal to sending ids every step.

    python -m pytest -q -m gpu tests/test_cuda_penalty_counts.py
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import require_gpu
from test_cuda_overlap import _maker, _wide_margin_model
from test_overlap import random_requests
from test_penalty_counts import both_ways, penalized

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.executor.ops import SamplingTensors, cuda_sampling  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_sampling import TokenCounts, count_words, sample  # noqa: E402


@pytest.fixture(scope="module")
def ops():
    return CudaOps("bfloat16")


def _pad(rows):
    out = np.full((len(rows), max(1, max(map(len, rows)))), -1, np.int32)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = ids
    return out


def _tensors(rows, step, rng, **kw) -> SamplingTensors:
    # greedy and top-k rows: draws that do not hinge on float summation order
    t = SamplingTensors(
        temperature=np.array([0.0, 0.8] * (rows // 2), np.float32),
        top_k=np.full(rows, 20, np.int32), top_p=np.ones(rows, np.float32),
        min_p=np.zeros(rows, np.float32), seeds=np.arange(rows, dtype=np.uint64) + 11,
        steps=np.full(rows, step, np.uint32),
        presence_penalty=np.array([0.5, 0.0, -0.4, 0.0] * (rows // 4), np.float32),
        frequency_penalty=np.array([0.0, 0.7, 0.0, 0.3] * (rows // 4), np.float32),
        repetition_penalty=np.array([1.5, 1.0, 0.6, 2.0] * (rows // 4), np.float32))
    for k, v in kw.items():
        setattr(t, k, v)
    return t


@pytest.fixture(params=["select", "twopass"])
def sampler(request):
    """cuda_sampling.SAMPLER for the test, restored after it."""
    saved, cuda_sampling.SAMPLER = cuda_sampling.SAMPLER, request.param
    yield request.param
    cuda_sampling.SAMPLER = saved


@pytest.mark.parametrize("vocab", [4096, 1001], ids=["vectorized", "scalar"])
@pytest.mark.parametrize("bias", [False, True], ids=["sparse", "dense"])
def test_kept_counts_match_numpy(ops, vocab, bias, sampler):
    rng = np.random.default_rng(vocab)
    rows, num_slots = 8, 12
    prompts = [rng.integers(0, vocab, int(rng.integers(5, 60))).tolist() for _ in range(rows)]
    outputs = [rng.integers(0, vocab, int(rng.integers(0, 9))).tolist() for _ in range(rows)]
    slots = rng.permutation(num_slots)[:rows].astype(np.int32)
    slots[3] = -1  # a row without penalties among them
    device = ops.alloc_token_counts(num_slots, vocab)
    host = TokenCounts(num_slots, vocab)
    for step in range(5):
        # logits that make the penalties decide: the seen tokens are the strongest
        logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
        for r in range(rows):
            logits[r, prompts[r][:10]] += 6
        logits = ops.to_host(ops.from_host(logits))  # bf16 values, as the lm_head leaves them
        rebuild = np.array([step == 0 or (step == 3 and r % 3 == 0) for r in range(rows)])
        kw = {}
        if bias:
            kw = dict(bias_ids=np.tile(np.array([[5, 7]], np.int32), (rows, 1)),
                      bias_values=np.tile(np.array([[3.0, -2.0]], np.float32), (rows, 1)))
        with_ids = [(p, o) if b else ([], []) for p, o, b in zip(prompts, outputs, rebuild,
                                                                  strict=True)]
        kept = _tensors(rows, step, rng, count_slots=slots, rebuild=rebuild,
                        prompt_ids=_pad([p for p, _ in with_ids]),
                        output_ids=_pad([o for _, o in with_ids]), **kw)
        if step == 3:  # garbage in the slots being rebuilt
            stale = slots[rebuild & (slots >= 0)]
            device.counts[cupy.asarray(stale)] = 5
            host.table[stale] = 5
        by_ids = _tensors(rows, step, rng, prompt_ids=_pad(prompts), output_ids=_pad(outputs),
                          **kw)
        by_ids.prompt_ids[3] = by_ids.output_ids[3] = -1  # row 3 has no slot: no penalties
        want = sample(logits, by_ids)
        got = ops.sample(ops.from_host(logits), dataclasses.replace(kept, count_table=device))
        legacy = ops.sample(ops.from_host(logits), by_ids)  # ids sent: a table of its own
        sample(logits, dataclasses.replace(kept, count_table=host))
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        np.testing.assert_array_equal(legacy.token_ids, want.token_ids)
        np.testing.assert_array_equal(device.table, host.table)
        bits = np.packbits(host.table != 0, axis=1, bitorder="little")
        seen = cupy.asnumpy(device.seen).view(np.uint8)[:, : bits.shape[1]]
        np.testing.assert_array_equal(seen, bits)
        for r in range(rows):
            outputs[r].append(int(want.token_ids[r]))
    used = slots[slots >= 0]
    np.testing.assert_array_equal(
        host.table[used], count_words(_pad(prompts), _pad(outputs), rows, vocab)[slots >= 0])


def test_bisect_sampler_keeps_the_counts_too(ops):
    rng = np.random.default_rng(1)
    vocab, rows = 2048, 4
    logits = ops.to_host(ops.from_host((rng.standard_normal((rows, vocab)) * 2).astype(np.float32)))
    prompts = [rng.integers(0, vocab, 30).tolist() for _ in range(rows)]
    t = _tensors(rows, 0, rng, count_slots=np.arange(rows, dtype=np.int32),
                 rebuild=np.ones(rows, bool), prompt_ids=_pad(prompts),
                 output_ids=_pad([[] for _ in range(rows)]))
    device, host = ops.alloc_token_counts(rows, vocab), TokenCounts(rows, vocab)
    want = sample(logits, dataclasses.replace(t, count_table=host))
    saved, cuda_sampling.SAMPLER = cuda_sampling.SAMPLER, "bisect"
    try:
        got = ops.sample(cupy.asarray(logits, cupy.float32),
                         dataclasses.replace(t, count_table=device))
    finally:
        cuda_sampling.SAMPLER = saved
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    np.testing.assert_array_equal(device.table, host.table)


@pytest.fixture(scope="module")
def loaded():
    return _wide_margin_model()


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_engine_kept_counts_equal_ids_on_cuda(loaded, eager):
    """Overlapped steps, chunked prefill, n > 1 forks and aborts: the same tokens with the counts
    kept on the GPU as with every row's ids sent each step."""
    requests = random_requests(9, 12, lambda i, rng: penalized(i, rng, n=1 + (i % 4 == 1)), 120)
    engine, _, rebuilt, slotted = both_ways(
        _maker(loaded, eager, []), requests, abort_after={"r2": 6}, async_scheduling=True,
        max_num_seqs=16, max_num_batched_tokens=64, num_kv_blocks=256, max_model_len=256)
    assert slotted > 5 * rebuilt > 0


@pytest.mark.parametrize("vocab", [4096, 1001], ids=["vectorized", "scalar"])
@pytest.mark.parametrize("bias", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("kind", ["select", "twopass", "bisect"])
def test_a_ban_stays_a_ban_under_penalties(ops, vocab, bias, kind):
    """A -inf logit (a grammar's mask; min_tokens' -inf bias) is never drawn with penalties on,
    even at a huge temperature, as numpy_sampling.apply_penalties keeps it."""
    rng = np.random.default_rng(3)
    rows = 4
    logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    allowed = [5, 9, 600]
    mask = np.ones(vocab, bool)
    mask[allowed] = False
    kw = {}
    if bias:  # min_tokens' way: a -inf bias (the dense path)
        ids = np.flatnonzero(mask).astype(np.int32)
        kw = dict(bias_ids=np.tile(ids, (rows, 1)),
                  bias_values=np.full((rows, len(ids)), -np.inf, np.float32))
    else:  # a grammar's way: -inf in the logits (the sparse path)
        logits[:, mask] = -np.inf
    prompts = [rng.integers(0, vocab, 30).tolist() + allowed[:1] for _ in range(rows)]
    saved, cuda_sampling.SAMPLER = cuda_sampling.SAMPLER, kind
    try:
        for step in range(20):
            t = _tensors(rows, step, rng, prompt_ids=_pad(prompts),
                         output_ids=_pad([[] for _ in range(rows)]), **kw)
            t.temperature = np.array([1e38, 3e38, 1e38, 0.0], np.float32)
            t.top_k = np.zeros(rows, np.int32)
            want = sample(logits, t)
            got = ops.sample(cupy.asarray(logits), t)
            assert not mask[want.token_ids].any(), want.token_ids
            np.testing.assert_array_equal(got.token_ids, want.token_ids)
    finally:
        cuda_sampling.SAMPLER = saved


@pytest.mark.parametrize("vocab", [4096, 1001], ids=["vectorized", "scalar"])
@pytest.mark.parametrize("bias", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("kind", ["select", "twopass", "bisect"])
def test_nan_logits_take_the_argmax_under_penalties(ops, vocab, bias, kind):
    """A broken model's NaN logits stay NaN through the penalties, as numpy_sampling keeps them:
    the row takes the argmax of the rest (a row of NaN: id 0), as it does without penalties
    (penalized() clamped NaN to -FLT_MAX, and the row was sampled)."""
    rng = np.random.default_rng(5)
    rows = 4
    logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    logits[:3, rng.integers(0, vocab, 40)] = np.nan
    logits[3] = np.nan
    kw = {}
    if bias:  # the dense path
        kw = dict(bias_ids=np.full((rows, 1), 7, np.int32),
                  bias_values=np.full((rows, 1), 0.5, np.float32))
    prompts = [rng.integers(0, vocab, 30).tolist() for _ in range(rows)]
    saved, cuda_sampling.SAMPLER = cuda_sampling.SAMPLER, kind
    try:
        for step in range(10):
            t = _tensors(rows, step, rng, prompt_ids=_pad(prompts),
                         output_ids=_pad([[] for _ in range(rows)]), **kw)
            t.temperature = np.array([0.8, 1.0, 0.0, 0.8], np.float32)
            want = sample(logits, t)
            got = ops.sample(cupy.asarray(logits), t)
            assert want.token_ids[3] == 0
            np.testing.assert_array_equal(got.token_ids, want.token_ids)
    finally:
        cuda_sampling.SAMPLER = saved
