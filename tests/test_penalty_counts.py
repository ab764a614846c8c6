"""Penalties from token counts kept on the device (runner.penalty_slots, TokenCounts): the slot
bookkeeping's invariants, and engine outputs identical to sending every row's ids each
step, through overlap, chunked prefill, preemption, n > 1 forks, aborts and speculation."""

import numpy as np
import pytest
from test_overlap import drive, random_requests

from engine.core.sampling_params import SamplingParams
from engine.executor.penalty_slots import PenaltySlots

# ---- the slot bookkeeping ------------------------------------------------------------------------


def test_slots_rebuild_only_when_the_counts_can_differ():
    slots = PenaltySlots(3)
    s, rebuild = slots.assign([10, None, 11], [0, 0, 5])
    assert s[1] == -1 and s[0] != s[2] and rebuild.tolist() == [True, False, True]
    # Each drew one token: the next step expects 1 and 6 outputs.
    s2, rebuild = slots.assign([11, 10], [6, 1])
    assert s2.tolist() == [s[2], s[0]] and not rebuild.any()
    # A dropped draw (preemption, failed step): the counts no longer match -> rebuilt.
    _, rebuild = slots.assign([10], [1])
    assert rebuild.tolist() == [True]
    slots.forget([11])
    _, rebuild = slots.assign([11], [7])
    assert rebuild.tolist() == [True]
    slots.check_invariants()


def test_slots_evict_outside_the_batch_and_refuse_what_cannot_fit():
    slots = PenaltySlots(2)
    slots.assign([1, 2], [0, 0])
    s, rebuild = slots.assign([3, 2], [0, 1])  # 1 is gone: 3 takes its slot, 2 keeps its own
    assert rebuild.tolist() == [True, False] and len(set(s.tolist())) == 2
    slots.check_invariants()
    assert slots.assign([1, 2, 3], [0, 0, 0]) is None  # more rows than slots
    assert slots.assign([4, 4], [0, 0]) is None  # one sequence on two rows


def test_slots_random_operations_keep_the_invariants():
    rng = np.random.default_rng(0)
    slots = PenaltySlots(6)
    outputs: dict[int, int] = {}
    for _ in range(500):
        batch = rng.choice(12, int(rng.integers(1, 7)), replace=False).tolist()
        assigned = slots.assign(batch, [outputs.get(i, 0) for i in batch])
        slot_of = dict(zip(batch, assigned[0].tolist(), strict=True))
        assert len(set(slot_of.values())) == len(batch)
        for i in batch:
            outputs[i] = outputs.get(i, 0) + int(rng.random() < 0.95)  # sometimes dropped
        if rng.random() < 0.1:
            slots.forget(rng.choice(12, 3).tolist())
        slots.check_invariants()


# ---- through the engine: the same outputs as ids sent every step ---------------------------------


def both_ways(make_engine, requests, abort_after=None, **fields):
    """Outputs with kept counts and with ids; asserts they are equal; returns the kept run's
    (engine, final outputs, rows rebuilt, rows sampled with a slot)."""
    by_ids = make_engine(**fields)
    by_ids.runner.penalty_slots = None
    kept = make_engine(**fields)
    rebuilt, slotted = [], []
    real = kept.runner.ops.sample_start

    def spy(logits, t, prev=None):
        if t.count_slots is not None:
            rebuilt.append(int(t.rebuild.sum()))
            slotted.append(int((t.count_slots >= 0).sum()))
        return real(logits, t, prev)

    kept.runner.ops.sample_start = spy
    want, want_deltas, _ = drive(by_ids, requests, abort_after)
    got, got_deltas, placeholders = drive(kept, requests, abort_after)
    # overlapped runs really overlapped (decode rows read ids sampled on the device)
    assert (placeholders > 0) == kept.async_scheduling
    assert got_deltas == want_deltas
    for request_id in requests:
        for g, w in zip(got[request_id].outputs, want[request_id].outputs, strict=True):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
    kept.runner.penalty_slots.check_invariants()
    return kept, got, sum(rebuilt), sum(slotted)


def penalized(i, rng, **kw):
    return SamplingParams(temperature=[0, 0.8][i % 2], top_k=[0, 30][i % 3 == 0], seed=i,
                          max_tokens=int(rng.integers(10, 40)), ignore_eos=True,
                          repetition_penalty=[1.0, 1.6][i % 4 != 0],
                          frequency_penalty=[0.0, 1.2][i % 3 == 1],
                          presence_penalty=[0.0, -0.8][i % 5 == 2], **kw)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_kept_counts_through_chunked_prefill_and_preemption(make_engine, async_scheduling):
    requests = random_requests(3, 16, penalized, 90)
    engine, _, rebuilt, slotted = both_ways(
        make_engine, requests, async_scheduling=async_scheduling, max_num_batched_tokens=48,
        num_kv_blocks=12, max_num_seqs=6)
    stats = engine.get_stats()
    assert stats.num_preemptions > 0 and stats.num_chunked_prefill_steps > 0
    # Ids go up once per sequence, plus once per resumed preemption: not every step.
    num_penalized = sum(p.repetition_penalty != 1 or p.frequency_penalty != 0
                        or p.presence_penalty != 0 for _, p in requests.values())
    assert num_penalized <= rebuilt <= num_penalized + 3 * stats.num_preemptions
    assert slotted > 5 * rebuilt


def test_kept_counts_with_n_forks_and_aborts(make_engine):
    requests = random_requests(5, 8, lambda i, rng: penalized(i, rng, n=1 + i % 3), 50)
    _, got, _, _ = both_ways(make_engine, requests, abort_after={"r1": 4, "r6": 9},
                             async_scheduling=True, max_num_seqs=8)
    assert len(got["r2"].outputs) == 3
    assert len({tuple(o.token_ids) for o in got["r5"].outputs}) > 1  # the forks draw apart


def test_kept_counts_beside_speculation(make_engine):
    """Verify steps send ids (a sequence's draft rows would share its slot) and give the slots
    up; the steps after them rebuild."""
    rng = np.random.default_rng(1)
    loop = rng.integers(3, 512, 6).tolist() * 6  # repetitive: the n-gram proposer drafts
    requests = {f"r{i}": ({"prompt_token_ids": loop[i:]}, penalized(i, rng))
                for i in range(4)}
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2}
    engine, _, rebuilt, _ = both_ways(make_engine, requests, speculative_config=spec)
    assert engine.get_stats().spec_num_draft_tokens > 0
    assert rebuilt >= 3
