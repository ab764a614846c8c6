"""Overlapped scheduling on the GPU: the placeholder kernel against its numpy twin, the pinned
copy of sampled ids, and the engine's tokens with async scheduling equal to the synchronous loop,
eagerly and with decode CUDA graphs."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
from conftest import require_gpu, sharpen, tiny_model_config
from test_overlap import compare, ids, random_requests

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor import runner  # noqa: E402
from engine.executor.ops import SamplingTensors  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps, resolve_placeholders  # noqa: E402
from engine.model.config import EngineConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402
from engine.model.weights import ModelWeights  # noqa: E402

# NOTE: bf16 logits change in the last bits with the batch's shape (GEMM tiling), so the two
# runs' summed logprobs agree to about 1e-4 relative, not exactly; the tokens must be equal.
BF16_LOGPROB_TOL = 2e-2
# A preempted sequence's recompute runs its context through prefill GEMMs instead of decode
# GEMVs: ~1e-4 per token more, 0.022 summed over the 163 tokens of "long" below (H200, session 4).
RECOMPUTED_LOGPROB_TOL = 0.1



@pytest.fixture(scope="module")
def ops():
    return CudaOps("bfloat16")


@pytest.mark.parametrize("width", [0, 1, 8])
def test_resolve_placeholders_matches_numpy(ops, width):
    rng = np.random.default_rng(width)
    rows = 37
    sampled = rng.integers(0, 50000, (rows, width) if width else rows).astype(np.int32)
    ids_host = rng.integers(0, 50000, 300).astype(np.int32)
    ids_host[::3] = -2 - rng.integers(0, rows, 100)  # placeholders for every row, some twice
    ids_host[1::3][::4] = -1  # padding stays
    want = ids_host.copy()
    resolve_placeholders(want, sampled)
    got = cupy.asarray(ids_host)
    ops.resolve_placeholders(got, cupy.asarray(sampled))
    np.testing.assert_array_equal(got.get(), want)
    column = sampled if width == 0 else sampled[:, 0]
    np.testing.assert_array_equal(want[::3], column[-2 - ids_host[::3]])
    with pytest.raises(TypeError, match="ids"):
        ops.resolve_placeholders(cupy.asarray(ids_host, cupy.int64), cupy.asarray(sampled))


def _tensors(rows: int, **kw) -> SamplingTensors:
    f = dict(temperature=np.full(rows, 0.8, np.float32), top_k=np.zeros(rows, np.int32),
             top_p=np.ones(rows, np.float32), min_p=np.zeros(rows, np.float32),
             seeds=np.arange(rows, dtype=np.uint64), steps=np.zeros(rows, np.uint32),
             presence_penalty=np.zeros(rows, np.float32),
             frequency_penalty=np.full(rows, 1.5, np.float32),
             repetition_penalty=np.ones(rows, np.float32), num_logprobs=2)
    f.update(kw)
    return SamplingTensors(**f)


def test_sample_start_resolves_output_ids_and_copies_through_pinned_memory(ops):
    """Penalties whose output ids hold placeholders equal the numpy sampler on resolved ids;
    the answer arrives after more work is queued behind it."""
    rng = np.random.default_rng(1)
    rows, vocab = 6, 1000
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 3
    prev = rng.integers(0, vocab, rows).astype(np.int32)
    output_ids = rng.integers(0, vocab, (rows, 5)).astype(np.int32)
    output_ids[:, 4] = -2 - np.arange(rows)[::-1]  # each row's pending token: another row's
    output_ids[0, 3:] = -1
    resolved = output_ids.copy()
    resolve_placeholders(resolved.reshape(-1), prev)
    want = NumpyOps().sample(logits, _tensors(rows, output_ids=resolved,
                                              prompt_ids=np.full((rows, 1), -1, np.int32)))
    pending = ops.sample_start(cupy.asarray(logits), _tensors(
        rows, output_ids=output_ids, prompt_ids=np.full((rows, 1), -1, np.int32)),
        cupy.asarray(prev))
    busy = cupy.ones((4096, 4096), cupy.float32)
    for _ in range(5):  # queued after the copy: wait() must not depend on it
        busy = busy @ busy * 1e-3
    got = pending.wait()
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    np.testing.assert_array_equal(got.top_ids, want.top_ids)
    assert pending.token_ids.shape == (rows, 2 + 2 * 2)


def _wide_margin_model():
    """Tiny Qwen3-like weights scaled as in conftest, so greedy picks sit far from bf16 ties and
    tokens do not depend on how the batch was composed."""
    config = tiny_model_config(4096, architecture="Qwen3ForCausalLM", qk_norm=True, num_heads=8,
                               num_kv_heads=2, head_dim=64, hidden_size=256,
                               intermediate_size=512, tie_word_embeddings=False)
    w = sharpen(dummy_weights(config, NumpyOps(), seed=5))
    dev = CudaOps("bfloat16")

    def up(a):
        return None if a is None else dev.from_host(a)

    layers = [dataclasses.replace(layer, **{f.name: up(getattr(layer, f.name))
                                            for f in dataclasses.fields(layer)})
              for layer in w.layers]
    weights = ModelWeights(embed=up(w.embed), layers=layers, norm=up(w.norm),
                           lm_head=up(w.lm_head))
    return types.SimpleNamespace(config=config, weights=weights, tokenizer=None)


@pytest.fixture(scope="module")
def loaded():
    return _wide_margin_model()


def _maker(loaded, eager, replays):
    if not eager and not runner.DECODE_GRAPHS:
        pytest.skip("PAGEDSERVE_DECODE_GRAPHS=0")

    def make(text=False, **fields):
        engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", enforce_eager=eager,
                                        **fields), loaded_model=loaded)
        graphs = engine.runner.graphs
        assert (graphs is None) == eager
        if graphs is not None:
            run = graphs.run
            graphs.run = lambda *a: replays.append(a[3] is not None) or run(*a)
        return engine

    return make


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_sampling_features_async_equals_sync_on_cuda(loaded, eager):
    """Seeds, top-p, penalties, logprobs, n > 1 under chunked prefill and mixed batches. Every
    sequence fits at once and ends by max_tokens, so both loops run the very same batches and the
    tokens must match bit for bit, whatever the GEMMs' batch-size dependence."""
    replays = []

    def params(i, rng):
        return SamplingParams(
            n=1 + (i % 5 == 0), temperature=[0, 0.8][i % 2], top_p=[1.0, 0.9][i % 3 == 0],
            seed=i, max_tokens=int(rng.integers(1, 30)), ignore_eos=True,
            repetition_penalty=[1.0, 1.3][i % 3 == 1], frequency_penalty=[0, 0.5][i % 6 == 1],
            presence_penalty=[0, 0.4][i % 4 == 3], logprobs=[None, 2][i % 2])

    requests = random_requests(7, 16, params, 150)
    engine, placeholders, _ = compare(_maker(loaded, eager, replays), requests, max_num_seqs=32,
                                      max_num_batched_tokens=64, num_kv_blocks=256,
                                      max_model_len=256)
    stats = engine.get_stats()
    assert stats.num_chunked_prefill_steps > 0 and stats.num_mixed_steps > 0
    assert placeholders > 100
    if not eager:
        assert sum(replays) > 10  # graph replays whose input ids were resolved on the device


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_preemption_and_stops_async_equals_sync_on_cuda(loaded, eager):
    """Greedy (wide logit margins): preemption in a tiny KV pool, stop ids found one step late,
    max_model_len; here the two loops may batch differently."""
    replays = []
    make = _maker(loaded, eager, replays)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = {f"r{i}": ids(range(5 + 7 * i, 45 + 9 * i)) for i in range(10)}
    _, _, probe = compare(make, {r: (p, greedy) for r, p in prompts.items()},
                          logprob_tol=BF16_LOGPROB_TOL, max_num_seqs=16,
                          num_kv_blocks=128)
    requests = {}
    for i, (r, p) in enumerate(prompts.items()):
        # Half of them stop at a token they produce greedily: found one step late with overlap.
        stop = [probe[r].outputs[0].token_ids[2 + i]] if i % 2 else []
        requests[r] = (p, SamplingParams(temperature=0, max_tokens=20 + i, ignore_eos=True,
                                         stop_token_ids=stop, logprobs=2))
    requests["long"] = (ids(range(3, 40)), SamplingParams(temperature=0, max_tokens=None,
                                                          ignore_eos=True, logprobs=2))
    # NOTE: a preempted sequence is recomputed as a prefill (GEMMs, not GEMVs) at a step that
    # differs between the loops, so its later logits move in the last bf16 bits: a greedy pick
    # may flip where the two best tokens were within that noise (near_tie), nowhere else.
    engine, placeholders, got = compare(make, requests, logprob_tol=RECOMPUTED_LOGPROB_TOL,
                                        near_tie=0.1, max_num_seqs=8, num_kv_blocks=14,
                                        max_model_len=200)
    assert engine.get_stats().num_preemptions > 0 and placeholders > 50
    assert sum(got[f"r{i}"].outputs[0].finish_reason == "stop" for i in range(1, 10, 2)) >= 3
    assert len(got["long"].outputs[0].token_ids) == 200 - 37


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_bad_words_async_equals_sync_on_cuda(loaded, eager):
    """bad_words: a ban after the previous token, compared on the device where that token is
    still pending. Words of one to three tokens that a free seeded run makes never appear, and
    the tokens of both loops are the same."""
    replays = []
    make = _maker(loaded, eager, replays)
    fields = dict(max_num_seqs=16, num_kv_blocks=128, max_model_len=256)

    def params(i, rng):
        return SamplingParams(temperature=0.8, seed=i, max_tokens=24, ignore_eos=True)

    requests = random_requests(9, 8, params, 60)
    _, _, free = compare(make, requests, **fields)
    outs = [free[f"r{i}"].outputs[0].token_ids for i in range(8)]
    words = [outs[0][3:6], outs[1][5:7], outs[2][10:13], outs[4][15:18], [outs[3][2]]]
    for _, p in requests.values():
        p.bad_words_token_ids = words  # the front's field (this model has no tokenizer)
    _, placeholders, got = compare(make, requests, **fields)
    assert placeholders > 50
    banned = [got[f"r{i}"].outputs[0].token_ids for i in range(8)]
    assert sum(a != b for a, b in zip(outs, banned, strict=True)) >= 4
    for out in banned:
        for w in words:
            assert not any(out[i : i + len(w)] == w for i in range(len(out)))
    if not eager:
        assert sum(replays) > 10


def test_gpu_step_times_are_recorded(loaded):
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", async_scheduling=True,
                                    max_num_seqs=4, num_kv_blocks=64), loaded_model=loaded)
    assert engine.async_scheduling
    # A warm-up request first: on a cold kernel cache a kernel compiled between a step's two
    # events (the first prompt's attention) would count as that step's device time.
    engine.add_request("warm-up", ids(range(3, 30)), SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    num_steps = engine.get_stats().num_steps
    engine.runner.time_gpu = True
    engine.add_request("a", ids(range(3, 30)), SamplingParams(temperature=0, max_tokens=8,
                                                              ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    times = engine.runner.gpu_step_times
    assert len(times) == engine.get_stats().num_steps - num_steps == 8
    assert all(0 < t < 1 for t in times)
