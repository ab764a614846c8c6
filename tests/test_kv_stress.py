"""Randomized differential test of the KV block manager, the prefix cache and preemption: the
same requests (greedy and seeded sampling, n > 1, beams with best_of, penalties, cache_salt,
logprobs, prompt logprobs, staggered arrivals) must produce the same tokens and logprobs whatever
the KV cache does underneath:

    roomy    plenty of blocks, prefix caching off, a large token budget (the reference)
    cached   prefix caching on; the prompts share random-length prefixes, ending on a block
             boundary, one token before or after it, or covering a whole prompt, and identical
             prompts arrive in the same step
    tight    so few blocks that sequences are preempted (recompute) over and over
    both     cached + tight, with chunked prefill (a small token budget)
    spec     both, with n-gram speculative decoding (rolled-back draft slots)

each with the synchronous and the overlapped loop; the block size, the tight cache's size (down
to one sequence's worth) and the token budget vary with the seed. After every step the block
manager's books balance; at the end every block is free (or only in the prefix cache) and no
Sequence is alive (test_abort_stress.assert_empty).

NOTE: batch composition moves logits by ~1e-6; the sharpened 512-token model keeps that from
moving a greedy choice, and a seeded one almost always: the sampler draws by inverse CDF, so a
draw that lands within float32 rounding of a boundary flips to the neighbouring id (one seed of
118 swept did). The seeds below are clear of such ties.
"""

from __future__ import annotations

import collections
import random

import pytest
from conftest import step_once

from engine.core.sampling_params import SamplingParams
from tests.test_abort_stress import assert_empty

V = 512
MAX_LEN = 64
NUM_REQUESTS = 24
MODES = ("roomy", "cached", "tight", "both", "spec")
COVERAGE = collections.Counter()  # (mode, what happened): how often, over the whole module


