"""Continuous batching: which sequences run this step and how many tokens each (floor 1).

Every step re-forms the batch under a token budget (`max_num_batched_tokens`) and a sequence cap
(`max_num_seqs`): running decodes first (one token each), then prefill chunks, first for running
sequences part-way through their prompt, then for waiting ones in arrival order (FCFS). A prefill
longer than what is left of the budget is split over steps (chunked prefill), so one long prompt
never stalls the decodes. When the KV cache runs out of blocks, the newest running sequence is
preempted: its blocks are freed and it waits at the front of the queue to be recomputed as a
prefill of its prompt plus the tokens it had generated (its full blocks usually survive in the
prefix cache, so the recompute is mostly hits).

Overlapped steps: the engine may schedule step N+1 before step N's sampled tokens reach the host.
`advance(batch)` counts a launched batch's tokens as computed at once, so a sequence that sampled
at step N has num_computed_tokens == len(token_ids): its token is *pending*. It decodes at N+1 like
any other (its input is resolved on the device from N's sampled ids), its slot is at position
len(token_ids), and its blocks grow for it. `commit(batch)` keys the blocks the batch filled, once
every token in them is known; a block is never keyed over a pending token. A sequence whose pending
token will end it for sure (max_tokens, max_model_len) is not scheduled again.

Speculative decoding: a decode whose seq.spec_token_ids the engine core filled computes its last
token and the drafts in one go. Drafts count in the token budget and are trimmed here so that no
accepted token could pass max_tokens or max_model_len; drafts never preempt anyone (a decode whose
drafts find no free block, or only blocks a later decode needs, runs without them). The engine
core runs such steps synchronously and rolls back the slots of rejected drafts
(BlockManager.truncate) before commit keys any block.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)  # running decodes first, then prefill chunks
    # Tokens each sequence computes this step, from seq.num_computed_tokens on.
    num_new_tokens: list[int] = field(default_factory=list)
    # Whether each sequence samples a token this step: its new tokens reach the end of its
    # token_ids, or past it by its pending token (decided here, once; the runner and the engine
    # core read it).
    is_sampling: list[bool] = field(default_factory=list)
    num_preempted: int = 0  # preemptions made while building this batch
    # (src, dst) KV blocks to copy before the forward: the partial tails of forked sequences.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Draft tokens scheduled for verification (speculative decoding): a decode with drafts
    # computes 1 + len(seq.spec_token_ids) tokens and samples at each of them.
    num_spec_tokens: int = 0

    def sampling_rows(self) -> tuple[list[Sequence], list[int]]:
        """Who samples this step, in row order, read before advance: the sequences that sample
        (in batch order), then the waiting forks of those, each sampling its first token from
        its parent's logits; and for each fork, its parent's row."""
        seqs = [s for s, sampling in zip(self.seqs, self.is_sampling, strict=True) if sampling]
        fork_rows = []
        for row, seq in enumerate(seqs[:]):
            seqs += seq.forks
            fork_rows += [row] * len(seq.forks)
        return seqs, fork_rows

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.is_sampling.append(seq.num_computed_tokens + n >= len(seq.token_ids))


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ):
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_chunked_prefill_steps = 0  # steps where some prefill ran with tokens left over
        self.num_mixed_steps = 0  # steps with both decodes and prefill chunks
        # (child, src, dst) made by forks, run by the next batch; a child that ends first
        # takes its copies with it
        self._block_copies: list[tuple[Sequence, int, int]] = []

    # ---- queue -------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a waiting sequence; raise ValueError at once if it could never run to its end."""
        num_prompt = len(seq.token_ids)
        if num_prompt == 0:
            raise ValueError("prompt is empty: it needs at least one token")
        if num_prompt + 1 > self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt} tokens; with one generated token that exceeds "
                f"max_model_len {self.max_model_len}"
            )
        # A sequence alone must be able to hold its longest possible length, or it would be
        # preempted forever. The last token is never computed, but the table covers it.
        max_tokens = seq.sampling_params.max_tokens
        max_len = self.max_model_len
        if max_tokens is not None:
            max_len = min(max_len, num_prompt + max_tokens)
        bm = self.block_manager
        need = bm.blocks_for(max_len)
        if need > bm.num_blocks:
            raise ValueError(
                f"prompt has {num_prompt} tokens and may grow to {max_len} tokens, which needs "
                f"{need} KV-cache blocks of {bm.block_size} tokens; the KV cache has only "
                f"{bm.num_blocks} blocks (lower max_tokens or max_model_len, or add blocks)"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # Decodes, oldest first: a victim is always newer than the sequence being served, so it
        # is never one already in this batch.
        bs, running = bm.block_size, SequenceStatus.RUNNING
        # Appended to directly: the hot loop. A decode always samples.
        seqs, num_new, sampling = batch.seqs, batch.num_new_tokens, batch.is_sampling
        max_num_seqs = self.max_num_seqs
        max_len = self.max_model_len
        for seq in list(self.running):
            c = seq.num_computed_tokens
            num_tokens = len(seq.token_ids)
            if seq.status is not running or num_tokens - c > 1:
                continue
            beam = seq.sampling_params.use_beam_search
            if c == num_tokens and (beam or _ends_with_pending(seq, max_len)):
                continue  # a beam's next token is chosen on the host, with its siblings
            if beam and seq.has_pending_token:
                # A beam that recomputes samples a row at the end; if its round ended on its
                # kept candidates meanwhile (a token appended), that row is stale, and it must be
                # read, and dropped, before the beam decodes its new token (BeamSearch.report)
                continue
            if budget == 0 or len(seqs) == max_num_seqs:
                break
            if seq.spec_token_ids and self._trim_drafts(seq, budget):
                n = 1 + len(seq.spec_token_ids)
                bm.append(seq, n)
                batch.add(seq, n)
                batch.num_spec_tokens += n - 1
                budget -= n
                continue
            if c < len(seq.block_table) * bs:  # its new token's slot is in a block it holds
                seqs.append(seq)
                num_new.append(1)
                sampling.append(True)
                budget -= 1
                continue
            while not bm.can_append(seq, 1):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            if seq.status is running:
                bm.append(seq, 1)
                batch.add(seq, 1)
                budget -= 1
        num_decodes = len(seqs)

        chunked = False
        # Prefills already admitted (their blocks cover the whole prompt), then the queue.
        stalled = []  # running prefills with no block for tokens they gained (below)
        for seq in self.running:
            if budget == 0 or len(seqs) == max_num_seqs:
                break
            num_uncomputed = len(seq.token_ids) - seq.num_computed_tokens
            if num_uncomputed <= 1:
                continue
            n = min(num_uncomputed, budget)
            if bm.can_append(seq, n):
                bm.append(seq, n)  # a no-op unless tokens came after admission (below)
                chunked |= n < num_uncomputed
                batch.add(seq, n)
                budget -= n
            else:
                # A beam chose its token part-way through its recompute, and that token's
                # block is not free: it waits to be admitted again rather than hold its blocks
                # forever (admission waits for room, or _unblock_beams makes it).
                stalled.append(seq)
        for seq in stalled:
            self._preempt(seq)
            batch.num_preempted += 1
        # After a preemption, admitting would only take blocks the running ones need back.
        i = 0  # the queue's first sequence whose grammar is ready (the others wait in place)
        while i < len(self.waiting) and batch.num_preempted == 0:
            if budget == 0 or len(batch.seqs) == self.max_num_seqs:
                break
            if len(self.running) >= self.max_num_seqs:
                break
            seq = self.waiting[i]
            if seq.is_waiting_for_grammar:
                i += 1
                continue
            # A preempted sequence or a fork that found no room may still wait for a token of
            # the step in flight: admitted now, its prompt would lack it. FCFS: one step's wait.
            if seq.has_pending_token or not bm.can_allocate(seq):
                break  # FCFS: nobody overtakes the head of the queue
            del self.waiting[i]
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            chunked |= n < seq.num_uncomputed_tokens
            batch.add(seq, n)
            budget -= n

        if batch.is_empty and self.waiting and (len(self.running) >= self.max_num_seqs
                                                or not bm.can_allocate(self.waiting[0])):
            self._unblock_beams(batch)
        self.num_preemptions += batch.num_preempted
        if not batch.is_empty:
            # Copies wait for a forward: none can touch their blocks before one runs.
            batch.block_copies = [(src, dst) for _, src, dst in self._block_copies]
            self._block_copies = []
            self.num_steps += 1
            self.num_chunked_prefill_steps += chunked
            self.num_mixed_steps += 0 < num_decodes < len(batch.seqs)
        return batch

    def _unblock_beams(self, batch: ScheduledBatch) -> None:
        """Nothing runs: the running sequences are beams that reported their candidates and
        wait for a sibling (engine/beam_search.py), and the sibling waits for blocks they hold or
        for a place among max_num_seqs. One of them makes way, queued behind the others; its
        candidates are kept."""
        stuck = [s for s in self.running if s.sampling_params.use_beam_search
                 and not s.has_pending_token and s.num_computed_tokens == len(s.token_ids)]
        if stuck:
            self._preempt(stuck[-1])
            self.waiting.remove(stuck[-1])
            self.waiting.append(stuck[-1])
            batch.num_preempted += 1

    def _trim_drafts(self, seq: Sequence, budget: int) -> int:
        """Cut seq.spec_token_ids to what fits this step; return how many are left. Every draft
        accepted plus the bonus token must stay within max_tokens and max_model_len."""
        num_tokens = len(seq.token_ids)
        k = min(len(seq.spec_token_ids), budget - 1, self.max_model_len - num_tokens - 1)
        max_tokens = seq.sampling_params.max_tokens
        if max_tokens is not None:
            k = min(k, max_tokens - (num_tokens - seq.num_prompt_tokens) - 1)
        if k > 0:
            # Drafts take no block a later decode needs for its own token: taking the last free
            # one would preempt that decode for tokens that may all be rejected.
            bs, running = self.block_manager.block_size, SequenceStatus.RUNNING
            later = self.running[self.running.index(seq) + 1 :]
            reserve = sum(1 for q in later if q.status is running
                          and len(q.token_ids) - q.num_computed_tokens <= 1
                          and q.num_computed_tokens >= len(q.block_table) * bs)
            if not self.block_manager.can_append(seq, 1 + k, reserve):
                k = 0
        seq.spec_token_ids = seq.spec_token_ids[: max(k, 0)]
        return len(seq.spec_token_ids)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def advance(self, batch: ScheduledBatch) -> None:
        """Count the launched batch as computed (before its sampled tokens are known), so the
        next schedule() sees where each sequence stands; start the forks of a finished prompt."""
        for seq, n, sampling in zip(batch.seqs, batch.num_new_tokens, batch.is_sampling,
                                    strict=True):
            seq.num_computed_tokens += n
            if sampling and seq.forks:
                self._fork(seq)

    def commit(self, batch: ScheduledBatch, undrafted_only: bool = False) -> None:
        """Key for the prefix cache the blocks the advanced batch filled. Call it once every
        token the batch computed is known: after the previous step's tokens are appended.
        undrafted_only: only the sequences without drafts in the batch (their tokens are known
        at launch; a drafting one's wait for verification). Keying a block twice is harmless."""
        bm, bs = self.block_manager, self.block_manager.block_size
        running = SequenceStatus.RUNNING
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if undrafted_only and seq.spec_token_ids:
                continue
            # A sequence finished since the launch (a stop in the previous step's tokens, an
            # abort) holds no blocks to key.
            if seq.status is running and seq.num_computed_tokens % bs < n:  # a block filled
                bm.mark_computed(seq)

    def _fork(self, parent: Sequence) -> None:
        """Start the parent's pending forks on its computed prompt. A fork that finds no room
        (no free block for its tail, or max_num_seqs running) waits instead, like a preempted
        sequence: it recomputes its prompt later (mostly prefix-cache hits)."""
        children, parent.forks = parent.forks, []
        for child in children:
            self.fork(parent, child)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start `child` (the parent's tokens, no blocks) on the parent's blocks, its partial
        tail copied (copy-on-write by block); with no room, or a parent that holds no blocks
        (preempted) or has not computed all its tokens (a beam part-way through a recompute),
        it waits and recomputes."""
        if (parent.status == SequenceStatus.RUNNING and len(self.running) < self.max_num_seqs
                and parent.num_computed_tokens == len(parent.token_ids)
                and self.block_manager.can_fork(parent)):
            self._block_copies += [(child, src, dst)
                                   for src, dst in self.block_manager.fork(parent, child)]
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:
            child.status = SequenceStatus.WAITING
            self.waiting.appendleft(child)

    def finish_step(self, batch: ScheduledBatch) -> None:
        """advance + commit: the synchronous step, whose tokens are all known at launch."""
        self.advance(batch)
        self.commit(batch)

    # ---- endings -----------------------------------------------------------------------------

    def finish_seq(self, seq: Sequence, reason: str, defer_free: bool = False) -> None:
        """End `seq`; defer_free: BlockManager.free(defer=True), for a step's own finishers."""
        if seq.status == SequenceStatus.FINISHED:
            return
        for child in seq.forks:  # ended before its prompt was computed: so do its forks
            child.status = SequenceStatus.FINISHED
            child.finish_reason = reason
            child.matcher = child.later_matcher = None
        seq.forks = []
        seq.matcher = seq.later_matcher = None  # its grammar's state ends with it
        if self._block_copies:  # a fork that ends before a batch ran its copies
            self._block_copies = [c for c in self._block_copies if c[0] is not seq]
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq, defer=defer_free)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of the request with reason "abort"; return them."""
        seqs = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in seqs:
            self.finish_seq(seq, "abort")
        return seqs


def _ends_with_pending(seq: Sequence, max_model_len: int) -> bool:
    """True if the sequence's pending token ends it whatever its value (check_stop_ids' length
    rules), so computing past it would be wasted."""
    max_tokens = seq.sampling_params.max_tokens
    num_tokens = len(seq.token_ids) + 1
    if max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens:
        return True
    return num_tokens >= max_model_len
