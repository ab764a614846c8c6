"""Block manager: books that always balance, and prefix sharing that never mixes up k/v."""

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.core.block_manager import BlockManager
from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence


def make_seq(tokens, request_id="r"):
    return Sequence(request_id, list(tokens), len(tokens), SamplingParams())


class FakeKV:
    """Stands in for the KV cache: each slot remembers the prefix whose k/v were written there.

    Real k/v at position p depend on every token up to p, so a slot holding a different prefix
    than the reader expects is exactly the bug prefix caching can cause.
    """

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots = {}

    def slot(self, seq, pos):
        bs = self.bm.block_size
        return seq.block_table[pos // bs] * bs + pos % bs

    def compute(self, seq, n):
        """Write k/v for the next n tokens as one model step would, then record them."""
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = self.bm.blocks[seq.block_table[pos // self.bm.block_size]]
            assert block.ref_count == 1, f"writing into block {block.block_id} shared or free"
            self.slots[self.slot(seq, pos)] = tuple(seq.token_ids[: pos + 1])
        seq.num_computed_tokens += n
        self.bm.mark_computed(seq)

    def copy(self, copies):
        bs = self.bm.block_size
        for src, dst in copies:
            for off in range(bs):
                self.slots[dst * bs + off] = self.slots.get(src * bs + off)

    def check(self, seq):
        for pos in range(seq.num_computed_tokens):
            assert self.slots.get(self.slot(seq, pos)) == tuple(seq.token_ids[: pos + 1]), pos


# ---- random operations -------------------------------------------------------------------------

PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9], [7] * 11, []]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / compute / append / free on prompts that share prefixes, in a small pool."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=4)
        self.kv = FakeKV(self.bm)
        self.live = []

    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(0, 3), min_size=0, max_size=6),
    )
    def admit(self, prefix, suffix):
        seq = make_seq((prefix + suffix) or [5])
        if self.bm.can_allocate(seq):
            free_before = self.bm.num_free_blocks
            self.bm.allocate(seq)
            assert len(seq.block_table) == self.bm.blocks_for(len(seq))
            assert seq.num_computed_tokens == seq.num_cached_tokens < len(seq)
            assert seq.num_cached_tokens % self.bm.block_size == 0
            assert free_before - self.bm.num_free_blocks <= len(seq.block_table)
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def step(self, data):
        """Compute a chunk; when everything is computed, 'sample' a token and grow the table."""
        seq = data.draw(st.sampled_from(self.live))
        left = seq.num_uncomputed_tokens
        if left:
            self.kv.compute(seq, data.draw(st.integers(1, left)))
        else:
            seq.token_ids.append(data.draw(st.integers(0, 3)))
            if self.bm.can_append(seq, 1):
                self.bm.append(seq, 1)
                self.bm.append(seq, 1)  # idempotent
                assert len(seq.block_table) == self.bm.blocks_for(len(seq))
            else:
                seq.token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        """n > 1: a sibling takes a fully computed sequence's blocks (tail copied)."""
        parent = data.draw(st.sampled_from(self.live))
        if parent.num_uncomputed_tokens or not parent.num_computed_tokens:
            return
        if not self.bm.can_fork(parent):
            return
        child = make_seq(parent.token_ids)
        free_before = self.bm.num_free_blocks
        copies = self.bm.fork(parent, child)
        self.kv.copy(copies)
        assert free_before - self.bm.num_free_blocks == len(copies) <= 1
        assert child.num_computed_tokens == parent.num_computed_tokens
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0

    @invariant()
    def books_balance(self):
        self.bm.check_invariants(self.live)
        for seq in self.live:
            self.kv.check(seq)
        assert self.bm.num_used_blocks == len({b for s in self.live for b in s.block_table})

    def teardown(self):
        for seq in self.live:
            self.bm.free(seq)
        self.bm.check_invariants([])
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.usage == 0


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


