"""The dashboard's view of the engine: block tables, keyed blocks, queues and counters, sent as
a keyframe once and then as changes (floor 1: stdlib only).

A snapshot is a JSON-able dict. Blocks are never listed one by one: a sequence's block table
travels as runs of consecutive block ids (`encode_runs`), and only what changed since the previous
snapshot is sent, so an update stays a few KB with 100k blocks. Everything else the page shows per
block follows from the tables: a block's reference count is the number of tables holding it, it
is free when none does, and a free keyed block is cached and evictable.

    {"v": 7, "kind": "key" | "delta", "t": unix time, "num_blocks": N, "block_size": 16,
     "tables": [[seq_id, offset, runs], ...],  # cut the table to `offset` ids, then append runs
     "drop": [seq_id, ...],                     # tables gone (finished, preempted, aborted)
     "keyed": runs, "unkeyed": runs,            # blocks whose hash became set / unset
     "names": [[seq_id, request_id, index, num_prompt_tokens], ...],  # seqs seen the first time
     "rows": [[seq_id, state, prompt_computed, output_tokens], ...],  # running, then waiting
     "num_waiting": W, "done": [seq_id, ...],   # rows that left since the last snapshot
     "stats": {EngineStats fields...}}

Never text: request ids, counts and block ids only. The tracker costs O(running sequences +
changed blocks) per snapshot, so an engine pays almost nothing for a dashboard watching it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence

WAITING, PREEMPTED, PREFILL, DECODE = 0, 1, 2, 3  # row states
MAX_WAITING_ROWS = 256  # a long queue is summed up by num_waiting


# ---- runs of consecutive block ids ---------------------------------------------------------


def encode_runs(ids: list[int]) -> list[int]:
    """[5, 6, 7, 9, 3, 2] -> [5, 3, 9, 1, 3, -2]: flat (start, count) pairs; a negative count
    runs downwards (the allocator often hands out freed blocks in descending order)."""
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        start, j = ids[i], i + 1
        step = ids[j] - start if j < n and abs(ids[j] - start) == 1 else 1
        while j < n and ids[j] - ids[j - 1] == step:
            j += 1
        out += (start, (j - i) * step)
        i = j
    return out


def decode_runs(runs: list[int]) -> list[int]:
    ids: list[int] = []
    for start, count in zip(runs[::2], runs[1::2], strict=True):
        step = 1 if count > 0 else -1
        ids.extend(range(start, start + count, step))
    return ids


# ---- the engine side ------------------------------------------------------------------------


def _rows(running: list[Sequence], waiting: list[Sequence], ran: set[int]) -> list[list[int]]:
    # Plain attribute reads, no properties: this runs for every running sequence on every update.
    rows = []
    for seq in running:
        n, c, p = len(seq.token_ids), seq.num_computed_tokens, seq.num_prompt_tokens
        rows.append([seq.seq_id, PREFILL if n - c > 1 else DECODE, c if c < p else p, n - p])
    for seq in waiting:
        n, p = len(seq.token_ids), seq.num_prompt_tokens
        state = PREEMPTED if seq.seq_id in ran or n > p else WAITING
        rows.append([seq.seq_id, state, 0, n - p])
    return rows


class Introspector:
    """Turns the scheduler's and block manager's state into snapshots, remembering what it sent.

    `scrub` blocks per snapshot are re-read round-robin: a block that was evicted from the prefix
    cache by a sequence that came and went between two snapshots is in no table the tracker sees,
    so its keyed flag is caught this way, at most num_blocks / scrub snapshots late.
    """

    def __init__(self, block_manager: BlockManager, scrub: int = 1024):
        self.bm = block_manager
        self.scrub = scrub
        self.version = 0
        self._tables: dict[int, tuple[list[int], int, int]] = {}  # seq -> (table, sent, keyed)
        self._keyed: set[int] = set()
        self._named: set[int] = set()  # seqs whose name was sent
        self._ran: set[int] = set()  # seqs seen holding blocks: waiting again means preempted
        self._cursor = 0

    def snapshot(self, running: list[Sequence], waiting, stats: dict,
                 since: int | None = None) -> dict:
        """A keyframe, or the changes since the snapshot numbered `since` when that was the last
        one taken (one consumer follows the deltas; others start from a keyframe it keeps)."""
        is_key = since is None or since != self.version
        if is_key:
            self._tables, self._keyed, self._named = {}, set(), set()
        snap = {"v": self.version + 1, "kind": "key" if is_key else "delta", "t": time.time(),
                "num_blocks": self.bm.num_blocks, "block_size": self.bm.block_size}
        self._blocks(running, snap, is_key)
        self._queues(running, waiting, snap)
        snap["stats"] = stats
        self.version += 1
        return snap

    def _blocks(self, running: list[Sequence], snap: dict, is_key: bool) -> None:
        blocks = self.bm.blocks
        holders = {seq.seq_id: seq for seq in running if seq.block_table}
        check: set[int] = set()  # blocks whose keyed flag may have changed
        drop = []
        for seq_id, (table, _, _) in list(self._tables.items()):
            if seq_id not in holders:
                drop.append(seq_id)
                check.update(table)
                del self._tables[seq_id]
        tables = []
        for seq_id, seq in holders.items():
            self._ran.add(seq_id)
            table = seq.block_table
            old, sent, keyed = self._tables.get(seq_id, (None, 0, 0))
            # free() and allocate() put a new list in place; append() extends the same one.
            if old is not table or len(table) < sent:
                if old is not None:
                    check.update(old)
                sent = keyed = 0
            if len(table) > sent:
                tables.append([seq_id, sent, encode_runs(table[sent:])])
                check.update(table[sent:])
            # Keyed blocks form a prefix of the table (BlockManager.mark_computed).
            while keyed < len(table) and blocks[table[keyed]].hash is not None:
                check.add(table[keyed])
                keyed += 1
            self._tables[seq_id] = (table, len(table), keyed)
        if is_key:
            check = range(self.bm.num_blocks)
        else:
            n, c = self.bm.num_blocks, self._cursor
            check.update(range(c, min(n, c + self.scrub)))
            self._cursor = c + self.scrub if c + self.scrub < n else 0
        added, removed = [], []
        for b in check:
            is_keyed = blocks[b].hash is not None
            if is_keyed != (b in self._keyed):
                (added if is_keyed else removed).append(b)
        self._keyed.update(added)
        self._keyed.difference_update(removed)
        snap.update(tables=tables, drop=drop, keyed=encode_runs(sorted(added)),
                    unkeyed=encode_runs(sorted(removed)))

    def _queues(self, running: list[Sequence], waiting, snap: dict) -> None:
        waiting_shown = list(itertools.islice(waiting, MAX_WAITING_ROWS))
        shown = [*running, *waiting_shown]
        ran = self._ran
        rows = _rows(running, waiting_shown, ran)
        names = [[s.seq_id, s.request_id, s.index, s.num_prompt_tokens] for s in shown
                 if s.seq_id not in self._named]
        now = {row[0] for row in rows}
        snap.update(rows=rows, names=names, num_waiting=len(waiting),
                    done=sorted(self._named - now))
        self._named = now
        if len(ran) > 4 * len(now) + 64:  # forget finished sequences now and then
            self._ran = ran & ({s.seq_id for s in running} | {s.seq_id for s in waiting})


# ---- the viewer side ------------------------------------------------------------------------


@dataclass
class DashboardState:
    """What a viewer knows after applying snapshots in order; the page keeps the same in JS."""

    version: int = 0
    num_blocks: int = 0
    block_size: int = 0
    tables: dict[int, list[int]] = field(default_factory=dict)
    keyed: set[int] = field(default_factory=set)
    names: dict[int, list] = field(default_factory=dict)  # seq_id -> [request_id, index, prompt]
    rows: list[list[int]] = field(default_factory=list)
    num_waiting: int = 0
    stats: dict = field(default_factory=dict)
    t: float = 0.0

    def apply(self, snap: dict) -> None:
        if snap["kind"] == "key":
            self.tables, self.keyed, self.names = {}, set(), {}
        elif snap["v"] != self.version + 1:
            raise ValueError(f"snapshot {snap['v']} is a delta; this state is at {self.version}")
        self.version, self.t = snap["v"], snap["t"]
        self.num_blocks, self.block_size = snap["num_blocks"], snap["block_size"]
        for seq_id in snap["drop"]:
            self.tables.pop(seq_id, None)
        for seq_id, offset, runs in snap["tables"]:
            table = self.tables.setdefault(seq_id, [])
            del table[offset:]
            table += decode_runs(runs)
        self.keyed.update(decode_runs(snap["keyed"]))
        self.keyed.difference_update(decode_runs(snap["unkeyed"]))
        for seq_id, *name in snap["names"]:
            self.names[seq_id] = name
        self.rows, self.num_waiting, self.stats = snap["rows"], snap["num_waiting"], snap["stats"]
        live = {row[0] for row in self.rows}
        for seq_id in [s for s in self.names if s not in live]:
            del self.names[seq_id]

    def keyframe(self) -> dict:
        """This state as one keyframe, for a viewer that joins late."""
        return {"v": self.version, "kind": "key", "t": self.t, "num_blocks": self.num_blocks,
                "block_size": self.block_size,
                "tables": [[s, 0, encode_runs(t)] for s, t in self.tables.items()], "drop": [],
                "keyed": encode_runs(sorted(self.keyed)), "unkeyed": [],
                "names": [[s, *n] for s, n in self.names.items()], "rows": self.rows,
                "num_waiting": self.num_waiting, "done": [], "stats": self.stats}

    def ref_counts(self) -> list[int]:
        refs = [0] * self.num_blocks
        for table in self.tables.values():
            for b in table:
                refs[b] += 1
        return refs

    @property
    def num_used_blocks(self) -> int:
        return sum(1 for r in self.ref_counts() if r)


def full_state(bm: BlockManager, running: list[Sequence]) -> tuple[dict[int, list[int]], set[int]]:
    """The tables and keyed blocks read afresh: what a viewer must hold after every snapshot."""
    tables = {s.seq_id: list(s.block_table) for s in running if s.block_table}
    return tables, {b.block_id for b in bm.blocks if b.hash is not None}
