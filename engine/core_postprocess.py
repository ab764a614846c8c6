"""What a step's sampled tokens do to its sequences: the engine core's postprocessing.

Row by row (the order of ScheduledBatch.sampling_rows): append the token, check the id stop rules
(eos, stop_token_ids, max_tokens, max_model_len), free a sequence that ends, and say it in a
SeqOutput. Three kinds of rows take a path of their own:
- a constrained row (structured outputs): its grammar matcher takes the token first; a token the
  grammar refuses fails the request, one that completes it ends the sequence;
- a sequence that verified k drafts (speculative decoding) owns k + 1 rows: it takes what
  SpecDecoder.verify keeps, and its KV slots past them are rolled back;
- a beam: the row's top candidates go to the request's BeamSearch, which forks the next beams.
A sequence that finished after the step was launched (overlapped loop) has its token dropped.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from engine.core.block_manager import BlockManager
from engine.core.outputs import SeqOutput
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.core.stopping import check_stop_ids
from engine.core_requests import CoreRequest, RequestTable
from engine.spec_decode import SpecDecoder
from engine.structured_outputs import ACCEPTED, ENDED, GrammarCompiler

logger = logging.getLogger("pagedserve." + __name__)


class Postprocessor:
    def __init__(self, requests: RequestTable, scheduler: Scheduler,
                 block_manager: BlockManager, eos_token_ids: list[int], max_model_len: int,
                 vocab_size: int):
        self.requests = requests
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    def run(self, seqs: list[Sequence], sampled, outputs: list[SeqOutput],
            grammars: GrammarCompiler | None, spec: SpecDecoder | None,
            on_advanced=None) -> int:
        """Take the step's `sampled` rows into `seqs` and `outputs`; return how many tokens went
        out. on_advanced() runs once the matchers have taken their tokens, before the rest."""
        tokens, logprobs = sampled.token_ids.tolist(), sampled.logprobs.tolist()
        errors = sampled.errors or {}
        top = None
        if sampled.top_ids is not None and sampled.top_ids.size:
            top = (sampled.top_ids.tolist(), sampled.top_logprobs.tolist())
        if sampled.row_logprobs:  # chosen ids or the whole vocabulary instead of the top-k
            top = top or ([[]] * len(tokens), [[]] * len(tokens))
            for r, (ids, lps) in sampled.row_logprobs.items():
                top[0][r], top[1][r] = ids.tolist(), lps.tolist()
        num_emitted = 0
        verdicts = None
        if any(seq.matcher is not None for seq in seqs):
            # Constrained steps never speculate (EngineCore.step), so row i is sequence i here.
            for i, seq in enumerate(seqs):  # a first token that defers the grammar: it waits
                if seq.matcher is not None and _defers(seq, tokens[i]):
                    seq.matcher, seq.later_matcher = None, seq.matcher
            verdicts = grammars.advance([seq.matcher for seq in seqs], tokens, errors)
        for i, seq in enumerate(seqs):  # (nor do steps with a later matcher)
            if seq.later_matcher is not None and _ends_with(
                    seq, tokens[i], seq.sampling_params.structured_outputs_after):
                seq.matcher, seq.later_matcher = seq.later_matcher, None  # from the next token
        if on_advanced is not None:
            on_advanced()
        r = 0  # this sequence's first row
        for i, seq in enumerate(seqs):
            k = len(seq.spec_token_ids)
            first, r = r, r + 1 + k
            seq.has_pending_token = False
            if seq.finish_reason is not None:
                continue
            req = self.requests[seq.request_id]
            if errors and any(j in errors for j in range(first, r)):
                self.requests.fail(seq.request_id, next(errors[j] for j in range(first, r)
                                                        if j in errors), outputs)
                continue
            verdict = ACCEPTED if verdicts is None else verdicts[i]
            if verdict is not ACCEPTED and verdict is not ENDED:
                cause = _starved(seq, tokens[first], logprobs[first]) or \
                    f"the grammar refused token {tokens[first]}: {verdict}"
                self.requests.fail(seq.request_id, cause, outputs)
                continue
            try:
                if req.beam is not None:  # beams never speculate: k == 0
                    num_emitted += self._beam_row(req, seq, top[0][first], top[1][first],
                                                  outputs)
                    continue
                if k:
                    out = self._append_verified(req, seq, tokens, logprobs, top, first, spec)
                else:
                    out = self._append(req, seq, tokens[first], logprobs[first], top, first,
                                       verdict is ENDED)
                outputs.append(out)
                num_emitted += len(out.new_token_ids)
            except Exception as e:  # the stop check, for this request alone
                logger.exception("request %s failed after its step", seq.request_id)
                self.requests.fail(seq.request_id, f"{type(e).__name__}: {e}", outputs)
        return num_emitted

    def _append(self, req: CoreRequest, seq: Sequence, token: int, logprob: float, top,
                r: int, grammar_ended: bool = False) -> SeqOutput:
        """Row r of the step: append its token to `seq`, check stops, free it if it ends.
        grammar_ended: the sequence's grammar was complete (it allowed only eos)."""
        if not 0 <= token < self.vocab_size:  # never hand the front garbage
            raise RuntimeError(f"the sampler returned token id {token}, outside the vocabulary")
        if grammar_ended and token not in self.eos_token_ids and self.eos_token_ids:
            # The grammar allowed only eos, and min_tokens held eos back: the row was all
            # masked, its sample arbitrary. It stands for eos; so does the token sent.
            token = self.eos_token_ids[0]
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        p = seq.sampling_params
        new_logprobs = None
        if p.logprobs is not None:
            entry = {}
            if p.logprobs:
                k = None if p.logprobs == -1 else p.logprobs  # -1: the row holds them all
                # A masked token's logprob is -inf: not a number JSON can carry, and not a
                # choice the model had.
                entry = {t: v for t, v in zip(top[0][r][:k], top[1][r][:k], strict=True)
                         if v != -np.inf}
            entry[token] = logprob
            new_logprobs = [entry]
        reason, stop = check_stop_ids(seq, token, self.eos_token_ids, self.max_model_len)
        if reason is None and grammar_ended:
            # The sequence goes on past eos (ignore_eos, min_tokens): the token stands for eos.
            reason = "stop"
        out = SeqOutput(seq.request_id, seq.index, [token], new_logprobs,
                        seq.cumulative_logprob, reason, stop)
        if seq.num_output_tokens == 1:
            out.first_scheduled_time = req.first_scheduled_time
        if not req.has_output:
            req.has_output = True
            out.prompt_logprobs = req.prompt_logprobs
            out.prompt_logprob_ranks = req.prompt_logprob_ranks
            out.num_cached_tokens = seq.num_cached_tokens
            out.num_created_cache_tokens = self.block_manager.created_cache_tokens(seq)
        if reason is not None:  # its blocks are released after the step's outputs go out
            if seq.spec_token_ids:
                # Verified drafts: the commit after verification passes over a finished
                # sequence, so key the blocks they filled now (every position before this
                # token holds an accepted token's k/v), as a plain step keys before it frees.
                self.block_manager.truncate(seq, len(seq.token_ids) - 1)
                self.block_manager.mark_computed(seq)
            self.requests.finish(req, seq, reason, defer_free=True)
        return out

    def _append_verified(self, req: CoreRequest, seq: Sequence, tokens: list[int],
                         logprobs: list[float], top, first: int, spec: SpecDecoder) -> SeqOutput:
        """A sequence that verified drafts in rows first..: append what the verdict keeps, one
        token at a time until a stop rule ends it (the rest are dropped), in one SeqOutput; roll
        back the KV slots past them (the rejected drafts' k/v are garbage)."""
        num = spec.verify(seq, tokens, first)
        outs = []
        for r in range(first, first + num):
            outs.append(self._append(req, seq, tokens[r], logprobs[r], top, r))
            if outs[-1].finish_reason is not None:
                break
        out = outs[-1]
        out.first_scheduled_time = outs[0].first_scheduled_time
        out.prompt_logprobs = outs[0].prompt_logprobs
        out.prompt_logprob_ranks = outs[0].prompt_logprob_ranks
        out.num_cached_tokens = outs[0].num_cached_tokens
        out.num_created_cache_tokens = outs[0].num_created_cache_tokens
        out.new_token_ids = [o.new_token_ids[0] for o in outs]
        if out.new_logprobs is not None:
            out.new_logprobs = [o.new_logprobs[0] for o in outs]
        out.token_logprobs = logprobs[first : first + len(outs)]
        if out.finish_reason is None:
            self.block_manager.truncate(seq, len(seq.token_ids) - 1)
        return out

    def _beam_row(self, req: CoreRequest, seq: Sequence, top_ids: list[int],
                  top_logprobs: list[float], outputs: list[SeqOutput]) -> int:
        """One beam's candidates; once all live beams have theirs, the next beams (forks share
        the KV blocks) or, at the end, the request's outputs. Return how many tokens went out."""
        beam = req.beam
        if not beam.report(seq, top_ids, top_logprobs):
            return 0
        done = beam.expand(self.scheduler, _fork_beam)
        if done is None:
            return 0
        done[0].prompt_logprobs = req.prompt_logprobs
        done[0].prompt_logprob_ranks = req.prompt_logprob_ranks
        done[0].num_cached_tokens = req.seqs[0].num_cached_tokens
        done[0].num_created_cache_tokens = self.block_manager.created_cache_tokens(req.seqs[0])
        done[0].first_scheduled_time = req.first_scheduled_time
        outputs += done
        self.requests.finish_beams(req)
        return sum(len(o.new_token_ids) for o in done)


