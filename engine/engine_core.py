"""EngineCore: token ids in, token ids out, one model step at a time.

    step():  batch = scheduler.schedule()      which sequences, how many new tokens each
             handle = runner.launch(batch, ...) one forward, one sample, queued on the device
             sampled = previous.result()        the step launched one call earlier (overlap)
             postprocess(sampled)               append, check stop ids, free blocks

Overlapped (async_scheduling, the default on cuda): one step stays in flight. step() launches
step N+1 before it reads step N's tokens, so scheduling, input building and postprocessing on the
host run while the device computes:

    host:    | sched N+1 | launch N+1 | wait N | post N | sched N+2 | launch N+2 | wait N+1 | ...
    device:  ...  step N  ][           step N+1            ][           step N+2 ...

Step N+1's decodes read step N's sampled ids on the device (runner.py: placeholders). A sequence
that finished at step N (eos, stop id, a stop string the front found, an abort) was scheduled into
N+1 all the same: its token from N+1 is dropped, never emitted, and its blocks were freed when
the finish was noticed. Without async_scheduling, step() reads the step it just launched.

Structured outputs: a constrained row's mask needs its sequence's previous token, which may be in
the step still in flight. The runner asks for the masks once the forward of N+1 is queued
(fill_bitmask); that is when a step holding constrained rows reads step N's tokens, advances the
matchers, and fills the masks, while the device computes N+1's forward. So such steps lose the
overlap of postprocessing, never the forward's, and every mask is exact.
Speculative decoding (speculative_config): while few sequences run, a step verifies n-gram drafts
synchronously (engine/spec_decode.py); larger batches keep the overlapped loop. Beams never
speculate (their step reads one row per beam).

This file is the loop. How the core is built, and what happens to requests around the loop, live
beside it:
    core_setup.py        build_core_parts: backend, model (tensor-parallel group), KV cache sized
                         to memory, scheduler, runner
    core_requests.py     RequestTable: intake and its checks, seeds, grammars compiling, and how a
                         request ends (finish, fail, abort)
    core_postprocess.py  Postprocessor: a step's sampled rows into its sequences and SeqOutputs
                         (stop ids, grammar verdicts, verified drafts, beams)

It owns the scheduler, the block manager and the runner (and with them the device), and knows no
text: the output processor (engine/output_processor.py) detokenizes and finds stop strings, and
tells the core through finish_sequences. In `pagedserve serve` it runs alone in the engine-core
process (engine/core_process.py); LLMEngine and LLM run it in-process.

Single-threaded by design: nothing here takes a lock.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import time
from dataclasses import dataclass

from engine.core.introspect import Introspector
from engine.core.outputs import EngineCoreRequest, EngineDeadError, EngineStats, SeqOutput
from engine.core.sequence import Sequence
from engine.core_postprocess import Postprocessor, allow_deferring
from engine.core_requests import RequestTable
from engine.core_setup import build_core_parts
from engine.executor.distributed import CommunicatorError
from engine.model.config import ConfigError, EngineConfig
from engine.spec_decode import SpecDecoder
from engine.structured_outputs import GrammarCompiler

logger = logging.getLogger("pagedserve." + __name__)


@dataclass(slots=True)
class _Launched:
    batch: object  # ScheduledBatch
    rows: list[Sequence]  # who samples, in the order of the step's sampled ids (forks last)
    handle: object  # runner.StepHandle
    launched_at: float  # time.monotonic() once launch() returned


class EngineCore:
    def __init__(self, engine_config: EngineConfig, loaded_model=None):
        """`loaded_model` (anything with .config, .weights, .tokenizer) skips load_model; tests use
        it to run tiny random models."""
        engine_config.validate()
        self.config = engine_config
        parts = build_core_parts(engine_config, loaded_model)
        # The parts (core_setup.py), each an attribute: tools and tests look inside a step.
        self.ops, self.workers, self.model = parts.ops, parts.workers, parts.model
        self.kv_cache, self.num_kv_blocks = parts.kv_cache, parts.num_kv_blocks
        self.block_manager, self.scheduler = parts.block_manager, parts.scheduler
        self.runner, self.max_model_len = parts.runner, parts.max_model_len
        self.model_config = mc = parts.model_config
        self.tokenizer, self.eos_token_ids = parts.tokenizer, parts.eos_token_ids
        self.grammars = parts.grammars  # a benchmark may set its own (tools/bench_throughput.py)

        self.async_scheduling = (self.ops.name == "cuda" if engine_config.async_scheduling is None
                                 else engine_config.async_scheduling)
        self._in_flight: _Launched | None = None  # the launched step whose tokens are unread
        # Overlap only while this many sequences run: below it, a step waits for the one before
        # so that a request arriving meanwhile joins the next step, not the one after it (the
        # first token comes a step sooner; each step pays its host time on the device's clock).
        # An experiment until measured on the GPU: PAGEDSERVE_OVERLAP_MIN_SEQS, default 0.
        text = os.environ.get("PAGEDSERVE_OVERLAP_MIN_SEQS") or "0"
        if not text.isdigit():
            raise ConfigError(f"$PAGEDSERVE_OVERLAP_MIN_SEQS must be a whole number >= 0, got "
                              f"{text!r}")
        self.overlap_min_seqs = int(text)
        spec = engine_config.speculative_config
        self.spec = SpecDecoder(spec) if spec is not None else None  # None: never speculates
        self.requests = RequestTable(engine_config, self.scheduler, mc.vocab_size,
                                     self.max_model_len, self.eos_token_ids)
        self.postprocessor = Postprocessor(self.requests, self.scheduler, self.block_manager,
                                           self.eos_token_ids, self.max_model_len, mc.vocab_size)
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self.dead_error: EngineDeadError | None = None  # set once the core cannot go on
        # The step whose tokens were read last: when it was launched and when its tokens were
        # back (time.monotonic()); the core process stamps first tokens with them.
        self.last_read: tuple[float, float] = (0.0, 0.0)
        # Everything built so far (the model, graphs, modules) lives as long as the core; frozen,
        # the garbage collector's full collections skip it. Unfrozen, each walks all of it: a
        # 29 ms host stall in a W1-sized run on the CPU (3 ms frozen), longer than the one step
        # the device has queued (W1 on the H200 idled in five 19-28 ms gaps of that rhythm).
        # shutdown() unfreezes, so that its collection reclaims cycles.
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------------ requests

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; raise ValueError naming the field if it can never run."""
        self.check_alive()
        self.requests.add(req, self.grammar_compiler)

    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-outputs compiler; ValueError if this model cannot have one."""
        if self.grammars is None:
            raise ValueError("structured_outputs needs the model's tokenizer, and this model has "
                             "none")
        return self.grammars

    def abort_requests(self, request_ids: list[str]) -> None:
        """Free the requests' blocks; ids that already finished (or never came) are ignored."""
        self.requests.abort(request_ids)

    def finish_sequences(self, items: list[tuple[str, int, str]]) -> None:
        """(request_id, index, stop_string): the front found a stop string; free the sequence.
        Its tokens of any step still under way are dropped by the front."""
        self.requests.finish_sequences(items)

    def has_unfinished_requests(self) -> bool:
        """False once the core is dead or shut down: nothing it holds can run any more. An idle
        core first releases the blocks of the sequences its last step ended (step() returns
        their outputs before that: BlockManager.free(defer=True))."""
        if self.dead_error is not None or self.is_closed:
            return False
        if not self.requests:
            self.block_manager.settle()
        # An abort can empty the table with a step in flight: one more step() reads it, rather
        # than the idle core holding it (and its batch) until the next request.
        return bool(self.requests) or self._in_flight is not None

    def check_alive(self) -> None:
        """Raise RuntimeError once shut down, EngineDeadError once dead."""
        if self.is_closed:
            raise RuntimeError("this engine was shut down; build a new one")
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead_error}") from self.dead_error

    def check_workers(self) -> None:
        """EngineDeadError once a tensor-parallel worker has died or failed: an idle engine
        notices it here (the engine-core process asks while it waits) rather than at the next
        step."""
        if self.workers is None or self.dead_error is not None or self.is_closed:
            return
        try:
            self.workers.check_peers()
        except CommunicatorError as e:
            self.dead_error = EngineDeadError(f"the tensor-parallel group failed: {e}")
            raise self.dead_error from e

    @property
    def is_closed(self) -> bool:
        return self.runner is None

    # ------------------------------------------------------------------ one step

    def step(self) -> list[SeqOutput]:
        """Launch the next step; return the tokens of the step launched last (overlapped) or of
        this one (synchronous). A failure of one sequence fails its request alone (SeqOutput
        finish_reason "error"); a failure of a whole step fails that step's requests; either way
        the core goes on. EngineDeadError: it cannot go on."""
        self.check_alive()
        outputs: list[SeqOutput] = []
        if self.requests.compiling:
            self.requests.start_grammars(outputs)
        # NOTE: a constrained sequence's mask for draft row j would need its matcher advanced
        # through the first j drafts; until that exists, no step speculates while one runs.
        speculate = (self.spec is not None and self.spec.should_speculate(self.scheduler)
                     and not self._has_constrained())
        overlap = (self.async_scheduling and not speculate
                   and self.scheduler.num_running >= self.overlap_min_seqs)
        if not overlap and self._in_flight is not None:
            # Drafts are drawn from known tokens; a synchronous step is scheduled from them.
            done, self._in_flight = self._in_flight, None
            self._read(done, outputs)
        drafted = self.spec.propose(self.scheduler.running) if speculate else []
        batch = self.scheduler.schedule()
        launched = None
        if (not batch.seqs and self._in_flight is None and self.requests.compiling
                and not outputs):
            self.requests.wait_for_grammars(timeout=0.05)  # sleep on them rather than spin
        if batch.seqs:
            self._prompt_tokens_total += self.requests.note_scheduled(batch)
            rows = batch.sampling_rows()
            fill = self._mask_filler(rows[0], outputs)
            handle = self._guard(lambda: self.runner.launch(batch, rows, fill), batch, outputs)
            if handle is not None:
                launched = _Launched(batch, rows[0], handle, time.monotonic())
                for seq in rows[0]:
                    seq.has_pending_token = True  # until postprocessing appends or drops it
                self.scheduler.advance(batch)
        if overlap:
            done, self._in_flight = self._in_flight, launched
        else:
            done = launched
        # Synchronous: key the blocks before a sequence that ends here frees them, or a prompt
        # run with max_tokens=1 would never reach the prefix cache. Drafts are first verified
        # (token_ids lacks them until then): a drafting sequence keys after, the others before.
        commit_first = done is launched and launched is not None
        if done is not None:
            self._read(done, outputs, commit_first)
        for seq in drafted:
            seq.spec_token_ids = []
        if launched is not None and (not commit_first or launched.batch.num_spec_tokens):
            # Every token the launched batch computed is known now: the previous step's are in,
            # its drafts verified.
            self.scheduler.commit(launched.batch)
        if self._in_flight is not None and not self.requests:
            # Nothing left to serve: read the last step (its tokens all belong to finished
            # sequences) rather than leave it pending until the next request.
            self._in_flight, last = None, self._in_flight
            self._guard(last.handle.result, last.batch, outputs)
        return outputs

    def _has_constrained(self) -> bool:
        s = self.scheduler
        return any(seq.matcher is not None or seq.later_matcher is not None
                   for seq in (*s.running, *s.waiting))

    def _read(self, done: _Launched, outputs: list[SeqOutput], commit_first=False,
              on_advanced=None) -> None:
        """Wait for a launched step's tokens and postprocess them; commit_first: key its blocks
        for the prefix cache before; on_advanced: called once its matchers have advanced."""
        sampled = self._guard(done.handle.result, done.batch, outputs)
        self.last_read = (done.launched_at, time.monotonic())
        self.requests.collect_prompt_logprobs(done.handle.prompt_logprobs)
        if commit_first:
            self.scheduler.commit(done.batch, undrafted_only=bool(done.batch.num_spec_tokens))
        if sampled is not None:
            self._generation_tokens_total += self.postprocessor.run(
                done.rows, sampled, outputs, self.grammars, self.spec, on_advanced)

    def _mask_filler(self, rows: list[Sequence], outputs: list[SeqOutput]):
        """fill_bitmask for runner.launch when a row is constrained (or may become so: a later
        matcher takes over once the previous token ends what it waits for), else None."""
        if all(seq.matcher is None and seq.later_matcher is None for seq in rows):
            return None

        def fill(out):
            # Called with this step's forward queued. A constrained row's mask needs its
            # sequence's previous token: read the step in flight first. Once its matchers have
            # advanced (and later matchers taken over), the masks fill on the grammar threads
            # while the rest of its postprocessing runs here; a row that finishes meanwhile
            # gets a mask it never uses (its token is dropped). None: no row is constrained
            # yet (every later matcher still waits), so there is no mask to apply.
            if self._in_flight is not None:
                done, self._in_flight = self._in_flight, None
                filling = []
                self._read(done, outputs, on_advanced=lambda: filling.append(
                    self.grammars.fill_bitmask_soon([seq.matcher for seq in rows], out)
                    if any(seq.matcher is not None for seq in rows) else None))
                if filling:
                    bitmask = filling[0] and filling[0].result()
                    allow_deferring(rows, bitmask)
                    return bitmask
            # Synchronous, or its step failed (no matcher advanced; a failed row has none).
            if all(seq.matcher is None for seq in rows):
                return None
            bitmask = self.grammars.fill_bitmask([seq.matcher for seq in rows], out)
            allow_deferring(rows, bitmask)
            return bitmask

        return fill

    def _guard(self, work, batch, outputs: list[SeqOutput]):
        """work()'s answer; if it raises, the batch's requests fail (None is returned), or the
        core is dead (EngineDeadError propagates, and every later call raises it again)."""
        try:
            return work()
        except EngineDeadError as e:
            self.dead_error = e
            raise
        except Exception as e:
            logger.exception("the model step failed; failing its requests")
            cause = f"the model step failed: {type(e).__name__}: {e}"
            for seq in batch.seqs:
                if seq.finish_reason is None:  # else its request ended (or was aborted, and
                    # its id may belong to a new request now)
                    self.requests.fail(seq.request_id, cause, outputs)
            return None

    # ------------------------------------------------------------------ stats

    def get_stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_blocks_used=bm.num_used_once_released,  # releasing none: they go out with outputs
            kv_blocks_total=self.num_kv_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            num_steps=s.num_steps,
            num_chunked_prefill_steps=s.num_chunked_prefill_steps,
            num_mixed_steps=s.num_mixed_steps,
            **(self.spec.stats() if self.spec is not None else {}),
        )

    def snapshot(self, since: int | None = None) -> dict:
        """The dashboard's view: block tables, queues and counters, as a keyframe or, when
        `since` is the number of the last snapshot, as the changes (engine/core/introspect.py)."""
        s = self.scheduler
        self.block_manager.settle()  # it draws no finished sequence: count none of their blocks
        return self._introspector.snapshot(s.running, s.waiting,
                                           dataclasses.asdict(self.get_stats()), since)

    @functools.cached_property
    def _introspector(self) -> Introspector:
        return Introspector(self.block_manager)

    def shutdown(self) -> None:
        """Drop every request and free the core's memory: on the GPU the KV cache, weights,
        decode graphs, cuBLAS workspace and the pool blocks they used. Idempotent. After it,
        add_request and step raise RuntimeError, has_unfinished_requests is False and aborts
        are ignored."""
        if self.is_closed:
            return
        self.requests.clear()
        self._in_flight = None
        if self.grammars is not None:
            self.grammars.shutdown()
        gc.unfreeze()  # what the core froze at start-up can be collected again
        # Every reference to a device array goes before the backend hands its pools back.
        self.runner.close()
        self.runner = self.model = self.kv_cache = None
        if self.workers is not None:
            self.workers.close()
        self.ops.close()
