"""Random aborts: many small requests with random sampling parameters arrive at random steps,
some are aborted at random steps, and at the end the engine must be back to its empty state
(every block free, no queue, table, in-flight step or pending fork copy left, no Sequence alive),
and every request that was not aborted must have the outputs it has in the same run without any
abort (greedy and seeded requests; seeded ones on the 512-token model only, where batch
composition cannot move a sample).

Modes: plain (n > 1, penalties, logprobs, prompt logprobs, min_tokens, stop ids, prefix-cache
hits, chunked prefill, preemption), spec (n-gram speculative decoding), beam (beam search mixed
in), text (real tokenizer: stop strings and structured outputs), faults (injected forward and
sampling failures; only the empty state is checked). Each with the overlapped loop off and on.
The minimal cases these found are in test_abort_paths.py.
"""

from __future__ import annotations

import collections
import gc
import logging
import random

import pytest
from conftest import step_once

from engine.core.sampling_params import SamplingParams, StructuredOutputsParams
from engine.core.sequence import Sequence, SequenceStatus

SEEDS = {"plain": range(10), "spec": range(6), "beam": [0, 1, 2, 3, 4, 8],  # 8: a stale beam row
         "text": range(2), "faults": range(6)}
NUM_REQUESTS = 40
V = 512  # token ids drawn below this (both models have at least this many)

COVERAGE = collections.Counter()  # what state aborted requests were in, over the whole module


