"""N-gram proposals for speculative decoding (prompt lookup): copy what followed the last time
the sequence's recent tokens occurred.

For a sequence a[0 .. L-1], find the longest n in [prompt_lookup_min, prompt_lookup_max] such
that the suffix a[L-n:] occurred earlier, ending at some j < L-1; propose a[j+1 : j+1+k]. Of
several occurrences of that longest n-gram, the most recent wins (the nearest context is the
likeliest to continue the same way).

Vectorized: one comparison of the whole history with the last token gives every candidate end
j; each longer n keeps the candidates whose token n-1 places back matches too (at most
prompt_lookup_max small steps). Histories live in per-sequence numpy buffers that only grow by the
tokens appended since the last step, so a step never re-converts a long prompt.
"""

from __future__ import annotations

import numpy as np

from engine.model.config import SpeculativeConfig


class NgramProposer:
    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._history: dict[int, tuple[np.ndarray, int]] = {}  # seq_id -> (buffer, length)

    def propose(self, seqs: list) -> list[list[int]]:
        """Draft tokens for each sequence (possibly none); forgets sequences not passed."""
        drafts = [self.propose_ids(self._array(seq)) for seq in seqs]
        if len(self._history) > len(seqs):
            live = {seq.seq_id for seq in seqs}
            for seq_id in [s for s in self._history if s not in live]:
                del self._history[seq_id]
        return drafts

    def propose_ids(self, a: np.ndarray) -> list[int]:
        """Draft for the token history `a` (L,) int32."""
        last = len(a) - 1
        if last < self.min_n:  # no earlier occurrence of a min_n-gram can leave a token after
            return []
        ends = np.flatnonzero(a[:last] == a[last])  # (C,) where a 1-gram match ends
        n = 1
        while n < self.max_n and n < last:
            room = ends[ends >= n]  # (C',) candidates with a token n places back
            longer = room[a[room - n] == a[last - n]]
            if not len(longer):
                break
            ends, n = longer, n + 1
        if n < self.min_n or not len(ends):  # too short, or not even the last token matched
            return []
        start = int(ends[-1]) + 1
        return a[start : start + self.k].tolist()

    def _array(self, seq) -> np.ndarray:
        """The sequence's tokens as an int32 array, appending only what is new since last time."""
        tokens = seq.token_ids
        buf, length = self._history.get(seq.seq_id, (None, 0))
        if buf is None or len(tokens) > len(buf) or length > len(tokens):
            grown = np.empty(max(64, 2 * len(tokens)), np.int32)
            if buf is not None and length <= len(tokens):
                grown[:length] = buf[:length]
            else:
                length = 0
            buf = grown
        if length < len(tokens):
            buf[length : len(tokens)] = tokens[length:]
        self._history[seq.seq_id] = (buf, len(tokens))
        return buf[: len(tokens)]
