"""Reference sampler: the exact semantics of SamplingTensors (ops/__init__.py) in numpy.

The cuda sampling kernel computes the same function; its tests compare against `sample` here.
"""

from __future__ import annotations

import numpy as np

from engine.executor.ops import ALLOWED_PAD, SamplerOutput, SamplingTensors

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
FLT_MIN = np.finfo(np.float32).tiny
FLT_MAX = np.finfo(np.float32).max


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective scramble of 64-bit integers (uint64 arrays wrap)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """One float32 in [0, 1) per (seed, step): 24 random bits, so exact in float32."""
    with np.errstate(over="ignore"):
        key = mix64(seeds) + np.asarray(steps, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    bits = mix64(key) >> np.uint64(40)
    return bits.astype(np.float32) * np.float32(2.0**-24)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    # A row a grammar masked whole (a dead end) is all -inf: its logprobs are NaN, and its
    # sequence fails on the grammar's verdict; numpy need not warn about it.
    with np.errstate(invalid="ignore"):
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# A count word: how often the token was drawn (low 30 bits) and whether the prompt holds it.
PROMPT_BIT = 1 << 30
COUNT_MASK = PROMPT_BIT - 1


class TokenCounts:
    """Per-sequence token counts kept between steps (the table a SamplingTensors' count_slots
    index): (num_slots, vocab) int32 count words. The cuda backend keeps the same table on the
    device, plus a bitmap of the non-zero words."""

    def __init__(self, num_slots: int, vocab: int):
        self.table = np.zeros((num_slots, vocab), np.int32)  # (S, vocab)


def count_words(prompt_ids: np.ndarray | None, output_ids: np.ndarray | None, num_rows: int,
                vocab: int) -> np.ndarray:
    """(R, vocab) int32 count words of rows of token ids padded with -1 (ids past vocab are
    ignored, as the cuda kernel does)."""
    words = np.zeros((num_rows, vocab), np.int32)
    for r in range(num_rows):
        if output_ids is not None:
            out = output_ids[r]
            words[r] = np.bincount(out[(out >= 0) & (out < vocab)], minlength=vocab)
        if prompt_ids is not None:
            prompt = prompt_ids[r]
            words[r, prompt[(prompt >= 0) & (prompt < vocab)]] |= PROMPT_BIT
    return words


def penalty_words(t: SamplingTensors, vocab: int) -> np.ndarray:
    """(R, vocab) count words each row's penalties read. With count_slots: the `rebuild` rows'
    slots are reset from their ids first (the table changes)."""
    num_rows = len(t.temperature)
    if t.count_slots is None:
        return count_words(t.prompt_ids, t.output_ids, num_rows, vocab)
    counts = t.count_table
    if not isinstance(counts, TokenCounts):
        raise ValueError(f"SamplingTensors.count_slots need a TokenCounts count_table, got "
                         f"{type(counts).__name__}")
    slots = np.asarray(t.count_slots)
    used = slots[slots >= 0]
    if len(np.unique(used)) != len(used):
        raise ValueError(f"count_slots: a slot is used by two rows ({slots.tolist()})")
    rebuild = np.flatnonzero(t.rebuild & (slots >= 0)) if t.rebuild is not None else []
    if len(rebuild):
        counts.table[slots[rebuild]] = count_words(
            None if t.prompt_ids is None else t.prompt_ids[rebuild],
            None if t.output_ids is None else t.output_ids[rebuild], len(rebuild), vocab)
    return np.where((slots >= 0)[:, None], counts.table[np.maximum(slots, 0)], 0)


def add_drawn(counts: TokenCounts, slots: np.ndarray, token_ids: np.ndarray) -> None:
    """Each row with a slot counts the token it drew."""
    rows = np.flatnonzero(slots >= 0)
    counts.table[slots[rows], token_ids[rows]] += 1


def apply_penalties(logits: np.ndarray, t: SamplingTensors, words: np.ndarray) -> np.ndarray:
    """vLLM's penalties: repetition over prompt+output tokens, frequency/presence over output,
    from each row's count words (words != 0: seen; words & COUNT_MASK: drawn so often).

    NOTE: a repetition penalty of 1e-50 is 0 in float32 and 1e50 is inf, and dividing by either
    would put inf or nan into the row: the penalty is clamped to [FLT_MIN, FLT_MAX] and the
    penalized logits to [-FLT_MAX, FLT_MAX], so no penalty makes an inf or nan. A logit already
    -inf (a ban: min_tokens' bias on a stop id) stays -inf: clamped to -FLT_MAX, a huge
    temperature would give it weight, and a row with every token banned would no longer take the
    argmax. A NaN or +inf logit (a broken model, an fp16 overflow) stays as it is, so its row
    takes the argmax of the rest (sample) whether the step penalizes or not: +inf clamped to
    FLT_MAX made a row without penalties of its own draw among its infs (or, at a huge
    temperature, among every token) as soon as a batchmate had a penalty."""
    raw = logits
    logits = logits.copy()
    for r in range(len(logits)):
        counts = (words[r] & COUNT_MASK).astype(np.float32)
        if t.repetition_penalty[r] != 1.0:
            seen = words[r] != 0
            row = logits[r]
            penalty = np.clip(t.repetition_penalty[r], FLT_MIN, FLT_MAX)
            with np.errstate(over="ignore"):
                row[seen] = np.where(row[seen] > 0, row[seen] / penalty, row[seen] * penalty)
        logits[r] -= t.frequency_penalty[r] * counts
        logits[r] -= t.presence_penalty[r] * (counts > 0)
    return np.where(np.isfinite(raw), np.clip(logits, -FLT_MAX, FLT_MAX), raw).astype(np.float32)


def argmax(row: np.ndarray) -> int:
    """The id of the row's largest value, the lowest among equals; NaN is never chosen (a row of
    only NaN or -inf answers 0): the order of cuda/sampling_common.cuh's ahead()."""
    return int(np.argmax(np.where(np.isnan(row), -np.inf, row)))


def filter_probs(probs: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Zero the probabilities outside top-k / top-p / min-p, in vLLM's order: top-k and min-p cut
    the distribution first, and top-p measures its mass on what they keep (as if renormalized).
    Every rule keeps ties."""
    if not 0 < top_k < len(probs) and top_p >= 1.0 and min_p <= 0.0:
        return probs.astype(np.float32)  # no rule is on: skip the sort
    ordered = np.sort(probs)[::-1]
    tau = ordered[top_k - 1] if 0 < top_k < len(probs) else np.float32(0.0)
    if min_p > 0.0:
        tau = max(tau, min_p * ordered[0])
    if top_p < 1.0:
        # Smallest p whose strictly-larger mass is < top_p of the mass top-k and min-p keep; the
        # first of a run of ties in `ordered` has exactly the strictly-larger mass before it.
        # top_p below float32's smallest denormal is 0 and keeps nothing by that rule: the largest
        # p is kept whatever top_p is, which is the rule's limit as top_p goes to 0.
        cumulative = np.cumsum(ordered)
        kept = np.float32(1.0) if tau == 0 else cumulative[(ordered >= tau).sum() - 1]
        mass_before = cumulative - ordered
        tau = max(tau, ordered[mass_before < np.float32(top_p) * kept].min(initial=ordered[0]))
    return np.where(probs >= tau, probs, 0.0).astype(np.float32)


def sample(logits: np.ndarray, t: SamplingTensors) -> SamplerOutput:
    """t.count_table, when the rows have count_slots, is updated: rebuilt rows, then each draw."""
    # logits (R, vocab) float32
    raw, raw_logprobs = logits, log_softmax(logits)
    # vLLM's order: the logit bias first, then the penalties on the biased logits.
    if t.bias_ids is not None:
        logits = logits.copy()
        for r in range(len(logits)):
            ids = t.bias_ids[r]
            use = ids >= 0
            if t.bias_after is not None:
                after = t.bias_after[r]
                use &= (after < 0) | (after == t.last_ids[r])
            np.add.at(logits[r], ids[use], t.bias_values[r][use])
    if t.has_penalties:
        logits = apply_penalties(logits, t, penalty_words(t, logits.shape[1]))
    if t.allowed_rows is not None:
        logits = allow_only(logits, t.allowed_rows, t.allowed_ids)

    num_rows = len(logits)
    token_ids = np.empty(num_rows, np.int32)
    u = uniform(t.seeds, t.steps)
    for r in range(num_rows):
        row = logits[r]
        top = row.max()
        # A row whose every token is banned (-inf) has no distribution: its argmax is id 0; a NaN
        # in the row (a broken model) leaves the argmax of the rest.
        if t.temperature[r] == 0 or not np.isfinite(top):
            token_ids[r] = argmax(row)
            continue
        # NOTE: the max is subtracted before dividing, so a temperature of 1e-40 (a float32
        # denormal) sends every other logit to -inf instead of overflowing to inf - inf = nan.
        temperature = min(t.temperature[r], FLT_MAX)
        with np.errstate(over="ignore"):
            probs = np.exp((row - top) / temperature)
        probs = filter_probs(probs / probs.sum(), int(t.top_k[r]), float(t.top_p[r]),
                             float(t.min_p[r]))
        cumulative = np.cumsum(probs, dtype=np.float32)
        chosen = int(np.searchsorted(cumulative, u[r] * cumulative[-1], side="right"))
        # Never pick a filtered-out token, even where float rounding lands on the boundary.
        kept = np.flatnonzero(probs)
        if not len(kept):  # nothing survived the filters: the argmax, never an error
            token_ids[r] = argmax(row)
            continue
        token_ids[r] = kept[np.searchsorted(kept, min(chosen, kept[-1]))]

    if t.count_slots is not None:
        add_drawn(t.count_table, np.asarray(t.count_slots), token_ids)
    out = SamplerOutput(token_ids, raw_logprobs[np.arange(num_rows), token_ids].astype(np.float32))
    if t.num_logprobs > 0:
        # Ranked by the raw logits (value desc, id asc, NaN last in id order), as the cuda
        # kernels' next_top: their logprobs round distinct logits together, and a row holding a
        # NaN or an inf has only NaN logprobs.
        top = np.argsort(-np.asarray(raw, np.float32), axis=-1, kind="stable")[:, : t.num_logprobs]
        out.top_ids = top.astype(np.int32)
        out.top_logprobs = np.take_along_axis(raw_logprobs, top, axis=-1).astype(np.float32)
    if t.logprob_rows is not None or t.full_logprob_rows is not None:
        chosen = None if t.logprob_rows is None else row_logprobs(raw, t.logprob_rows,
                                                                  t.logprob_ids)
        full = None if t.full_logprob_rows is None else row_logprobs(raw, t.full_logprob_rows)
        out.row_logprobs = gather_row_logprobs(t, chosen, full)
    return out


def allow_only(logits: np.ndarray, rows: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A copy of `logits` where each of `rows` keeps only its allowed ids; every other logit
    is -inf. The twin of cuda/sampling_tokens.cu's allow_only_kernel."""
    # logits (R, vocab) float32; rows (M,) int32; allowed (M, max_allowed) int32, ALLOWED_PAD
    out = logits.copy()
    for row, ids in zip(rows.tolist(), allowed, strict=True):
        keep = np.zeros(logits.shape[1], bool)
        keep[ids[ids != ALLOWED_PAD]] = True
        out[row, ~keep] = -np.inf
    return out


def row_logprobs(logits: np.ndarray, rows: np.ndarray, ids: np.ndarray | None = None
                 ) -> np.ndarray:
    """(N, W) float32: each listed row's raw logprobs (log_softmax of its logits) at its ids
    (-1: -inf), or with `ids` None at every token (W = vocab). The twin of
    cuda/sampling_tokens.cu's row_logprobs_kernel."""
    # logits (R, vocab) float32; rows (N,) int32; ids (N, W) int32, padded with -1
    lp = log_softmax(np.asarray(logits, np.float32)[rows])  # (N, vocab)
    if ids is None:
        return lp.astype(np.float32)
    picked = np.take_along_axis(lp, np.maximum(ids, 0), axis=1)
    return np.where(ids >= 0, picked, -np.inf).astype(np.float32)


def gather_row_logprobs(t: SamplingTensors, chosen: np.ndarray | None,
                        full: np.ndarray | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """SamplerOutput.row_logprobs from row_logprobs' answers (both backends): each row's
    requested ids with their logprobs, or the whole vocabulary best first."""
    # chosen (N, max_ids) float32 for t.logprob_rows; full (F, vocab) float32
    out = {}
    if chosen is not None:
        for i, row in enumerate(t.logprob_rows.tolist()):
            n = int((t.logprob_ids[i] >= 0).sum())
            out[row] = (t.logprob_ids[i, :n].copy(), chosen[i, :n].copy())
    if full is not None:
        for i, row in enumerate(t.full_logprob_rows.tolist()):
            order = np.argsort(-full[i], kind="stable").astype(np.int32)
            out[row] = (order, full[i, order])
    return out
