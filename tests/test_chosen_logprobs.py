"""vLLM's chosen-token extensions on the numpy sampler and through the engine: logprobs of chosen
ids (`logprob_token_ids`), of the whole vocabulary (`logprobs=-1`), and sampling among allowed ids
(`allowed_token_ids`), each held to a numpy log_softmax of the logits the sampler saw.
(The cuda sampler: tests/test_cuda_sampling_tokens.py; over HTTP: tests/test_server_parity.py.)"""

import numpy as np
import pytest

from engine.core.sampling_params import ParamError, SamplingParams
from engine.core.sequence import Sequence
from engine.executor.ops.numpy_sampling import sample
from engine.executor.sampling_inputs import sampling_tensors

VOCAB = 512
PROMPT = {"prompt_token_ids": [(7 * i + 3) % 500 + 5 for i in range(11)]}


def rows_of(params: list[SamplingParams]):
    rng = np.random.default_rng(0)
    seqs = [Sequence(f"r{i}", list(rng.integers(0, VOCAB, 9)), 9, p, seed=i)
            for i, p in enumerate(params)]
    logits = (rng.standard_normal((len(seqs), VOCAB)) * 3).astype(np.float32)
    return sampling_tensors(seqs, VOCAB, [2], {}), logits


# ---- SamplingParams ----------------------------------------------------------------------------


def test_params_normalize_and_refuse_naming_the_field():
    p = SamplingParams(logprob_token_ids=[9, 4, 9], allowed_token_ids=[30, 7, 30, 1])
    assert p.logprobs == 3 and p.logprob_token_ids == [9, 4, 9]  # logprobs defaults to the count
    assert p.allowed_token_ids == [1, 7, 30]  # a set, sorted
    assert p.num_top_logprobs == 0  # no top-k is computed for them
    assert SamplingParams(logprobs=-1).num_top_logprobs == 0
    assert SamplingParams(logprob_token_ids=[]).logprob_token_ids is None  # asks nothing
    bad = [
        (dict(logprob_token_ids=[1, 2], logprobs=5), "logprob_token_ids"),  # vLLM's rule
        (dict(logprob_token_ids=[-1]), "logprob_token_ids"),
        (dict(logprob_token_ids=list(range(129))), "logprob_token_ids"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(allowed_token_ids=["5"]), "allowed_token_ids"),
        (dict(logprobs=-2), "logprobs"),
        (dict(logprobs=-1, use_beam_search=True, n=2, temperature=0), "logprobs"),
        (dict(logprob_token_ids=[3], use_beam_search=True, n=2, temperature=0),
         "logprob_token_ids"),
    ]
    for kw, field in bad:
        with pytest.raises(ParamError) as e:
            SamplingParams(**kw)
        assert e.value.field == field, kw


def test_tensors_carry_nothing_when_no_row_asks():
    t, _ = rows_of([SamplingParams(logprobs=5), SamplingParams(temperature=0)])
    assert t.logprob_rows is t.full_logprob_rows is t.allowed_rows is None
    assert sample(np.zeros((2, VOCAB), np.float32), t).row_logprobs is None


# ---- the numpy sampler -------------------------------------------------------------------------


def test_sampler_rows_each_get_what_they_asked():
    params = [SamplingParams(logprobs=3, temperature=0.8),
              SamplingParams(logprob_token_ids=[400, 5, 17]),
              SamplingParams(logprobs=-1, temperature=0),
              SamplingParams(allowed_token_ids=[11, 300, 499], temperature=0),
              SamplingParams(allowed_token_ids=[8, 9], logprob_token_ids=[8, 100], top_k=1)]
    t, logits = rows_of(params)
    ref = logits.astype(np.float64)  # (R, vocab): log_softmax written out, not the sampler's
    ref -= ref.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    out = sample(logits, t)
    assert sorted(out.row_logprobs) == [1, 2, 4]
    # chosen ids: exactly those, in the order asked, with their raw logprobs
    for row, want in ((1, [400, 5, 17]), (4, [8, 100])):
        ids, lps = out.row_logprobs[row]
        assert ids.tolist() == want
        np.testing.assert_allclose(lps, ref[row, want], atol=1e-5)
    # -1: every token, best first
    ids, lps = out.row_logprobs[2]
    assert sorted(ids.tolist()) == list(range(VOCAB))
    np.testing.assert_allclose(lps, ref[2, ids], atol=1e-5)
    assert np.all(np.diff(lps) <= 0)
    # allowed ids: greedy takes the best allowed token; its logprob is still the raw one
    assert out.token_ids[3] == [11, 300, 499][int(np.argmax(ref[3, [11, 300, 499]]))]
    assert out.token_ids[4] == [8, 9][int(np.argmax(ref[4, [8, 9]]))]
    np.testing.assert_allclose(out.logprobs, ref[np.arange(5), out.token_ids], atol=1e-5)
    # the top-k row is untouched by its neighbours
    assert out.top_ids[0].tolist() == np.argsort(-ref[0])[:3].tolist()
    assert out.token_ids[2] == np.argmax(ref[2])


