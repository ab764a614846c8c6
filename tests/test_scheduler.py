"""Scheduler, driven by a fake model: budgets, chunked prefill, preemption, rejection, abort."""

import pytest

from engine.core.block_manager import BlockManager
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import ScheduledBatch, Scheduler
from engine.core.sequence import Sequence, SequenceStatus


def make_seq(prompt, max_tokens=8, request_id=None):
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(request_id or f"r{prompt[0]}", list(prompt), len(prompt), params)


def next_token(tokens):
    """The fake model: a token that depends on the whole context, like a real one."""
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 7919) % 1000


class FakeEngine:
    """Runs schedule -> fake forward -> finish_step -> append/finish, checking every step."""

    def __init__(
        self,
        num_blocks=64,
        block_size=4,
        max_num_seqs=8,
        budget=64,
        max_model_len=256,
        prefix_caching=True,
    ):
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.sched = Scheduler(self.bm, max_num_seqs, budget, max_model_len)
        self.kv = {}  # cache slot -> the context whose k/v it holds
        self.batches = []

    def step(self) -> ScheduledBatch:
        s, bs = self.sched, self.bm.block_size
        was_decoding = {id(q) for q in s.running if q.num_uncomputed_tokens == 1}
        batch = s.schedule()
        assert batch.num_tokens <= s.max_num_batched_tokens
        assert len(batch.seqs) <= s.max_num_seqs and s.num_running <= s.max_num_seqs
        assert len({id(q) for q in batch.seqs}) == len(batch.seqs)
        kinds = [id(q) in was_decoding for q in batch.seqs]
        assert kinds == sorted(kinds, reverse=True), "decodes must come first"
        sampling = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            assert seq.status == SequenceStatus.RUNNING and n >= 1
            end = seq.num_computed_tokens + n
            assert end <= len(seq) and len(seq.block_table) * bs >= end
            for pos in range(end):  # attention reads the whole context: it must be intact
                slot = seq.block_table[pos // bs] * bs + pos % bs
                if pos >= seq.num_computed_tokens:
                    self.kv[slot] = tuple(seq.token_ids[: pos + 1])
                assert self.kv.get(slot) == tuple(seq.token_ids[: pos + 1])
            if end == len(seq):
                sampling.append(seq)
        s.finish_step(batch)
        for seq in sampling:
            seq.token_ids.append(next_token(seq.token_ids))
            if seq.num_output_tokens >= seq.sampling_params.max_tokens:
                s.finish_seq(seq, "length")
        self.bm.check_invariants(s.running)
        self.batches.append([(q, n) for q, n in zip(batch.seqs, batch.num_new_tokens, strict=True)])
        return batch

    def run(self, seqs, max_steps=10_000):
        for seq in seqs:
            self.sched.add(seq)
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                break
            assert not self.step().is_empty, "no progress"
        assert not self.sched.has_unfinished()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        return seqs


def reference_outputs(prompts, max_tokens):
    seqs = [make_seq(p, max_tokens) for p in prompts]
    FakeEngine(num_blocks=1024, budget=4096, max_num_seqs=64).run(seqs)
    return [q.output_token_ids for q in seqs]


PROMPTS = [list(range(10 * i + 1, 10 * i + 1 + n)) for i, n in enumerate([5, 17, 30, 9, 23, 12])]


def test_everything_finishes_with_the_reference_outputs():
    ref = reference_outputs(PROMPTS, 8)
    seqs = FakeEngine().run([make_seq(p, 8) for p in PROMPTS])
    assert [q.output_token_ids for q in seqs] == ref
    assert all(q.status == SequenceStatus.FINISHED and q.finish_reason == "length" for q in seqs)
    assert all(len(q.output_token_ids) == 8 for q in seqs)


def test_small_budget_chunks_prefills_and_mixes_them_with_decodes():
    eng = FakeEngine(budget=8)
    seqs = eng.run([make_seq(p, 6) for p in PROMPTS])
    assert [q.output_token_ids for q in seqs] == reference_outputs(PROMPTS, 6)
    assert eng.sched.num_chunked_prefill_steps > 0 and eng.sched.num_mixed_steps > 0
    assert max(sum(n for _, n in b) for b in eng.batches) == 8
    # The 30-token prompt can only have been computed in pieces.
    assert max(n for b in eng.batches for q, n in b if q is seqs[2]) <= 8
    assert eng.sched.num_steps == len(eng.batches)


def test_budget_smaller_than_the_running_decodes_still_serves_everyone():
    eng = FakeEngine(budget=3)
    seqs = eng.run([make_seq(p, 6) for p in PROMPTS])
    assert [q.output_token_ids for q in seqs] == reference_outputs(PROMPTS, 6)
    assert max(sum(n for _, n in b) for b in eng.batches) == 3
    assert max(len(b) for b in eng.batches) == 3


def test_max_num_seqs_caps_the_batch_and_the_running_set():
    eng = FakeEngine(max_num_seqs=2)
    eng.run([make_seq(p, 5) for p in PROMPTS])
    assert max(len(b) for b in eng.batches) == 2


def test_first_step_is_all_prefill_then_decodes_lead():
    eng = FakeEngine(budget=100)
    eng.sched.add(make_seq(PROMPTS[0], 4))
    first = eng.step()
    assert first.num_new_tokens == [5]
    eng.sched.add(make_seq(PROMPTS[1], 4))
    second = eng.step()
    assert second.num_new_tokens == [1, 17] and eng.sched.num_mixed_steps == 1


def test_preemption_under_a_small_pool_recomputes_to_the_same_outputs():
    prompts = [list(range(100 * i + 1, 100 * i + 7)) for i in range(4)]  # 6 tokens each
    ref = reference_outputs(prompts, 20)
    # Each sequence ends at 26 tokens = 7 blocks of 4; four of them cannot all fit in 12.
    eng = FakeEngine(num_blocks=12, block_size=4, budget=64)
    seqs = eng.run([make_seq(p, 20) for p in prompts])
    assert eng.sched.num_preemptions > 0
    assert [q.output_token_ids for q in seqs] == ref
    assert all(q.num_output_tokens == 20 for q in seqs)
    # Recomputed prefills found their own earlier blocks in the prefix cache.
    assert eng.bm.prefix_cache_hits > 0


def test_preemption_takes_the_newest_and_requeues_it_first():
    eng = FakeEngine(num_blocks=4, block_size=2, budget=64, max_model_len=64)
    a, b = make_seq([1, 2, 3, 4], 3), make_seq([5, 6, 7, 8], 3)
    eng.sched.add(a)
    eng.sched.add(b)
    eng.step()  # both prefilled: 2 blocks each, the pool is full
    assert eng.bm.num_free_blocks == 0
    batch = eng.step()  # a's 5th token needs a block: b, the newest, is preempted
    assert batch.seqs == [a] and batch.num_preempted == 1
    assert b.status == SequenceStatus.WAITING and list(eng.sched.waiting) == [b]
    assert b.block_table == [] and b.num_computed_tokens == 0
    eng.run([])
    assert a.num_output_tokens == b.num_output_tokens == 3


def test_the_queue_is_first_come_first_served_even_when_a_later_request_would_fit():
    """FCFS: a prompt that does not fit yet holds the queue; a smaller one behind it waits too
    (letting it pass could starve the big one for as long as small ones keep coming)."""
    eng = FakeEngine(num_blocks=4, block_size=2, budget=64, max_model_len=64)
    a = make_seq([1, 2, 3, 4], 4)
    eng.sched.add(a)
    eng.step()  # a holds 2 of the 4 blocks
    big, small = make_seq([11, 12, 13, 14, 15, 16], 2), make_seq([21, 22], 2)
    eng.sched.add(big)  # 3 blocks: does not fit beside a
    eng.sched.add(small)  # 1 block: would fit
    for _ in range(3):
        batch = eng.step()
        assert batch.seqs == [a] and list(eng.sched.waiting) == [big, small]
    eng.run([])
    first = {id(q): min(i for i, b in enumerate(eng.batches) if any(x is q for x, _ in b))
             for q in (big, small)}
    assert first[id(big)] <= first[id(small)]
    assert a.num_output_tokens == 4 and big.num_output_tokens == small.num_output_tokens == 2


def test_prompt_longer_than_max_model_len_is_rejected_with_both_numbers():
    sched = Scheduler(BlockManager(100, 4), 4, 64, max_model_len=10)
    with pytest.raises(ValueError, match=r"prompt has 12 tokens.*max_model_len 10"):
        sched.add(make_seq(list(range(12))))
    with pytest.raises(ValueError, match=r"prompt has 10 tokens.*max_model_len 10"):
        sched.add(make_seq(list(range(10))))
    with pytest.raises(ValueError, match="empty"):
        sched.add(Sequence("e", [], 0, SamplingParams()))
    sched.add(make_seq(list(range(9)), max_tokens=1))
    assert sched.num_waiting == 1


def test_request_larger_than_the_pool_is_rejected_with_both_numbers():
    sched = Scheduler(BlockManager(4, 4), 4, 64, max_model_len=100)
    with pytest.raises(ValueError, match=r"prompt has 20 tokens.*only 4 blocks"):
        sched.add(make_seq(list(range(20)), max_tokens=1))
    # The prompt fits, but its longest possible length (12 + 8 = 20 tokens) does not.
    with pytest.raises(ValueError, match=r"grow to 20 tokens.*5 KV-cache blocks.*only 4 blocks"):
        sched.add(make_seq(list(range(12)), max_tokens=8))
    assert not sched.has_unfinished()


def test_abort_finishes_waiting_and_running_sequences_and_frees_their_blocks():
    eng = FakeEngine(max_num_seqs=2)
    shared = [make_seq(PROMPTS[1], 50, request_id="x") for _ in range(2)]
    other = make_seq(PROMPTS[0], 50, request_id="y")
    for seq in (*shared, other):
        eng.sched.add(seq)
    eng.step()
    eng.step()
    assert {q.status for q in shared} == {SequenceStatus.RUNNING}
    assert other.status == SequenceStatus.WAITING
    aborted = eng.sched.abort("x")
    assert set(map(id, aborted)) == set(map(id, shared))
    assert all(q.finish_reason == "abort" and q.is_finished for q in shared)
    assert eng.sched.abort("nobody") == []
    eng.step()
    assert other.status == SequenceStatus.RUNNING
    assert eng.sched.abort("y") == [other]
    assert not eng.sched.has_unfinished()
    eng.bm.check_invariants([])
    assert eng.bm.num_free_blocks == eng.bm.num_blocks


def test_shared_prompts_hit_the_prefix_cache_across_requests():
    eng = FakeEngine(block_size=4)
    system = list(range(500, 516))  # 4 full blocks
    eng.run([make_seq(system + [1, 2], 3)])
    later = make_seq(system + [7, 8, 9], 3)
    eng.run([later])
    assert later.num_cached_tokens == 16
    assert eng.bm.prefix_cache_hits == 4


def test_a_running_sequence_left_out_of_the_batch_still_counts_toward_max_num_seqs():
    """Overlapped steps: a sequence whose pending token ends it is not scheduled again, but it
    still holds its place among max_num_seqs, so nobody is admitted beside it."""
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64)
    a, b = make_seq([1, 2, 3], max_tokens=1), make_seq([4, 5, 6], max_tokens=1)
    sched.add(a)
    sched.advance(sched.schedule())  # a's only token is pending: a is done once it lands
    sched.add(b)
    batch = sched.schedule()
    assert batch.is_empty and sched.running == [a] and list(sched.waiting) == [b]
    assert b.status == SequenceStatus.WAITING and b.block_table == []


