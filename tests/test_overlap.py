"""Overlapped scheduling (async_scheduling) on the numpy backend: the same tokens, text, logprobs
and finish reasons as the synchronous loop, while step N+1 is launched before N's tokens are read.
"""

import numpy as np
import pytest

from engine.core.sampling_params import SamplingParams


def ids(tokens):
    return {"prompt_token_ids": list(tokens)}


def drive(engine, requests: dict, abort_after: dict | None = None):
    """Step until done, checking the block manager after every step; returns ({id: final output},
    {id: concatenated delta token ids per index}, placeholders the runner saw)."""
    seen = []
    prepare = engine.runner.prepare_inputs

    def spy(batch):
        inputs = prepare(batch)
        seen.append(inputs.num_placeholders)
        return inputs

    engine.runner.prepare_inputs = spy
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    final, deltas, step = {}, {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            for o in out.outputs:
                deltas.setdefault((out.request_id, o.index), []).extend(o.delta_token_ids)
            if out.finished:
                final[out.request_id] = out
        step += 1
        for request_id, at in (abort_after or {}).items():
            if step == at:
                engine.abort(request_id)
        s = engine.scheduler
        engine.block_manager.check_invariants(s.running)
        assert step < 5000, "no progress"
    assert engine.get_stats().kv_blocks_used == 0
    return final, deltas, sum(seen)


def _first_difference(a: list, b: list) -> int:
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def compare(make_engine, requests, text=False, abort_after=None, logprob_tol=1e-4,
            near_tie=0.0, **fields):
    """Run the requests without and with overlap; assert equal outputs; return the async run's
    engine and its placeholder count.

    near_tie > 0 (reduced-precision backends whose two runs batch differently): a request may
    diverge at a position where the synchronous run's two best tokens were within near_tie of
    each other (its requests must ask for logprobs >= 1); it is compared up to there only."""
    sync_engine = make_engine(text=text, async_scheduling=False, **fields)
    async_engine = make_engine(text=text, async_scheduling=True, **fields)
    assert not sync_engine.async_scheduling and async_engine.async_scheduling
    want, want_deltas, no_placeholders = drive(sync_engine, requests, abort_after)
    got, got_deltas, placeholders = drive(async_engine, requests, abort_after)
    assert no_placeholders == 0
    # The comparison proves something only if steps really overlapped: decode rows that read the
    # previous step's sampled ids on the device (an overlap switched off for, say, penalties or
    # stop strings would give equal outputs too).
    assert placeholders > 0, "no step overlapped"
    assert set(got) == set(want) == set(requests)
    aborted = set(abort_after or ())
    for request_id in aborted:
        for g, w in zip(got[request_id].outputs, want[request_id].outputs, strict=True):
            # Aborted at the same step() call: the overlapped loop has read one step fewer.
            assert g.finish_reason == w.finish_reason == "abort"
            assert g.token_ids == w.token_ids[: len(g.token_ids)]
            assert len(w.token_ids) - 1 <= len(g.token_ids)
            assert got_deltas.pop((request_id, g.index)) == g.token_ids
            want_deltas.pop((request_id, g.index))
    for request_id in set(requests) - aborted:
        for g, w in zip(got[request_id].outputs, want[request_id].outputs, strict=True):
            if near_tie and g.token_ids != w.token_ids:
                at = _first_difference(g.token_ids, w.token_ids)
                best = sorted(w.logprobs[at].values(), reverse=True)
                assert len(best) >= 2 and best[0] - best[1] < near_tie, (request_id, at, best)
                got_deltas.pop((request_id, g.index))
                want_deltas.pop((request_id, w.index))
                continue
            assert g.token_ids == w.token_ids, request_id
            assert g.text == w.text and g.finish_reason == w.finish_reason, request_id
            assert g.stop_reason == w.stop_reason, request_id
            assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=logprob_tol)
            if w.logprobs is not None:
                assert [sorted(e) for e in g.logprobs] == [sorted(e) for e in w.logprobs]
    # Every token went out exactly once, in order: the dropped extra tokens never did.
    assert got_deltas == want_deltas
    for (request_id, index), tokens in got_deltas.items():
        assert tokens == got[request_id].outputs[index].token_ids
    if not aborted:
        stats_sync, stats_async = sync_engine.get_stats(), async_engine.get_stats()
        assert stats_async.generation_tokens_total == stats_sync.generation_tokens_total
    return async_engine, placeholders, got


def random_requests(seed, count, make_params, max_len=300):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, count)
    return {f"r{i}": (ids(rng.integers(3, 512, n)), make_params(i, rng))
            for i, n in enumerate(lengths)}


def test_greedy_under_chunked_prefill_mixed_batches_and_preemption(make_engine):
    requests = random_requests(0, 20, lambda i, rng: SamplingParams(
        temperature=0, ignore_eos=True, max_tokens=[1, 2, 40, 33][i % 4]), 100)
    engine, placeholders, _ = compare(make_engine, requests, max_num_batched_tokens=48,
                                   num_kv_blocks=16, max_num_seqs=8)
    stats = engine.get_stats()
    assert stats.num_preemptions > 0 and stats.num_chunked_prefill_steps > 0
    assert stats.num_mixed_steps > 0
    assert placeholders > 100  # decodes really read the previous step's ids on the device


