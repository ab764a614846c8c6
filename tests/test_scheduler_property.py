"""Random add / step / abort / finish sequences driving the Scheduler and BlockManager directly
(no model, no runner), in the order EngineCore.step uses them: synchronous, overlapped (one step
in flight, pending tokens), and synchronous with drafts verified and rolled back (truncate).
Requests share prefixes (at, before and after block boundaries), arrive in identical pairs, ask
n > 1, cache_salt and prompt_logprobs, and are aborted in any state (waiting, part-way through
their prefill, running, preempted, finished already).

After every step the block books balance (BlockManager.check_invariants: every block free or held,
reference counts equal to the tables holding it, cached keys matching the holders' tokens), no
waiting or finished sequence holds a block, and every position a step's attention reads holds the
k/v written for the reader's own prefix (a fake KV cache records, per slot, the context whose k/v
were written there), and a row samples only once its whole context is computed. At the end every
block is free and nothing hung.
"""

from __future__ import annotations

import random

import pytest

from engine.core.block_manager import BlockManager
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import ScheduledBatch, Scheduler
from engine.core.sequence import Sequence, SequenceStatus

RUNNING, WAITING, FINISHED = (SequenceStatus.RUNNING, SequenceStatus.WAITING,
                              SequenceStatus.FINISHED)


def sample(context: tuple[int, ...], index: int) -> int:
    """The fake model's token: depends on the whole context (and the sequence's index, so that
    a request's n sequences diverge)."""
    return (sum(t * (i + 1) for i, t in enumerate(context)) * 7919 + 31 * index) % 50


