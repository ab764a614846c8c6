"""The requests an engine core runs, from intake to their last sequence's end.

A request comes in as an EngineCoreRequest (token ids and SamplingParams). `add` checks it against
the model and the core's limits (every error names its field), makes its n sequences (or its first
beam) with their seeds, and queues the first one: the other n - 1 fork from it once its prompt is
computed. A request with structured outputs waits, unscheduled, until its grammar compiles
(`start_grammars`).

A request ends when its last sequence does: `finish` (a stop rule, from the step's postprocessing
or a stop string the front found), `fail` (finish_reason "error", said in the outputs) or `abort`
(the client left: nothing more is said). Every end frees the sequence's blocks in the scheduler.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from engine.beam_search import BeamSearch, ending_ids
from engine.core.limits import MAX_LOGPROBS, is_int
from engine.core.outputs import EngineCoreRequest, SeqOutput
from engine.core.sampling_params import ParamError
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.model.config import EngineConfig
from engine.structured_outputs import GrammarCompiler


@dataclass(eq=False, slots=True)
class CoreRequest:
    request_id: str
    seqs: list[Sequence]
    first_scheduled_time: float | None = None
    num_unfinished: int = 0
    prompt_logprobs: list | None = None  # collected so far, when the params ask
    prompt_logprob_ranks: list | None = None  # each prompt token's rank, beside them
    beam: BeamSearch | None = None  # use_beam_search: the live and finished beams
    has_output: bool = False  # the first output (which carries prompt_logprobs) went out
    grammar: Future | None = None  # the compiled grammar (structured outputs), while compiling


class RequestTable:
    def __init__(self, config: EngineConfig, scheduler: Scheduler, vocab_size: int,
                 max_model_len: int, eos_token_ids: list[int]):
        self.config = config
        self.scheduler = scheduler
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self._requests: dict[str, CoreRequest] = {}
        self.compiling: list[CoreRequest] = []  # requests whose grammar is compiling
        # Unseeded requests draw their seeds here; data-parallel cores offset theirs by rank, so
        # two cores never hand the same seed stream to the requests they run.
        self._rng = np.random.default_rng(config.seed + config.data_parallel_rank)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __getitem__(self, request_id: str) -> CoreRequest:
        return self._requests[request_id]

    def get(self, request_id: str) -> CoreRequest | None:
        return self._requests.get(request_id)

    def clear(self) -> None:
        self._requests.clear()

    # ------------------------------------------------------------------ intake

    def add(self, req: EngineCoreRequest,
            grammar_compiler: Callable[[], GrammarCompiler]) -> None:
        """Queue a request; raise ValueError naming the field if it can never run.
        grammar_compiler() is asked only when the request has structured outputs."""
        if req.request_id in self._requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        ids, params = req.prompt_token_ids, req.params
        self._check(ids, params)
        grammar = None
        if params.structured_outputs is not None:
            # Compiled on the pool (a cache hit is ready at once); the sequences wait in the
            # queue meanwhile, and step() hands them their matchers.
            grammar = grammar_compiler().submit(params.structured_outputs,
                                                 params.allowed_token_ids)
        seqs = []
        for i in range(1 if params.use_beam_search else params.n):  # beams fork as they go
            if params.seed is not None:
                seq_seed = np.random.SeedSequence([params.seed & (2**64 - 1), i])
                seed = int(seq_seed.generate_state(1, np.uint64)[0])
            else:
                seed = int(self._rng.integers(0, 2**63))
            seqs.append(Sequence(req.request_id, list(ids), len(ids), params, index=i,
                                 seed=seed, is_waiting_for_grammar=grammar is not None))
            if i:  # forks take the prompt computed once: only the first scores it
                seqs[-1].next_prompt_logprob = len(ids)
        # Only the first sequence is queued: the other n - 1 fork from it once its prompt is
        # computed, sharing the prompt's blocks. The scheduler rejects a prompt that can never
        # fit before anything is queued.
        self.scheduler.add(seqs[0])
        seqs[0].forks = seqs[1:]
        core_req = self._requests[req.request_id] = CoreRequest(
            req.request_id, seqs, num_unfinished=len(seqs),
            prompt_logprobs=None if params.prompt_logprobs is None else [None],
            prompt_logprob_ranks=None if params.prompt_logprobs is None else [None],
            grammar=grammar)
        if params.use_beam_search:
            core_req.beam = BeamSearch(req.request_id, list(seqs), self.eos_token_ids,
                                       self.max_model_len, token_logprobs={seqs[0].seq_id: []})
        if grammar is not None:
            self.compiling.append(core_req)

    def _check(self, ids: list[int], params) -> None:
        vocab, config = self.vocab_size, self.config
        if ids and not 0 <= min(ids) <= max(ids) < vocab:  # min/max: C speed for the usual case
            i, t = next((i, t) for i, t in enumerate(ids) if not 0 <= t < vocab)
            raise ValueError(f"prompt_token_ids[{i}] = {t!r}: token id {t} is out of "
                             f"vocabulary (vocab_size {vocab})")
        for name in ("logit_bias", "stop_token_ids", "allowed_token_ids", "logprob_token_ids"):
            bad = [t for t in getattr(params, name) or () if not 0 <= t < vocab]
            if bad:  # vLLM's clients look for the ids, the size and "out of vocabulary"
                shown = bad if len(bad) <= 16 else f"{bad[:16]} (and {len(bad) - 16} more)"
                raise ParamError(name, f"{name} has token id(s) {shown} out of vocabulary "
                                       f"(vocab_size {vocab})")
        after = params.structured_outputs_after
        if after is not None and (not after or not all(0 <= t < vocab for t in after)
                                  or params.structured_outputs is None):
            raise ParamError("structured_outputs", f"structured_outputs_after must be token ids "
                             f"(vocab_size {vocab}) after which structured_outputs hold, got "
                             f"{after[:16]}")
        opener = params.structured_outputs_deferred_by
        if opener is not None and (after is None or not is_int(opener)
                                   or not 0 <= opener < vocab):
            raise ParamError("structured_outputs", f"structured_outputs_deferred_by must be a "
                             f"token id (vocab_size {vocab}) beside structured_outputs_after, "
                             f"got {opener!r}")
        words = params.bad_words_token_ids
        if params.bad_words and words is None:
            raise ParamError("bad_words", "bad_words reach the engine core as token ids, which "
                                          "the front (OutputProcessor) sets from the tokenizer")
        if words is not None and not all(words):
            raise ParamError("bad_words", "bad_words hold a word of no tokens")
        bad = sorted({t for ids in words or () for t in ids if not 0 <= t < vocab})
        if bad:
            raise ParamError("bad_words", f"bad_words have token id(s) {bad[:16]} out of "
                                          f"vocabulary (vocab_size {vocab})")
        if words and params.allowed_token_ids is not None:
            banned = {ids[0] for ids in words if len(ids) == 1}
            if banned.issuperset(params.allowed_token_ids):
                raise ParamError("allowed_token_ids", "allowed_token_ids are all one-token "
                                 "bad_words: no token would be left to sample")
        if params.min_tokens and params.allowed_token_ids is not None:
            held = {*self.eos_token_ids, *params.stop_token_ids}  # what min_tokens masks
            if held.issuperset(params.allowed_token_ids):
                # Every logit -inf: the sampler's pick would be arbitrary (id 0), not allowed.
                raise ParamError("allowed_token_ids", "allowed_token_ids are all eos or "
                                 f"stop_token_ids, which min_tokens ({params.min_tokens}) holds "
                                 "back: no token would be left to sample")
        cap = vocab if config.max_logprobs == -1 else config.max_logprobs
        top_k = None if params.logprob_token_ids else params.logprobs  # chosen ids: no top-k
        for name, k in (("logprobs", top_k), ("prompt_logprobs", params.prompt_logprobs)):
            if k is not None and (vocab if k == -1 else k) > cap:
                asked = f"-1 (the whole vocabulary, {vocab})" if k == -1 else str(k)
                raise ParamError(name, f"{name} {asked} is more than max_logprobs ({cap}); "
                                       "the server's --max-logprobs sets it")
        if params.n > config.max_num_seqs:  # the n sequences must fit in one batch
            raise ParamError("n", f"n ({params.n}) must be <= max_num_seqs "
                                  f"({config.max_num_seqs})")
        if params.use_beam_search and params.beam_width > config.max_num_seqs:
            raise ParamError("best_of", f"best_of (the beam width, {params.beam_width}) must "
                                        f"be <= max_num_seqs ({config.max_num_seqs})")
        if params.use_beam_search and params.min_tokens:
            # Until min_tokens, a beam's candidates are its row's best 2 x width tokens that do
            # not end it: the row must hold them past every stop id.
            held = ending_ids(params, self.eos_token_ids)
            params.beam_candidates = 2 * params.beam_width + len(held)
            if params.beam_candidates > MAX_LOGPROBS:
                raise ParamError("min_tokens", f"min_tokens with use_beam_search needs 2 x the "
                                               f"beam width + the {len(held)} stop and eos ids "
                                               f"<= {MAX_LOGPROBS} candidates a row, got "
                                               f"{params.beam_candidates}")
        if not ids:
            raise ValueError("prompt is empty: it must have at least one token")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, more than max_model_len "
                             f"({self.max_model_len})")

    def start_grammars(self, outputs: list[SeqOutput]) -> None:
        """Give every sequence whose grammar finished compiling its own matcher, so the scheduler
        takes it; a grammar that failed ends its request with "error"."""
        still = []
        for req in self.compiling:
            if not req.grammar.done():
                still.append(req)
                continue
            if self._requests.get(req.request_id) is not req:  # aborted while compiling
                continue
            error = req.grammar.exception()
            if error is not None:
                self.fail(req.request_id, str(error), outputs)
                continue
            params = req.seqs[0].sampling_params
            later = (bool(params.structured_outputs_after)
                     and params.structured_outputs_deferred_by is None)
            for seq in req.seqs:
                if later:  # it takes over once the output ends with those ids
                    seq.later_matcher = req.grammar.result().deep_copy()
                else:  # (a first token structured_outputs_deferred_by makes it a later one)
                    seq.matcher = req.grammar.result().deep_copy()
                seq.is_waiting_for_grammar = False
            req.grammar = None
        self.compiling = still

    def wait_for_grammars(self, timeout: float) -> None:
        """Sleep until a compiling grammar is done (or timeout seconds pass)."""
        concurrent.futures.wait([r.grammar for r in self.compiling], timeout=timeout,
                                return_when=concurrent.futures.FIRST_COMPLETED)

    # ------------------------------------------------------------------ while they run

    def note_scheduled(self, batch) -> int:
        """Stamp first_scheduled_time on requests whose prompt the batch starts; return how many
        prompt tokens it computes. Call it before the scheduler advances the batch."""
        now, num_prompt_tokens = None, 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            c = seq.num_computed_tokens
            if c < seq.num_prompt_tokens:  # some prompt tokens: a prefill, or a 1-token tail
                req = self._requests[seq.request_id]
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now = now or time.time()
                num_prompt_tokens += min(c + n, seq.num_prompt_tokens) - c
        return num_prompt_tokens

    def collect_prompt_logprobs(self, scored: list) -> None:
        """Keep each request's scored prompt positions, in order; a recompute's repeats are
        dropped."""
        for item in scored:
            seq = item.seq
            req = self._requests.get(seq.request_id)
            if req is None or req.prompt_logprobs is None or seq not in req.seqs:
                continue  # ended; or aborted, its id taken since by a new request
            collected = req.prompt_logprobs
            for position, entry, rank in zip(range(item.start, item.start + len(item.entries)),
                                             item.entries, item.ranks, strict=True):
                if position == len(collected):
                    collected.append(entry)
                    req.prompt_logprob_ranks.append(rank)
            seq.next_prompt_logprob = len(collected)

    # ------------------------------------------------------------------ ends

    def abort(self, request_ids: list[str]) -> None:
        """Free the requests' blocks; ids that already finished (or never came) are ignored."""
        for request_id in request_ids:
            if (req := self._requests.pop(request_id, None)) is not None:
                self.scheduler.abort(request_id)
                if req in self.compiling:  # its grammar is not wanted any more
                    self.compiling.remove(req)
                    req.grammar.cancel()  # if it has not started

    def finish_sequences(self, items: list[tuple[str, int, str]]) -> None:
        """(request_id, index, stop_string): the front found a stop string; free the sequence.
        Its tokens of any step still under way are dropped by the front."""
        for request_id, index, _stop in items:
            req = self._requests.get(request_id)
            if req is None or req.seqs[index].finish_reason is not None:
                continue
            self.finish(req, req.seqs[index], "stop")

    def finish(self, req: CoreRequest, seq: Sequence, reason: str,
               defer_free: bool = False) -> None:
        self.scheduler.finish_seq(seq, reason, defer_free)
        req.num_unfinished -= 1
        if req.num_unfinished == 0:
            del self._requests[req.request_id]

    def finish_beams(self, req: CoreRequest) -> None:
        """The beam search handed out its outputs (and freed its beams): the request is over."""
        del self._requests[req.request_id]

    def fail(self, request_id: str, cause: str, outputs: list[SeqOutput]) -> None:
        """End every unfinished sequence of the request with finish_reason "error" and `cause`,
        freeing its blocks, and say so in `outputs`; a request that already ended is left
        alone."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req.beam is not None:  # no beam was ever sent: every output fails
            for seq in req.beam.live:
                self.scheduler.finish_seq(seq, "error")
            outputs += [SeqOutput(request_id, i, [], None, 0.0, "error", None, cause)
                        for i in range(req.seqs[0].sampling_params.n)]
            return
        for seq in req.seqs:
            if seq.finish_reason is None:
                self.scheduler.finish_seq(seq, "error")  # its pending forks end with it
            if seq.finish_reason == "error":
                seq.error = seq.error or cause
                outputs.append(SeqOutput(request_id, seq.index, [], None, seq.cumulative_logprob,
                                         "error", None, seq.error))