def _fork_beam(parent: Sequence) -> Sequence:
    child = Sequence(parent.request_id, list(parent.token_ids), parent.num_prompt_tokens,
                     parent.sampling_params, seed=parent.seed,
                     cumulative_logprob=parent.cumulative_logprob,
                     next_prompt_logprob=parent.num_prompt_tokens)
    child.num_cached_tokens, child.admitted = parent.num_cached_tokens, parent.admitted
    return child


def _may_defer(seq: Sequence) -> bool:
    """Whether `seq`'s next token may be the one that defers its grammar: its first output
    token, under a grammar that is not already in error (that row allows nothing, and fails)."""
    return (seq.sampling_params.structured_outputs_deferred_by is not None
            and seq.matcher is not None and seq.num_output_tokens == 0
            and not seq.matcher.is_error())


def _defers(seq: Sequence, token: int) -> bool:
    """Whether `token`, `seq`'s next token, defers its grammar: the id that does, at the first
    output token, where the grammar itself would not take it (then it is the grammar's)."""
    return (token == seq.sampling_params.structured_outputs_deferred_by and _may_defer(seq)
            and seq.matcher.validate_tokens([token]) == 0)


def allow_deferring(rows: list[Sequence], bitmask) -> None:
    """Let the first token of each row whose grammar a first token may defer be that token
    too (beside the grammar's own first tokens, which `bitmask` allows)."""
    if bitmask is None:
        return
    words = bitmask.view(np.uint32)
    for r, seq in enumerate(rows):
        if _may_defer(seq):
            opener = seq.sampling_params.structured_outputs_deferred_by
            words[r, opener >> 5] |= np.uint32(1 << (opener & 31))


