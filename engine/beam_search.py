"""Beam search in the engine core, on shared KV blocks.

A request keeps `beam_width` live beams, all of one length. Each step every live beam samples
one row whose top 2 x width raw logprobs are the candidates; once every live beam has reported
(a preempted one reports after its recompute), the best `width` candidates that do not end the
sequence become the next beams: the first candidate of a beam extends that beam's own sequence,
each further one forks it (Scheduler.fork: full blocks shared by reference count, the partial
tail copied). A beam with no candidate left is freed. Candidates that end on an eos or stop id
are finished beams; before min_tokens they are passed over for the row's next best (the engine
core asks the sampler for 2 x width + the stop ids then). The search ends at max_tokens (or
max_model_len), or with early_stopping once `width` beams are finished (the live ones are dropped,
as in HF and vLLM's former engine); the n best by score =
cumulative logprob / length ** length_penalty (prompt included, vLLM's rule) are emitted at once
as the request's only outputs, each token's logprobs as sampling gives them (the top `logprobs`,
then the token's own).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from engine.core.outputs import SeqOutput
from engine.core.sequence import Sequence


def ending_ids(params, eos_token_ids: list[int]) -> set[int]:
    """The token ids that end a beam: stop_token_ids, and eos unless ignore_eos."""
    return set(params.stop_token_ids or ()) | (set() if params.ignore_eos else set(eos_token_ids))


def beam_score(cum: float, length: int, length_penalty: float) -> float:
    """cum / length ** length_penalty, also where the power leaves a float's range: a finite
    penalty (1e308 is one) overflows it, where Python raises, and the score is 0; or underflows
    it to 0, and the score is -inf."""
    try:
        return cum / length ** length_penalty
    except OverflowError:
        return 0.0
    except ZeroDivisionError:
        return -math.inf if cum < 0 else 0.0


@dataclass
class _Finished:
    token_ids: list[int]
    logprobs: list[dict[int, float]]  # per token: the row's top `logprobs`, then the token's
    cumulative_logprob: float
    finish_reason: str
    stop_reason: int | None
    score: float


@dataclass(eq=False)
class BeamSearch:
    request_id: str
    live: list[Sequence]
    eos_token_ids: list[int]
    max_model_len: int
    finished: list[_Finished] = field(default_factory=list)
    rows: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # by seq_id
    token_logprobs: dict[int, list[dict[int, float]]] = field(default_factory=dict)  # per beam

    def report(self, seq: Sequence, top_ids: list[int], top_logprobs: list[float]) -> bool:
        """One live beam's candidates; True once every live beam has reported.

        A row computed before the beam's last token was chosen is stale and dropped: a beam
        that had reported, then made way for a sibling (Scheduler._unblock_beams), samples
        again in its recompute, and the round may have ended meanwhile on its kept candidates.
        The beam then decodes its new token like any other."""
        if seq.num_computed_tokens != len(seq.token_ids):
            return False
        self.rows[seq.seq_id] = (top_ids, top_logprobs)
        return all(s.seq_id in self.rows for s in self.live)

    def expand(self, scheduler, fork_seq) -> list[SeqOutput] | None:
        """Choose the next beams (fork_seq(parent) -> a new Sequence, unscheduled); the
        request's outputs if the search ended, else None."""
        p = self.live[0].sampling_params
        width = p.beam_width
        stops = ending_ids(p, self.eos_token_ids)
        eos = set() if p.ignore_eos else set(self.eos_token_ids)
        shown = p.logprobs or 0  # top logprobs the request shows beside each token's own
        candidates = []  # (cumulative logprob, beam order, rank, beam, token, logprob)
        top = {}  # by seq_id: the row's top `shown` logprobs
        for order, seq in enumerate(self.live):
            ids, lps = self.rows[seq.seq_id]
            top[seq.seq_id] = {t: v for t, v in zip(ids[:shown], lps[:shown], strict=True)
                               if v != -math.inf}
            pairs = zip(ids, lps, strict=True)
            if seq.num_output_tokens < p.min_tokens:  # stop ids held back: the next best ones
                pairs = ((t, v) for t, v in pairs if t not in stops)
            for rank, (token, lp) in enumerate(itertools.islice(pairs, 2 * width)):
                candidates.append((seq.cumulative_logprob + lp, order, rank, seq, token, lp))
        self.rows.clear()
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))

        def entry(seq, token, lp) -> dict[int, float]:
            return {**top[seq.seq_id], token: lp}

        chosen = []
        for cum, _, _, seq, token, lp in candidates:
            if token in stops:  # (none before min_tokens: left out above)
                # an eos ends with no stop_reason, also when it is a stop id too
                self._finish(seq, [token], [entry(seq, token, lp)], cum, "stop",
                             None if token in eos else token)
            elif len(chosen) < width:
                chosen.append((seq, token, lp))
        if p.early_stopping and len(self.finished) >= width:
            # The search is over: the finished beams are the answers (HF's and vLLM's rule), not
            # live ones cut short, which would read as finished by length.
            return self.end(scheduler, p, keep_live=False)
        # Prune first: a pruned beam's place among max_num_seqs and its own blocks go to the
        # forks below (else a fork of a full batch found no room, and recomputed its whole
        # sequence). Its shared blocks stay with the beams that hold them.
        used = {seq.seq_id for seq, _, _ in chosen}
        for seq in self.live:
            if seq.seq_id not in used:
                scheduler.finish_seq(seq, "abort")
                self.token_logprobs.pop(seq.seq_id, None)
        # Fork, from each beam's state before this step's token; then append.
        used, extended = set(), []
        chosen = [(seq, token, lp, entry(seq, token, lp)) for seq, token, lp in chosen]
        for seq, token, lp, lps in chosen:
            if seq.seq_id in used:
                child = fork_seq(seq)
                self.token_logprobs[child.seq_id] = list(self.token_logprobs[seq.seq_id])
                scheduler.fork(seq, child)
                extended.append((child, token, lp, lps))
            else:
                used.add(seq.seq_id)
                extended.append((seq, token, lp, lps))
        self.live = []
        for seq, token, lp, lps in extended:
            seq.token_ids.append(token)
            seq.cumulative_logprob += lp
            self.token_logprobs[seq.seq_id].append(lps)
            self.live.append(seq)
        if not self.live:
            return self.end(scheduler, p)
        first = self.live[0]
        if ((p.max_tokens is not None and first.num_output_tokens >= p.max_tokens)
                or len(first.token_ids) >= self.max_model_len):
            return self.end(scheduler, p)
        return None

    def _finish(self, seq: Sequence, extra: list[int], extra_lps: list[dict[int, float]],
                cum: float, reason: str, stop: int | None) -> None:
        """Keep `seq` (+ `extra`: its stop token, in its ids as elsewhere; the front shows its
        text only with include_stop_str_in_output) among the finished if it scores among the
        best; the length scored leaves the stop token out."""
        p = seq.sampling_params
        lps = self.token_logprobs[seq.seq_id] + extra_lps
        self.finished.append(_Finished(seq.output_token_ids + extra, lps, cum, reason, stop,
                                       beam_score(cum, len(seq.token_ids), p.length_penalty)))
        self.finished.sort(key=lambda f: -f.score)
        del self.finished[p.beam_width :]

    def end(self, scheduler, p, keep_live: bool = True) -> list[SeqOutput]:
        """Finish the live beams too ("length"), or drop them (keep_live False: early
        stopping); the n best as the request's outputs."""
        for seq in self.live:
            if keep_live:
                self._finish(seq, [], [], seq.cumulative_logprob, "length", None)
            scheduler.finish_seq(seq, "length" if keep_live else "abort")
        self.live = []
        best = self.finished[: p.n]
        outputs = []
        for i, f in enumerate(best):
            lps = None if p.logprobs is None else f.logprobs
            # Each token's own logprob: a front that cuts the tokens at a stop string takes
            # the dropped ones out of cumulative_logprob, as for verified drafts.
            own = [entry[t] for t, entry in zip(f.token_ids, f.logprobs, strict=True)]
            outputs.append(SeqOutput(self.request_id, i, f.token_ids, lps,
                                     f.cumulative_logprob, f.finish_reason, f.stop_reason,
                                     token_logprobs=own))
        return outputs
