"""Every sampling parameter, through the engine where it can be, against the reference sampler."""

import numpy as np
import pytest
from conftest import check_sampler_is_total, extreme_sampling_params
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.sampling_params import ParamError, SamplingParams
from engine.executor.ops import SamplingTensors
from engine.executor.ops.numpy_sampling import (
    TokenCounts,
    apply_penalties,
    count_words,
    filter_probs,
    sample,
)

PROMPT = {"prompt_token_ids": list(range(3, 40))}


def generate(engine, run_engine, params, prompt=PROMPT):
    out, _ = run_engine(engine, {"r": (prompt, params)})
    return out["r"].outputs


def tokens(engine, run_engine, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("ignore_eos", True)
    return generate(engine, run_engine, SamplingParams(**kw))[0].token_ids


# ---- through the engine ------------------------------------------------------------------------


def test_filters_that_keep_only_the_top_token_equal_greedy(make_engine, run_engine):
    e = make_engine()
    want = tokens(e, run_engine, temperature=0)
    assert tokens(e, run_engine, temperature=1.0, seed=1) != want  # sampling does differ
    assert tokens(e, run_engine, temperature=1.0, seed=1, top_k=1) == want
    assert tokens(e, run_engine, temperature=1.0, seed=1, top_p=1e-6) == want
    assert tokens(e, run_engine, temperature=1.0, seed=1, min_p=1.0) == want


def test_logit_bias_forces_its_token(make_engine, run_engine):
    e = make_engine()
    assert tokens(e, run_engine, temperature=0, logit_bias={77: 100}) == [77] * 8
    assert tokens(e, run_engine, temperature=1, seed=5, logit_bias={78: 100}) == [78] * 8


def test_min_tokens_holds_back_eos_and_stop_ids(make_engine, run_engine):
    e = make_engine()
    eos = e.model_config.eos_token_ids[0]
    [out] = generate(e, run_engine, SamplingParams(temperature=0, logit_bias={eos: 100}))
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    [out] = generate(e, run_engine,
                     SamplingParams(temperature=0, logit_bias={eos: 100}, min_tokens=5))
    assert len(out.token_ids) == 6 and eos not in out.token_ids[:5] and out.token_ids[5] == eos
    # min_tokens holds back stop_token_ids too, even with ignore_eos.
    [out] = generate(e, run_engine, SamplingParams(temperature=0, logit_bias={9: 100},
                                                   stop_token_ids=[9], min_tokens=3,
                                                   ignore_eos=True))
    assert len(out.token_ids) == 4 and out.token_ids[3] == 9
    assert out.finish_reason == "stop" and out.stop_reason == 9


def test_ignore_eos(make_engine, run_engine):
    e = make_engine()
    eos = e.model_config.eos_token_ids[0]
    [out] = generate(e, run_engine, SamplingParams(temperature=0, logit_bias={eos: 100},
                                                   ignore_eos=True, max_tokens=4))
    assert out.token_ids == [eos] * 4 and out.finish_reason == "length"


def test_penalties_reach_the_sampler(make_engine, run_engine, monkeypatch):
    e = make_engine()
    seen = []
    real_sample = e.runner.ops.sample_start
    monkeypatch.setattr(e.runner.ops, "sample_start", lambda logits, t, prev=None:
                        seen.append(t) or real_sample(logits, t, prev))
    plain = tokens(e, run_engine, temperature=0, max_tokens=6)
    assert seen[-1].prompt_ids is None and seen[-1].count_slots is None  # nothing built
    for kw in ({"repetition_penalty": 2.0}, {"frequency_penalty": 2.0},
               {"presence_penalty": 2.0}):
        seen.clear()
        out = tokens(e, run_engine, temperature=0, max_tokens=6, **kw)
        assert out != plain, kw
        # The ids go once, at the first draw; then the sampler's kept counts are the history.
        first, later = seen[0], seen[1:]
        assert first.rebuild.tolist() == [True]
        assert first.prompt_ids[0].tolist() == PROMPT["prompt_token_ids"]
        assert all(not t.rebuild.any() and (t.prompt_ids == -1).all() for t in later)
        slot = int(first.count_slots[0])
        table = seen[-1].count_table.table
        assert (table[slot] & 0xFFFF).sum() == len(out)  # every draw counted
        assert sorted(np.flatnonzero(table[slot] & 0xFFFF)) == sorted(set(out))


def test_seeded_sampling_is_independent_of_the_batch(make_engine, run_engine):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    alone = generate(make_engine(), run_engine, params)[0].token_ids
    # The same request among others, with chunked prefill and a different arrival order.
    e = make_engine(max_num_batched_tokens=32)
    others = {f"o{i}": ({"prompt_token_ids": list(range(5 + i, 90))},
                        SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
              for i in range(4)}
    out, _ = run_engine(e, {**others, "r": (PROMPT, params)})
    assert out["r"].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=4321, max_tokens=10,
                                ignore_eos=True)
    assert generate(make_engine(), run_engine, other_seed)[0].token_ids != alone


def test_unseeded_requests_differ_but_the_engine_seed_reproduces(make_engine, run_engine):
    def two_runs(engine):
        p = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
        return [generate(engine, run_engine, p)[0].token_ids for _ in range(2)]

    first = two_runs(make_engine(seed=7))
    assert first[0] != first[1]
    assert two_runs(make_engine(seed=7)) == first


def test_n_gives_distinct_seeded_outputs(make_engine, run_engine):
    e = make_engine()
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    outs = generate(e, run_engine, params)
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) == 3
    assert [o.token_ids for o in generate(e, run_engine, params)] == [o.token_ids for o in outs]


