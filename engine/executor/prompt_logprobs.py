"""Logprobs of prompt tokens (SamplingParams.prompt_logprobs): scoring a text.

Only the sequences that ask get extra logits rows, and only for the prompt positions in this
step's chunk: the logit row at position j scores prompt token j + 1. Those rows ride after the
sampling rows in the forward's logits_indices, so no other row's full-vocabulary logits are
kept. Their log-softmax and top-k are taken on the host when the step's result is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PromptRows:
    rows: np.ndarray  # (Q,) int32, flat token index of each scored position
    targets: np.ndarray  # (Q,) int32, the prompt token each row scores
    spans: list[tuple[object, int, int]]  # (sequence, first scored prompt position, count)
    num_top: int  # top-k width: the largest prompt_logprobs among the spans' sequences


def _num_top(seq, vocab_size: int) -> int:
    k = seq.sampling_params.prompt_logprobs
    return vocab_size if k == -1 else k


def prompt_rows(seqs: list, num_new: list[int], query_start_loc: np.ndarray,
                vocab_size: int) -> PromptRows | None:
    """The rows of this step that score prompt tokens; None when no sequence asks."""
    rows, targets, spans, num_top = [], [], [], 0
    for i, seq in enumerate(seqs):
        if not seq.wants_prompt_logprobs:
            continue
        c = seq.num_computed_tokens
        first = max(c, seq.next_prompt_logprob - 1)  # position whose logits score token first+1
        end = min(c + num_new[i], seq.num_prompt_tokens - 1)
        if first >= end:
            continue
        start = int(query_start_loc[i]) + first - c
        rows.append(np.arange(start, start + end - first, dtype=np.int32))
        targets.append(seq.token_ids[first + 1 : end + 1])
        spans.append((seq, first + 1, end - first))
        num_top = max(num_top, _num_top(seq, vocab_size))
    if not spans:
        return None
    return PromptRows(np.concatenate(rows), np.array(sum(targets, []), np.int32), spans, num_top)


@dataclass
class PromptLogprobs:
    """One sequence's scored prompt positions from one step."""

    seq: object
    start: int  # the prompt position of the first entry
    # per position {top-k token: logprob, ..., then the prompt token's}
    entries: list[dict[int, float]]
    ranks: list[int]  # per position the prompt token's rank in the vocabulary (1: the best)


class PendingPromptLogprobs:
    """The prompt rows' logits, still where the forward left them (the device on cuda) until
    the step's result is read."""

    def __init__(self, ops, logits, prompt: PromptRows):
        self.ops, self.logits, self.prompt = ops, logits, prompt  # logits (Q, vocab)

    def wait(self) -> list[PromptLogprobs]:
        p = self.prompt
        logits = np.asarray(self.ops.to_host(self.logits), np.float32)  # (Q, vocab)
        shifted = logits - logits.max(axis=1, keepdims=True)
        lp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (Q, vocab)
        chosen_lp = lp[np.arange(len(lp)), p.targets]  # (Q,)
        chosen = chosen_lp.tolist()
        ranks = prompt_ranks(lp, chosen_lp)
        k = min(p.num_top, lp.shape[1])
        if k:
            top_ids_l = [top_ids(row, k) for row in lp]  # per position k ids, best first
            top_lps_l = [row[ids].tolist() for row, ids in zip(lp, top_ids_l, strict=True)]
        out, q = [], 0
        targets = p.targets.tolist()
        for seq, start, count in p.spans:
            want = _num_top(seq, lp.shape[1])
            entries = []
            for r in range(q, q + count):
                entry = dict(zip(top_ids_l[r][:want], top_lps_l[r][:want], strict=True)) \
                    if want else {}
                entry[targets[r]] = chosen[r]
                entries.append(entry)
            out.append(PromptLogprobs(seq, start, entries, ranks[q : q + count]))
            q += count
        return out


def prompt_ranks(lp: np.ndarray, chosen_lp: np.ndarray) -> list[int]:
    """vLLM's rank of each row's prompt token: how many tokens score at least as high as it,
    itself included (1: the best; a token tied with others comes after them all). In slices of
    rows: a (Q, vocab) mask is big."""
    return np.concatenate([(lp[i : i + 256] >= chosen_lp[i : i + 256, None]).sum(axis=1)
                           for i in range(0, len(lp), 256)]).tolist()


def top_ids(row: np.ndarray, k: int) -> list[int]:
    """The k ids of the largest logprobs of `row` (vocab,), best first and the lowest id among
    equals, as the sampler orders its top-k: scoring a text lists the same ids generating it
    did. (argpartition alone picks tied ids at the k-th place in no fixed order.)"""
    key = np.where(np.isnan(row), -np.inf, row)
    kth = np.partition(key, len(key) - k)[len(key) - k]  # the k-th largest value
    ids = np.flatnonzero(key >= kth)  # ascending: a stable sort keeps ties lowest id first
    return ids[np.argsort(-key[ids], kind="stable")][:k].tolist()
