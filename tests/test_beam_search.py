"""Beam search in the engine core on shared KV blocks, held to a brute-force beam search that
scores every beam with a full forward of its own (prompt_logprobs=-1: the whole next-token
distribution), with the block manager's invariants checked after every step."""

import math

import pytest
from conftest import step_to_end

from engine.core.sampling_params import BeamSearchParams, ParamError, SamplingParams

PROMPT = [(11 * i + 7) % 500 + 5 for i in range(7)]


def next_logprobs(engine, tokens: list[int]) -> dict[int, float]:
    """The distribution of the token after `tokens`, from an independent full forward."""
    engine.add_request("ref", {"prompt_token_ids": tokens + [0]},
                       SamplingParams(prompt_logprobs=-1, max_tokens=1))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    return out.prompt_logprobs[-1]


def brute_force(engine, prompt, width, n, max_tokens, stops=(), length_penalty=1.0,
                min_tokens=0, early_stopping=False):
    """vLLM's beam search, one beam at a time: [(output tokens, cumulative logprob)] best first.
    early_stopping: HF's (vLLM's former engine's) rule, done once `width` beams finished, the
    live ones dropped."""
    beams, finished = [(list(prompt), 0.0)], []  # finished: (tokens, cum, length scored)
    for _ in range(max_tokens):
        if early_stopping and len(finished) >= width:
            beams = []
            break
        candidates = []
        for order, (toks, cum) in enumerate(beams):
            dist = next_logprobs(engine, toks)
            top = sorted(dist.items(), key=lambda kv: -kv[1])[: 2 * width]
            candidates += [(cum + lp, order, rank, toks, t) for rank, (t, lp) in enumerate(top)]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        beams = []
        for cum, _, _, toks, t in candidates:
            if t in stops:  # kept in the tokens, left out of the length
                if len(toks) - len(prompt) >= min_tokens:  # else no candidate at all
                    finished.append((toks + [t], cum, len(toks)))
            elif len(beams) < width:
                beams.append((toks + [t], cum))
    finished += [(toks, cum, len(toks)) for toks, cum in beams]
    finished.sort(key=lambda f: -f[1] / f[2] ** length_penalty)
    return [(toks[len(prompt):], cum) for toks, cum, _ in finished[:n]]


def run_checked(engine, prompt, params):
    """The request's final output; after every step no block is owned twice or lost, and at
    some step beams share blocks."""
    engine.add_request("beam", {"prompt_token_ids": prompt}, params)
    s, bm = engine.scheduler, engine.block_manager
    final, shared = None, False
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
        live = [q for q in (*s.running, *s.waiting) if not q.is_finished]
        bm.check_invariants(live)
        held = sum(len(q.block_table) for q in live)
        shared |= held > bm.num_used_blocks
    assert bm.num_used_blocks == 0 and final.finished
    return final, shared


@pytest.mark.parametrize("fields", [
    dict(block_size=4),
    dict(block_size=4, async_scheduling=True),
    dict(block_size=2, num_kv_blocks=12, max_num_batched_tokens=6),  # preemptions
    # Too few blocks for all beams at once: a beam that reported makes way for its sibling.
    dict(block_size=2, num_kv_blocks=7, max_num_batched_tokens=6),
    dict(block_size=2, num_kv_blocks=7, max_num_batched_tokens=6, async_scheduling=True),
])
def test_equals_brute_force_with_shared_blocks(make_engine, fields):
    ref = make_engine()
    params = SamplingParams(n=2, best_of=3, use_beam_search=True, max_tokens=6, ignore_eos=True)
    want = brute_force(ref, PROMPT, 3, 2, 6)
    engine = make_engine(**fields)
    out, shared = run_checked(engine, PROMPT, params)
    got = [(c.token_ids, c.cumulative_logprob) for c in out.outputs]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-4)
    assert all(c.finish_reason == "length" for c in out.outputs)
    assert shared or engine.scheduler.num_preemptions