def test_stop_token_ids(make_engine, run_engine):
    e = make_engine()
    greedy = tokens(e, run_engine, temperature=0, max_tokens=12)
    stop = greedy[4]
    [out] = generate(e, run_engine, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                   stop_token_ids=[stop]))
    cut = greedy.index(stop) + 1
    assert out.token_ids == greedy[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_logprobs_are_the_log_softmax_of_the_logits(make_engine, run_engine, monkeypatch):
    e = make_engine()
    logits_seen = []
    real_sample = e.runner.ops.sample_start
    monkeypatch.setattr(e.runner.ops, "sample_start", lambda logits, t, prev=None: (
        logits_seen.append(np.array(logits, np.float64)) or real_sample(logits, t, prev)))
    params = SamplingParams(temperature=0.7, seed=2, max_tokens=5, ignore_eos=True, logprobs=3)
    [out] = generate(e, run_engine, params)
    assert len(out.logprobs) == 5
    for token, entry, logits in zip(out.token_ids, out.logprobs, logits_seen, strict=True):
        # written out here, not numpy_sampling.log_softmax: the sampler's logprobs come from it
        ref = logits[0] - logits[0].max()
        ref -= np.log(np.exp(ref).sum())
        top3 = np.argsort(-ref)[:3].tolist()
        assert set(entry) == set(top3) | {token}
        for token_id, value in entry.items():
            assert value == pytest.approx(ref[token_id], abs=1e-4)
    total = sum(entry[t] for t, entry in zip(out.token_ids, out.logprobs, strict=True))
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)
    [out] = generate(e, run_engine, SamplingParams(max_tokens=3, logprobs=0))
    assert [list(entry) for entry in out.logprobs] == [[t] for t in out.token_ids]
    assert generate(e, run_engine, SamplingParams(max_tokens=3))[0].logprobs is None


