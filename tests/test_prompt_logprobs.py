"""Prompt logprobs (SamplingParams.prompt_logprobs): scored by the prefill chunks that compute
them, the same whatever the chunking, the loop or the prefix cache, and equal to the logprobs the
sampler gives the same tokens when it generates them."""

import numpy as np
import pytest

from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence

PROMPT = {"prompt_token_ids": [(7 * i + 3) % 500 + 5 for i in range(23)]}


def run_one(engine, prompt, params):
    engine.add_request("r", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    return final


def test_first_entry_none_then_one_dict_per_prompt_token(make_engine):
    out = run_one(make_engine(), PROMPT, SamplingParams(prompt_logprobs=3, max_tokens=2))
    ids = PROMPT["prompt_token_ids"]
    lps = out.prompt_logprobs
    assert lps[0] is None and len(lps) == len(ids)
    for token, entry in zip(ids[1:], lps[1:], strict=True):
        assert token in entry and 3 <= len(entry) <= 4
        top = sorted((v for k, v in entry.items()), reverse=True)[:3]
        assert max(entry.values()) == top[0] and all(v <= 0 for v in entry.values())
        assert entry[token] <= top[0] + 1e-6
    # prompt_logprobs=0: the prompt token's own logprob only.
    out0 = run_one(make_engine(), PROMPT, SamplingParams(prompt_logprobs=0, max_tokens=1))
    assert [list(e) for e in out0.prompt_logprobs[1:]] == [[t] for t in ids[1:]]
    assert [e[t] for e, t in zip(out0.prompt_logprobs[1:], ids[1:], strict=True)] == \
        pytest.approx([lps[i][t] for i, t in enumerate(ids[1:], 1)], abs=1e-5)
    plain = run_one(make_engine(), PROMPT, SamplingParams(max_tokens=1))
    assert plain.prompt_logprobs is None


def test_equal_to_the_samplers_logprobs_of_generated_tokens(make_engine):
    """Generate greedily with logprobs, then score prompt + generated text: same numbers."""
    gen = run_one(make_engine(), PROMPT, SamplingParams(temperature=0, max_tokens=6,
                                                        ignore_eos=True, logprobs=0))
    out = gen.outputs[0]
    text = PROMPT["prompt_token_ids"] + out.token_ids
    scored = run_one(make_engine(), {"prompt_token_ids": text},
                     SamplingParams(prompt_logprobs=0, max_tokens=1))
    n = len(PROMPT["prompt_token_ids"])
    got = [scored.prompt_logprobs[n + i][t] for i, t in enumerate(out.token_ids)]
    want = [d[t] for d, t in zip(out.logprobs, out.token_ids, strict=True)]
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("fields", [
    dict(max_num_batched_tokens=5, block_size=4),  # chunked prefill, chunks cross blocks
    dict(max_num_batched_tokens=7, async_scheduling=True),
    dict(max_num_batched_tokens=64, async_scheduling=True, block_size=8),
])
def test_same_whatever_the_chunking_and_loop(make_engine, fields):
    params = SamplingParams(prompt_logprobs=2, max_tokens=3, temperature=0)
    want = run_one(make_engine(max_num_batched_tokens=256), PROMPT, params)
    got = run_one(make_engine(**fields), PROMPT, params)
    for a, b in zip(want.prompt_logprobs[1:], got.prompt_logprobs[1:], strict=True):
        assert list(a) == list(b)
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_prefix_cache_hits_do_not_skip_scored_positions(make_engine):
    engine = make_engine(block_size=4)
    params = SamplingParams(prompt_logprobs=1, max_tokens=1)
    first = run_one(engine, PROMPT, SamplingParams(max_tokens=1))  # fills the prefix cache
    assert first.num_cached_tokens == 0
    again = run_one(engine, PROMPT, SamplingParams(max_tokens=1))
    assert again.num_cached_tokens == 20  # 5 full blocks of the 23 tokens; the last recomputed
    scored = run_one(engine, PROMPT, params)
    fresh = run_one(make_engine(block_size=4), PROMPT, params)
    assert scored.num_cached_tokens == 0
    assert len(scored.prompt_logprobs) == len(PROMPT["prompt_token_ids"])
    for a, b in zip(scored.prompt_logprobs[1:], fresh.prompt_logprobs[1:], strict=True):
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)