def test_stop_ids_finish_beams_and_length_penalty_ranks_them(make_engine):
    ref = make_engine()
    plain = brute_force(ref, PROMPT, 2, 1, 5)
    stop = plain[0][0][2]  # a token the best beam takes: now it ends beams
    outs = {}
    for penalty in (0.0, 1.0, 3.0):
        want = brute_force(ref, PROMPT, 2, 2, 5, stops={stop}, length_penalty=penalty)
        params = SamplingParams(n=2, use_beam_search=True, max_tokens=5, ignore_eos=True,
                                stop_token_ids=[stop], length_penalty=penalty)
        out, _ = run_checked(make_engine(block_size=4), PROMPT, params)
        outs[penalty] = [c.token_ids for c in out.outputs]
        assert outs[penalty] == [w[0] for w in want], penalty
        if penalty == 0.0:  # no length normalization: the short finished beam wins
            c = out.outputs[0]
            assert c.finish_reason == "stop" and c.stop_reason == stop == c.token_ids[-1]
    assert outs[0.0] != outs[3.0]


def test_eos_min_tokens_and_logprobs_as_sampling_has_them(make_engine):
    """A beam ending on eos has no stop_reason (eos wins over a stop id that is eos too), stop
    candidates wait for min_tokens, and each token's logprobs are the row's top `logprobs` and
    the token's own, as the brute force's distributions give them."""
    ref = make_engine()
    best = brute_force(ref, PROMPT, 2, 1, 5)[0][0]
    eos = best[1]
    for stop_ids in ([], [eos]):
        engine = make_engine(block_size=4)
        engine.core.eos_token_ids[:] = [eos]
        params = SamplingParams(n=2, use_beam_search=True, max_tokens=5, length_penalty=0.0,
                                stop_token_ids=stop_ids)
        out, _ = run_checked(engine, PROMPT, params)
        want = brute_force(ref, PROMPT, 2, 2, 5, stops={eos}, length_penalty=0.0)
        assert [c.token_ids for c in out.outputs] == [w[0] for w in want]
        c = out.outputs[0]
        assert c.token_ids[-1] == eos and (c.finish_reason, c.stop_reason) == ("stop", None)
    held = make_engine(block_size=4)
    params = SamplingParams(n=2, use_beam_search=True, max_tokens=5, length_penalty=0.0,
                            ignore_eos=True, stop_token_ids=[best[0]], min_tokens=2, logprobs=3)
    out, _ = run_checked(held, PROMPT, params)
    want = brute_force(ref, PROMPT, 2, 2, 5, stops={best[0]}, length_penalty=0.0, min_tokens=2)
    assert [c.token_ids for c in out.outputs] == [w[0] for w in want]
    assert all(c.token_ids[0] != best[0] for c in out.outputs)  # no beam ended at once
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids)
    for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        dist = next_logprobs(ref, PROMPT + c.token_ids[:i])
        top = sorted(dist.items(), key=lambda kv: -kv[1])[:3]
        assert list(entry)[:3] == [t for t, _ in top]
        assert len(entry) == 3 + (token not in dict(top))
        assert entry[token] == pytest.approx(dist[token], abs=1e-4)
        assert [entry[t] for t, _ in top] == pytest.approx([v for _, v in top], abs=1e-4)
    with pytest.raises(ParamError) as e:
        SamplingParams(n=2, use_beam_search=True, length_penalty=float("nan"))
    assert e.value.field == "length_penalty"


def test_early_stopping_ends_once_width_beams_finished(make_engine):
    ref = make_engine()
    stop = brute_force(ref, PROMPT, 2, 1, 4)[0][0][1]
    params = SamplingParams(n=1, best_of=2, use_beam_search=True, max_tokens=40,
                            ignore_eos=True, stop_token_ids=[stop], early_stopping=True)
    out, _ = run_checked(make_engine(block_size=4), PROMPT, params)
    late = SamplingParams(n=1, best_of=2, use_beam_search=True, max_tokens=40,
                          ignore_eos=True, stop_token_ids=[stop])
    full, _ = run_checked(make_engine(block_size=4), PROMPT, late)
    assert len(out.outputs) == 1 and out.metrics.finished_time
    assert len(out.outputs[0].token_ids) <= len(full.outputs[0].token_ids)