def test_stop_strings_cut_and_never_leak(make_engine, run_engine):
    e = make_engine(text=True)
    prompt = "Once upon a time"
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full, _ = run_engine(e, {"full": (prompt, base)})
    text = full["full"].outputs[0].text
    ids = full["full"].outputs[0].token_ids
    # A stop string across the boundary of tokens 4 and 5 (the last chars of 4 + first of 5).
    before = e.tokenizer.decode(ids[:5])
    assert text.startswith(before)
    assert len(before) >= 2 and len(text) > len(before) + 2
    stop = before[-2:] + text[len(before)]
    start = text.find(stop)
    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                stop=["\x00zz", stop], include_stop_str_in_output=include)
        out, history = run_engine(e, {"s": (prompt, params)})
        o = out["s"].outputs[0]
        want = text[: start + len(stop)] if include else text[:start]
        assert o.text == want and o.finish_reason == "stop" and o.stop_reason == stop
        deltas = [h.outputs[0].delta_text for h in history["s"]]
        assert "".join(deltas) == want
        if not include:  # no streamed prefix ever held any part of the stop string
            sent = ""
            for d in deltas:
                sent += d
                assert sent == text[: len(sent)] and len(sent) <= start


# ---- unit tests on the reference sampler ---------------------------------------------------------


def _tensors(rows, **kw):
    t = SamplingTensors(
        temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32),
        top_p=np.ones(rows, np.float32), min_p=np.zeros(rows, np.float32),
        seeds=np.zeros(rows, np.uint64), steps=np.zeros(rows, np.uint32),
        presence_penalty=np.zeros(rows, np.float32), frequency_penalty=np.zeros(rows, np.float32),
        repetition_penalty=np.ones(rows, np.float32))
    for k, v in kw.items():
        setattr(t, k, np.asarray(v, getattr(t, k).dtype if hasattr(getattr(t, k), "dtype")
                                 else np.int32))
    return t


def test_apply_penalties_by_hand():
    logits = np.array([[2.0, -1.0, 0.5, 3.0, -2.0]], np.float32)
    t = _tensors(1, repetition_penalty=[2.0], frequency_penalty=[0.5], presence_penalty=[0.25],
                 prompt_ids=[[0, 4, -1]], output_ids=[[3, 3, 1]])
    # repetition: seen = {0, 4} (prompt) + {1, 3} (output): positive / 2, negative * 2
    # frequency: token 3 twice, token 1 once; presence: tokens 1 and 3
    want = [2.0 / 2, -1.0 * 2 - 0.5 - 0.25, 0.5, 3.0 / 2 - 1.0 - 0.25, -2.0 * 2]
    words = count_words(t.prompt_ids, t.output_ids, 1, 5)
    np.testing.assert_allclose(apply_penalties(logits, t, words)[0], want, rtol=1e-6)


def test_kept_counts_sample_like_the_ids():
    """Penalties from a TokenCounts table (rebuilt, then kept by the draws) give the tokens and
    the table the ids would: step by step, rows in another order, one row rebuilt midway."""
    rng = np.random.default_rng(0)
    vocab, rows = 64, 3
    prompts = [rng.integers(0, vocab, 9).tolist() for _ in range(rows)]
    outputs = [[], rng.integers(0, vocab, 4).tolist(), []]
    counts = TokenCounts(5, vocab)
    slots = np.array([4, 0, 2], np.int32)
    for step in range(6):
        logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 2
        params = dict(temperature=[0.9] * rows, top_k=[20] * rows, seeds=[1, 2, 3],
                      steps=[step] * rows, repetition_penalty=[1.3, 0.7, 1.0],
                      frequency_penalty=[0.0, 0.4, -0.3], presence_penalty=[0.5, 0.0, 0.2])
        by_ids = _tensors(rows, **params, prompt_ids=_pad(prompts), output_ids=_pad(outputs))
        rebuild = np.array([step == 0, step in (0, 3), step == 0])
        kept = _tensors(rows, **params, count_slots=slots, rebuild=rebuild,
                        prompt_ids=_pad([p if b else [] for p, b in zip(prompts, rebuild,
                                                                         strict=True)]),
                        output_ids=_pad([o if b else [] for o, b in zip(outputs, rebuild,
                                                                         strict=True)]))
        if step == 3:
            counts.table[0] = 7  # garbage that the rebuild must clear
        kept.count_table = counts
        want, got = sample(logits, by_ids), sample(logits, kept)
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        np.testing.assert_array_equal(got.logprobs, want.logprobs)
        for r in range(rows):
            outputs[r].append(int(want.token_ids[r]))
        np.testing.assert_array_equal(counts.table[slots],
                                      count_words(_pad(prompts), _pad(outputs), rows, vocab))
    assert not counts.table[[1, 3]].any()  # slots no row uses stay untouched
    with pytest.raises(ValueError, match="count_slots"):
        sample(logits[:2], _tensors(2, count_slots=[1, 1], rebuild=[False, False]))


