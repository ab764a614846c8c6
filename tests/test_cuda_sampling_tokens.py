"""cuda/sampling_tokens.cu against its numpy twins: logprobs of chosen ids (logprob_token_ids)
and of the whole vocabulary (logprobs=-1), sampling among allowed ids (allowed_token_ids); and
none of it launched when no row asks."""

from __future__ import annotations

import types

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.core.sequence import Sequence  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor.ops import cuda_sampling, numpy_sampling  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.sampling_inputs import sampling_tensors  # noqa: E402
from engine.model.config import EngineConfig, ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402

ALLOWED = [3, 77, 200, 201, 900]


def rows(params: list[SamplingParams], vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    seqs = [Sequence(f"r{i}", list(rng.integers(0, vocab, 9)), 9, p, seed=i)
            for i, p in enumerate(params)]
    logits = (rng.standard_normal((len(seqs), vocab)) * 3).astype(np.float32)
    return sampling_tensors(seqs, vocab, [2], {}), logits


def on_device(ops, logits, dtype):
    """The logits on the device in `dtype`, and the float32 values the device holds."""
    if dtype == "float32":
        return cupy.asarray(logits), logits
    dev = ops.from_host(logits)
    return dev, np.asarray(ops.to_host(dev), np.float32)


def by_id(ids: np.ndarray, lps: np.ndarray, vocab: int) -> np.ndarray:
    out = np.full(vocab, np.nan, np.float32)
    out[ids] = lps
    return out


@pytest.mark.parametrize("vocab", [1001, 151936])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chosen_whole_and_allowed_rows_match_numpy(vocab, dtype):
    ops = CudaOps("bfloat16")
    params = [SamplingParams(logprobs=3, temperature=0),
              SamplingParams(logprob_token_ids=[vocab - 1, 0, 17, 17], temperature=0),
              SamplingParams(logprobs=-1, temperature=0),
              SamplingParams(allowed_token_ids=ALLOWED, temperature=0),
              SamplingParams(allowed_token_ids=ALLOWED, logprob_token_ids=[77, 5], top_k=1,
                             repetition_penalty=1.3, logit_bias={4: 100.0})]
    t, logits = rows(params, vocab)
    dev, host = on_device(ops, logits, dtype)
    got, want = ops.sample(dev, t), numpy_sampling.sample(host, t)
    ref = numpy_sampling.log_softmax(host.astype(np.float64))  # (R, vocab)
    np.testing.assert_array_equal(got.token_ids, want.token_ids)  # every row is deterministic
    np.testing.assert_array_equal(got.top_ids[0], want.top_ids[0])
    assert got.token_ids[3] in ALLOWED and got.token_ids[4] in ALLOWED
    assert sorted(got.row_logprobs) == [1, 2, 4]
    for row, asked in ((1, [vocab - 1, 0, 17, 17]), (4, [77, 5])):
        ids, lps = got.row_logprobs[row]
        assert ids.tolist() == asked
        np.testing.assert_allclose(lps, ref[row, asked], atol=2e-4)
    ids, lps = got.row_logprobs[2]
    np.testing.assert_allclose(by_id(ids, lps, vocab), ref[2], atol=2e-4)
    assert np.all(np.diff(lps) <= 0)
    np.testing.assert_allclose(got.logprobs, ref[np.arange(5), got.token_ids], atol=2e-4)


def test_allowed_draws_stay_allowed_at_any_temperature():
    ops = CudaOps("bfloat16")
    params = [SamplingParams(allowed_token_ids=ALLOWED, temperature=temp, top_p=p, seed=s)
              for temp, p, s in ((1.0, 1.0, 1), (50.0, 1.0, 2), (2.0, 0.5, 3), (1e-30, 1, 4))]
    for step in range(8):
        t, logits = rows(params, 1024, seed=step)
        drawn = ops.sample(cupy.asarray(logits), t).token_ids
        assert set(drawn.tolist()) <= set(ALLOWED)
        assert drawn[3] == numpy_sampling.sample(logits, t).token_ids[3]


def test_nothing_launched_when_no_row_asks(monkeypatch):
    ops = CudaOps("bfloat16")
    files = []
    real = cuda_sampling.kernel
    monkeypatch.setattr(cuda_sampling, "kernel", lambda f, *a: files.append(f) or real(f, *a))
    t, logits = rows([SamplingParams(logprobs=2, temperature=0.7), SamplingParams(top_k=3)], 512)
    out = ops.sample(cupy.asarray(logits), t)
    assert out.row_logprobs is None and "sampling_tokens.cu" not in files
    t, logits = rows([SamplingParams(logprobs=2), SamplingParams(logprob_token_ids=[1])], 512)
    assert ops.sample(cupy.asarray(logits), t).row_logprobs is not None
    assert "sampling_tokens.cu" in files


def test_engine_end_to_end_against_the_prompt_scores():
    """On the cuda engine loop: greedy among allowed ids with the whole vocabulary's logprobs,
    and chosen ids, equal (to bf16 noise) to the host's scores of the same text."""
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, 1024
    loaded = types.SimpleNamespace(config=config, tokenizer=None,
                                   weights=dummy_weights(config, CudaOps("bfloat16"), seed=3))
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256,
                                    max_num_seqs=8, num_kv_blocks=128, enforce_eager=True),
                       loaded_model=loaded)
    prompt = [(7 * j) % 1024 for j in range(40)]
    asks = {"all": SamplingParams(logprobs=-1, allowed_token_ids=ALLOWED, temperature=0,
                                  max_tokens=4, ignore_eos=True),
            "ids": SamplingParams(logprob_token_ids=[900, 3, 5], allowed_token_ids=ALLOWED,
                                  temperature=0, max_tokens=4, ignore_eos=True)}
    final = {}
    for name, p in asks.items():
        engine.add_request(name, {"prompt_token_ids": prompt}, p)
    while engine.has_unfinished_requests():
        final.update((o.request_id, o.outputs[0]) for o in engine.step() if o.finished)
    tokens = final["all"].token_ids
    assert set(tokens) <= set(ALLOWED) and final["ids"].token_ids == tokens
    engine.add_request("ref", {"prompt_token_ids": prompt + tokens},
                       SamplingParams(prompt_logprobs=-1, max_tokens=1))
    ref = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            ref = o.prompt_logprobs or ref
    for i, token in enumerate(tokens):
        want = ref[len(prompt) + i]
        whole, chosen = final["all"].logprobs[i], final["ids"].logprobs[i]
        assert len(whole) == 1024 and set(chosen) == {900, 3, 5, token}
        for t, v in chosen.items():  # two rows of one step: the same logits
            assert v == pytest.approx(whole[t], abs=0.02)
        for t, v in whole.items():  # another step's shapes: bf16 noise
            assert v == pytest.approx(want[t], abs=0.1)