@pytest.mark.parametrize("width, n, penalty", [(1, 1, 1.0), (2, 2, 1.0), (3, 2, 0.0)])
def test_early_stopping_answers_with_finished_beams_only(make_engine, width, n, penalty):
    """Once `width` beams finished the live ones are dropped: they had run out of nothing, and
    were answered as "length" after a token or two of max_tokens 30."""
    ref = make_engine()
    stop = brute_force(ref, PROMPT, 2, 1, 4)[0][0][1]
    params = SamplingParams(n=n, best_of=width, use_beam_search=True, max_tokens=30,
                            ignore_eos=True, stop_token_ids=[stop], early_stopping=True,
                            length_penalty=penalty)
    out, _ = run_checked(make_engine(block_size=4), PROMPT, params)
    want = brute_force(ref, PROMPT, width, n, 30, stops={stop}, length_penalty=penalty,
                       early_stopping=True)
    assert [c.token_ids for c in out.outputs] == [w[0] for w in want]
    assert [c.cumulative_logprob for c in out.outputs] == \
        pytest.approx([w[1] for w in want], abs=1e-4)
    assert all((c.finish_reason, c.token_ids[-1]) == ("stop", stop) for c in out.outputs)


def test_llm_beam_search_like_vllm(make_engine):
    from engine.llm import LLM

    llm = LLM.from_engine(make_engine(block_size=4))
    [out] = llm.beam_search([{"prompt_token_ids": PROMPT}],
                            BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
    want = brute_force(make_engine(), PROMPT, 3, 3, 6)
    assert [s.tokens for s in out.sequences] == [PROMPT + w[0] for w in want]
    assert out.sequences[0].logprobs[: len(PROMPT)] == [None] * len(PROMPT)
    assert out.sequences[0].cum_logprob >= out.sequences[-1].cum_logprob
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search("x", SamplingParams(max_tokens=2))
    with pytest.raises(TypeError):  # use_tqdm by keyword: vLLM's third is lora_request
        llm.beam_search("x", BeamSearchParams(beam_width=2, max_tokens=2), None)
    for bad in ({"beam_width": 0}, {"beam_width": 11}, {"beam_width": True}):
        with pytest.raises(ParamError) as e:
            BeamSearchParams(max_tokens=6, **bad)
        assert e.value.field == "beam_width"
    with pytest.raises(ParamError) as e:
        BeamSearchParams(beam_width=2, max_tokens=0)
    assert e.value.field == "max_tokens"
    # vLLM's temperature is taken (its code runs unchanged) and, as in vLLM's v1, changes no beam
    [warm] = llm.beam_search([{"prompt_token_ids": PROMPT}], BeamSearchParams(
        beam_width=3, max_tokens=6, ignore_eos=True, temperature=0.8))
    assert [s.tokens for s in warm.sequences] == [s.tokens for s in out.sequences]
    for bad in (-0.1, math.inf, math.nan, "0", True):
        with pytest.raises(ParamError) as e:
            BeamSearchParams(beam_width=2, max_tokens=2, temperature=bad)
        assert e.value.field == "temperature"


def test_validation():
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2, use_beam_search=True)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=1, best_of=2)
    with pytest.raises(ValueError, match="n must be <= 10"):
        SamplingParams(n=11, use_beam_search=True)


def test_beam_width_must_fit_a_batch(make_engine):
    engine = make_engine(max_num_seqs=2)
    with pytest.raises(ValueError, match="best_of"):
        engine.add_request("b", {"prompt_token_ids": PROMPT},
                           SamplingParams(n=1, best_of=3, use_beam_search=True))


def test_beams_wider_than_the_free_places_make_way(make_engine):
    """Two beam requests whose widths together pass max_num_seqs, the second (with a plain
    request) arriving while the first runs: a beam that reported its candidates makes way for a
    sibling waiting for a place among max_num_seqs (the engine used to spin forever), and both
    still equal the brute force."""
    prompts = {rid: list(range(3, 30)) + [ord(rid)] for rid in "abc"}
    params = {rid: SamplingParams(use_beam_search=True, best_of=w, max_tokens=12,
                                  ignore_eos=True) for rid, w in (("a", 2), ("b", 4))}
    params["c"] = SamplingParams(max_tokens=5, ignore_eos=True)
    engine = make_engine(max_num_seqs=4, num_kv_blocks=64, block_size=16)
    engine.add_request("a", {"prompt_token_ids": prompts["a"]}, params["a"])
    finals, steps = {}, 0
    while engine.has_unfinished_requests() or steps <= 3:
        if steps == 3:
            for rid in "bc":
                engine.add_request(rid, {"prompt_token_ids": prompts[rid]}, params[rid])
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
        steps += 1
        assert steps < 400, "the engine stopped making progress"
    assert sorted(finals) == ["a", "b", "c"]
    ref = make_engine()
    for rid, width in (("a", 2), ("b", 4)):
        (want, _), = brute_force(ref, prompts[rid], width, 1, 12)
        assert finals[rid].outputs[0].token_ids == want


