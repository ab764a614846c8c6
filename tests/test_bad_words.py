"""bad_words (vLLM's rule): a word's last token is never drawn where the output so far ends with
the rest of the word. Held to a plain reference: greedy decoding one token at a time, each a
fresh request whose allowed_token_ids leave out what the rule bans at that point, in the
synchronous and the overlapped loop, under chunked prefill, preemption and n-gram drafts."""

import dataclasses

import numpy as np
import pytest
from conftest import _smollm2_tokenizer, step_to_end

from engine.core.sampling_params import ParamError, SamplingParams
from engine.executor.ops import SamplingTensors
from engine.executor.ops.numpy_ops import NumpyOps
from engine.output_processor import bad_words_token_ids

VOCAB = 512  # make_engine()'s model


def banned(out: list[int], words: list[list[int]]) -> set[int]:
    """The rule, as written: the last token of every word whose other tokens end `out`."""
    return {w[-1] for w in words
            if len(w) - 1 <= len(out) and out[len(out) - len(w) + 1 :] == w[:-1]}


def contains(out: list[int], word: list[int]) -> bool:
    return any(out[i : i + len(word)] == word for i in range(len(out) - len(word) + 1))


def with_ids(params: SamplingParams, words: list[list[int]]) -> SamplingParams:
    """params with bad words given as token ids (the model here has no tokenizer; the front
    sets the same field from text)."""
    params.bad_words_token_ids = words
    return params


def reference_greedy(make_engine, prompt: list[int], words: list[list[int]], n: int) -> list[int]:
    engine, out = make_engine(async_scheduling=False), []
    for i in range(n):
        allowed = sorted(set(range(VOCAB)) - banned(out, words))
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt + out},
                           SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                          allowed_token_ids=allowed))
        out += step_to_end(engine)[f"r{i}"].outputs[0].token_ids
    return out


def greedy(engine, prompts: dict, words: list[list[int]] | None, n: int) -> dict:
    for request_id, prompt in prompts.items():
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        engine.add_request(request_id, {"prompt_token_ids": prompt},
                           with_ids(params, words) if words else params)
    return {k: out.outputs[0].token_ids for k, out in step_to_end(engine).items()}


def spec():
    return {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2, "disable_by_batch_size": 64}


@pytest.mark.parametrize("fields", [
    dict(async_scheduling=False),
    dict(async_scheduling=True),
    dict(async_scheduling=True, max_num_batched_tokens=8, block_size=4),
    dict(async_scheduling=True, block_size=2, num_kv_blocks=40),  # preempts
    dict(speculative_config=spec()),  # draft rows carry the drafts before them
], ids=["sync", "overlap", "chunked", "preempt", "drafts"])
def test_greedy_equals_the_reference(make_engine, fields):
    rng = np.random.default_rng(5)
    span = rng.integers(3, VOCAB, 5).tolist()
    prompts = {"copy": span * 6, "other": rng.integers(3, VOCAB, 11).tolist()}
    free = greedy(make_engine(), prompts, None, 24)
    out = free["copy"]  # it copies the span: the words below come back again and again
    # Words of three tokens (two generated before the banned one: in the overlapped loop the
    # second is pending), then of two and one.
    for words in ([out[7:10], free["other"][5:8]], [out[3:5], [free["other"][2]]]):
        got = greedy(make_engine(**fields), prompts, words, 24)
        for request_id, prompt in prompts.items():
            assert got[request_id] == reference_greedy(make_engine, prompt, words, 24)
            assert not any(contains(got[request_id], w) for w in words)
            assert got[request_id] != free[request_id]


@pytest.mark.parametrize("fields", [
    dict(), dict(max_num_batched_tokens=8, block_size=4),
    dict(block_size=2, num_kv_blocks=40),
], ids=["plain", "chunked", "preempt"])
def test_seeded_tokens_are_the_same_with_and_without_overlap(make_engine, fields):
    rng = np.random.default_rng(6)
    prompts = {f"p{i}": rng.integers(3, VOCAB, int(rng.integers(4, 20))).tolist()
               for i in range(4)}

    def run(words, overlap: bool):
        engine = make_engine(async_scheduling=overlap, **fields)
        for request_id, prompt in prompts.items():
            params = SamplingParams(temperature=1.0, top_k=8, seed=int(request_id[1:]), n=2,
                                    max_tokens=30, ignore_eos=True)
            engine.add_request(request_id, {"prompt_token_ids": prompt},
                               with_ids(params, words) if words else params)
        return {k: [c.token_ids for c in out.outputs] for k, out in step_to_end(engine).items()}

    free = run(None, False)
    outs = [ids for both in free.values() for ids in both]
    # Stretches the free run makes: each sequence runs as before up to its word's last token.
    for words in ([outs[0][4:7], outs[3][10:13], outs[5][20:23]],
                  [outs[1][4:6], outs[2][20:22], outs[7][7:9], [outs[4][1]]]):
        sync, overlapped = run(words, False), run(words, True)
        assert sync == overlapped
        changed = [a != b for k in free for a, b in zip(free[k], sync[k], strict=True)]
        assert sum(changed) >= len(words)
        for both in sync.values():
            for ids in both:
                assert not any(contains(ids, w) for w in words)


