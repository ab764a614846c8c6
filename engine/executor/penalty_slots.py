"""Which slot of the token-count table (ops.alloc_token_counts) each sequence with penalties
owns, and whether that slot still holds exactly the sequence's tokens.

The sampler adds every drawn token to its row's slot on the device, so while a sequence decodes
the host uploads nothing for its penalties (before, every step rebuilt each row's counts from
the prompt and output ids). The host cannot read the table; per sequence it keeps how many output
tokens the slot holds if every draw was kept (`counted`). A row is rebuilt from the host's token
lists when that differs from the sequence's outputs, its pending token included: a new sequence or
fork, a slot taken by another sequence, a draw that did not happen (a failed step). A step that
sends ids instead (speculation: a sequence on several rows) leaves the slots as they are, and so
does `counted`: the next step finds the outputs grown and rebuilds.
Finished and aborted sequences need no call: their slots return to the pool when a batch needs
them, and whoever takes a slot rebuilds it first.
"""

from __future__ import annotations

import numpy as np


class PenaltySlots:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._entries: dict[int, list[int]] = {}  # seq_id -> [slot, counted]
        self._free = list(range(num_slots - 1, -1, -1))

    def assign(self, seq_ids: list, num_outputs: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """(slots (R,) int32, rebuild (R,) bool) for a step's sampling rows: seq_ids[r] None for a
        row without penalties (slot -1). Every row given a slot draws one token into it this step.
        None when the rows need more slots than the table has (the caller then sends ids)."""
        wanted = [i for i in seq_ids if i is not None]
        if len(wanted) > self.num_slots or len(set(wanted)) != len(wanted):
            return None  # a sequence on two rows (speculation) cannot share one slot either
        in_batch = set(wanted)
        slots = np.full(len(seq_ids), -1, np.int32)
        rebuild = np.zeros(len(seq_ids), bool)
        for r, (seq_id, n) in enumerate(zip(seq_ids, num_outputs, strict=True)):
            if seq_id is None:
                continue
            entry = self._entries.get(seq_id)
            if entry is None:
                entry = self._entries[seq_id] = [self._take(in_batch), -1]
            rebuild[r] = entry[1] != n
            slots[r] = entry[0]
            entry[1] = n + 1  # this step's draw
        return slots, rebuild

    def forget(self, seq_ids) -> None:
        """Free these sequences' slots (_take: every sequence outside the batch, once no slot is
        free), so their next use rebuilds."""
        for seq_id in seq_ids:
            entry = self._entries.pop(seq_id, None)
            if entry is not None:
                self._free.append(entry[0])

    def _take(self, in_batch: set) -> int:
        if not self._free:  # every sequence outside this batch gives its slot back
            self.forget([s for s in self._entries if s not in in_batch])
        return self._free.pop()

    def check_invariants(self) -> None:
        owned = [e[0] for e in self._entries.values()]
        assert len(set(owned)) == len(owned), "a slot owned twice"
        assert not set(owned) & set(self._free), "a slot both owned and free"
        assert len(owned) + len(self._free) == self.num_slots, "a slot lost"