def _pad(rows):
    out = np.full((len(rows), max(1, max(map(len, rows)))), -1, np.int32)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = ids
    return out


def test_filter_probs_keeps_the_right_sets():
    p = np.array([0.05, 0.4, 0.2, 0.2, 0.15], np.float32)
    kept = lambda **kw: np.flatnonzero(filter_probs(p, **kw)).tolist()  # noqa: E731
    assert kept(top_k=1, top_p=1.0, min_p=0.0) == [1]
    assert kept(top_k=2, top_p=1.0, min_p=0.0) == [1, 2, 3]  # the tie at 0.2 is kept whole
    assert kept(top_k=0, top_p=0.3, min_p=0.0) == [1]  # the mass above 0.2 (0.4) is not < 0.3
    assert kept(top_k=0, top_p=0.5, min_p=0.0) == [1, 2, 3]
    assert kept(top_k=0, top_p=0.85, min_p=0.0) == [1, 2, 3, 4]
    assert kept(top_k=0, top_p=1.0, min_p=0.5) == [1, 2, 3]
    assert kept(top_k=0, top_p=1.0, min_p=0.51) == [1]
    # top-p's boundary, in sums float32 holds exactly: a mass before of exactly top_p is not kept
    halves = np.array([0.125, 0.5, 0.25, 0.125], np.float32)
    assert np.flatnonzero(filter_probs(halves, 0, 0.5, 0.0)).tolist() == [1]
    assert np.flatnonzero(filter_probs(halves, 0, 0.75, 0.0)).tolist() == [1, 2]


def test_top_p_measures_what_top_k_and_min_p_keep():
    """vLLM's order: top-k and min-p cut first, top-p runs on the renormalized rest."""
    p = np.array([0.1, 0.5, 0.1, 0.3], np.float32)
    kept = lambda **kw: np.flatnonzero(filter_probs(p, **kw)).tolist()  # noqa: E731
    # top-k 2 keeps 0.5 and 0.3 (mass 0.8); renormalized, 0.3 has 0.625 above it, not < 0.6
    assert kept(top_k=2, top_p=0.6, min_p=0.0) == [1]
    assert kept(top_k=0, top_p=0.6, min_p=0.0) == [1, 3]  # over the whole row it is kept
    assert kept(top_k=0, top_p=0.6, min_p=0.5) == [1]  # min-p 0.5 keeps >= 0.25: the same
    assert kept(top_k=2, top_p=0.7, min_p=0.0) == [1, 3]  # 0.625 < 0.7

    # Against renormalizing by hand, on random rows with every pair of rules.
    rng = np.random.default_rng(7)
    for _ in range(200):
        row = np.exp(rng.standard_normal(50) * 2).astype(np.float32)
        row /= row.sum()
        top_k, min_p = int(rng.choice([0, 3, 10])), float(rng.choice([0.0, 0.02, 0.2]))
        top_p = float(rng.uniform(0.2, 0.99))
        first = filter_probs(row, top_k, 1.0, min_p)
        want = filter_probs(first / first.sum(), 0, top_p, 0.0) > 0
        np.testing.assert_array_equal(filter_probs(row, top_k, top_p, min_p) > 0, want)