def _beam(width: int, max_tokens: int, **fields) -> SamplingParams:
    return SamplingParams(n=width, use_beam_search=True, temperature=0, max_tokens=max_tokens,
                          ignore_eos=True, **fields)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_beam_that_made_way_reports_no_stale_row(make_engine, async_scheduling):
    """A beam that reported and then made way for a sibling samples again in its recompute; when
    the round ends first on its kept candidates, that row (logits from before its new token) is
    stale. Taken as the next round's, it had chosen a token twice at the old position's logprob
    (found by a randomized search: max_num_seqs 4 gave other tokens than 16, with a claimed
    score of -27.08 where the tokens score -29.96)."""
    long_prompt = [167, 375, 142, 166, 374, 154, 320, 236, 202, 115, 208, 242, 419, 121, 143, 381,
                   139, 341, 327, 441, 416, 380, 132, 488, 400, 392, 412, 179, 441, 470, 285]
    requests = [("r0", long_prompt, _beam(3, 12)), ("r1", long_prompt[:16], _beam(3, 2)),
                ("r2", [471, 164, 152, 111, 205, 405, 152, 511], _beam(3, 2))]
    engine = make_engine(max_model_len=64, block_size=4, max_num_seqs=4,
                         async_scheduling=async_scheduling)
    for rid, prompt, params in requests:
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    finals = step_to_end(engine)
    assert engine.scheduler.num_preemptions  # the premise: beams made way
    ref = make_engine(max_model_len=64, block_size=4)
    for rid, prompt, params in requests:
        want = brute_force(ref, prompt, 3, 3, params.max_tokens)
        got = [(c.token_ids, c.cumulative_logprob) for c in finals[rid].outputs]
        assert [g[0] for g in got] == [w[0] for w in want], rid
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-4), rid


def test_a_beam_forked_mid_recompute_does_not_stall(make_engine):
    """Under KV pressure with chunked prefill and the overlapped loop, a round ended while a
    beam that had made way was part-way through its recompute: its fork got blocks for only the
    computed part, sat in the running list unable to grow, and the engine stepped empty batches
    forever. Now the fork waits to recompute and a prefill that finds no block waits too."""
    requests = [
        ("a", [100, 43, 33, 362, 137, 465, 7, 316, 462, 377, 280, 38, 183, 317, 403, 55, 35, 7,
               84, 237, 262, 179, 271, 31, 449, 216, 39], _beam(3, 5, length_penalty=1.0)),
        ("b", [468, 304, 484, 171, 382, 405, 293, 341, 470, 125, 469, 221, 431, 510, 125, 499,
               166, 216], _beam(3, 12, length_penalty=0.5)),
    ]
    outs = {}
    for async_scheduling in (False, True):
        engine = make_engine(async_scheduling=async_scheduling, enable_prefix_caching=False,
                             max_num_batched_tokens=8, block_size=8, num_kv_blocks=9,
                             max_num_seqs=3, max_model_len=64)
        for rid, prompt, params in requests:
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        finals = step_to_end(engine, max_steps=1000)
        outs[async_scheduling] = {rid: [c.token_ids for c in o.outputs]
                                  for rid, o in finals.items()}
    assert outs[True] == outs[False] and sorted(outs[True]) == ["a", "b"]