def test_only_asking_sequences_get_rows_and_batchmates_are_unchanged(make_engine):
    engine = make_engine(max_num_batched_tokens=64)
    rows = []
    prepare = engine.runner.prepare_inputs

    def spy(batch):
        inputs = prepare(batch)
        rows.append(0 if inputs.prompt is None else len(inputs.prompt.rows))
        return inputs

    engine.runner.prepare_inputs = spy
    other = {"prompt_token_ids": [9, 8, 7, 6, 5, 4]}
    engine.add_request("a", PROMPT, SamplingParams(prompt_logprobs=1, max_tokens=4,
                                                   temperature=0, n=2))
    engine.add_request("b", other, SamplingParams(max_tokens=4, temperature=0))
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            final[out.request_id] = out
    assert sum(rows) == len(PROMPT["prompt_token_ids"]) - 1  # once, n=2 or not
    alone = run_one(make_engine(), other, SamplingParams(max_tokens=4, temperature=0))
    assert final["b"].outputs[0].token_ids == alone.outputs[0].token_ids
    assert final["b"].prompt_logprobs is None
    assert len(final["a"].prompt_logprobs) == len(PROMPT["prompt_token_ids"])


def test_recompute_after_preemption_keeps_one_entry_per_position(make_engine):
    # 10 blocks of 4: two 23-token prompts growing to 31 tokens cannot both stay.
    engine = make_engine(block_size=4, num_kv_blocks=10, max_num_batched_tokens=8)
    params = SamplingParams(prompt_logprobs=1, max_tokens=8, ignore_eos=True, temperature=0)
    for name in "ab":
        engine.add_request(name, PROMPT, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            final[out.request_id] = out
    fresh = run_one(make_engine(), PROMPT, params)
    for name in "ab":
        got = final[name].prompt_logprobs
        assert len(got) == len(PROMPT["prompt_token_ids"])
        assert [list(e) for e in got[1:]] == [list(e) for e in fresh.prompt_logprobs[1:]]


def test_validation():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-2)


def test_minus_one_is_the_whole_vocabulary(make_engine):
    out = run_one(make_engine(), {"prompt_token_ids": [5, 6, 7]},
                  SamplingParams(prompt_logprobs=-1, max_tokens=1))
    for entry in out.prompt_logprobs[1:]:
        assert len(entry) == 512
        assert np.exp(list(entry.values())).sum() == pytest.approx(1, abs=1e-4)


def test_each_prompt_tokens_rank_is_its_place_in_the_whole_vocabulary(make_engine):
    """vLLM's rank: how many tokens score at least as high, also past the top ones (it was
    counted among the entry's few tokens), the same under chunked prefill; a server sends it."""
    from server.extras import prompt_logprobs_json

    ids = PROMPT["prompt_token_ids"]
    full = run_one(make_engine(), PROMPT, SamplingParams(prompt_logprobs=-1, max_tokens=1))
    want = [None] + [sum(v >= e[t] for v in e.values())
                     for e, t in zip(full.prompt_logprobs[1:], ids[1:], strict=True)]
    assert max(want[1:]) > 2  # the premise: some prompt token lies past the top two
    for fields in ({}, {"max_num_batched_tokens": 5, "block_size": 4}):
        out = run_one(make_engine(**fields), PROMPT,
                      SamplingParams(prompt_logprobs=2, max_tokens=1))
        assert out.prompt_logprob_ranks == want
    sent = prompt_logprobs_json(out.prompt_logprobs, str, out.prompt_token_ids,
                                out.prompt_logprob_ranks)
    assert [None if e is None else e[str(t)]["rank"] for e, t in zip(sent, ids, strict=True)] \
        == want
    assert all(sorted(v["rank"] for v in e.values())[:2] == [1, 2] for e in sent[1:])


