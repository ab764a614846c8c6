"""The cuda sampler is total: parameters at the edges of float32 give valid tokens on the GPU,
the same ones as the numpy reference where the draw is deterministic."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
from conftest import check_sampler_is_total, extreme_sampling_params, require_gpu
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.core.sequence import Sequence  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor.ops import numpy_sampling  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.model.config import EngineConfig, ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402

VOCAB = 1024  # == MAX_STOP_TOKEN_IDS, so one request can ban every token
PROMPT = {"prompt_token_ids": [(7 * j) % VOCAB for j in range(40)]}


@pytest.fixture(scope="module")
def engine():
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, VOCAB
    loaded = types.SimpleNamespace(config=config, tokenizer=None,
                                   weights=dummy_weights(config, CudaOps("bfloat16"), seed=3))
    return LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256,
                                  max_num_seqs=8, num_kv_blocks=128, enforce_eager=True),
                     loaded_model=loaded)


@settings(max_examples=40, deadline=None)
@given(st.lists(extreme_sampling_params(VOCAB), min_size=1, max_size=4))
def test_cuda_sampler_is_total(engine, params):
    check_sampler_is_total(engine, PROMPT, params, VOCAB)


DETERMINISTIC = [  # each keeps one token (or bans all): the GPU must pick numpy's
    dict(temperature=1e-40), dict(top_p=1e-50), dict(temperature=1e-40, top_p=1e-50, top_k=3),
    dict(temperature=1e-40, min_p=1.0), dict(repetition_penalty=1e-50, temperature=0),
    dict(repetition_penalty=1e50, temperature=0), dict(repetition_penalty=1e-50, top_p=1e-50),
    dict(logit_bias={5: 100.0, 6: -100.0}, temperature=1e-30, top_k=2**31 - 1),
    dict(stop_token_ids=list(range(VOCAB)), min_tokens=2, ignore_eos=True),  # all banned
]


@pytest.mark.parametrize("kw", DETERMINISTIC, ids=str)
def test_cuda_matches_numpy_at_the_edges(engine, kw):
    rng = np.random.default_rng(0)
    seqs = [Sequence("x", list(rng.integers(0, VOCAB, 30)), 20, SamplingParams(**kw), seed=r)
            for r in range(6)]
    t = engine.runner.prepare_sampling(seqs)  # penalties: kept counts, every slot rebuilt
    logits = (rng.standard_normal((6, VOCAB)) * 4).astype(np.float32)
    host = t if t.count_table is None else dataclasses.replace(
        t, count_table=numpy_sampling.TokenCounts(engine.runner.penalty_slots.num_slots, VOCAB))
    want = numpy_sampling.sample(logits, host).token_ids
    got = engine.ops.sample(cupy.asarray(logits), t).token_ids
    np.testing.assert_array_equal(got, want)
    if t.count_table is not None:  # the rows' slots, rebuilt and counted alike
        used = t.count_slots[t.count_slots >= 0]
        np.testing.assert_array_equal(t.count_table.table[used], host.count_table.table[used])


@pytest.mark.parametrize("rows, vocab", [(1, 151936), (3, 1001), (256, 151936), (5, 4096),
                                         (300, 4096)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_rows_split_over_blocks_match_numpy(rows, vocab, dtype):
    """All-greedy steps without penalties or top logprobs take cuda/sampling_greedy.cu (a row
    over several blocks); the same ids as numpy, ties to the lowest id, banned rows to 0, NaN
    never chosen (a row of NaN: 0), and
    three launches in a row agree: the per-row counters the sampler keeps are back at 0 after
    each (the next launch starts from them), and close() drops them."""
    from engine.executor.ops import cuda_sampling

    ops = CudaOps("bfloat16")
    rng = np.random.default_rng(rows)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    logits[0, [vocab - 1, vocab // 2]] = 50.0  # a tie across chunks: the lower id wins
    if rows > 2:
        logits[1] = -np.inf  # every token banned: id 0
        logits[2, 7:13] = logits[2].max() + 1  # a tie inside a chunk
    if rows > 4:  # NaN is never the argmax (numpy_sampling.argmax): the rest's, or 0
        logits[3, 5], logits[3, 900] = np.nan, logits[3].max() + 2
        logits[4] = np.nan
    dev = cupy.asarray(logits) if dtype == "float32" else ops.from_host(logits)
    host = logits if dtype == "float32" else ops.to_host(dev)
    t = numpy_sampling_tensors(rows)
    launches = []
    real = cuda_sampling.greedy
    cuda_sampling.greedy = lambda *a: launches.append(1) or real(*a)
    try:
        for _ in range(3):
            got = ops.sample(dev, t)
            want = numpy_sampling.sample(host, t)
            np.testing.assert_array_equal(got.token_ids, want.token_ids)
            finite = np.isfinite(want.logprobs)
            np.testing.assert_allclose(got.logprobs[finite], want.logprobs[finite], atol=2e-4)
            kept = cuda_sampling._done_counters[(cupy.cuda.Device().id,
                                                 cupy.cuda.get_current_stream().ptr)]
            assert kept[-1].size >= rows and all(int(abs(c).sum()) == 0 for c in kept)
    finally:
        cuda_sampling.greedy = real
    assert len(launches) == 3
    assert want.token_ids[0] == vocab // 2
    if rows > 4:
        assert want.token_ids[3] == 900 and want.token_ids[4] == 0
    ops.close()
    assert not cuda_sampling._done_counters


def numpy_sampling_tensors(rows: int):
    from engine.executor.ops import SamplingTensors

    return SamplingTensors(np.zeros(rows, np.float32), np.zeros(rows, np.int32),
                           np.ones(rows, np.float32), np.zeros(rows, np.float32),
                           np.arange(rows, dtype=np.uint64), np.zeros(rows, np.uint32),
                           np.zeros(rows, np.float32), np.zeros(rows, np.float32),
                           np.ones(rows, np.float32))