def _ends_with(seq: Sequence, token: int, ids: list[int]) -> bool:
    """Whether `seq`'s output, `token` appended, ends with `ids`."""
    if token != ids[-1]:
        return False
    before = ids[:-1]
    if not before:
        return True
    return (len(seq.token_ids) - seq.num_prompt_tokens >= len(before)
            and seq.token_ids[len(seq.token_ids) - len(before) :] == before)


def _starved(seq: Sequence, token: int, logprob: float) -> str | None:
    """Why a constrained row had no token left to sample, or None if it had one: the request's
    own settings excluded every token its grammar allowed next, so every logit was -inf and the
    sampler's pick (the grammar then refused it) was arbitrary. (The first step's case is
    refused on arrival for allowed_token_ids: GrammarCompiler.check.)"""
    p = seq.sampling_params
    allowed = p.allowed_token_ids
    if math.isfinite(logprob) and (allowed is None or token in allowed):
        return None  # (a row whose ids were all masked picks one outside them)
    settings = [name for name, excludes in (
        ("allowed_token_ids", allowed is not None), ("bad_words", bool(p.bad_words_token_ids)),
        ("min_tokens", seq.num_output_tokens < p.min_tokens)) if excludes]
    if not settings:  # a grammar at a dead end (its row allowed nothing), or NaN logits
        return None
    return (f"no token was left to sample after {seq.num_output_tokens} output tokens: "
            f"{' and '.join(settings)} exclude every token structured_outputs allows next")
