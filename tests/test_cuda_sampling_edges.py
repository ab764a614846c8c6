"""The cuda samplers against numpy_sampling on rows at the edges of float32 (NaN, inf and -inf
logits), where a kernel can agree with its twin on ordinary rows and still differ."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from test_cuda_sampling import numpy_sampling_tensors as greedy_tensors  # noqa: E402

from engine.executor.ops import SamplingTensors, cuda_sampling, numpy_sampling  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402


def sample_both(logits: np.ndarray, t: SamplingTensors, kind: str):
    """(cuda's, numpy's) SamplerOutput of float32 `logits` with cuda_sampling.SAMPLER = kind."""
    ops = CudaOps("bfloat16")
    saved, cuda_sampling.SAMPLER = cuda_sampling.SAMPLER, kind
    try:
        return ops.sample(cupy.asarray(logits), t), numpy_sampling.sample(logits, t)
    finally:
        cuda_sampling.SAMPLER = saved
        ops.close()


def same_nan(got: np.ndarray, want: np.ndarray) -> None:
    """Equal where both are numbers (to float32 rounding), NaN exactly where numpy's is."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=2e-4)
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])


def same_output(got, want) -> None:
    """cuda's SamplerOutput is numpy's: the same ids and top ids, logprobs as same_nan says."""
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    np.testing.assert_array_equal(got.top_ids, want.top_ids)
    same_nan(got.top_logprobs, want.top_logprobs)
    same_nan(got.logprobs, want.logprobs)