def test_logit_bias_comes_before_the_penalties():
    """vLLM biases first: a seen token at logit 1 biased by -3 is penalized from -2 (to -4 at
    repetition penalty 2), below an unseen token at -3; penalized first it would be -2.5."""
    logits = np.array([[1.0, -3.0, -9.0]], np.float32)
    t = _tensors(1, repetition_penalty=[2.0], prompt_ids=[[0]], output_ids=[[-1]],
                 bias_ids=[[0]])
    t.bias_values = np.array([[-3.0]], np.float32)
    assert sample(logits, t).token_ids.tolist() == [1]


@pytest.mark.parametrize("field, kw", [
    ("temperature", {"temperature": -0.5}), ("top_p", {"top_p": 0.0}), ("top_k", {"top_k": -3}),
    ("min_p", {"min_p": 1.5}), ("n", {"n": 0}), ("max_tokens", {"max_tokens": 0}),
    ("min_tokens", {"min_tokens": 9, "max_tokens": 4}), ("logprobs", {"logprobs": 21}),
    ("presence_penalty", {"presence_penalty": 3}), ("frequency_penalty", {"frequency_penalty": -3}),
    ("repetition_penalty", {"repetition_penalty": 0}), ("logit_bias", {"logit_bias": {3: 101}}),
    ("stop", {"stop": [""]}),
])
def test_invalid_values_raise_naming_the_field(field, kw):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


@pytest.mark.parametrize("field, kw", [
    ("max_tokens", {"max_tokens": True}), ("logprobs", {"logprobs": True}),
    ("n", {"n": True}), ("seed", {"seed": False}), ("ignore_eos", {"ignore_eos": "yes"}),
    ("skip_special_tokens", {"skip_special_tokens": "no"}), ("stop", {"stop": 5}),
    ("stop_token_ids", {"stop_token_ids": "a"}), ("stop_token_ids", {"stop_token_ids": [1.5]}),
    ("stop_token_ids", {"stop_token_ids": [True]}), ("logit_bias", {"logit_bias": [1, 2]}),
    ("logit_bias", {"logit_bias": {"abc": 1}}), ("logit_bias", {"logit_bias": {5: "x"}}),
    ("logit_bias", {"logit_bias": {5: True}}), ("use_beam_search", {"use_beam_search": 1}),
    # keys that str.isdigit() took but int() refuses: a bare ValueError naming no field
    ("logit_bias", {"logit_bias": {"\u00b2": 1}}), ("logit_bias", {"logit_bias": {"--5": 1}}),
    # an integer too large for a float: math.isfinite raised OverflowError
    ("temperature", {"temperature": 10**400}), ("top_p", {"top_p": -(10**400)}),
    ("logit_bias", {"logit_bias": {5: 10**400}}), ("logit_bias", {"logit_bias": {5: -(10**400)}}),
])
def test_wrong_types_raise_naming_the_field(field, kw):
    """A bool is no count, a string no flag: each is a ParamError naming its field, never a
    TypeError from deep inside nor a silent reading (max_tokens=True once generated 1 token)."""
    with pytest.raises(ParamError) as e:
        SamplingParams(**kw)
    assert e.value.field == field


def test_integer_like_values_are_taken():
    import numpy as np

    p = SamplingParams(n=np.int64(2), seed=np.int32(7), stop_token_ids=(np.int64(3), 4),
                       logit_bias={"5": 1, np.int64(6): np.float32(-2.5), 7: 3})
    assert p.stop_token_ids == [3, 4] and all(type(t) is int for t in p.stop_token_ids)
    assert p.logit_bias == {5: 1.0, 6: -2.5, 7: 3.0}
    # the lists of token ids take them too, as Python ints (they travel to the engine core)
    q = SamplingParams(allowed_token_ids=[np.int64(9), 2, np.int32(9)],
                       logprob_token_ids=(np.int64(5), np.uint16(6)))
    assert q.allowed_token_ids == [2, 9] and q.logprob_token_ids == [5, 6] and q.logprobs == 2
    assert all(type(t) is int for t in q.allowed_token_ids + q.logprob_token_ids)


# ---- totality: any valid parameters give a valid token ------------------------------------------