class Harness:
    """A minimal engine core around the scheduler: launch (fake forward, sample, advance), read
    (append or finish), commit, with one step in flight when `overlap`."""

    def __init__(self, rng: random.Random, num_blocks: int, block_size: int, max_num_seqs: int,
                 budget: int, max_model_len: int, overlap: bool, prefix_caching: bool = True,
                 stop_p: float = 0.05, spec: bool = False):
        self.rng = rng
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.sched = Scheduler(self.bm, max_num_seqs, budget, max_model_len)
        self.max_model_len = max_model_len
        self.overlap = overlap and not spec  # drafting steps run synchronously
        self.spec = spec
        self.stop_p = stop_p
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> the context its k/v were written for
        # seq_id -> its sampled tokens not yet appended (two: the step in flight's, the launched's)
        self.pending: dict[int, list[int]] = {}
        self.in_flight: tuple[ScheduledBatch, list[Sequence]] | None = None
        self.requests: dict[str, list[Sequence]] = {}  # unfinished requests
        self.all_seqs: list[Sequence] = []
        self.verified: dict[int, list[int]] = {}  # seq_id -> a drafting row's sampled tokens
        self.scored: list[tuple[Sequence, int]] = []  # (seq, next_prompt_logprob) by a step
        self.scored_to: dict[int, int] = {}  # seq_id -> next_prompt_logprob once steps are read
        self.num_steps = 0

    # ---- requests ----------------------------------------------------------------------------

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        seqs = [Sequence(request_id, list(prompt), len(prompt), params, index=i)
                for i in range(params.n)]
        for fork in seqs[1:]:  # forks take the prompt computed once: only the first scores it
            fork.next_prompt_logprob = len(prompt)
        self.sched.add(seqs[0])
        seqs[0].forks = seqs[1:]
        self.requests[request_id] = seqs
        self.all_seqs += seqs

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:  # RequestTable.abort
            self.sched.abort(request_id)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.sched.finish_seq(seq, reason, defer_free=True)
        seqs = self.requests.get(seq.request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self.requests[seq.request_id]

    # ---- one step ----------------------------------------------------------------------------

    def context(self, seq: Sequence) -> tuple[int, ...]:
        """seq's tokens, its pending ones and its drafts included."""
        return (tuple(seq.token_ids) + tuple(self.pending.get(seq.seq_id, ()))
                + tuple(seq.spec_token_ids))

    def propose(self) -> list[Sequence]:
        """Drafts for some running decodes (SpecDecoder.propose): the fake model's own tokens
        (accepted) for a random length, then random ones (rejected, mostly)."""
        drafted = []
        for seq in self.sched.running:
            if (seq.status is not RUNNING or seq.forks
                    or len(seq.token_ids) - seq.num_computed_tokens != 1
                    or self.rng.random() < 0.3):
                continue
            ctx, draft = tuple(seq.token_ids), []
            for _ in range(self.rng.randint(1, 4)):
                right = self.rng.random() < 0.7
                token = sample(ctx, seq.index) if right else self.rng.randrange(50)
                draft.append(token)
                ctx += (token,)
            seq.spec_token_ids = draft
            drafted.append(seq)
        return drafted

    def forward(self, batch: ScheduledBatch) -> None:
        bs, kv = self.bm.block_size, self.kv
        for src, dst in batch.block_copies:
            for off in range(bs):
                kv[dst * bs + off] = kv.get(src * bs + off)
        # Reads of what earlier steps wrote, before anything this step writes.
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            assert seq.status is RUNNING and n >= 1
            c, ctx = seq.num_computed_tokens, self.context(seq)
            assert c + n <= len(ctx) and len(seq.block_table) * bs >= c + n
            for pos in range(c):
                slot = seq.block_table[pos // bs] * bs + pos % bs
                assert kv.get(slot) == ctx[: pos + 1], (
                    f"seq {seq.seq_id} reads position {pos} of block "
                    f"{seq.block_table[pos // bs]}: wrong k/v")
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            c, ctx = seq.num_computed_tokens, self.context(seq)
            # Scores from the first position still wanted on (counting a step in flight's).
            wanted = max(seq.next_prompt_logprob, self.scored_to.get(seq.seq_id, 0))
            if seq.sampling_params.prompt_logprobs is not None and wanted < seq.num_prompt_tokens:
                assert c <= wanted - 1, "a wanted prompt logprob is skipped"
                end = self.scored_to[seq.seq_id] = min(c + n + 1, seq.num_prompt_tokens)
                self.scored.append((seq, end))
            for pos in range(c, c + n):
                block = self.bm.blocks[seq.block_table[pos // bs]]
                assert block.ref_count == 1, f"writing block {block.block_id} shared or free"
                assert block.hash is None, f"writing block {block.block_id}, already keyed"
                kv[block.block_id * bs + pos % bs] = ctx[: pos + 1]

    def launch(self, batch: ScheduledBatch) -> tuple[list[Sequence], list]:
        rows, fork_rows = batch.sampling_rows()
        self.scored = []
        self.forward(batch)
        for seq in rows:
            if seq.spec_token_ids:  # verified now: the sampled tokens at each draft position
                ctx, c = self.context(seq), len(seq.token_ids) - 1
                self.verified[seq.seq_id] = [sample(ctx[: c + 1 + j], seq.index)
                                             for j in range(1 + len(seq.spec_token_ids))]
        parents = [rows[r] for r in fork_rows]
        num_own = len(rows) - len(fork_rows)
        ends = {q.seq_id: q.num_computed_tokens + n
                for q, n in zip(batch.seqs, batch.num_new_tokens, strict=True)}
        tokens = []
        for i, seq in enumerate(rows):
            src = seq if i < num_own else parents[i - num_own]
            # A row samples after its whole context, pending tokens included: a sequence
            # scheduled without one would sample from a context that lacks it.
            assert ends[src.seq_id] == len(self.context(src)), "sampled from a partial context"
            tokens.append(sample(self.context(src), seq.index))
        for seq, token in zip(rows, tokens, strict=True):
            seq.has_pending_token = True
            self.pending.setdefault(seq.seq_id, []).append(token)
        self.sched.advance(batch)
        return rows, self.scored

    def read(self, launched: tuple[list[Sequence], list]) -> None:
        """RequestTable.collect_prompt_logprobs, then Postprocessor.run: append each row's token,
        or drop it for a finished sequence."""
        rows, scored = launched
        for seq, next_prompt_logprob in scored:
            seq.next_prompt_logprob = max(seq.next_prompt_logprob, next_prompt_logprob)
        for seq in rows:
            pending = self.pending[seq.seq_id]
            token = pending.pop(0)
            if not pending:
                del self.pending[seq.seq_id]
            seq.has_pending_token = False
            sampled = self.verified.pop(seq.seq_id, None)
            if seq.finish_reason is not None:
                continue
            if sampled is None:
                self.append(seq, token)
                continue
            draft = seq.spec_token_ids
            accepted = 0
            while accepted < len(draft) and sampled[accepted] == draft[accepted]:
                accepted += 1
            for token in sampled[: accepted + 1]:
                self.append(seq, token)
                if seq.is_finished:
                    break
            else:  # the rejected drafts' slots are rolled back (Postprocessor._append_verified)
                self.bm.truncate(seq, len(seq.token_ids) - 1)

    def append(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        p = seq.sampling_params
        if self.rng.random() < self.stop_p:
            self._finish(seq, "stop")
        elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            self._finish(seq, "length")
        elif len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, "length")

    def step(self) -> ScheduledBatch:
        self.num_steps += 1
        drafted = self.propose() if self.spec and self.rng.random() < 0.7 else []
        batch = self.sched.schedule()
        launched = None
        if batch.seqs:
            assert batch.num_tokens <= self.sched.max_num_batched_tokens
            assert len(batch.seqs) <= self.sched.max_num_seqs
            assert self.sched.num_running <= self.sched.max_num_seqs
            assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs)
            launched = (batch, self.launch(batch))
        if self.overlap:
            done, self.in_flight = self.in_flight, launched
            if done is not None:
                self.read(done[1])
            if launched is not None:
                self.sched.commit(batch)
        elif launched is not None:
            # keyed before a finisher frees its blocks; a drafting one's after verification
            self.sched.commit(batch, undrafted_only=bool(batch.num_spec_tokens))
            self.read(launched[1])
            if batch.num_spec_tokens:
                self.sched.commit(batch)
        for seq in drafted:
            seq.spec_token_ids = []
        if self.in_flight is not None and not self.requests:
            done, self.in_flight = self.in_flight, None
            self.read(done[1])
        self.check()
        return batch

    def busy(self) -> bool:
        return bool(self.requests) or self.in_flight is not None

    # ---- checks ------------------------------------------------------------------------------

    def check(self) -> None:
        s = self.sched
        self.bm.check_invariants(s.running)
        assert all(q.status is RUNNING for q in s.running)
        assert all(q.status is WAITING and not q.block_table for q in s.waiting)
        assert not {q.seq_id for q in s.running} & {q.seq_id for q in s.waiting}
        for q in self.all_seqs:
            if q.is_finished:
                assert not q.block_table and q not in s.running and q not in s.waiting
        assert self.bm.num_used_blocks == len({b for q in s.running for b in q.block_table})

    def drain(self, max_steps: int = 5000) -> None:
        idle = 0
        for _ in range(max_steps):
            if not self.busy():
                break
            batch = self.step()
            idle = 0 if batch.seqs else idle + 1
            assert idle < 3, "no progress: the scheduler hangs"
        assert not self.busy() and not self.sched.has_unfinished()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(q.is_finished for q in self.all_seqs)
        self.check()


SHARED = [list(range(1, 1 + n)) for n in (4, 7, 8, 9, 16)]


def random_prompt(rng: random.Random) -> list[int]:
    r = rng.random()
    if r < 0.5:
        prefix = rng.choice(SHARED)
        return prefix + [rng.randrange(50) for _ in range(rng.choice([0, 0, 1, 3, 6]))]
    return [rng.randrange(50) for _ in range(rng.randint(1, 20))]


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(max_tokens=rng.randint(1, 10), n=rng.choice([1, 1, 1, 2, 3]),
                          cache_salt=rng.choice([None, None, None, "tenant"]),
                          prompt_logprobs=rng.choice([None, None, None, None, 1]))


@pytest.mark.parametrize("mode", ["sync", "overlap", "spec"])
@pytest.mark.parametrize("seed", range(6))
def test_random_add_step_abort_keeps_the_books(seed, mode):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4])
    max_model_len = 40
    num_blocks = -(-max_model_len // bs) + rng.choice([0, 1, 4, 20])  # down to one sequence
    h = Harness(rng, num_blocks, bs, max_num_seqs=rng.choice([2, 4, 8]),
                budget=rng.choice([3, 8, 64]), max_model_len=max_model_len,
                overlap=mode == "overlap", prefix_caching=rng.random() < 0.8,
                spec=mode == "spec")
    ids = 0
    for _ in range(300):
        r = rng.random()
        if r < 0.25:
            for _ in range(rng.choice([1, 1, 2])):  # identical prompts in the same step, too
                prompt = random_prompt(rng)
                h.add(f"r{ids}", prompt, random_params(rng))
                ids += 1
        elif r < 0.35 and ids:
            h.abort(f"r{rng.randrange(ids)}")  # live, finished or aborted already
        h.step()
    h.drain()


def test_a_prefix_being_prefilled_in_the_same_step_is_no_hit():
    """Two requests with the same prompt admitted together both compute it (the first's blocks
    are keyed only once computed); a third, admitted once they are, finds them."""
    h = Harness(random.Random(0), num_blocks=32, block_size=4, max_num_seqs=8, budget=64,
                max_model_len=40, overlap=True, stop_p=0.0)
    prompt = list(range(1, 14))  # 3 full blocks and one token
    for request_id in ("a", "b"):
        h.add(request_id, prompt, SamplingParams(max_tokens=4))
    h.step()
    a, b = h.requests["a"][0], h.requests["b"][0]
    assert a.num_cached_tokens == b.num_cached_tokens == 0
    assert not set(a.block_table) & set(b.block_table)
    h.add("c", prompt, SamplingParams(max_tokens=4))
    h.step()
    c = h.requests["c"][0]
    assert c.num_cached_tokens == 12 and c.block_table[:3] == a.block_table[:3]
    h.abort("a")  # c keeps the blocks it shares with a
    h.drain()