def test_overlap_only_above_a_batch_size_switches_both_ways(make_engine, monkeypatch):
    """PAGEDSERVE_OVERLAP_MIN_SEQS: steps with fewer sequences running are synchronous; the loop
    moves between the two as the batch grows and drains, with the same tokens as the sync one."""
    requests = random_requests(0, 20, lambda i, rng: SamplingParams(
        temperature=0, ignore_eos=True, max_tokens=[1, 2, 40, 33][i % 4]), 100)
    _, full, _ = compare(make_engine, requests, max_num_batched_tokens=48, num_kv_blocks=16,
                         max_num_seqs=8)
    monkeypatch.setenv("PAGEDSERVE_OVERLAP_MIN_SEQS", "4")
    engine, placeholders, _ = compare(make_engine, requests, max_num_batched_tokens=48,
                                      num_kv_blocks=16, max_num_seqs=8)
    assert engine.core.overlap_min_seqs == 4
    assert 0 < placeholders < full  # some steps overlapped, not all


def test_seeded_sampling_n_and_logprobs(make_engine):
    def params(i, rng):
        return SamplingParams(n=1 + i % 3, temperature=0.8, top_k=[0, 20][i % 2],
                              top_p=[1.0, 0.9][i % 2 == 0], min_p=0.02, seed=100 + i,
                              max_tokens=int(rng.integers(2, 14)), ignore_eos=True,
                              logprobs=[None, 0, 3][i % 3])

    compare(make_engine, random_requests(1, 12, params, 120), max_num_batched_tokens=48,
            num_kv_blocks=48, max_num_seqs=8)


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.8}, {"frequency_penalty": 1.5},
                                     {"presence_penalty": 1.5}])
def test_penalties_count_the_pending_token(make_engine, penalty):
    """Penalties read the output tokens, the one still on the device included (its placeholder
    is resolved before the penalty pass)."""
    def params(i, rng, **kw):
        return SamplingParams(temperature=[0, 0.7][i % 2], seed=i, max_tokens=12,
                              ignore_eos=True, **kw)

    requests = random_requests(2, 6, lambda i, rng: params(i, rng, **penalty), 40)
    compare(make_engine, requests, max_num_seqs=4)
    plain = random_requests(2, 6, params, 40)
    engine = make_engine()
    penalized, _, _ = drive(make_engine(async_scheduling=True), requests)
    unpenalized, _, _ = drive(engine, plain)
    assert any(penalized[r].outputs[0].token_ids != unpenalized[r].outputs[0].token_ids
               for r in requests)  # the penalty did something


def test_stops_found_one_step_late_drop_the_extra_token(make_engine):
    """eos, stop token ids, max_tokens (1 included), min_tokens, max_model_len: a sequence that
    ends at step N was already scheduled into N+1; that token is never emitted."""
    probe, _, _ = drive(make_engine(), {f"p{i}": (ids(range(5 + i, 25 + i)), SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True)) for i in range(4)})
    stops = [probe[f"p{i}"].outputs[0].token_ids[3 + i] for i in range(4)]
    requests = {}
    for i in range(4):
        prompt = ids(range(5 + i, 25 + i))
        requests[f"stop{i}"] = (prompt, SamplingParams(temperature=0, max_tokens=12,
                                                       stop_token_ids=[stops[i]]))
        requests[f"min{i}"] = (prompt, SamplingParams(temperature=0, max_tokens=12, min_tokens=6,
                                                      stop_token_ids=[stops[i]]))
        requests[f"one{i}"] = (prompt, SamplingParams(temperature=0, max_tokens=1))
        requests[f"eos{i}"] = (prompt, SamplingParams(temperature=0.9, seed=i, max_tokens=40,
                                                      stop_token_ids=[7, 11, 13]))
    requests["long"] = (ids(range(3, 60)), SamplingParams(temperature=0, max_tokens=None,
                                                          ignore_eos=True))
    engine, _, got = compare(make_engine, requests, max_model_len=80, max_num_seqs=8)
    reasons = {r: got[r].outputs[0].finish_reason for r in requests}
    lengths = {r: len(got[r].outputs[0].token_ids) for r in requests}
    assert all(reasons[f"stop{i}"] == "stop" and lengths[f"stop{i}"] <= 4 + i for i in range(4))
    assert all(lengths[f"min{i}"] >= 6 for i in range(4))
    assert all(lengths[f"one{i}"] == 1 for i in range(4))
    assert reasons["long"] == "length" and lengths["long"] == 80 - 57