def test_drafts_are_cut_so_no_accepted_token_passes_max_model_len_or_max_tokens():
    """Every draft accepted plus the bonus token must end exactly at the bound, not one past."""
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=12)
    by_len = make_seq([1, 2, 3, 4, 5, 6, 7], max_tokens=None)  # room for 12 - 7 = 5 tokens
    by_max = make_seq([8, 9, 10, 11, 12, 13, 14], max_tokens=3)
    sched.add(by_len)
    sched.add(by_max)
    sched.finish_step(sched.schedule())
    for seq in (by_len, by_max):
        seq.token_ids.append(99)  # 1 output token, 8 tokens
        seq.spec_token_ids = [1, 2, 3, 4, 5, 6]
    batch = sched.schedule()
    # by_len: 8 tokens + 3 drafts + bonus = 12; by_max: 1 output + 1 draft + bonus = 3
    assert by_len.spec_token_ids == [1, 2, 3] and by_max.spec_token_ids == [1]
    assert batch.num_new_tokens == [4, 2] and batch.num_spec_tokens == 4


def test_a_pending_token_that_reaches_max_model_len_is_not_computed():
    """Overlapped steps: once the pending token makes len == max_model_len it ends the sequence
    whatever its value, so no step computes past it."""
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=8)
    a = make_seq([1, 2, 3, 4, 5, 6], max_tokens=None)
    sched.add(a)
    sched.advance(sched.schedule())  # prefill: the 7th token is pending
    second = sched.schedule()  # 7 tokens < 8: it decodes its pending token
    assert second.seqs == [a] and second.num_new_tokens == [1]
    sched.advance(second)
    a.token_ids.append(7)  # the first step's token lands; the second's (the 8th) is pending
    third = sched.schedule()
    assert third.is_empty and a.num_computed_tokens == 7