def test_a_prompt_token_tied_with_others_ranks_after_them_all():
    """vLLM's count of logprobs >= the token's: ties put the token last among its equals (1 + a
    count of strictly higher ones would put it first)."""
    from engine.executor.prompt_logprobs import prompt_ranks

    lp = np.log(np.array([[0.3, 0.3, 0.3, 0.1], [0.4, 0.2, 0.2, 0.2], [0.25] * 4], np.float32))
    chosen = lp[[0, 1, 2], [1, 3, 0]]
    assert prompt_ranks(lp, chosen) == [3, 4, 4]
    big = np.tile(lp[1], (600, 1))  # past one slice of 256 rows
    assert prompt_ranks(big, big[:, 0]) == [1] * 600


def test_max_logprobs_caps_what_a_request_asks(make_engine):
    from engine.core.sampling_params import ParamError

    capped = make_engine(max_logprobs=20)  # the server's default, as vLLM's
    for params, field in ((SamplingParams(prompt_logprobs=-1), "prompt_logprobs"),
                          (SamplingParams(logprobs=5, max_tokens=1), None)):
        if field is None:
            capped.add_request("ok", PROMPT, params)
            continue
        with pytest.raises(ParamError, match="max_logprobs") as e:
            capped.add_request("r", PROMPT, params)
        assert e.value.field == field
    with pytest.raises(ParamError) as e:
        make_engine(max_logprobs=3).add_request("r", PROMPT, SamplingParams(logprobs=4))
    assert e.value.field == "logprobs"
    # as vLLM's: a cap of at least the vocabulary's size lets a request ask for all of it
    # (vLLM's own tests start their server with --max-logprobs 151936); below -1 is refused
    from engine.model.config import ConfigError

    vocab = capped.model_config.vocab_size
    make_engine(max_logprobs=vocab).add_request("all", PROMPT, SamplingParams(prompt_logprobs=-1))
    with pytest.raises(ParamError, match="max_logprobs"):
        make_engine(max_logprobs=vocab - 1).add_request("r", PROMPT,
                                                        SamplingParams(prompt_logprobs=-1))
    with pytest.raises(ConfigError, match=r"max_logprobs must be -1 .* or >= 0, got -2"):
        make_engine(max_logprobs=-2)


def test_offline_llm_scores_prompts_like_vllm(make_engine):
    from engine.llm import LLM

    llm = LLM.from_engine(make_engine(text=True))
    [out] = llm.generate("Hello there, how are you?", SamplingParams(prompt_logprobs=2,
                                                                     max_tokens=1),
                         use_tqdm=False)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True):
        assert token in entry


def test_ties_pick_the_lowest_ids_as_the_sampler_does():
    """Tied logprobs (common in bf16 logits) give the same top-k ids, lowest first, as the
    sampler's logprobs of a generated token at the same row."""
    from types import SimpleNamespace

    from engine.executor.ops.numpy_ops import NumpyOps
    from engine.executor.ops.numpy_sampling import sample
    from engine.executor.prompt_logprobs import PendingPromptLogprobs, PromptRows
    from engine.executor.sampling_inputs import sampling_tensors

    logits = np.zeros((3, 512), np.float32)  # (Q, vocab)
    logits[1, 300:310] = 1.0  # ten tied best
    logits[2, [40, 450]] = 2.0
    logits[2, [7, 90, 200, 499]] = 1.0  # the 3rd..5th best among four tied
    targets = np.array([7, 305, 499], np.int32)
    seq = SimpleNamespace(sampling_params=SamplingParams(prompt_logprobs=5))
    [scored] = PendingPromptLogprobs(NumpyOps(), logits,
                                     PromptRows(np.arange(3), targets, [(seq, 1, 3)], 5)).wait()
    seqs = [Sequence(f"s{i}", [1, 2], 2, SamplingParams(temperature=0, logprobs=5))
            for i in range(3)]
    want = sample(logits, sampling_tensors(seqs, 512, [2], {})).top_ids.tolist()
    assert want == [[0, 1, 2, 3, 4], [300, 301, 302, 303, 304], [40, 450, 7, 90, 200]]
    for entry, top, target in zip(scored.entries, want, targets.tolist(), strict=True):
        assert list(entry)[:5] == top and target in entry