@pytest.mark.parametrize("vocab", [4096, 1001], ids=["vectorized", "scalar"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_logprob_of_a_row_holding_nan_is_nan(vocab, dtype):
    """cuda/sampling_greedy.cu dropped the sum of a thread (or of a whole chunk) whose only values
    were NaN and -inf (its max still -inf), so such a row's logprob was a number where numpy's
    log_softmax gives NaN."""
    ops = CudaOps("bfloat16")
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((4, vocab)) * 3).astype(np.float32)
    logits[0, 8:16] = np.nan  # a thread's whole share on the 16-byte path (8 ids a thread)
    logits[1, [5, 261, 517, 773]] = [np.nan, -np.inf, -np.inf, -np.inf]  # 256 threads, one chunk
    logits[2, vocab // 2 :] = -np.inf  # the second chunk (of 2 at vocab 4096): -inf and a NaN
    logits[2, vocab - 2] = np.nan
    dev = cupy.asarray(logits) if dtype == "float32" else ops.from_host(logits)
    host = logits if dtype == "float32" else ops.to_host(dev)
    t = greedy_tensors(4)
    assert cuda_sampling.takes_greedy(t)
    got, want = ops.sample(dev, t), numpy_sampling.sample(host, t)
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    assert np.isnan(want.logprobs[:3]).all() and np.isfinite(want.logprobs[3])
    same_nan(got.logprobs, want.logprobs)
    ops.close()


@pytest.mark.parametrize("vocab", [4096, 1001], ids=["vectorized", "scalar"])
@pytest.mark.parametrize("kind", ["select", "twopass", "bisect"])
@pytest.mark.parametrize("sampled", [False, True], ids=["all-greedy", "mixed"])
def test_argmax_of_a_row_of_nan_and_minus_inf_is_0(vocab, kind, sampled):
    """numpy_sampling.argmax reads NaN as -inf, so a row whose only numbers are -inf answers 0
    even where id 0 is a NaN; the cuda argmaxes (`ahead` per element) took the lowest -inf id,
    on every sampler and path but the 16-byte twopass one."""
    rng = np.random.default_rng(vocab)
    logits = np.full((4, vocab), -np.inf, np.float32)
    logits[0, 0] = np.nan
    logits[1, [0, 3, vocab - 1]] = np.nan
    logits[2, :8] = np.nan  # a thread's whole share on the 16-byte path
    logits[3] = rng.standard_normal(vocab)
    t = greedy_tensors(4)
    if sampled:  # sample_kernel (bisect: its own) on greedy and sampled rows alike
        t.temperature = np.array([0.0, 0.8, 0.8, 0.0], np.float32)
    got, want = sample_both(logits, t, kind)
    np.testing.assert_array_equal(want.token_ids[:3], [0, 0, 0])
    np.testing.assert_array_equal(got.token_ids, want.token_ids)


@pytest.mark.parametrize("vocab, num_logprobs", [(4096, 20), (1001, 20), (40, 40)],
                         ids=["vectorized", "scalar", "whole-row"])
@pytest.mark.parametrize("kind", ["select", "twopass", "bisect"])
def test_top_logprobs_of_a_row_holding_nan(vocab, num_logprobs, kind):
    """The top logprobs rank the raw logits, then the NaN in id order (numpy_sampling's stable
    argsort of -logits); the kernels' `ahead` never takes a NaN, so a row holding some answered
    0x7fffffff as the ids past its numbers."""
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((4, vocab)).astype(np.float32)
    logits[0, rng.integers(0, vocab, vocab - 10)] = np.nan  # most ids NaN
    logits[1] = np.nan
    logits[2, [3, 9]] = np.nan
    t = greedy_tensors(4)
    t.num_logprobs = num_logprobs
    got, want = sample_both(logits, t, kind)
    assert want.top_ids[1].tolist() == list(range(num_logprobs))
    same_output(got, want)


@pytest.mark.parametrize("vocab", [4096, 1001], ids=["vectorized", "scalar"])
@pytest.mark.parametrize("kind", ["select", "twopass", "bisect"])
def test_logprobs_of_a_row_holding_inf_are_nan(vocab, kind):
    """log_softmax of a row holding +inf is NaN everywhere (inf - inf; numpy's, torch's, and the
    bisect and row_logprobs kernels'); sample_kernel's online sum counted the infs, so its top
    logprobs were -inf at the other ids (NaN only on the scalar path's second inf)."""
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    logits[0, 17] = np.inf
    logits[1, [vocab - 3, 17, 600]] = np.inf
    logits[2, [4, 5]] = [np.inf, -np.inf]
    t = greedy_tensors(3)
    t.temperature = np.array([0.0, 0.7, 0.0], np.float32)
    t.num_logprobs = 5
    got, want = sample_both(logits, t, kind)
    assert np.isnan(want.top_logprobs).all() and np.isnan(want.logprobs).all()
    same_output(got, want)


@pytest.mark.parametrize("vocab", [4096, 1001], ids=["vectorized", "scalar"])
@pytest.mark.parametrize("kind", ["select", "twopass", "bisect"])
def test_sampled_rows_with_nan_or_inf_logits_take_the_argmax(vocab, kind):
    """A broken model's sampled row (temperature > 0) holding a NaN or an inf has no distribution:
    numpy_sampling takes the argmax of the rest (`not isfinite(row.max())`; a row of NaN: 0), and
    every sampler and load path must too (the scalar path drew over NaN probabilities)."""
    rng = np.random.default_rng(vocab)
    rows = 6
    logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    logits[0, rng.integers(0, vocab, 40)] = np.nan
    logits[1, rng.integers(0, vocab, 3)] = np.nan
    logits[2, [vocab - 3, 17]] = np.inf  # the lower id of the two
    logits[3] = np.nan
    logits[4, 8:16] = np.nan  # a thread's whole share on the 16-byte path (8 ids a thread)
    t = greedy_tensors(rows)
    t.temperature = np.full(rows, 0.8, np.float32)
    t.top_k = np.array([0, 20, 0, 20, 50, 0], np.int32)
    t.top_p = np.array([1.0, 1.0, 0.9, 0.9, 1.0, 1.0], np.float32)
    for step in range(8):
        t.steps = np.full(rows, step, np.uint32)
        got, want = sample_both(logits, t, kind)
        assert want.token_ids[2] == 17 and want.token_ids[3] == 0
        np.testing.assert_array_equal(got.token_ids[:5], want.token_ids[:5])


@pytest.mark.parametrize("vocab", [4096, 1001], ids=["vectorized", "scalar"])
@pytest.mark.parametrize("bias", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("kind", ["select", "twopass", "bisect"])
def test_inf_logits_take_the_argmax_under_penalties(vocab, bias, kind):
    """A broken model's +inf logits stay +inf through the penalties, as numpy_sampling keeps
    them: the row takes the argmax (the lowest inf id) whether or not the step penalizes, by its
    own penalty or a batchmate's (penalized() and pen8 clamped +inf to FLT_MAX, and the row was
    sampled: among its infs, at a huge temperature among every token)."""
    rng = np.random.default_rng(vocab)
    rows = 4
    logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    logits[0, [vocab - 5, 40, 41]] = np.inf  # no penalty of its own: its batchmates' only
    logits[1, [300, 9]] = np.inf  # both seen
    logits[2, 600] = np.inf  # seen, at a huge temperature
    t = greedy_tensors(rows)
    t.temperature = np.array([0.8, 1.0, 3e38, 0.8], np.float32)
    t.repetition_penalty = np.array([1.0, 1.5, 0.5, 1.3], np.float32)
    t.frequency_penalty = np.array([0.0, 0.7, -0.5, 0.0], np.float32)
    t.prompt_ids = np.array([[-1, -1], [9, 300], [600, 3], [5, 6]], np.int32)
    t.output_ids = np.array([[-1, -1], [9, 2], [600, 600], [7, -1]], np.int32)
    if bias:  # the dense path: penalties on a float32 copy of the biased logits
        t.bias_ids = np.full((rows, 1), 11, np.int32)
        t.bias_values = np.full((rows, 1), 0.5, np.float32)
    for step in range(10):
        t.steps = np.full(rows, step, np.uint32)
        got, want = sample_both(logits, t, kind)
        assert want.token_ids[:3].tolist() == [40, 9, 600]
        np.testing.assert_array_equal(got.token_ids[:3], want.token_ids[:3])
