"""A scheduled batch flattened into the int32 arrays the model reads, with numpy, not per token.

Sequence i of the batch computes seq.token_ids[c : c + n] with c = seq.num_computed_tokens (before
the step) and n = batch.num_new_tokens[i]; it samples iff batch.is_sampling[i]. Python touches each
sequence a few times (its counters, its new tokens); positions, slots and logits rows are array
arithmetic. Block tables are the one per-step input that is big (B x blocks per sequence), so they
are kept as rows of a persistent array and only the blocks a sequence gained are copied.

Overlapped steps: a sequence whose last sampled token is still on the device (pending, see
engine/core/scheduler.py: num_computed_tokens == len(token_ids)) gets a placeholder input id,
`placeholder(row)` = -2 - row, where row is its row in the previous step's sampled ids; the runner
resolves it on the device before the forward (ops.resolve_placeholders). -1 stays free for padding.

Speculative decoding: a sequence with draft tokens (seq.spec_token_ids, batch.num_spec_tokens > 0)
computes its last token followed by its k drafts and samples at all 1 + k of them, so it owns
1 + k consecutive logits rows. Such steps are synchronous: no placeholders.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from engine.executor.ops import AttentionMetadata
from engine.executor.prompt_logprobs import PromptRows, prompt_rows


@dataclass
class StepInputs:
    input_ids: np.ndarray  # (T,) int32
    positions: np.ndarray  # (T,) int32
    logits_indices: np.ndarray  # (R,) int32, rows of the flat batch that sample
    meta: AttentionMetadata  # host arrays
    samples: np.ndarray  # (B,) bool, which sequences sample this step
    num_placeholders: int = 0  # input ids that are rows of the previous step's sampled ids
    prompt: PromptRows | None = None  # rows scoring prompt tokens, read after the sampling rows
    # pack()'s result, made once: rank 0 of a tensor-parallel group sends what it uploads
    _packed: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def is_decode_only(self) -> bool:
        """One new token per sequence, and every sequence samples: what a decode graph runs."""
        return len(self.input_ids) == len(self.samples) == len(self.logits_indices)

    def pack(self) -> tuple[np.ndarray, dict[str, slice]]:
        """Every array in one int32 buffer (for one upload), and where each one sits in it.

        Each array starts on a 32-byte boundary, so a kernel may load it in 16-byte words.
        """
        if self._packed is not None:
            return self._packed
        m = self.meta
        rows = self.logits_indices
        if self.prompt is not None:
            rows = np.concatenate([rows, self.prompt.rows])  # (R + Q,)
        parts = {"input_ids": self.input_ids, "positions": self.positions,
                 "logits_indices": rows, "slot_mapping": m.slot_mapping,
                 "query_start_loc": m.query_start_loc, "context_lens": m.context_lens,
                 "block_tables": m.block_tables.reshape(-1)}
        where, start = {}, 0
        for name, a in parts.items():
            where[name] = slice(start, start + a.size)
            start += -(-a.size // 8) * 8
        flat = np.zeros(start, np.int32)
        for name, a in parts.items():
            flat[where[name]] = a
        self._packed = flat, where
        return self._packed

    def as_decode_rows(self) -> StepInputs | None:
        """This step with every new token as a decode of its own, or None unless every token
        samples (a verify step of decodes and their drafts) with no prompt rows.

        Row t attends to its sequence's keys 0..positions[t] through that sequence's block
        table: causal attention over a sequence's new tokens is one decode per token once the
        step has written their k/v, which the model does before attention. So a verify step
        replays the decode CUDA graph of B * (1 + k) rows (cuda_graph.py) instead of running the
        prefill path eagerly; no row is padded within a sequence, and a sequence that proposed
        fewer drafts simply has fewer rows."""
        num_tokens = len(self.input_ids)
        if (self.prompt is not None or self.num_placeholders
                or len(self.logits_indices) != num_tokens
                or not np.array_equal(self.logits_indices, np.arange(num_tokens))):
            return None
        m = self.meta
        token_seq = np.repeat(np.arange(len(m.context_lens)), np.diff(m.query_start_loc))  # (T,)
        meta = AttentionMetadata(
            slot_mapping=m.slot_mapping,
            query_start_loc=np.arange(num_tokens + 1, dtype=np.int32),
            context_lens=(self.positions + 1).astype(np.int32),
            block_tables=m.block_tables[token_seq],  # (T, width)
            max_query_len=1,
            max_context_len=m.max_context_len,
        )
        return StepInputs(self.input_ids, self.positions, self.logits_indices, meta,
                          np.ones(num_tokens, bool))


@dataclass
class WorkerStep:
    """What tensor-parallel worker ranks need to run rank 0's step (runner.run_worker_step): the
    layout of StepInputs.pack()'s buffer (which travels beside this, as raw int32), and how rank 0
    runs the step."""

    where: dict[str, tuple[int, int]]  # name -> (start, stop) in the packed buffer
    block_tables_shape: tuple[int, int]  # (B, width)
    max_query_len: int
    max_context_len: int
    block_copies: list  # (src, dst) KV blocks to copy first
    use_graph: bool  # rank 0 replays a decode graph (the same graph replays everywhere)
    has_prev: bool  # placeholders read the previous step's sampled ids
    num_rows: int  # sampled rows: the size of the sampled-ids broadcast after the step

    def host_views(self, flat: np.ndarray) -> tuple[dict[str, np.ndarray], AttentionMetadata]:
        """The packed arrays as views of `flat`, and the host attention metadata over them."""
        view = {name: flat[a:b] for name, (a, b) in self.where.items()}
        meta = AttentionMetadata(
            slot_mapping=view["slot_mapping"], query_start_loc=view["query_start_loc"],
            context_lens=view["context_lens"],
            block_tables=view["block_tables"].reshape(self.block_tables_shape),
            max_query_len=self.max_query_len, max_context_len=self.max_context_len)
        return view, meta


class HostBlockTables:
    """The block tables of recent sequences as rows of one (rows, max_blocks) int32 array.

    A sequence's block_table only grows in place (BlockManager.append) or is replaced by a new list
    (allocate, free), so a row stays valid while it mirrors the same list object: each step copies
    just the entries appended since. Rows past a table's end hold -1.
    """

    def __init__(self, num_rows: int, max_blocks: int):
        self.rows = np.full((num_rows, max(1, max_blocks)), -1, np.int32)  # (rows, max_blocks)
        self._entries: dict[int, list] = {}  # seq_id -> [row, table (the list object), copied]
        self._free = list(range(num_rows - 1, -1, -1))

    def gather(self, seqs: list, width: int) -> np.ndarray:
        """(B, width) int32: the first `width` blocks of each sequence, padded with -1."""
        if width > self.rows.shape[1]:
            grown = np.full((len(self.rows), width), -1, np.int32)
            grown[:, : self.rows.shape[1]] = self.rows
            self.rows = grown
        rows, entries = self.rows, self._entries
        index = []  # row of each sequence
        for seq in seqs:
            table = seq.block_table
            num_blocks = len(table)
            entry = entries.get(seq.seq_id)
            if entry is None or entry[1] is not table or entry[2] > num_blocks:
                entry = self._assign(seq, seqs)
            copied = entry[2]
            if copied < num_blocks:
                n = min(num_blocks, rows.shape[1])
                rows[entry[0], copied:n] = table[copied:n]
                entry[2] = n
            index.append(entry[0])
        return rows[index, :width]

    def _assign(self, seq, batch_seqs: list) -> list:
        old = self._entries.pop(seq.seq_id, None)
        if old is not None:
            self._free.append(old[0])
        if not self._free:
            # Forget every sequence outside this batch: finished or waiting ones cost a re-copy
            # at most. A batch never holds more sequences than half the rows.
            keep = {s.seq_id for s in batch_seqs}
            for seq_id in [k for k in self._entries if k not in keep]:
                self._free.append(self._entries.pop(seq_id)[0])
        row = self._free.pop()
        self.rows[row] = -1
        entry = self._entries[seq.seq_id] = [row, seq.block_table, 0]
        return entry


def placeholder(row: int) -> int:
    """The input id standing for row `row` of the previous step's sampled ids."""
    return -2 - row