def random_params(rng: random.Random, mode: str) -> SamplingParams:
    kw = dict(max_tokens=rng.randint(1, 12), ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.5:
        kw["temperature"] = 0.0
    else:
        kw.update(temperature=rng.choice([0.7, 1.0]), seed=rng.randint(0, 1000),
                  top_k=rng.choice([0, 5, 50]), top_p=rng.choice([1.0, 0.9]))
    if rng.random() < 0.25:
        kw["n"] = rng.randint(2, 3)
    if rng.random() < 0.15:
        kw["presence_penalty"] = 0.5
    if rng.random() < 0.15:
        kw["frequency_penalty"] = 0.3
    if rng.random() < 0.1:
        kw["repetition_penalty"] = 1.3
    if rng.random() < 0.2:
        kw["logprobs"] = rng.choice([0, 2])
    if rng.random() < 0.1:
        kw["min_tokens"] = min(2, kw["max_tokens"])
    if rng.random() < 0.1:
        kw["stop_token_ids"] = [rng.randint(0, V - 1)]
    if rng.random() < 0.1:
        kw["prompt_logprobs"] = rng.choice([0, 1])
    if mode == "beam" and rng.random() < 0.3:
        n = rng.randint(1, 2)
        kw = dict(max_tokens=rng.randint(1, 8), n=n, best_of=n + rng.randint(0, 1),
                  use_beam_search=True, temperature=0.0, ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.3:
            kw["logprobs"] = 1
    if mode == "text":
        if rng.random() < 0.4:
            kw["stop"] = [rng.choice(["a", "e", " ", "the", "x"])]
        if rng.random() < 0.15 and not kw.get("use_beam_search"):
            regex = rng.choice(["[a-z]{1,5}", "(yes|no)", "[0-9]+"])
            kw["structured_outputs"] = StructuredOutputsParams(regex=regex)
    return SamplingParams(**kw)


def random_prompt(rng: random.Random, shared: list[list[int]]) -> list[int]:
    r = rng.random()
    if r < 0.4:  # a shared prefix: prefix-cache hits
        return rng.choice(shared) + [rng.randint(3, V - 1) for _ in range(rng.randint(1, 6))]
    if r < 0.55:  # repetitive: n-gram drafts find matches
        return [rng.randint(3, V - 1) for _ in range(3)] * rng.randint(2, 6)
    return [rng.randint(3, V - 1) for _ in range(rng.randint(1, 40))]


def scenario(seed: int, mode: str):
    rng = random.Random(seed)
    fields = dict(max_num_seqs=rng.choice([4, 8]), max_num_batched_tokens=rng.choice([16, 32, 64]),
                  block_size=4, num_kv_blocks=rng.choice([24, 40, 64]), max_model_len=64)
    if mode == "spec":
        fields["speculative_config"] = {
            "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1, "disable_by_batch_size": rng.choice([2, 4, 8])}
    shared = [[rng.randint(3, V - 1) for _ in range(rng.randint(8, 20))] for _ in range(3)]
    requests = {f"r{i}": (random_prompt(rng, shared), random_params(rng, mode))
                for i in range(NUM_REQUESTS)}
    arrivals = {rid: rng.randint(0, 30) for rid in requests}
    # aborted some steps after arrival (0: at once, before the step that would admit it)
    aborts = {rid: arrivals[rid] + min(20, int(rng.expovariate(0.25)))
              for rid in requests if rng.random() < 0.35}
    return fields, requests, arrivals, aborts


def classify(engine, request_id: str) -> list[str]:
    """What state a request is in as it is aborted (for the coverage counts)."""
    core, s = engine.core, engine.scheduler
    req = core.requests.get(request_id)
    if req is None:
        return ["already finished" if not engine.processor.has_request(request_id)
                else "finished in the core, not yet out"]
    tags = []
    if req.beam is not None:
        tags.append("beam")
    if req.grammar is not None:
        tags.append("grammar compiling")
    for seq in (*s.running, *s.waiting):
        if seq.request_id != request_id:
            continue
        if seq.forks:
            tags.append("forks pending")
        if seq.has_pending_token:
            tags.append("token in flight")
        if seq.num_cached_tokens:
            tags.append("prefix-cache hit")
        if seq.spec_token_ids:
            tags.append("drafting")
        if seq.status is SequenceStatus.RUNNING:
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                tags.append("mid prefill (chunked)" if seq.num_computed_tokens
                            else "admitted, no token computed")
            else:
                tags.append("decoding")
        elif seq.num_output_tokens or seq.index or seq.num_cached_tokens:
            tags.append("preempted / waiting fork")
        else:
            tags.append("waiting, never ran")
    return tags


def add_faults(engine, seed: int, p: float = 0.04) -> None:
    frng = random.Random(seed + 99)
    forward, prepare = engine.runner._forward_eager, engine.runner.prepare_sampling

    def flaky_forward(*args, **kw):
        if frng.random() < p:
            raise RuntimeError("injected forward failure")
        return forward(*args, **kw)

    def flaky_prepare(seqs):
        if frng.random() < p:
            raise FloatingPointError("injected sampling failure")
        return prepare(seqs)

    engine.runner._forward_eager = flaky_forward
    engine.runner.prepare_sampling = flaky_prepare


def drive(make_engine, seed: int, mode: str, async_scheduling: bool, with_aborts: bool):
    fields, requests, arrivals, aborts = scenario(seed, mode)
    engine = make_engine(text=mode == "text", async_scheduling=async_scheduling, **fields)
    if mode == "faults":
        add_faults(engine, seed)
    aborts = aborts if with_aborts else {}
    final, step, version = {}, 0, None
    last_arrival = max(arrivals.values()) + 1
    while step < 3000:
        for rid, at in arrivals.items():
            if at == step:
                try:
                    engine.add_request(rid, {"prompt_token_ids": requests[rid][0]},
                                       requests[rid][1])
                except ValueError as e:  # can never fit: rejected at once, in both runs
                    final[rid] = e
        for rid, at in aborts.items():
            if at == step and not isinstance(final.get(rid), Exception):
                if with_aborts:
                    for tag in classify(engine, rid):
                        COVERAGE[(mode, async_scheduling, tag)] += 1
                engine.abort(rid)
        if step > max(last_arrival, max(aborts.values(), default=0)) and \
                not engine.has_unfinished_requests():
            break
        step_once(engine, final)
        if step % 5 == 0:  # the dashboard's view, as deltas
            version = engine.snapshot(version)["v"]
        step += 1
    assert step < 3000, "no progress"
    return engine, final, requests, aborts


def assert_empty(engine, mode: str) -> None:
    core, s, bm = engine.core, engine.scheduler, engine.block_manager
    bm.check_invariants([])
    assert bm.num_used_blocks == 0 and not bm._unreleased
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert engine.get_stats().kv_blocks_used == 0
    assert not s.running and not s.waiting
    assert not core.requests._requests, list(core.requests._requests)
    assert not core.requests.compiling
    assert engine.processor.num_requests == 0, list(engine.processor._requests)
    assert not engine._aborted
    runner = core.runner
    if runner.penalty_slots is not None:
        runner.penalty_slots.check_invariants()
    assert len(runner.host_tables._entries) <= len(runner.host_tables.rows)
    if core.spec is not None:
        assert len(core.spec.proposer._history) <= engine.config.max_num_seqs
    assert core._in_flight is None, "an unread step is left in flight"
    assert s._block_copies == [], f"fork copies of ended sequences queued: {s._block_copies}"
    gc.collect()  # nothing anywhere still holds a sequence
    alive = [o for o in gc.get_objects() if isinstance(o, Sequence)]
    assert not alive, [(q.request_id, q.index, q.finish_reason) for q in alive]


CASES = [(mode, seed, a) for mode, seeds in SEEDS.items() for seed in seeds for a in (False, True)]


@pytest.mark.parametrize("mode, seed, async_scheduling", CASES,
                         ids=[f"{m}-{s}-{'async' if a else 'sync'}" for m, s, a in CASES])
def test_random_aborts_leave_the_engine_empty(make_engine, mode, seed, async_scheduling):
    logging.getLogger("pagedserve").setLevel(logging.CRITICAL)  # injected faults log tracebacks
    base_engine, base, requests, _ = drive(make_engine, seed, mode, async_scheduling, False)
    assert_empty(base_engine, mode)
    del base_engine
    engine, got, _, aborts = drive(make_engine, seed, mode, async_scheduling, True)
    assert_empty(engine, mode)
    assert set(got) == set(requests), "a request never ended"
    if mode == "faults":
        return
    for rid, (_, params) in requests.items():
        if rid in aborts:
            if not isinstance(got[rid], Exception):
                assert all(c.finish_reason is not None for c in got[rid].outputs)
            continue
        want, have = base[rid], got[rid]
        if isinstance(want, Exception) or isinstance(have, Exception):
            assert type(want) is type(have), rid
            continue
        if params.temperature == 0 or (params.seed is not None and mode != "text"):
            assert [(c.token_ids, c.finish_reason) for c in have.outputs] == \
                   [(c.token_ids, c.finish_reason) for c in want.outputs], (rid, params)
            if params.prompt_logprobs is not None:
                assert [None if d is None else sorted(d) for d in have.prompt_logprobs] == \
                       [None if d is None else sorted(d) for d in want.prompt_logprobs], rid


def test_the_aborts_hit_every_state():
    """Run after the stress cases: the aborts reached each state of a request's life."""
    if not COVERAGE:
        pytest.skip("run with the stress cases")
    tags = collections.Counter()
    for (_, _, tag), n in COVERAGE.items():
        tags[tag] += n
    wanted = {"waiting, never ran", "mid prefill (chunked)", "decoding",
              "preempted / waiting fork", "prefix-cache hit", "token in flight", "beam",
              "forks pending", "already finished", "grammar compiling"}
    missing = wanted - set(tags)
    assert not missing, (missing, tags)

