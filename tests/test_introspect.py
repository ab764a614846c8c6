"""The dashboard's snapshots (engine/core/introspect.py): runs of block ids, and a viewer that
applies the deltas holding exactly the engine's block tables and keyed blocks at every step."""

import itertools
import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_scheduler import FakeEngine, make_seq

from engine.core import sequence as sequence_module
from engine.core.block_manager import BlockManager
from engine.core.introspect import (
    DECODE,
    PREEMPTED,
    PREFILL,
    WAITING,
    DashboardState,
    Introspector,
    decode_runs,
    encode_runs,
    full_state,
)
from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence


@given(st.lists(st.integers(0, 40), max_size=60))
def test_runs_round_trip(ids):
    runs = encode_runs(ids)
    assert decode_runs(runs) == ids
    assert len(runs) <= 2 * len(ids)


def test_runs_compress_ascending_and_descending_stretches():
    assert encode_runs([5, 6, 7, 9, 3, 2]) == [5, 3, 9, 1, 3, -2]
    assert encode_runs(list(range(100_000))) == [0, 100_000]
    assert encode_runs(list(range(10, 0, -1))) == [10, -10]
    assert encode_runs([]) == []


def _check(view: DashboardState, eng: FakeEngine) -> None:
    tables, keyed = full_state(eng.bm, eng.sched.running)
    assert view.tables == tables
    assert view.keyed == keyed
    assert view.ref_counts() == [b.ref_count for b in eng.bm.blocks]
    assert view.num_used_blocks == eng.bm.num_used_blocks


def _random_workload(seed: int, eng: FakeEngine, view: DashboardState, intro: Introspector,
                     scrub_exact: bool):
    rng = random.Random(seed)
    shared = [rng.randrange(1, 900) for _ in range(rng.choice([4, 9, 13]))]
    stats = {"num_steps": 0}
    seqs = []
    for i in range(12):
        tail = [rng.randrange(1, 900) for _ in range(rng.randrange(1, 12))]
        prompt = (shared if rng.random() < 0.7 else []) + tail
        seqs.append(Sequence(f"req-{i}", prompt, len(prompt),
                             SamplingParams(max_tokens=rng.randrange(1, 9))))
    pending = list(seqs)
    version = None
    for _ in range(400):
        for _ in range(rng.randrange(0, 3)):
            if pending:
                eng.sched.add(pending.pop(0))
        if rng.random() < 0.05 and eng.sched.running:
            eng.sched.abort(rng.choice(eng.sched.running).request_id)
        if eng.sched.has_unfinished():
            eng.step()
        if rng.random() < 0.6:  # not every step: deltas must also cover several steps
            snap = intro.snapshot(eng.sched.running, eng.sched.waiting, stats, version)
            json.dumps(snap)  # plain JSON, nothing else
            view.apply(snap)
            version = snap["v"]
            if scrub_exact:
                _check(view, eng)
        if not pending and not eng.sched.has_unfinished():
            break
    return version


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("num_blocks", [10, 64])  # 10: preemptions; 64: the prefix cache lives
def test_deltas_rebuild_the_engine_state_after_every_snapshot(seed, num_blocks):
    eng = FakeEngine(num_blocks=num_blocks, block_size=4, max_num_seqs=6, budget=24)
    view = DashboardState()
    intro = Introspector(eng.bm, scrub=num_blocks)  # a full scrub: exact at every snapshot
    _random_workload(seed, eng, view, intro, scrub_exact=True)


@pytest.mark.parametrize("seed", range(6))
def test_a_small_scrub_catches_up_once_idle(seed):
    eng = FakeEngine(num_blocks=40, block_size=4, max_num_seqs=6, budget=24)
    view = DashboardState()
    intro = Introspector(eng.bm, scrub=3)
    version = _random_workload(seed, eng, view, intro, scrub_exact=False)
    for _ in range(40 // 3 + 1):
        snap = intro.snapshot(eng.sched.running, eng.sched.waiting, {}, version)
        view.apply(snap)
        version = snap["v"]
    _check(view, eng)
    assert view.num_used_blocks == 0 and not view.rows


def test_a_late_viewer_starts_from_the_first_viewers_keyframe():
    eng = FakeEngine(num_blocks=32, block_size=4)
    intro = Introspector(eng.bm)
    first = DashboardState()
    first.apply(intro.snapshot([], [], {}, None))
    for i in range(3):  # the first computes the shared prefix, the others find it cached
        eng.sched.add(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9 + i], max_tokens=5, request_id=f"r{i}"))
        eng.step()
    first.apply(intro.snapshot(eng.sched.running, eng.sched.waiting, {}, first.version))
    late = DashboardState()
    late.apply(json.loads(json.dumps(first.keyframe())))
    assert late == first
    _check(late, eng)
    # The shared prefix: two full blocks held by all three tables.
    refs = late.ref_counts()
    assert sorted(refs, reverse=True)[:2] == [3, 3]
    with pytest.raises(ValueError, match="delta"):
        eng.step()
        snap = intro.snapshot(eng.sched.running, eng.sched.waiting, {}, first.version)
        snap["v"] += 1
        first.apply(snap)