def test_min_tokens_passes_over_stop_ids_for_the_next_best(make_engine):
    """Before min_tokens, stop ids among a row's best candidates are passed over for the next
    best (the rows hold enough): a beam of width 1 whose first two candidates are stop ids goes
    on with the third (the request failed with an IndexError), and n = 2 beams whose top three
    are get the fourth and fifth (one of the two never finished: the request hung)."""
    engine = make_engine(max_model_len=32, block_size=4, num_kv_blocks=64)
    first = next_logprobs(engine, PROMPT)
    top = sorted(first, key=lambda t: -first[t])[:5]
    common = dict(use_beam_search=True, temperature=0, min_tokens=1, ignore_eos=True)
    engine.add_request("one", {"prompt_token_ids": PROMPT},
                       SamplingParams(n=1, max_tokens=3, stop_token_ids=top[:2], **common))
    engine.add_request("two", {"prompt_token_ids": PROMPT},
                       SamplingParams(n=2, max_tokens=1, stop_token_ids=top[:3], **common))
    final = step_to_end(engine)
    one = final["one"].outputs
    assert len(one) == 1 and one[0].finish_reason != "error" and one[0].token_ids[0] == top[2]
    two = final["two"].outputs
    assert [(c.token_ids, c.finish_reason) for c in two] == [([top[3]], "length"),
                                                            ([top[4]], "length")]
    with pytest.raises(ParamError, match="min_tokens") as e:  # 2 x 8 + 5 stop ids > 20
        engine.add_request("wide", {"prompt_token_ids": PROMPT},
                           SamplingParams(n=8, max_tokens=2, stop_token_ids=top, **common))
    assert e.value.field == "min_tokens"


def test_text_prompts_as_vllm_writes_them(make_engine):
    """vLLM's beam_search takes its prompts as TextPrompt / TokensPrompt dicts
    (`[{"prompt": "Hello"}]` in its examples), and generate takes a TextPrompt too; a
    {"prompt": text} dict was refused with a TypeError."""
    from engine.llm import LLM

    llm = LLM.from_engine(make_engine(text=True))
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    [want] = llm.beam_search(["Hello world"], params)
    [out] = llm.beam_search([{"prompt": "Hello world"}], params)
    assert [s.tokens for s in out.sequences] == [s.tokens for s in want.sequences]
    assert out.sequences[0].text == want.sequences[0].text
    sampling = SamplingParams(temperature=0, max_tokens=3)
    [a] = llm.generate([{"prompt": "Hello world"}], sampling, use_tqdm=False)
    [b] = llm.generate("Hello world", sampling, use_tqdm=False)
    assert a.prompt == "Hello world" and a.prompt_token_ids == b.prompt_token_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    with pytest.raises(TypeError, match="'prompt'"):
        llm.generate({"prompt": 5}, sampling, use_tqdm=False)


def test_beams_as_wide_as_max_num_seqs_fork_without_recomputing(make_engine):
    """A round's forks come after its pruned beams are gone: with width == max_num_seqs, the
    pruned beams held every place, so each fork waited and recomputed its whole sequence (with
    prefix caching off, 273 prompt tokens computed for a 21-token prompt)."""
    prompt = [(11 * i + 7) % 500 + 5 for i in range(21)]
    params = SamplingParams(n=3, use_beam_search=True, max_tokens=10, ignore_eos=True)
    outs = {}
    for max_num_seqs in (3, 8):
        engine = make_engine(max_num_seqs=max_num_seqs, block_size=4,
                             enable_prefix_caching=False)
        out, _ = run_checked(engine, prompt, params)
        outs[max_num_seqs] = [c.token_ids for c in out.outputs]
        assert engine.get_stats().prompt_tokens_total == len(prompt), max_num_seqs
    assert outs[3] == outs[8]


def test_a_stop_string_cuts_a_beams_cumulative_logprob_with_its_tokens(make_engine):
    """Beams end at the front when their text holds a stop string: the cumulative logprob is
    that of the tokens kept (it was the whole beam's, dropped tokens included)."""
    engine = make_engine(text=True)
    common = dict(n=2, use_beam_search=True, max_tokens=6, ignore_eos=True, logprobs=0)
    [full] = engine_outputs(engine, SamplingParams(**common))
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    [cut] = engine_outputs(engine, SamplingParams(**common, stop=[stop]))
    c, whole = cut.outputs[0], full.outputs[0]
    assert c.finish_reason == "stop" and 0 < len(c.token_ids) < len(whole.token_ids)
    assert c.token_ids == whole.token_ids[: len(c.token_ids)]
    kept = sum(whole.logprobs[i][t] for i, t in enumerate(c.token_ids))
    assert c.cumulative_logprob == pytest.approx(kept, abs=1e-4)