@pytest.fixture(scope="module")
def shared_engine():
    from conftest import _tiny_loaded

    from engine.engine import LLMEngine
    from engine.model.config import EngineConfig

    return LLMEngine(EngineConfig(device="numpy"), loaded_model=_tiny_loaded(512, False))


@settings(max_examples=80, deadline=None)
@given(st.lists(extreme_sampling_params(512), min_size=1, max_size=4))
def test_sampler_is_total(shared_engine, params):
    final = check_sampler_is_total(shared_engine, PROMPT, params, 512)
    for out in final.values():
        for c in out.outputs:
            assert 1 <= len(c.token_ids) <= 3 and np.isfinite(c.cumulative_logprob)


@pytest.mark.parametrize("kw", [dict(temperature=1e-40), dict(top_p=1e-50),
                                dict(temperature=1e-40, top_p=1e-50, top_k=3, min_p=0.5),
                                dict(top_p=1e-50, repetition_penalty=1e-50)])
def test_underflowing_filters_keep_the_top_token(make_engine, run_engine, kw):
    e = make_engine()
    want = tokens(e, run_engine, temperature=0, **{k: v for k, v in kw.items()
                                                  if k == "repetition_penalty"})
    assert tokens(e, run_engine, seed=3, **kw) == want


def test_a_row_with_every_token_banned_takes_id_0():
    logits = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    t = _tensors(2, temperature=[1.0, 0.0], bias_ids=[list(range(6))] * 2)
    t.bias_values = np.full((2, 6), -np.inf, np.float32)
    assert sample(logits, t).token_ids.tolist() == [0, 0]


def test_nan_logits_are_never_the_argmax():
    """A broken model's NaN logits: greedy and any row whose max is not finite take the argmax
    of the rest (a row of NaN: id 0), as the GPU samplers order them (sampling_common.cuh)."""
    logits = np.array([[0.5, 1.0, np.nan, -2.0, 3.0, 0.0],
                       [np.nan] * 6,
                       [0.5, 1.0, np.nan, -2.0, 3.0, 0.0]], np.float32)
    t = _tensors(3, temperature=[0.0, 0.0, 0.7])
    assert sample(logits, t).token_ids.tolist() == [4, 0, 4]


def test_nan_logits_take_the_argmax_under_penalties_too():
    """NaN stays NaN through the penalties (it is no number to clamp): a row holding one takes
    the argmax of the rest whether or not the step penalizes (a row of NaN: id 0), as without.
    cuda/sampling_penalty.cuh's penalized() clamped it to -FLT_MAX, so on the GPU such a row was
    sampled (an all-NaN one uniformly) as soon as any row of the step had a penalty."""
    logits = np.array([[0.5, 1.0, np.nan, -2.0, 3.0, 0.0],
                       [np.nan] * 6,
                       [0.5, 1.0, np.nan, -2.0, 3.0, 0.0]], np.float32)
    t = _tensors(3, temperature=[0.7, 0.7, 0.7], repetition_penalty=[1.0, 1.0, 1.5],
                 prompt_ids=[[-1], [-1], [1]], output_ids=[[-1], [-1], [0]])
    words = count_words(t.prompt_ids, t.output_ids, 3, 6)
    assert np.isnan(apply_penalties(logits, t, words)[:, 2]).all()
    for seed in range(50):
        t.seeds = np.full(3, seed, np.uint64)
        assert sample(logits, t).token_ids.tolist() == [4, 0, 4], seed