def test_the_sampler_adds_a_conditional_entry_after_its_token_only():
    """numpy twin: an entry with bias_after >= 0 adds where the row's previous token is that id;
    a placeholder previous token is read from the previous step's sampled ids."""
    logits = np.tile(np.arange(6, dtype=np.float32), (4, 1))  # greedy takes 5 unbanned
    z = np.zeros(4, np.float32)
    t = SamplingTensors(temperature=z, top_k=z.astype(np.int32), top_p=z + 1, min_p=z,
                        seeds=z.astype(np.uint64), steps=z.astype(np.uint32), presence_penalty=z,
                        frequency_penalty=z, repetition_penalty=z + 1)
    t.bias_ids = np.array([[5, 4]] * 4, np.int32)
    t.bias_values = np.full((4, 2), -np.inf, np.float32)
    t.bias_after = np.array([[7, -1], [7, 8], [8, 9], [-1, 8]], np.int32)
    t.last_ids = np.array([7, 3, -2, -3], np.int32)  # rows 2, 3: pending, rows 0, 1 of prev
    got = NumpyOps().sample_start(logits, dataclasses.replace(t), np.array([9, 8], np.int32))
    # row 0: 5 after 7 banned, 4 always -> 3; row 1: neither -> 5; row 2: last 9, so 4 banned
    # but not 5 -> 5; row 3: 5 always, 4 after 8 (last 8) -> 3
    assert got.wait().token_ids.tolist() == [3, 5, 5, 3]


def test_words_become_token_ids_bare_and_spaced():
    tok = _smollm2_tokenizer()
    for word in ["hello", "  Paris", "don't stop", "zqxjkv"]:
        bare = tok.encode(word.lstrip(), add_special_tokens=False)
        spaced = tok.encode(" " + word.lstrip(), add_special_tokens=False)
        want = [bare] + ([spaced] if spaced[0] != bare[0] and len(spaced) == len(bare) else [])
        assert bad_words_token_ids(tok, [word]) == want
    # SmolLM2 spells "hello" and " hello" as one token each: both are banned
    assert [len(ids) for ids in bad_words_token_ids(tok, ["hello"])] == [1, 1]


def test_text_words_through_the_engine(make_engine):
    """bad_words as text: the front tokenizes them; the output never holds them."""
    tok = _smollm2_tokenizer()
    prompt = {"prompt_token_ids": list(range(1000, 1012))}
    engine = make_engine(text=True)
    engine.add_request("free", prompt, SamplingParams(temperature=0, max_tokens=20,
                                                      ignore_eos=True))
    free = step_to_end(engine)["free"].outputs[0].token_ids
    # Words spelled by the free output's own tokens, so that banning them changes it.
    words = [w for w in (tok.decode(free[i : i + 2]) for i in range(0, 12, 4))
             if any(contains(free, ids) for ids in bad_words_token_ids(tok, [w]))]
    assert len(words) >= 2
    for overlap in (False, True):
        engine = make_engine(text=True, async_scheduling=overlap)
        engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=20,
                                                       ignore_eos=True, bad_words=words))
        got = step_to_end(engine)["r"].outputs[0].token_ids
        assert got != free
        assert not any(contains(got, ids) for ids in bad_words_token_ids(tok, words))


@pytest.mark.parametrize("kw, words, match", [
    (dict(bad_words=["x", ""]), None, "empty"),
    (dict(bad_words=[" \t"]), None, "empty"),
    (dict(bad_words=["x"] * 129), None, "at most 128"),
    (dict(bad_words=["x" * 257]), None, "at most 256 characters"),
    (dict(bad_words=3), None, "string or a list"),
    (dict(bad_words=["x"], use_beam_search=True, n=2), None, "use_beam_search"),
])
def test_bad_words_rules_name_the_field(kw, words, match):
    with pytest.raises(ParamError, match=match) as e:
        SamplingParams(**kw)
    assert e.value.field == "bad_words"


def test_the_engine_refuses_what_it_cannot_ban(make_engine):
    engine = make_engine()  # no tokenizer
    with pytest.raises(ParamError, match="need a tokenizer") as e:
        engine.add_request("a", {"prompt_token_ids": [5, 6]}, SamplingParams(bad_words=["x"]))
    assert e.value.field == "bad_words"
    with pytest.raises(ParamError, match="a word of no tokens") as e:
        engine.add_request("e", {"prompt_token_ids": [5, 6]}, with_ids(SamplingParams(), [[]]))
    assert e.value.field == "bad_words"
    with pytest.raises(ParamError, match=r"\[512\] out of vocabulary") as e:
        engine.add_request("b", {"prompt_token_ids": [5, 6]},
                           with_ids(SamplingParams(), [[5, 512]]))
    assert e.value.field == "bad_words"
    with pytest.raises(ParamError, match="all one-token bad_words") as e:
        engine.add_request("c", {"prompt_token_ids": [5, 6]},
                           with_ids(SamplingParams(allowed_token_ids=[3, 4]), [[3], [4], [5, 3]]))
    assert e.value.field == "allowed_token_ids"
    # the core without the front: text words that were never tokenized
    from engine.core.outputs import EngineCoreRequest

    with pytest.raises(ParamError, match="token ids") as e:
        engine.core.add_request(EngineCoreRequest("d", [5, 6], SamplingParams(bad_words=["x"]),
                                                  0.0))
    assert e.value.field == "bad_words"
    assert not engine.has_unfinished_requests()


def test_a_list_of_words_is_tokenized_once_and_each_request_gets_its_own_ids(make_engine,
                                                                            monkeypatch):
    from engine import output_processor

    calls = []
    real = output_processor.bad_words_token_ids
    monkeypatch.setattr(output_processor, "bad_words_token_ids",
                        lambda tok, words: calls.append(words) or real(tok, words))
    engine = make_engine(text=True)
    params = [SamplingParams(max_tokens=2, bad_words=["hello", "big cat"]) for _ in range(3)]
    for i, p in enumerate(params):
        engine.add_request(f"r{i}", "Hi", p)
    assert len(calls) == 1
    assert params[0].bad_words_token_ids == params[2].bad_words_token_ids
    assert params[0].bad_words_token_ids is not params[2].bad_words_token_ids
    step_to_end(engine)