def engine_outputs(engine, params):
    engine.add_request("r", "Hello there", params)
    final = []
    while engine.has_unfinished_requests():
        final += [o for o in engine.step() if o.finished]
    return final


@pytest.mark.parametrize("penalty", [1e308, -1e308])
def test_a_length_penalty_past_a_floats_power_still_ranks_the_beams(make_engine, penalty):
    """length ** 1e308 overflows a float (Python raises) and length ** -1e308 is 0: the request
    failed at its end with a 500. Beams of one length tie there, in the order of their scores
    at any other penalty."""
    params = dict(n=2, best_of=3, use_beam_search=True, max_tokens=4, ignore_eos=True)
    want, _ = run_checked(make_engine(), PROMPT, SamplingParams(**params))
    out, _ = run_checked(make_engine(), PROMPT, SamplingParams(**params, length_penalty=penalty))
    assert [c.finish_reason for c in out.outputs] == ["length", "length"]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in want.outputs]


def test_beam_text_decodes_the_prompt_and_output_tokens_alike_as_vllm(make_engine):
    """vLLM's beam_search decodes each beam's tokens, the prompt's included, in one go with the
    special tokens kept (tokenizer.decode's default). A token-id prompt's text kept them while
    the output's (decoded as generation does, skip_special_tokens) dropped them: a beam that
    took <file_sep> read as if it had not. A beam that ends on eos has it in its text only with
    include_stop_str_in_output (vLLM leaves it out of its tokens otherwise)."""
    import copy
    import dataclasses

    from conftest import _tiny_loaded

    from engine.engine import LLMEngine
    from engine.llm import LLM
    from engine.model.config import EngineConfig

    loaded = _tiny_loaded(49152, True)
    tok = loaded.tokenizer
    prompt = [1] + tok.encode("user\nHello world")  # <|im_start|>user ...
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    one = BeamSearchParams(beam_width=2, max_tokens=1, length_penalty=0.0)  # score: cum
    plain = LLM.from_engine(make_engine(text=True))

    def best_first(p: BeamSearchParams) -> int:
        [beams] = plain.beam_search([{"prompt_token_ids": prompt}], p)
        return beams.sequences[0].tokens[len(prompt)]

    def swapped(special: int, first: int) -> LLM:
        """The same model with `special`'s and `first`'s lm_head rows swapped (and their
        embeddings, so that the beam goes on as before): a best beam that took `first` takes
        `special`."""
        weights = copy.copy(loaded.weights)
        for name in ("lm_head", "embed"):
            rows = getattr(weights, name).copy()
            rows[[first, special]] = rows[[special, first]]
            setattr(weights, name, rows)
        model = copy.copy(loaded)
        model.weights = weights
        return LLM.from_engine(LLMEngine(EngineConfig(device="numpy"), loaded_model=model))

    llm = swapped(5, best_first(params))  # <file_sep>
    [beams] = llm.beam_search([{"prompt_token_ids": prompt}], params)
    best = beams.sequences[0]
    assert best.tokens[len(prompt)] == 5
    for seq in beams.sequences:
        assert seq.text == tok.decode(seq.tokens, skip_special_tokens=False)
    assert best.text.startswith("<|im_start|>user\nHello world<file_sep>")
    [text_beams] = llm.beam_search(["Hello world"], params)  # a text prompt's: alike
    for seq in text_beams.sequences:
        assert seq.text == tok.decode(seq.tokens, skip_special_tokens=False)

    eos = swapped(2, best_first(one))  # <|im_end|>, the model's eos: the best beam ends on it
    for include in (False, True):
        stops = dataclasses.replace(one, include_stop_str_in_output=include)
        [beams] = eos.beam_search([{"prompt_token_ids": prompt}], stops)
        best = beams.sequences[0]
        assert best.tokens == prompt + [2] and best.finish_reason == "stop"
        want = prompt + [2] if include else prompt
        assert best.text == tok.decode(want, skip_special_tokens=False)
