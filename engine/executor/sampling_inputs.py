"""The sampling settings of a step's rows as SamplingTensors (ops/__init__.py), built on the
host while the forward runs.

A row whose last token is pending (overlapped steps: it sampled in the previous launch and
num_computed_tokens == len(token_ids)) counts that token in its seed step and min_tokens, and
carries its placeholder (step_inputs.placeholder) among its penalties' output ids; the sampler
resolves it on the device from the previous step's sampled ids.
"""

from __future__ import annotations

import numpy as np

from engine.executor.ops import ALLOWED_PAD, SamplingTensors
from engine.executor.penalty_slots import PenaltySlots
from engine.executor.step_inputs import placeholder


def sampling_tensors(seqs: list, vocab_size: int, eos_token_ids: list[int],
                     pending_rows: dict[int, int],
                     slots: PenaltySlots | None = None) -> SamplingTensors:
    """Settings of the rows that sample. `pending_rows`: seq_id -> row of the previous step's
    sampled ids, for the rows whose last token is pending. `slots`: penalties read counts kept
    on the device (count_slots), and only rows whose slot is rebuilt carry their ids."""
    params = [s.sampling_params for s in seqs]
    num_rows = len(seqs)
    # One tuple of settings per row; in a batch they are nearly always all equal (one
    # request's defaults, or a benchmark's), and then each column is one np.full.
    # top_k >= vocab keeps every token: capped so that a huge one fits the int32 column.
    rows = [(p.temperature, min(p.top_k, vocab_size), p.top_p, p.min_p, p.presence_penalty,
             p.frequency_penalty, p.repetition_penalty, p.num_top_logprobs, p.min_tokens,
             bool(p.logit_bias or p.bad_words_token_ids), p.logprob_token_ids is not None,
             p.logprobs == -1,
             p.allowed_token_ids is not None) for p in params]
    if rows.count(rows[0]) == num_rows:
        columns = [np.full(num_rows, v, np.float64) for v in rows[0]]
    else:
        columns = list(np.array(rows, np.float64).T)
    # A value past float32's range (temperature 1e300) becomes inf; the samplers clamp it.
    with np.errstate(over="ignore"):
        f32 = [c.astype(np.float32) for c in columns[:7]]
    try:
        seeds = np.array([s.seed for s in seqs], np.uint64)  # (R,)
    except OverflowError:  # a seed outside [0, 2**64): its low 64 bits
        seeds = np.array([s.seed & 0xFFFFFFFFFFFFFFFF for s in seqs], np.uint64)
    t = SamplingTensors(
        temperature=f32[0],
        top_k=columns[1].astype(np.int32),
        top_p=f32[2],
        min_p=f32[3],
        seeds=seeds,
        steps=np.fromiter((_num_outputs(s) for s in seqs), np.uint32, num_rows),
        presence_penalty=f32[4],
        frequency_penalty=f32[5],
        repetition_penalty=f32[6],
        num_logprobs=int(columns[7].max()),
    )
    uses_penalties = (columns[4] != 0) | (columns[5] != 0) | (columns[6] != 1)  # (R,)
    if uses_penalties.any():
        send = uses_penalties.tolist()  # the rows whose ids go to the device
        assigned = None if slots is None else slots.assign(
            [s.seq_id if u else None for s, u in zip(seqs, send, strict=True)],
            [_num_outputs(s) if u else 0 for s, u in zip(seqs, send, strict=True)])
        if assigned is not None:
            t.count_slots, t.rebuild = assigned
            send = t.rebuild.tolist()
        # Rows without ids to send stay all -1: they cost nothing in the penalty pass.
        t.prompt_ids = _pad([s.prompt_token_ids if u else []
                             for s, u in zip(seqs, send, strict=True)])
        t.output_ids = _pad([_output_ids(s, pending_rows) if u else []
                             for s, u in zip(seqs, send, strict=True)])
    if columns[8].any() or columns[9].any():  # some row has min_tokens or a bias
        biases = [_row_bias(s, eos_token_ids) for s in seqs]
        bans = [_bad_word_bans(s) for s in seqs]  # (after, id) pairs
        if any(biases) or any(bans):
            width = max(len(b) + len(c) for b, c in zip(biases, bans, strict=True))
            t.bias_ids = np.full((num_rows, width), -1, np.int32)  # (R, max_biases)
            t.bias_values = np.zeros((num_rows, width), np.float32)  # (R, max_biases)
            for r, bias in enumerate(biases):
                t.bias_ids[r, : len(bias)] = list(bias.keys())
                t.bias_values[r, : len(bias)] = list(bias.values())
            if any(bans):
                t.bias_after = np.full((num_rows, width), -1, np.int32)  # (R, max_biases)
                t.last_ids = np.array([_last_id(s, pending_rows) for s in seqs], np.int32)
                for r, (bias, ban) in enumerate(zip(biases, bans, strict=True)):
                    if ban:
                        cols = slice(len(bias), len(bias) + len(ban))
                        t.bias_after[r, cols], t.bias_ids[r, cols] = np.array(ban).T
                        t.bias_values[r, cols] = -np.inf
    if columns[10].any():
        which = np.flatnonzero(columns[10])
        t.logprob_rows = which.astype(np.int32)
        t.logprob_ids = _pad([params[r].logprob_token_ids for r in which])
    if columns[11].any():
        t.full_logprob_rows = np.flatnonzero(columns[11]).astype(np.int32)
    if columns[12].any():
        which = np.flatnonzero(columns[12])
        t.allowed_rows = which.astype(np.int32)
        t.allowed_ids = _pad([params[r].allowed_token_ids for r in which], ALLOWED_PAD)
    return t