def build_step_inputs(batch, block_size: int, tables: HostBlockTables,
                      pending_rows: dict[int, int] | None = None,
                      vocab_size: int = 0) -> StepInputs:
    """`pending_rows`: seq_id -> row in the previous step's sampled ids, for the sequences of the
    batch whose last token is pending (none in a synchronous loop). `vocab_size`: the top-k
    width of prompt_logprobs=-1."""
    seqs, num_new = batch.seqs, batch.num_new_tokens
    num_seqs = len(seqs)
    computed = np.fromiter((s.num_computed_tokens for s in seqs), np.int32, num_seqs)  # (B,)
    lengths = np.fromiter((len(s.token_ids) for s in seqs), np.int32, num_seqs)  # (B,)
    pending = computed == lengths  # (B,) the token to compute is still on the device
    num_placeholders = int(pending.sum())
    new = np.asarray(num_new, np.int32)  # (B,)
    context_lens = computed + new  # (B,)
    query_start_loc = np.zeros(num_seqs + 1, np.int32)  # (B+1,)
    np.cumsum(new, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    if num_tokens == num_seqs:  # one token each: decodes (or 1-token prefill chunks)
        if num_placeholders:
            rows = pending_rows or {}
            input_ids = np.fromiter(
                (s.token_ids[c] if c < len(s.token_ids) else placeholder(rows[s.seq_id])
                 for s, c in zip(seqs, computed.tolist(), strict=True)), np.int32, num_seqs)
        else:
            input_ids = np.fromiter((s.token_ids[s.num_computed_tokens] for s in seqs),
                                    np.int32, num_seqs)  # (T,)
        positions = computed
        token_seq = np.arange(num_seqs)  # (T,) sequence of each token
    else:
        chunks = (s.token_ids[c : c + n] + s.spec_token_ids if s.spec_token_ids
                  else s.token_ids[c : c + n]
                  for s, c, n in zip(seqs, computed.tolist(), num_new, strict=True))
        input_ids = np.fromiter(itertools.chain.from_iterable(chunks), np.int32,
                                num_tokens - num_placeholders)
        if num_placeholders:  # only decodes are pending: one placeholder at their single slot
            rows = pending_rows or {}
            at = query_start_loc[:-1][pending]  # (P,) flat index of each pending token
            values = [placeholder(rows[s.seq_id]) for s, p in zip(seqs, pending.tolist(),
                                                                  strict=True) if p]
            input_ids = np.insert(input_ids, at - np.arange(len(at)), values).astype(np.int32)
        token_seq = np.repeat(np.arange(num_seqs), new)
        positions = (np.arange(num_tokens, dtype=np.int32)
                     - (query_start_loc[:-1] - computed)[token_seq])  # (T,)
    width = int(-(-context_lens.max() // block_size))
    block_tables = tables.gather(seqs, width)  # (B, width)
    slot_mapping = (block_tables[token_seq, positions // block_size] * block_size
                    + positions % block_size).astype(np.int32, copy=False)  # (T,)
    samples = np.array(batch.is_sampling, bool)  # (B,)
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        context_lens=context_lens,
        block_tables=block_tables,
        max_query_len=int(new.max()),
        max_context_len=int(context_lens.max()),
    )
    if batch.num_spec_tokens:
        logits_indices = _spec_logits_indices(seqs, samples, query_start_loc)
    else:
        logits_indices = (query_start_loc[1:] - 1)[samples]  # (R,)
    # Prompt-logprob rows come after every sampling row, the draft rows included.
    return StepInputs(input_ids, positions, logits_indices, meta, samples, num_placeholders,
                      prompt_rows(seqs, num_new, query_start_loc, vocab_size))


def _spec_logits_indices(seqs: list, samples: np.ndarray, query_start_loc: np.ndarray
                         ) -> np.ndarray:
    """(R,) int32: the last 1 + k rows of each sampling sequence with k drafts."""
    num_drafts = np.fromiter((len(s.spec_token_ids) for s in seqs), np.int32, len(seqs))  # (B,)
    counts = np.where(samples, 1 + num_drafts, 0)  # (B,) logits rows per sequence
    owner = np.repeat(np.arange(len(seqs)), counts)  # (R,)
    first_row = np.cumsum(counts) - counts  # (B,)
    offset = np.arange(len(owner)) - first_row[owner]  # (R,) 0..k within its sequence
    return (query_start_loc[1:][owner] - counts[owner] + offset).astype(np.int32)