def test_stuck_beams_make_way_newest_first():
    """Every running sequence is a beam waiting on its siblings and the queue's head does not
    fit: the newest beam is preempted and queued behind the others."""
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=16)
    beams = [Sequence("b", [1, 2, 3, 4, 5], 5, SamplingParams(use_beam_search=True, n=2,
                                                                  max_tokens=3))
             for _ in range(2)]
    for beam in beams:
        sched.add(beam)
    sched.advance(sched.schedule())  # both prefilled, 2 blocks each: the pool is full
    other = make_seq([9, 9, 9], max_tokens=2)
    sched.add(other)
    batch = sched.schedule()
    assert batch.is_empty and batch.num_preempted == 1
    assert sched.running == [beams[0]] and list(sched.waiting) == [other, beams[1]]
    assert beams[1].block_table == [] and beams[1].status == SequenceStatus.WAITING


def test_chunked_and_mixed_step_counters():
    """A step counts as chunked when a prefill leaves tokens for later, and as mixed only when
    it has both decodes and prefill chunks."""
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4, max_model_len=64)
    a = make_seq(list(range(1, 11)), max_tokens=3)  # 10 prompt tokens: chunks of 4, 4, 2
    sched.add(a)
    for n in (4, 4, 2):
        batch = sched.schedule()
        assert batch.num_new_tokens == [n]
        sched.finish_step(batch)
    assert (sched.num_chunked_prefill_steps, sched.num_mixed_steps) == (2, 0)
    a.token_ids.append(7)
    b = make_seq([20, 21, 22], max_tokens=3)
    sched.add(b)
    sched.finish_step(sched.schedule())  # a's decode and b's whole prompt
    assert (sched.num_chunked_prefill_steps, sched.num_mixed_steps) == (2, 1)
    a.token_ids.append(8)
    b.token_ids.append(9)
    batch = sched.schedule()
    assert batch.num_new_tokens == [1, 1]  # decodes only
    sched.finish_step(batch)
    assert (sched.num_chunked_prefill_steps, sched.num_mixed_steps, sched.num_steps) == (2, 1, 5)