def test_allowed_ids_bound_every_draw():
    allowed = [3, 77, 200, 201, 511]
    params = [SamplingParams(allowed_token_ids=allowed, temperature=t, top_p=p, seed=s)
              for t, p, s in ((1.0, 1.0, 1), (5.0, 1.0, 2), (1e-30, 1.0, 3), (2.0, 0.5, 4))]
    params.append(SamplingParams(allowed_token_ids=[60], logit_bias={61: 100.0},
                                 repetition_penalty=2.0))
    for step in range(20):
        t, logits = rows_of(params)
        t.steps[:] = step
        drawn = sample(logits * 3, t).token_ids
        assert set(drawn[:4].tolist()) <= set(allowed)
        assert drawn[4] == 60  # a bias toward another id cannot leave the allowed set


# ---- through the engine ------------------------------------------------------------------------


def run_one(engine, params, prompt=PROMPT):
    engine.add_request("r", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    return final.outputs[0]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_chosen_ids_and_whole_vocabulary(make_engine, async_scheduling):
    e = make_engine(async_scheduling=async_scheduling)
    ids = PROMPT["prompt_token_ids"]
    chosen = run_one(e, SamplingParams(logprob_token_ids=[300, 5, 7], max_tokens=4,
                                       temperature=0.9, seed=3, ignore_eos=True))
    whole = run_one(e, SamplingParams(logprobs=-1, max_tokens=3, temperature=0,
                                      ignore_eos=True))
    for out in (chosen, whole):
        e.add_request("ref", {"prompt_token_ids": ids + out.token_ids},
                      SamplingParams(prompt_logprobs=-1, max_tokens=1))
        ref = None
        while e.has_unfinished_requests():
            for o in e.step():
                ref = o.prompt_logprobs or ref
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            want = ref[len(ids) + i]
            if out is chosen:
                assert list(entry)[:3] == [300, 5, 7] and set(entry) == {300, 5, 7, token}
            else:
                assert len(entry) == VOCAB and token == max(want, key=want.get)
            for t, v in entry.items():
                assert v == pytest.approx(want[t], abs=1e-4)


def test_engine_allowed_ids_and_vocabulary_checks(make_engine):
    e = make_engine()
    allowed = [40, 41, 42, 43]
    for seed in range(3):
        out = run_one(e, SamplingParams(allowed_token_ids=allowed, max_tokens=6, seed=seed,
                                        temperature=1.5, ignore_eos=True, logprobs=0))
        assert set(out.token_ids) <= set(allowed) and len(out.token_ids) == 6
    for field in ("allowed_token_ids", "logprob_token_ids"):
        with pytest.raises(ParamError) as err:
            e.add_request("bad", PROMPT, SamplingParams(**{field: [1, VOCAB]}))
        assert err.value.field == field and "out of vocabulary" in str(err.value)


def test_engine_max_logprobs_caps_the_whole_vocabulary_not_chosen_ids(make_engine):
    e = make_engine(max_logprobs=20)
    with pytest.raises(ParamError) as err:
        e.add_request("all", PROMPT, SamplingParams(logprobs=-1))
    assert err.value.field == "logprobs"
    out = run_one(e, SamplingParams(logprob_token_ids=list(range(30)), max_tokens=1))
    assert len(out.logprobs[0]) >= 30