def test_stop_strings_and_text(make_engine):
    prompts = ["The quick brown fox", "Once upon a time", "1, 2, 3,", "def f(x):"]
    probe, _, _ = drive(make_engine(text=True), {p: (p, SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True)) for p in prompts})
    requests = {}
    for i, p in enumerate(prompts):
        text = probe[p].outputs[0].text
        stop = text[len(text) // 2 : len(text) // 2 + 2] or "x"
        requests[f"s{i}"] = (p, SamplingParams(temperature=0, max_tokens=10, stop=[stop],
                                               include_stop_str_in_output=i % 2 == 1))
        requests[f"t{i}"] = (p, SamplingParams(temperature=0.9, seed=i, max_tokens=8,
                                               logprobs=1))
    _, _, got = compare(make_engine, requests, text=True, max_num_seqs=8)
    stopped = 0
    for i, p in enumerate(prompts):
        out, stop = got[f"s{i}"].outputs[0], requests[f"s{i}"][1].stop[0]
        if out.finish_reason == "stop":  # the text ends at the stop string, kept only if asked
            stopped += 1
            cut = out.text[: -len(stop)] if i % 2 else out.text
            assert stop not in cut and out.text.endswith(stop) == (i % 2 == 1), (p, out.text)
            assert probe[p].outputs[0].text.startswith(cut)
    assert stopped >= 2


def test_abort_while_a_step_is_in_flight(make_engine):
    requests = random_requests(3, 8, lambda i, rng: SamplingParams(
        temperature=0, ignore_eos=True, max_tokens=10), 30)
    engine, _, _ = compare(make_engine, requests, abort_after={"r1": 3, "r4": 1, "r6": 6},
                        max_num_seqs=8)
    assert engine.core._in_flight is None


def test_prefix_cache_never_keys_a_pending_token(make_engine):
    """Shared prompts in blocks of 4: decodes fill blocks every few steps, and each block is
    keyed only once its last token is known (the invariant check after every step rehashes)."""
    shared = list(range(100, 140))
    requests = {f"r{i}": (ids(shared + [200 + i] * (i % 3)), SamplingParams(
        temperature=0.5, seed=i, max_tokens=13, ignore_eos=True)) for i in range(6)}
    engine, _, _ = compare(make_engine, requests, block_size=4, max_num_seqs=3)
    assert engine.get_stats().prefix_cache_hits > 0


def test_async_scheduling_default_and_flags(make_engine):
    assert not make_engine().async_scheduling  # numpy: nothing to overlap with
    assert make_engine(async_scheduling=True).async_scheduling
    with pytest.raises(ValueError, match="async_scheduling"):
        make_engine(async_scheduling="yes")
    from server.cli import build_parser

    args = build_parser().parse_args(["serve", "--no-async-scheduling"])
    assert args.async_scheduling is False
    assert build_parser().parse_args(["serve"]).async_scheduling is None


def test_a_pending_token_that_surely_ends_its_sequence_is_not_computed(make_engine):
    """max_tokens reached by the pending token: no step runs for the extra one."""
    for max_tokens in (1, 3):
        engine = make_engine(async_scheduling=True)
        final, _, _ = drive(engine, {"a": (ids(range(3, 20)), SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True))})
        assert len(final["a"].outputs[0].token_ids) == max_tokens
        assert engine.get_stats().num_steps == max_tokens  # one prefill, then decodes


def test_scheduler_counts_the_pending_token():
    from engine.core.block_manager import BlockManager, hash_block
    from engine.core.scheduler import Scheduler
    from engine.core.sequence import Sequence

    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    seq = Sequence("a", [1, 2, 3], 3, SamplingParams(max_tokens=10))
    short = Sequence("b", [5, 6], 2, SamplingParams(max_tokens=1))
    sched.add(seq)
    sched.add(short)
    first = sched.schedule()
    assert first.num_new_tokens == [3, 2] and first.is_sampling == [True, True]
    sched.advance(first)
    sched.commit(first)
    assert seq.num_computed_tokens == len(seq.token_ids) == 3  # its first token is pending
    # Step 2 is scheduled before step 1's tokens are known: the pending one is computed at
    # position 3; `short` ends with its pending token (max_tokens=1), so it is left out.
    second = sched.schedule()
    assert second.seqs == [seq] and second.num_new_tokens == [1] and second.is_sampling == [True]
    sched.advance(second)
    assert bm.blocks[seq.block_table[0]].hash is None
    seq.token_ids.append(7)  # step 1's token arrives, then the engine commits step 2
    sched.commit(second)
    assert bm.blocks[seq.block_table[0]].hash == hash_block(0, [1, 2, 3, 7])
    third = sched.schedule()  # position 4: a second block, for a token still pending
    assert third.seqs == [seq] and len(seq.block_table) == 2


def test_a_bad_overlap_switch_is_named(make_engine, monkeypatch):
    from engine.model.config import ConfigError

    monkeypatch.setenv("PAGEDSERVE_OVERLAP_MIN_SEQS", "abc")
    with pytest.raises(ConfigError, match=r"\$PAGEDSERVE_OVERLAP_MIN_SEQS must be a whole number"):
        make_engine()