class DraftRow:
    """Row j of a sequence verifying drafts: the sequence as it would be had it accepted its
    first j drafts. Sampled with that history (penalties, min_tokens) and at that seed step,
    row j draws exactly the token plain decoding would draw there, so greedy and seeded
    requests come out identical with or without speculation."""

    __slots__ = ("num_computed_tokens", "num_prompt_tokens", "request_id", "sampling_params",
                 "seed", "seq_id", "token_ids")

    def __init__(self, seq, j: int):
        self.token_ids = seq.token_ids + seq.spec_token_ids[:j]
        self.num_computed_tokens = len(self.token_ids) - 1  # not pending: the step is synchronous
        self.num_prompt_tokens = seq.num_prompt_tokens
        self.sampling_params, self.seed, self.seq_id = seq.sampling_params, seq.seed, seq.seq_id
        self.request_id = seq.request_id  # a row whose sampling fails names its request

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


def expand_draft_rows(seqs: list, fork_rows: list[int]) -> tuple[list, list[int]]:
    """batch.sampling_rows() with each sequence's k drafts as k more rows after its own (in the
    order of step_inputs' logits rows); forks keep reading their parent's first row."""
    rows, first_row = [], []
    num_base = len(seqs) - len(fork_rows)  # forks come last and never draft
    for seq in seqs[:num_base]:
        first_row.append(len(rows))
        rows.append(seq)
        rows += [DraftRow(seq, j) for j in range(1, len(seq.spec_token_ids) + 1)]
    return rows + seqs[num_base:], [first_row[r] for r in fork_rows]


def _output_ids(seq, pending_rows: dict[int, int]) -> list[int]:
    ids = seq.output_token_ids
    if seq.num_computed_tokens == len(seq.token_ids):  # pending: still on the device
        ids.append(placeholder(pending_rows[seq.seq_id]))
    return ids


def _row_bias(seq, eos_token_ids: list[int]) -> dict[int, float]:
    p = seq.sampling_params
    bias = dict(p.logit_bias)
    if _num_outputs(seq) < p.min_tokens:
        # min_tokens: no token that would end the sequence, whatever ignore_eos says.
        for token_id in (*eos_token_ids, *p.stop_token_ids):
            bias[token_id] = -np.inf
    return bias


def _bad_word_bans(seq) -> list[tuple[int, int]]:
    """(after, id): the row may not draw `id` when its previous token is `after` (-1: always),
    one pair per bad word whose tokens before `after` are the ones the row generated before its
    previous token (vLLM's rule: a word's last token is banned where the output so far ends with
    the rest of it). The previous token itself may still be pending: the sampler compares it."""
    words = seq.sampling_params.bad_words_token_ids
    if not words:
        return []
    # The generated tokens before the previous one: only the last (longest word - 2) matter.
    end = len(seq.token_ids) - (seq.num_computed_tokens < len(seq.token_ids))  # known: not it
    start = max(seq.num_prompt_tokens, end - max(map(len, words)) + 2)
    before = seq.token_ids[start:end] if end > start else []
    bans = []
    for ids in words:
        if len(ids) == 1:
            bans.append((-1, ids[0]))
        elif len(ids) - 2 <= len(before) and before[len(before) - (len(ids) - 2):] == ids[:-2]:
            bans.append((ids[-2], ids[-1]))
    return bans


def _last_id(seq, pending_rows: dict[int, int]) -> int:
    """The row's previous generated token (a placeholder while pending); -1 before any."""
    if seq.num_computed_tokens == len(seq.token_ids):
        return placeholder(pending_rows[seq.seq_id])
    return seq.token_ids[-1] if len(seq.token_ids) > seq.num_prompt_tokens else -1


def _num_outputs(seq) -> int:
    """Tokens the sequence has generated, its pending one included."""
    pending = seq.num_computed_tokens == len(seq.token_ids)
    return len(seq.token_ids) - seq.num_prompt_tokens + pending


def _pad(rows: list[list[int]], pad: int = -1) -> np.ndarray:
    """(R, max(1, longest row)) int32, padded with `pad`."""
    out = np.full((len(rows), max(1, max(len(r) for r in rows))), pad, np.int32)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = ids
    return out