def test_inf_logits_take_the_argmax_under_penalties():
    """+inf stays +inf through the penalties (a broken model's logit, an fp16 overflow), as NaN
    does: a row holding one takes the argmax (the lowest inf id) whether or not the step
    penalizes. Clamped to FLT_MAX, the row was sampled as soon as any row of the step had a
    penalty, its own or a batchmate's: among its infs, at a huge temperature among every token."""
    logits = np.array([[0.5, np.inf, np.inf, 1.0, 0.0],
                       [0.5, np.inf, -2.0, 1.0, 0.0],
                       [0.5, 1.0, -2.0, 3.0, 0.0]], np.float32)
    # row 0 has no penalty of its own; row 1's inf is seen (repetition) at a huge temperature
    t = _tensors(3, temperature=[1.0, 1e38, 1.0], repetition_penalty=[1.0, 1.5, 1.5],
                 frequency_penalty=[0.0, 0.5, 0.0], prompt_ids=[[-1], [1], [3]],
                 output_ids=[[-1], [1], [4]])
    words = count_words(t.prompt_ids, t.output_ids, 3, 5)
    assert np.isposinf(apply_penalties(logits, t, words)[:2, 1]).all()
    alone = _tensors(2, temperature=[1.0, 1e38])
    for seed in range(50):
        t.seeds = np.full(3, seed, np.uint64)
        alone.seeds = t.seeds[:2]
        assert sample(logits[:2], alone).token_ids.tolist() == [1, 1]
        assert sample(logits, t).token_ids[:2].tolist() == [1, 1], seed


def test_top_logprobs_rank_the_raw_logits_with_nan_last():
    """The top logprobs follow the raw logits (value desc, id asc, then NaN in id order), as the
    cuda kernels' next_top: a row holding a NaN has only NaN logprobs (ranked by those: ids 0, 1,
    ..; the GPU answered its numbers, then 0x7fffffff as ids), and two logits one ulp apart far
    below the max round to one logprob (ranked by those: the lower id first)."""
    above_1 = np.nextafter(np.float32(1), np.float32(2))
    logits = np.array([[np.nan, 1.0, -np.inf, np.nan, 3.0, 1.0],
                       [1000.0, 1.0, above_1, -5.0, 0.0, 0.0]], np.float32)
    t = _tensors(2, temperature=[0.0, 0.0])
    t.num_logprobs = 6
    out = sample(logits, t)
    assert out.top_ids.tolist() == [[4, 1, 5, 2, 0, 3], [0, 2, 1, 4, 5, 3]]
    assert np.isnan(out.top_logprobs[0]).all() and np.isfinite(out.top_logprobs[1]).all()
    assert out.top_logprobs[1, 1] == out.top_logprobs[1, 2]  # the tie the ranking must not see


def test_a_ban_stays_a_ban_under_penalties():
    """A -inf logit (min_tokens' bias on eos, a grammar's mask) is a ban whatever the row's or
    its batchmates' penalties: clamped to -FLT_MAX, a huge (valid) temperature gives it exp(-1)
    of the top token's weight, and a row with every token banned stops being one."""
    logits = np.array([[1.0, 2.0, 0.5, 3.0]] * 2, np.float32)
    # row 0 has a penalty, row 1 none (its batchmate's puts the step on the penalty path)
    t = _tensors(2, temperature=[1e38, 1e38], repetition_penalty=[1.5, 1.0],
                 prompt_ids=[[1], [-1]], output_ids=[[-1], [-1]], bias_ids=[[0, 1, 3]] * 2)
    t.bias_values = np.full((2, 3), -np.inf, np.float32)
    for seed in range(100):
        t.seeds = np.array([seed, seed + 1000], np.uint64)
        assert sample(logits, t).token_ids.tolist() == [2, 2], seed  # the one token not banned
    t.bias_ids = np.array([[0, 1, 2, 3]] * 2, np.int32)  # every token banned: the argmax, id 0
    t.bias_values = np.full((2, 4), -np.inf, np.float32)
    assert sample(logits, t).token_ids.tolist() == [0, 0]

def test_min_tokens_holds_eos_back_at_any_temperature_with_penalties(make_engine, run_engine):
    reqs = {f"s{s}": ({"prompt_token_ids": [5, 6, 7, 8]},
                      SamplingParams(temperature=1e300, seed=s, min_tokens=6, max_tokens=6,
                                     allowed_token_ids=[2, 9], repetition_penalty=1.5))
            for s in range(10)}
    out, _ = run_engine(make_engine(), reqs)
    assert [o.outputs[0].token_ids for o in out.values()] == [[9] * 6] * 10