def engine_fields(seed: int, mode: str) -> dict:
    """EngineConfig fields of `mode` for this seed: the block size, the tight cache's size and the
    small token budget vary with the seed."""
    rng = random.Random(seed + 7)
    bs = rng.choice([1, 2, 4, 4, 8])
    fields = dict(block_size=bs, max_model_len=MAX_LEN, max_num_seqs=rng.choice([4, 8]),
                  num_kv_blocks=4096 // bs, enable_prefix_caching=mode != "roomy" and
                  mode != "tight", max_num_batched_tokens=256)
    tight = -(-MAX_LEN // bs) + rng.choice([0, 1, 3]) * (8 // bs or 1)  # one sequence's worth
    small_budget = rng.choice([3, 5, 7, 12])
    if mode in ("tight", "both", "spec"):
        fields["num_kv_blocks"] = tight
    if mode in ("both", "spec"):
        fields["max_num_batched_tokens"] = small_budget
    if mode == "spec":
        fields["speculative_config"] = {
            "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1, "disable_by_batch_size": 8}
    return fields


def random_prompts(rng: random.Random, bs: int) -> list[list[int]]:
    bases = [[rng.randint(3, V - 1) for _ in range(40)] for _ in range(3)]
    prompts = []
    for _ in range(NUM_REQUESTS):
        base = rng.choice(bases)
        r = rng.random()
        if r < 0.15 and prompts:  # an earlier prompt again: a full-prompt hit
            prompts.append(list(rng.choice(prompts)))
            continue
        if r < 0.25:  # repetitive: n-gram drafts find matches
            prompts.append([rng.randint(3, V - 1) for _ in range(3)] * rng.randint(2, 8))
            continue
        if r < 0.7:  # a prefix ending on a block boundary, or one token before or after it
            cut = rng.randint(1, 32 // bs) * bs + rng.choice([-1, 0, 0, 1])
        else:
            cut = rng.randint(1, 36)
        tail = [rng.randint(3, V - 1) for _ in range(rng.choice([0, 0, 1, 2, 5, 9]))]
        prompts.append((base[:max(cut, 1)] + tail)[:40])
    return prompts


def random_params(rng: random.Random) -> SamplingParams:
    kw = dict(max_tokens=rng.randint(1, 16), ignore_eos=rng.random() < 0.7)
    if rng.random() < 0.5:
        kw["temperature"] = 0.0
    else:
        kw.update(temperature=rng.choice([0.8, 1.0]), seed=rng.randint(0, 1000),
                  top_k=rng.choice([0, 20]))
    if rng.random() < 0.3:
        kw["n"] = rng.randint(2, 3)
    if rng.random() < 0.3:
        kw["logprobs"] = rng.choice([0, 3])
    if rng.random() < 0.25:
        kw["prompt_logprobs"] = rng.choice([0, 2])
    if rng.random() < 0.15:
        kw["presence_penalty"] = 0.5
    if rng.random() < 0.1:
        kw["repetition_penalty"] = 1.3
    if rng.random() < 0.1:
        kw["min_tokens"] = min(3, kw["max_tokens"])
    if rng.random() < 0.1:
        kw["stop_token_ids"] = [rng.randint(3, V - 1)]
    if rng.random() < 0.1:
        kw["cache_salt"] = rng.choice(["a", "b"])
    if rng.random() < 0.1:  # beams: best_of of them, the n best returned
        n = rng.randint(1, 2)
        kw = dict(max_tokens=rng.randint(1, 8), n=n, best_of=n + rng.randint(0, 1),
                  use_beam_search=True, temperature=0.0, ignore_eos=True,
                  logprobs=rng.choice([None, 1]))
    return SamplingParams(**kw)


def scenario(seed: int):
    rng = random.Random(seed)
    prompts = random_prompts(rng, engine_fields(seed, "roomy")["block_size"])
    requests = {f"r{i}": (p, random_params(rng)) for i, p in enumerate(prompts)}
    arrivals = {rid: rng.choice([0, 0, rng.randint(0, 25)]) for rid in requests}
    for i in range(1, NUM_REQUESTS):  # identical prompts in the same step
        if rng.random() < 0.2:
            rid, prev = f"r{i}", f"r{rng.randrange(i)}"
            requests[rid] = (list(requests[prev][0]), requests[rid][1])
            arrivals[rid] = arrivals[prev]
    return requests, arrivals


def drive(make_engine, seed: int, mode: str, async_scheduling: bool):
    requests, arrivals = scenario(seed)
    engine = make_engine(async_scheduling=async_scheduling, **engine_fields(seed, mode))
    num_free = engine.block_manager.num_free_blocks
    final, step = {}, 0
    while step < 3000:
        for rid, at in arrivals.items():
            if at == step:
                engine.add_request(rid, {"prompt_token_ids": requests[rid][0]}, requests[rid][1])
        if step > max(arrivals.values()) and not engine.has_unfinished_requests():
            break
        step_once(engine, final)
        step += 1
    assert step < 3000, "no progress"
    assert set(final) == set(requests)
    bm = engine.block_manager
    assert bm.num_free_blocks == num_free == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    stats = engine.get_stats()
    assert_empty(engine, mode)
    return final, requests, stats


def summary(out):
    return [(c.token_ids, c.finish_reason) for c in out.outputs]


def assert_close_logprobs(have, want, rid):
    assert (have is None) == (want is None), rid
    if have is None:
        return
    assert len(have) == len(want), rid
    for h, w in zip(have, want, strict=True):
        assert (h is None) == (w is None), rid
        if h is None:
            continue
        assert sorted(h) == sorted(w), rid
        for t in h:
            lh, lw = getattr(h[t], "logprob", h[t]), getattr(w[t], "logprob", w[t])
            assert lh == pytest.approx(lw, abs=1e-3), (rid, t)


SEEDS = range(12)  # a wider sweep (118 seeds) found only a float32 tie in the sampler's CDF


@pytest.mark.parametrize("seed", SEEDS)
def test_kv_cache_modes_agree(make_engine, seed):
    ref, requests, _ = drive(make_engine, seed, "roomy", False)
    seen = {}
    for mode in MODES:
        for async_scheduling in (False, True):
            if (mode, async_scheduling) == ("roomy", False):
                continue
            got, _, stats = drive(make_engine, seed, mode, async_scheduling)
            seen[(mode, async_scheduling)] = stats
            for rid, (_, params) in requests.items():
                want, have = ref[rid], got[rid]
                where = (mode, async_scheduling, rid, params)
                assert summary(have) == summary(want), where
                assert_close_logprobs(have.prompt_logprobs, want.prompt_logprobs, where)
                for ch, cw in zip(have.outputs, want.outputs, strict=True):
                    assert_close_logprobs(ch.logprobs, cw.logprobs, where)
    for (mode, _), stats in seen.items():
        COVERAGE[mode, "prefix-cache hits"] += stats.prefix_cache_hits
        COVERAGE[mode, "preemptions"] += stats.num_preemptions
        COVERAGE[mode, "chunked prefills"] += stats.num_chunked_prefill_steps
        COVERAGE[mode, "accepted drafts"] += stats.spec_num_accepted_tokens or 0


def test_the_modes_did_what_they_are_for():
    """Run after the stress cases: each mode met what it is meant to exercise."""
    if not COVERAGE:
        pytest.skip("run with the stress cases")
    wanted = [("cached", "prefix-cache hits"), ("tight", "preemptions"),
              ("both", "prefix-cache hits"), ("both", "preemptions"), ("both", "chunked prefills"),
              ("spec", "preemptions"), ("spec", "accepted drafts")]
    assert all(COVERAGE[w] > 0 for w in wanted), COVERAGE


def test_a_prompt_preempted_mid_prefill_reports_no_cache_hits_of_its_own(make_engine, run_engine):
    """Re-admitted after a preemption, a request finds the blocks it wrote itself before: not
    prefix-cache hits for its usage (cached_tokens), which counts what it found at its first
    admission (vLLM's rule); the tokens are the same either way."""
    rng = random.Random(1)
    a = [rng.randint(3, 500) for _ in range(3)]
    b = [rng.randint(3, 500) for _ in range(30)]  # shares nothing with a
    requests = {"a": (a, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
                "b": (b, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))}
    got = {}
    for blocks in (64, 10):  # roomy: no preemption; tight: b is preempted in its prefill
        engine = make_engine(max_model_len=40, block_size=4, num_kv_blocks=blocks,
                             max_num_batched_tokens=4, async_scheduling=False)
        final, _ = run_engine(engine, {k: ({"prompt_token_ids": p}, sp)
                                       for k, (p, sp) in requests.items()})
        got[blocks] = (engine.get_stats().num_preemptions,
                       {k: (out.num_cached_tokens, out.num_created_cache_tokens,
                            list(out.outputs[0].token_ids)) for k, out in final.items()})
    assert got[64][0] == 0 and got[10][0] >= 1
    assert got[10][1] == got[64][1] and got[64][1]["b"][:2] == (0, 28)