class NoPrefixCacheMachine(BlockManagerMachine):
    """The same, without prefix caching: forks are then the only way blocks are shared."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=False)
        self.kv = FakeKV(self.bm)


TestNoPrefixCacheMachine = NoPrefixCacheMachine.TestCase
TestNoPrefixCacheMachine.settings = settings(max_examples=40, stateful_step_count=40,
                                             deadline=None)


def test_random_workload_returns_every_block():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=20, block_size=3)
    kv, live = FakeKV(bm), []
    for _ in range(3000):
        op = rng.random()
        if op < 0.3:
            suffix = [rng.randrange(3) for _ in range(rng.randrange(8))]
            seq = make_seq(rng.choice(PREFIXES) + suffix or [0])
            if bm.can_allocate(seq):
                bm.allocate(seq)
                live.append(seq)
        elif op < 0.85 and live:
            seq = rng.choice(live)
            if seq.num_uncomputed_tokens:
                kv.compute(seq, rng.randint(1, seq.num_uncomputed_tokens))
            elif bm.can_append(seq, 1):
                seq.token_ids.append(rng.randrange(3))
                bm.append(seq, 1)
        elif live:
            bm.free(live.pop(rng.randrange(len(live))))
        bm.check_invariants(live)
        for seq in live:
            kv.check(seq)
    assert bm.prefix_cache_hits > 0
    for seq in live:
        bm.free(seq)
    bm.check_invariants([])
    assert bm.num_free_blocks == 20


# ---- targeted cases ----------------------------------------------------------------------------


def computed(bm, tokens):
    seq = make_seq(tokens)
    bm.allocate(seq)
    FakeKV(bm).compute(seq, seq.num_uncomputed_tokens)
    return seq


def test_prefix_hits_count_full_blocks_of_the_shared_prefix():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = computed(bm, list(range(10)))  # blocks [0-3] [4-7] [8,9]
    assert bm.num_cached_blocks == 2  # the partial third block is never keyed
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (2, 0)
    b = make_seq(list(range(8)) + [50, 51, 52])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert (b.num_cached_tokens, b.num_computed_tokens) == (8, 8)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits, bm.prefix_cache_hit_tokens) == (4, 2, 8)
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    # Same tokens at a different position are a different block: no hit.
    c = make_seq([9, 9, 9, 9] + list(range(4, 8)) + [1])
    bm.allocate(c)
    assert c.num_cached_tokens == 0
    bm.check_invariants([a, b, c])


def test_cache_salt_shares_blocks_only_within_one_salt():
    """vLLM's cache_salt: requests of one salt share cached blocks; no block passes between two
    salts, or between a salted request and an unsalted one."""
    bm = BlockManager(num_blocks=32, block_size=4)
    tokens = list(range(9))

    def salted(salt):
        seq = make_seq(tokens)
        seq.sampling_params = SamplingParams(cache_salt=salt)
        return seq

    first = salted("tenant-a")
    bm.allocate(first)
    FakeKV(bm).compute(first, first.num_uncomputed_tokens)
    seqs = [first]
    for salt, hit in (("tenant-a", 8), ("tenant-b", 0), (None, 0)):
        seq = salted(salt)
        bm.allocate(seq)
        assert seq.num_cached_tokens == hit, salt
        seqs.append(seq)
    bm.check_invariants(seqs)
    for bad in ("", "x" * 129, "a/b", "a@b", "a\\b", "a\0b", 7):
        with pytest.raises(ValueError, match="cache_salt"):
            SamplingParams(cache_salt=bad)


def test_fully_cached_prompt_recomputes_its_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = computed(bm, list(range(8)))  # two full blocks, both keyed
    assert bm.num_cached_blocks == 2
    b = make_seq(list(range(8)))
    bm.allocate(b)
    # The block holding the last token is not reused, so it can be written by b alone.
    assert (b.num_cached_tokens, b.num_computed_tokens) == (4, 4)
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    c = make_seq(list(range(9)))
    bm.allocate(c)
    assert c.num_computed_tokens == 8 and c.block_table[:2] == a.block_table
    bm.check_invariants([a, b, c])


def test_can_allocate_counts_cached_blocks_taken_off_the_free_list():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = computed(bm, list(range(8)))
    b = make_seq(list(range(9)))  # needs 3 blocks: 2 shared with live a, 1 new
    assert bm.num_free_blocks == 1 and bm.can_allocate(b)
    bm.free(a)
    assert bm.num_free_blocks == 3 and bm.num_cached_blocks == 2
    big = make_seq(list(range(100, 109)))  # 3 new blocks: evicts both cached ones
    assert bm.can_allocate(big)
    bm.allocate(b)  # 2 cached-but-free blocks + 1 new = the whole pool
    assert b.num_cached_tokens == 8 and bm.num_free_blocks == 0
    assert not bm.can_allocate(make_seq([1]))
    with pytest.raises(RuntimeError):
        bm.allocate(make_seq([1]))
    bm.free(b)
    bm.check_invariants([])


def test_eviction_is_least_recently_freed_and_unkeyed_blocks_go_first():
    bm = BlockManager(num_blocks=5, block_size=2)
    a = computed(bm, [1, 2, 3, 4])
    b = computed(bm, [5, 6, 7, 8])
    a0, a1 = a.block_table
    b0, b1 = b.block_table
    partial = computed(bm, [9])  # its block is never keyed
    p0 = partial.block_table[0]
    bm.free(a)  # a1 then a0: a's tail is the least recently freed
    bm.free(b)
    bm.free(partial)
    assert bm.num_cached_blocks == 4
    order = [make_seq([100 + i, 0]) for i in range(5)]
    taken = []
    for seq in order:
        bm.allocate(seq)
        taken += seq.block_table
    assert taken == [p0, a1, a0, b1, b0]
    assert bm.num_cached_blocks == 0


def test_eviction_keeps_the_shared_prefix_longest():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = computed(bm, [1, 2, 3, 4, 5])  # [1,2] [3,4] [5]
    a0, a1, _ = a.block_table
    bm.free(a)
    x = make_seq([9, 9])
    bm.allocate(x)  # takes the unkeyed free block first (the spare, or a's partial block)
    assert bm.num_cached_blocks == 2
    y = make_seq([8, 8])
    bm.allocate(y)
    assert bm.num_cached_blocks == 2
    z = make_seq([7, 7])
    bm.allocate(z)  # now a keyed block must go: a's tail, not its head
    assert z.block_table == [a1] and bm.num_cached_blocks == 1
    bm.free(x)
    again = make_seq([1, 2, 9])
    bm.allocate(again)
    assert again.num_cached_tokens == 2 and again.block_table[0] == a0


def test_append_grows_only_when_needed_and_raises_when_full():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq([1, 2, 3])
    bm.allocate(seq)
    seq.num_computed_tokens = 3
    bm.append(seq, 1)
    assert len(seq.block_table) == 1
    assert bm.can_append(seq, 5) and not bm.can_append(seq, 6)
    bm.append(seq, 5)
    bm.append(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        bm.append(seq, 6)


def test_can_append_reserve_is_not_offset_by_blocks_the_table_already_holds():
    """A prefill's table covers its whole prompt, more than its next chunk needs: no block is
    missing, and that surplus must not count toward the reserve."""
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(range(12))  # 3 blocks, nothing computed yet
    bm.allocate(seq)
    assert bm.num_free_blocks == 1
    assert bm.can_append(seq, 1, reserve=1)
    assert not bm.can_append(seq, 1, reserve=2)
    assert bm.can_append(seq, 16) and not bm.can_append(seq, 17)


def test_duplicate_blocks_computed_twice_stay_consistent():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = make_seq([1, 2, 3, 4, 5]), make_seq([1, 2, 3, 4, 6])
    bm.allocate(a)
    bm.allocate(b)  # admitted before a computed anything: no hits, separate blocks
    kv = FakeKV(bm)
    kv.compute(a, 5)
    kv.compute(b, 5)
    a_table = list(a.block_table)
    assert bm.num_cached_blocks == 2
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])
    c = make_seq([1, 2, 3, 4, 7])
    bm.allocate(c)
    assert c.block_table[:2] == a_table[:2] and c.num_cached_tokens == 4


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = computed(bm, [1, 2, 3, 4, 5])
    b = make_seq([1, 2, 3, 4, 5])
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    assert bm.num_cached_blocks == 0 and bm.prefix_cache_queries == bm.prefix_cache_hits == 0
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_deferred_free_releases_at_the_next_look():
    """free(defer=True) takes the table at once and releases its blocks (cached, tail first) when
    anything next looks at the free blocks or the counts; the books balance either way."""
    bm = BlockManager(8, 4)
    seq = make_seq(range(10))
    bm.allocate(seq)
    held = list(seq.block_table)
    seq.num_computed_tokens = 10
    bm.mark_computed(seq)
    bm.free(seq, defer=True)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert [bm.blocks[b].ref_count for b in held] == [1, 1, 1]  # not released yet
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    assert [bm.blocks[b].ref_count for b in held] == [0, 0, 0]
    bm.check_invariants([])
    again = make_seq(range(10), "again")  # its two full blocks come back from the cache
    bm.allocate(again)
    assert again.block_table[:2] == held[:2] and again.num_cached_tokens == 8
    bm.check_invariants([again])


def test_used_once_released_counts_shared_blocks_once_without_releasing():
    """A fork shares the parent's full blocks: freeing the parent deferred frees only what the
    child does not hold; the count says so and releases nothing."""
    bm = BlockManager(16, 4)
    parent = make_seq(range(10))
    bm.allocate(parent)
    parent.num_computed_tokens = 10
    child = make_seq(range(10), "child")
    bm.fork(parent, child)  # 2 full blocks shared, the partial third copied
    assert bm.num_used_blocks == 4
    bm.free(parent, defer=True)
    assert bm.num_used_once_released == 3  # the parent's own partial block goes
    assert sum(1 for b in bm.blocks if b.ref_count) == 4  # nothing released yet
    assert bm.num_used_blocks == 3  # releases
    bm.check_invariants([child])


def test_a_recompute_whose_prompt_logprobs_are_all_collected_reuses_its_output_blocks():
    """prompt_logprobs only limit the prefix-cache hits while a prompt position still wants
    its logprob; once all are collected a recompute reuses every full block but the last."""
    bm = BlockManager(16, 4)
    seq = Sequence("r", list(range(13)), 9, SamplingParams(prompt_logprobs=1))
    seq.next_prompt_logprob = 5  # positions 5.. still wanted: logits from position 4 on
    bm.allocate(seq)
    FakeKV(bm).compute(seq, 13)
    bm.free(seq)
    bm.allocate(seq)
    assert seq.num_computed_tokens == 4
    bm.free(seq)
    seq.next_prompt_logprob = 9  # all 8 collected
    bm.allocate(seq)
    assert seq.num_computed_tokens == 12


def test_used_once_released_counts_a_block_every_holder_of_which_was_freed():
    bm = BlockManager(16, 4)
    parent = make_seq(range(10))
    bm.allocate(parent)
    parent.num_computed_tokens = 10
    child = make_seq(range(10), "child")
    bm.fork(parent, child)
    bm.free(parent, defer=True)
    bm.free(child, defer=True)  # the shared blocks' both holders are gone
    assert bm.num_used_once_released == 0
    assert bm.num_used_blocks == 0
