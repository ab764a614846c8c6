"""KV-cache blocks: the free list, reference counts and the prefix cache (floor 1: stdlib only).

The KV cache is `num_blocks` blocks of `block_size` token slots. A sequence's `block_table` lists
the blocks holding its tokens in order; token t lives in slot t % block_size of block
block_table[t // block_size]. Block tables stay plain int lists here; the runner uploads them.

Prefix caching: once every token of a full block is computed, the block is keyed by a hash chained
over all tokens from the start of the sequence to the block's end, so equal keys mean equal
prefixes (and therefore equal k/v). A new sequence reuses the longest run of keyed blocks from its
start; a reused block is shared (its reference count goes up) and is never written again, since
all writes land after the cached prefix. A request's n sequences share their prompt the same
way: the siblings fork from the first once its prompt is computed (`fork`). Freed keyed blocks
stay findable until the allocator needs them: it takes the least recently freed block first
(LRU), and unkeyed free blocks before any keyed one, so cached prefixes survive the longest.
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass

from engine.core.sequence import Sequence


def hash_block(parent: int, token_ids: list[int]) -> int:
    """Key of a full block: its tokens chained onto its parent block's key (root_key for the first).

    NOTE: 128-bit blake2b, so a collision (which would silently reuse wrong k/v) is negligible
    and lookups need not compare tokens. Python's hash() is 64-bit and salted for str; not used.
    """
    h = hashlib.blake2b(parent.to_bytes(16, "little"), digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def root_key(seq: Sequence) -> int:
    """The key the first block's chains onto: 0, or one of the request's cache_salt (vLLM's), so
    that only requests of the same salt share cached blocks."""
    salt = seq.sampling_params.cache_salt
    return _salt_key(salt) if salt else 0


@functools.lru_cache(maxsize=1024)
def _salt_key(salt: str) -> int:
    digest = hashlib.blake2b(b"cache_salt\0" + salt.encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


@dataclass
class Block:
    block_id: int
    ref_count: int = 0  # live sequences whose block table holds this block
    hash: int | None = None  # key of its full, computed contents; None while partial


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, in eviction order: the front is handed out next.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block key -> id of the block holding those k/v
        self.prefix_cache_queries = 0  # reusable full blocks looked up at admission
        self.prefix_cache_hits = 0  # of those, found in the cache
        self.prefix_cache_hit_tokens = 0
        # the tables free(defer=True) took, their blocks not yet released (settle)
        self._unreleased: list[list[int]] = []

    # ---- stats -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached or not): what can still be allocated."""
        self.settle()
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        self.settle()
        return self.num_blocks - len(self._free)

    @property
    def num_used_once_released(self) -> int:
        """num_used_blocks without releasing anything: the blocks the unreleased tables would
        free are counted off (a count over their blocks, several times cheaper than the release;
        what the engine core reports while a step's outputs are on their way)."""
        held = self.num_blocks - len(self._free)
        if not self._unreleased:
            return held
        drops = Counter(b for table in self._unreleased for b in table)
        blocks = self.blocks
        return held - sum(1 for b, n in drops.items() if blocks[b].ref_count == n)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by key, in use or free."""
        self.settle()
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission ---------------------------------------------------------------------------

    def _num_reusable_blocks(self, seq: Sequence) -> int:
        # The block holding the last token is never reused, even when cached: that token must be
        # recomputed to produce logits, and its block would then be written while shared.
        if not self.enable_prefix_caching:
            return 0
        num_tokens = len(seq.token_ids)
        if seq.wants_prompt_logprobs:
            # The logits of the position before each wanted prompt token must be computed.
            num_tokens = seq.next_prompt_logprob
        return (num_tokens - 1) // self.block_size

    def created_cache_tokens(self, seq: Sequence) -> int:
        """Prompt tokens `seq` wrote to the prefix cache: those of its prompt's full blocks,
        keyed once computed, that it did not find there (vLLM's created_cache_tokens)."""
        if not self.enable_prefix_caching:
            return 0
        keyed = seq.num_prompt_tokens // self.block_size * self.block_size
        return max(0, keyed - seq.num_cached_tokens)

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks covering the longest reusable prefix of `seq`."""
        self.settle()
        hits, key, bs = [], root_key(seq), self.block_size
        for i in range(self._num_reusable_blocks(seq)):
            key = hash_block(key, seq.token_ids[i * bs : (i + 1) * bs])
            block_id = self._cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _admission_cost(self, seq: Sequence, hits: list[int]) -> int:
        """Free blocks that admitting `seq` takes: new blocks plus the hits now on the free list."""
        num_new = self.blocks_for(len(seq.token_ids)) - len(hits)
        return num_new + sum(1 for b in hits if self.blocks[b].ref_count == 0)

    def can_allocate(self, seq: Sequence) -> bool:
        return self._admission_cost(seq, self._match_prefix(seq)) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, reusing its cached prefix.

        Sets block_table and num_computed_tokens (the hits' tokens, always < len(seq) because
        the last token's block is never a hit), and at the first admission num_cached_tokens.
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        hits = self._match_prefix(seq)
        cost = self._admission_cost(seq, hits)
        if cost > len(self._free):
            raise RuntimeError(f"allocate needs {cost} free blocks, {len(self._free)} left")
        self.prefix_cache_queries += self._num_reusable_blocks(seq)
        self.prefix_cache_hits += len(hits)
        self.prefix_cache_hit_tokens += len(hits) * self.block_size
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        num_new = self.blocks_for(len(seq.token_ids)) - len(hits)
        seq.block_table = hits + [self._take_free() for _ in range(num_new)]
        if not seq.admitted:  # a recompute's hits are (mostly) the blocks it wrote itself
            seq.num_cached_tokens = len(hits) * self.block_size
            seq.admitted = True
        seq.num_computed_tokens = len(hits) * self.block_size

    # ---- growth ------------------------------------------------------------------------------

    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int = 1, reserve: int = 0) -> bool:
        """Whether append(seq, num_new_tokens) would leave `reserve` free blocks or more."""
        self.settle()
        return self._num_missing_blocks(seq, num_new_tokens) + reserve <= len(self._free)

    def append(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Grow the block table to cover num_computed_tokens + num_new_tokens (no-op if it does)."""
        self.settle()
        missing = self._num_missing_blocks(seq, num_new_tokens)
        if missing > len(self._free):
            raise RuntimeError(f"append needs {missing} free blocks, {len(self._free)} left")
        seq.block_table.extend(self._take_free() for _ in range(missing))

    def truncate(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Roll `seq` back to its first `num_computed_tokens` computed tokens (speculative
        decoding: the k/v of rejected drafts are garbage) and free the blocks past them. Those
        blocks were taken this step and never keyed; a kept block's stale slots are rewritten
        before anything reads them. The table becomes a new list, so the runner's mirror of it
        (step_inputs.HostBlockTables) copies it afresh."""
        if not 0 <= num_computed_tokens <= seq.num_computed_tokens:
            raise ValueError(f"cannot truncate sequence {seq.seq_id} from "
                             f"{seq.num_computed_tokens} to {num_computed_tokens} tokens")
        keep = self.blocks_for(num_computed_tokens)
        table = seq.block_table
        if keep < len(table):
            for block_id in reversed(table[keep:]):
                block = self.blocks[block_id]
                if block.hash is not None:
                    raise RuntimeError(f"truncate would drop keyed block {block_id}")
                block.ref_count -= 1
                if block.ref_count == 0:
                    self._release(block)
            seq.block_table = table[:keep]
        seq.num_computed_tokens = num_computed_tokens

    def mark_computed(self, seq: Sequence) -> None:
        """Key the full blocks whose every token is now computed, making them findable."""
        if not self.enable_prefix_caching:
            return
        bs, table = self.block_size, seq.block_table
        num_full = min(seq.num_computed_tokens // bs, len(table))
        # Keyed blocks form a prefix of the table: walk back to its end, then key forward.
        first = num_full
        while first > 0 and self.blocks[table[first - 1]].hash is None:
            first -= 1
        key = self.blocks[table[first - 1]].hash if first else root_key(seq)
        for i in range(first, num_full):
            key = hash_block(key, seq.token_ids[i * bs : (i + 1) * bs])
            self.blocks[table[i]].hash = key
            # Another sequence may have computed the same block first; keep its copy findable.
            self._cached.setdefault(key, table[i])

    # ---- forks (n > 1) ------------------------------------------------------------------------

    def _fork_cost(self, parent: Sequence) -> int:
        return 1 if parent.num_computed_tokens % self.block_size else 0

    def can_fork(self, parent: Sequence) -> bool:
        self.settle()
        return self._fork_cost(parent) <= len(self._free)

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Give `child` (same tokens, no blocks) the parent's computed tokens: the full blocks are
        shared, the partial last block is copied into a block of its own, since both will write
        after it. Returns the (src, dst) block copies the KV cache must make before either
        sequence next writes."""
        self.settle()
        if child.block_table:
            raise RuntimeError(f"sequence {child.seq_id} already holds blocks")
        cost = self._fork_cost(parent)
        if cost > len(self._free):
            raise RuntimeError(f"fork needs {cost} free blocks, {len(self._free)} left")
        num_full = parent.num_computed_tokens // self.block_size
        shared = parent.block_table[:num_full]
        for block_id in shared:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(shared)
        copies = []
        if cost:
            dst = self._take_free()
            child.block_table.append(dst)
            copies.append((parent.block_table[num_full], dst))
        child.num_computed_tokens = parent.num_computed_tokens
        return copies

    # ---- release -----------------------------------------------------------------------------

    def free(self, seq: Sequence, defer: bool = False) -> None:
        """Drop `seq`'s blocks, tail first, so the shared prefix stays cached the longest.
        defer: only take its table now; the blocks are released by the next call that looks at
        the free blocks or the counts (settle). A sequence that a step's tokens end is freed so:
        at a 32k-token context the release is a Python loop of ~2 ms, which would otherwise
        hold back that step's outputs (its last token)."""
        if defer:
            self._unreleased.append(seq.block_table)
        else:
            self.settle()
            self._release_table(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _release_table(self, table: list[int]) -> None:
        for block_id in reversed(table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._release(block)

    def settle(self) -> None:
        """Release the blocks of the tables free(defer=True) took, in the order it took them
        (every look at the free blocks or the counts does; the engine core too, once a step's
        outputs are out)."""
        if self._unreleased:
            tables, self._unreleased = self._unreleased, []
            for table in tables:
                self._release_table(table)

    def _release(self, block: Block) -> None:
        if block.hash is not None and self._cached.setdefault(block.hash, block.block_id) != (
            block.block_id
        ):
            block.hash = None  # a duplicate of a block that is already findable: nothing to keep
        self._free[block.block_id] = None
        if block.hash is None:  # holds nothing findable: hand it out before any cached block
            self._free.move_to_end(block.block_id, last=False)

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict it from the prefix cache
            del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    # ---- checks ------------------------------------------------------------------------------

    def check_invariants(self, live_seqs: list[Sequence]) -> None:
        """Raise AssertionError if the books disagree with the block tables of `live_seqs`."""
        self.settle()
        holders = [0] * self.num_blocks
        full_for_all = [True] * self.num_blocks  # computed to its end in every table holding it
        bs = self.block_size
        for seq in live_seqs:
            key = root_key(seq)
            num_full = seq.num_computed_tokens // bs
            for i, block_id in enumerate(seq.block_table):
                holders[block_id] += 1
                full_for_all[block_id] &= i < num_full
                if self.blocks[block_id].hash is not None:  # its key must match seq's tokens
                    key = hash_block(key, seq.token_ids[i * bs : (i + 1) * bs])
                    assert self.blocks[block_id].hash == key, f"block {block_id}: wrong key"
        for block in self.blocks:
            b, ref = block.block_id, block.ref_count
            assert block.ref_count == holders[b], f"block {b}: ref {ref} != {holders[b]}"
            assert (block.ref_count == 0) == (b in self._free), f"block {b}: free list disagrees"
            if block.ref_count > 1:  # shared (a prefix-cache hit or a fork): never written again
                assert full_for_all[b], f"block {b} is shared but some holder still writes it"
            if block.ref_count == 0 and block.hash is not None:
                assert self._cached.get(block.hash) == b, f"free keyed block {b} is not findable"
        assert len(self._free) == sum(1 for h in holders if h == 0)
        for key, b in self._cached.items():
            assert self.blocks[b].hash == key, f"cache maps a key to block {b} with another key"