def test_a_stale_since_gets_a_keyframe():
    bm = BlockManager(8, 4)
    intro = Introspector(bm)
    assert intro.snapshot([], [], {}, None)["kind"] == "key"
    assert intro.snapshot([], [], {}, 1)["kind"] == "delta"
    assert intro.snapshot([], [], {}, 1)["kind"] == "key"


def test_rows_say_waiting_prefill_decode_preempted_and_done():
    eng = FakeEngine(num_blocks=6, block_size=4, max_num_seqs=4, budget=6)
    intro = Introspector(eng.bm)
    a = make_seq(list(range(1, 9)), max_tokens=12, request_id="a")  # 8 tokens: 2 steps of 6
    b = make_seq(list(range(20, 24)), max_tokens=12, request_id="b")
    eng.sched.add(a)
    eng.sched.add(b)

    def rows(since):
        snap = intro.snapshot(eng.sched.running, eng.sched.waiting, {}, since)
        return snap, {r[0]: r[1:] for r in snap["rows"]}

    snap, r = rows(None)
    assert r == {a.seq_id: [WAITING, 0, 0], b.seq_id: [WAITING, 0, 0]}
    assert [n[1] for n in snap["names"]] == ["a", "b"]
    eng.step()
    snap, r = rows(snap["v"])
    assert r[a.seq_id] == [PREFILL, 6, 0] and r[b.seq_id] == [WAITING, 0, 0]
    assert snap["names"] == []  # sent once
    eng.step()
    snap, r = rows(snap["v"])
    assert r[a.seq_id] == [DECODE, 8, 1] and r[b.seq_id] == [DECODE, 4, 1]
    while b.status.value != "waiting":  # the pool of 6 blocks runs out as both grow
        eng.step()
    snap, r = rows(snap["v"])
    assert r[b.seq_id][0] == PREEMPTED
    eng.sched.abort("a")
    eng.sched.abort("b")
    snap, r = rows(snap["v"])
    assert r == {} and snap["done"] == sorted([a.seq_id, b.seq_id])
    assert snap["drop"] or snap["tables"] == []


def test_100k_blocks_and_256_sequences_stay_a_few_kb(monkeypatch):
    # seq ids as a fresh engine numbers them: the sizes below count their digits, and the tests
    # before this one in the process may have made tens of thousands of sequences
    monkeypatch.setattr(sequence_module, "_seq_ids", itertools.count())
    bm = BlockManager(100_000, 16)
    intro = Introspector(bm)
    seqs = []
    for i in range(256):
        prompt = [i + 1] * (16 * 389)
        seq = Sequence(f"cmpl-{i:08x}", prompt, len(prompt), SamplingParams(max_tokens=2))
        bm.allocate(seq)
        seq.num_computed_tokens = len(prompt)
        seq.status = seq.status.RUNNING
        seqs.append(seq)
    key = intro.snapshot(seqs, [], {}, None)
    assert len(json.dumps(key["tables"])) < 8_000
    for seq in seqs:  # one decode step each: all blocks are full, everyone takes a new one
        seq.token_ids.append(7)
        bm.append(seq, 1)
    delta = intro.snapshot(seqs, [], {}, key["v"])
    size = len(json.dumps(delta, separators=(",", ":")))
    assert size < 10_000, size  # the worst case: all 256 tables grow in one update
    view = DashboardState()
    view.apply(key)
    view.apply(delta)
    assert view.num_used_blocks == bm.num_used_blocks == 256 * 390
