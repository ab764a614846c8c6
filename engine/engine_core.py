"""EngineCore: token ids in, token ids out, one model step at a time.

    step():  batch = scheduler.schedule()      which sequences, how many new tokens each
             handle = runner.launch(batch)      one forward, one sample, queued on the device
             sampled = previous.result()        the step launched one call earlier (overlap)
             return self._postprocess(...)      append, check stop ids, free blocks

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

It owns the scheduler, the block manager and the runner (and with them the device), and knows no
text: the output processor (engine/output_processor.py) detokenizes and finds stop strings, and
tells the core through finish_sequences. In `pagedserve serve` it runs alone in the engine-core
process (engine/core_process.py); LLMEngine and LLM run it in-process.

Single-threaded by design: nothing here takes a lock.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from engine.beam_search import BeamSearch
from engine.core.block_manager import BlockManager
from engine.core.introspect import Introspector
from engine.core.outputs import EngineCoreRequest, EngineDeadError, EngineStats, SeqOutput
from engine.core.sampling_params import ParamError
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.core.stopping import check_stop_ids
from engine.executor.distributed import CommunicatorError
from engine.executor.ops import get_ops, resolve_device
from engine.executor.runner import ModelRunner, num_kv_blocks
from engine.executor.tensor_parallel import release_unused_memory
from engine.executor.transformer import Transformer
from engine.executor.workers import WorkerGroup
from engine.model.config import EngineConfig
from engine.model.loader import checkpoint_dtype, load_model
from engine.spec_decode import SpecDecoder
from engine.structured_outputs import ACCEPTED, ENDED, GrammarCompiler

logger = logging.getLogger("pagedserve." + __name__)


def auto_dtype(device: str, checkpoint: str) -> str:
    """dtype="auto": numpy computes in fp32; the GPU keeps fp16 checkpoints in fp16 and runs
    bf16 and fp32 ones (and dequantized GGUF) in bf16, whose range fp32 weights fit."""
    if device == "numpy":
        return "float32"
    return "float16" if checkpoint == "float16" else "bfloat16"


@dataclass(slots=True)
class _Launched:
    batch: object  # ScheduledBatch
    rows: list[Sequence]  # who samples, in the order of the step's sampled ids (forks last)
    handle: object  # runner.StepHandle


@dataclass(eq=False, slots=True)
class _CoreRequest:
    request_id: str
    seqs: list[Sequence]
    first_scheduled_time: float | None = None
    num_unfinished: int = 0
    prompt_logprobs: list | None = None  # collected so far, when the params ask
    beam: BeamSearch | None = None  # use_beam_search: the live and finished beams
    has_output: bool = False  # the first output (which carries prompt_logprobs) went out
    grammar: Future | None = None  # the compiled grammar (structured outputs), while compiling


class EngineCore:
    def __init__(self, engine_config: EngineConfig, loaded_model=None):
        """`loaded_model` (anything with .config, .weights, .tokenizer) skips load_model; tests use
        it to run tiny random models."""
        engine_config.validate()
        self.config = engine_config
        device = resolve_device(engine_config.device)
        dtype = engine_config.dtype
        if dtype == "auto":
            dtype = auto_dtype(device, loaded_model.config.dtype if loaded_model else
                               checkpoint_dtype(engine_config.model))
        self.ops = get_ops(device, dtype, engine_config.cpu_threads)
        send_weights = loaded_model is not None  # workers cannot load a model given in memory
        if loaded_model is None:
            loaded_model = load_model(engine_config.model, self.ops,
                                      load_format=engine_config.load_format,
                                      quantization=engine_config.quantization,
                                      gguf_dequantize=engine_config.gguf_dequantize,
                                      seed=engine_config.seed)
        self.model_config = mc = loaded_model.config
        self.ops.check_model(mc)
        # Kept for the in-process front (LLMEngine); the core itself reads only its eos id.
        self.tokenizer = loaded_model.tokenizer
        self.max_model_len = engine_config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d",
                           self.max_model_len, mc.max_position_embeddings)
        # Tensor parallel: this process is rank 0; `part` is one rank's shape (its heads, its
        # slice of the MLP), which its transformer and KV cache take.
        self.workers, part, weights = None, mc, loaded_model.weights
        if engine_config.tensor_parallel_size > 1:
            self.workers = WorkerGroup(engine_config, device, dtype, self.ops, loaded_model,
                                       send_weights)
            self.ops, part, weights = self.workers.ops, self.workers.config, self.workers.weights
            loaded_model = None  # only this rank's slice stays
            release_unused_memory(self.ops)
        try:
            self._start(engine_config, mc, part, weights)
        except BaseException:
            if self.workers is not None:
                self.workers.close()
            raise

    def _start(self, engine_config: EngineConfig, mc, part, weights) -> None:
        """Model, KV cache, scheduler and runner, on this rank's part of the model."""
        self.model = Transformer(part, weights, self.ops, self.max_model_len)

        self.num_kv_blocks = num_blocks = num_kv_blocks(part, engine_config, self.ops,
                                                        self.max_model_len)
        bs = engine_config.block_size
        self.kv_cache = self.ops.alloc_kv_cache(part.num_layers, num_blocks, part.num_kv_heads,
                                                bs, part.head_dim)
        if num_blocks * bs < self.max_model_len:
            # A sequence longer than the whole pool could only preempt itself forever.
            if engine_config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len ({self.max_model_len}) is more than the KV cache holds "
                    f"({num_blocks} blocks x {bs} = {num_blocks * bs} tokens); lower "
                    "max_model_len or give more num_kv_blocks / gpu_memory_utilization")
            logger.warning("max_model_len lowered from %d to %d, what the KV cache holds",
                           self.max_model_len, num_blocks * bs)
            self.max_model_len = num_blocks * bs
        self.block_manager = BlockManager(num_blocks, bs, engine_config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, engine_config.max_num_seqs,
                                   engine_config.max_num_batched_tokens, self.max_model_len)
        eos = list(mc.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None and tok_eos not in eos:
            eos.append(tok_eos)
        self.eos_token_ids = eos
        if self.workers is not None:
            self.workers.start_runners(num_blocks, self.max_model_len, eos)
        self.runner = ModelRunner(mc, engine_config, self.ops, self.model, self.kv_cache,
                                  eos_token_ids=eos, max_model_len=self.max_model_len,
                                  workers=self.workers)

        self.async_scheduling = (self.ops.name == "cuda" if engine_config.async_scheduling is None
                                 else engine_config.async_scheduling)
        self._in_flight: _Launched | None = None  # the launched step whose tokens are unread
        # Structured outputs need the tokens' bytes: only a model with a tokenizer has them (a
        # benchmark may set a compiler of its own on dummy weights).
        self.grammars = None
        if self.tokenizer is not None:
            self.grammars = GrammarCompiler.for_tokenizer(self.tokenizer, mc.vocab_size, eos)
        self._compiling: list[_CoreRequest] = []  # requests whose grammar is compiling
        # Unseeded requests draw their seeds here; data-parallel cores offset theirs by rank, so
        # two cores never hand the same seed stream to the requests they run.
        self._rng = np.random.default_rng(engine_config.seed + engine_config.data_parallel_rank)
        spec = engine_config.speculative_config
        self.spec = SpecDecoder(spec) if spec is not None else None  # None: never speculates
        self._requests: dict[str, _CoreRequest] = {}
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self.dead_error: EngineDeadError | None = None  # set once the core cannot go on

    # ------------------------------------------------------------------ requests

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; raise ValueError naming the field if it can never run."""
        self.check_alive()
        if req.request_id in self._requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        ids, params = req.prompt_token_ids, req.params
        vocab = self.model_config.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids[{i}] = {t!r}: token id {t} is out of "
                                 f"vocabulary (vocab_size {vocab})")
        for name in ("logit_bias", "stop_token_ids", "allowed_token_ids", "logprob_token_ids"):
            bad = [t for t in getattr(params, name) or () if not 0 <= t < vocab]
            if bad:  # vLLM's clients look for the ids, the size and "out of vocabulary"
                raise ParamError(name, f"{name} has token id(s) {bad} out of vocabulary "
                                       f"(vocab_size {vocab})")
        cap = vocab if self.config.max_logprobs == -1 else self.config.max_logprobs
        top_k = None if params.logprob_token_ids else params.logprobs  # chosen ids: no top-k
        for name, k in (("logprobs", top_k), ("prompt_logprobs", params.prompt_logprobs)):
            if k is not None and (vocab if k == -1 else k) > cap:
                asked = f"-1 (the whole vocabulary, {vocab})" if k == -1 else str(k)
                raise ParamError(name, f"{name} {asked} is more than max_logprobs ({cap}); "
                                       "the server's --max-logprobs sets it")
        if params.n > self.config.max_num_seqs:  # the n sequences must fit in one batch
            raise ParamError("n", f"n ({params.n}) must be <= max_num_seqs "
                                  f"({self.config.max_num_seqs})")
        if params.use_beam_search and params.beam_width > self.config.max_num_seqs:
            raise ParamError("best_of", f"best_of (the beam width, {params.beam_width}) must "
                                        f"be <= max_num_seqs ({self.config.max_num_seqs})")
        if not ids:
            raise ValueError("prompt is empty: it must have at least one token")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, more than max_model_len "
                             f"({self.max_model_len})")
        grammar = None
        if params.structured_outputs is not None:
            # Compiled on the pool (a cache hit is ready at once); the sequences wait in the
            # queue meanwhile, and step() hands them their matchers.
            grammar = self.grammar_compiler().submit(params.structured_outputs)
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
        core_req = self._requests[req.request_id] = _CoreRequest(
            req.request_id, seqs, num_unfinished=len(seqs),
            prompt_logprobs=None if params.prompt_logprobs is None else [None], grammar=grammar)
        if params.use_beam_search:
            core_req.beam = BeamSearch(req.request_id, list(seqs), self.eos_token_ids,
                                       self.max_model_len, token_logprobs={seqs[0].seq_id: []})
        if grammar is not None:
            self._compiling.append(core_req)

    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-outputs compiler; ValueError if this model cannot have one."""
        if self.grammars is None:
            raise ValueError("structured_outputs needs the model's tokenizer, and this model has "
                             "none")
        return self.grammars

    def abort_requests(self, request_ids: list[str]) -> None:
        """Free the requests' blocks; ids that already finished (or never came) are ignored."""
        for request_id in request_ids:
            if self._requests.pop(request_id, None) is not None:
                self.scheduler.abort(request_id)

    def finish_sequences(self, items: list[tuple[str, int, str]]) -> None:
        """(request_id, index, stop_string): the front found a stop string; free the sequence.
        Its tokens of any step still under way are dropped by the front."""
        for request_id, index, _stop in items:
            req = self._requests.get(request_id)
            if req is None or req.seqs[index].finish_reason is not None:
                continue
            self._finish(req, req.seqs[index], "stop")

    def _finish(self, req: _CoreRequest, seq: Sequence, reason: str) -> None:
        self.scheduler.finish_seq(seq, reason)
        req.num_unfinished -= 1
        if req.num_unfinished == 0:
            del self._requests[req.request_id]

    def _fail(self, request_id: str, cause: str, outputs: list[SeqOutput]) -> None:
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

    def has_unfinished_requests(self) -> bool:
        """False once the core is dead or shut down: nothing it holds can run any more."""
        if self.dead_error is not None or self.is_closed:
            return False
        return bool(self._requests)

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
        if self._compiling:
            self._start_grammars(outputs)
        # NOTE: a constrained sequence's mask for draft row j would need its matcher advanced
        # through the first j drafts; until that exists, no step speculates while one runs.
        speculate = (self.spec is not None and self.spec.should_speculate(self.scheduler)
                     and not self._has_constrained())
        if speculate and self._in_flight is not None:  # drafts are drawn from known tokens
            done, self._in_flight = self._in_flight, None
            self._read(done, outputs)
        drafted = self.spec.propose(self.scheduler.running) if speculate else []
        batch = self.scheduler.schedule()
        launched = None
        if not batch.seqs and self._in_flight is None and self._compiling and not outputs:
            # Only grammars to wait for: sleep on them rather than spin.
            concurrent.futures.wait([r.grammar for r in self._compiling], timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        if batch.seqs:
            self._count_prompt_tokens(batch)  # before advance moves num_computed_tokens
            rows = batch.sampling_rows()
            fill = self._mask_filler(rows[0], outputs)
            handle = self._guard(lambda: self.runner.launch(batch, rows, fill), batch, outputs)
            if handle is not None:
                launched = _Launched(batch, rows[0], handle)
                for seq in rows[0]:
                    seq.has_pending_token = True  # until _postprocess appends or drops it
                self.scheduler.advance(batch)
        if self.async_scheduling and not speculate:
            done, self._in_flight = self._in_flight, launched
        else:
            done = launched
        # Synchronous and no drafts: key the blocks before a sequence that ends here frees them,
        # or a prompt run with max_tokens=1 would never reach the prefix cache. Drafts are first
        # verified (token_ids lacks them until then), so such a step keys after.
        commit_first = (done is launched and launched is not None
                        and not launched.batch.num_spec_tokens)
        if done is not None:
            self._read(done, outputs, commit_first)
        for seq in drafted:
            seq.spec_token_ids = []
        if launched is not None and not commit_first:
            # Every token the launched batch computed is known now: the previous step's are in.
            self.scheduler.commit(launched.batch)
        if self._in_flight is not None and not self._requests:
            # Nothing left to serve: read the last step (its tokens all belong to finished
            # sequences) rather than leave it pending until the next request.
            self._in_flight, last = None, self._in_flight
            self._guard(last.handle.result, last.batch, outputs)
        return outputs

    def _has_constrained(self) -> bool:
        s = self.scheduler
        return any(seq.matcher is not None for seq in (*s.running, *s.waiting))

    def _read(self, done: _Launched, outputs: list[SeqOutput], commit_first=False,
              on_advanced=None) -> None:
        """Wait for a launched step's tokens and postprocess them; commit_first: key its blocks
        for the prefix cache before; on_advanced: called once its matchers have advanced."""
        sampled = self._guard(done.handle.result, done.batch, outputs)
        self._collect_prompt_logprobs(done.handle.prompt_logprobs)
        if commit_first:
            self.scheduler.commit(done.batch)
        if sampled is not None:
            self._postprocess(done.rows, sampled, outputs, on_advanced)

    def _mask_filler(self, rows: list[Sequence], outputs: list[SeqOutput]):
        """fill_bitmask for runner.launch when a row is constrained, else None."""
        if all(seq.matcher is None for seq in rows):
            return None

        def fill(out):
            # Called with this step's forward queued. A constrained row's mask needs its
            # sequence's previous token: read the step in flight first. Once its matchers have
            # advanced, the masks fill on the grammar threads while the rest of its
            # postprocessing runs here; a row that finishes meanwhile gets a mask it never
            # uses (its token is dropped).
            matchers = [seq.matcher for seq in rows]
            if self._in_flight is None:
                return self.grammars.fill_bitmask(matchers, out)
            done, self._in_flight = self._in_flight, None
            filling = []
            self._read(done, outputs, on_advanced=lambda: filling.append(
                self.grammars.fill_bitmask_soon(matchers, out)))
            if filling:
                return filling[0].result()
            # Its step failed: no matcher advanced; a failed row has no matcher any more.
            return self.grammars.fill_bitmask([seq.matcher for seq in rows], out)

        return fill

    def _start_grammars(self, outputs: list[SeqOutput]) -> None:
        """Give every sequence whose grammar finished compiling its own matcher, so the scheduler
        takes it; a grammar that failed ends its request with "error"."""
        still = []
        for req in self._compiling:
            if not req.grammar.done():
                still.append(req)
                continue
            if self._requests.get(req.request_id) is not req:  # aborted while compiling
                continue
            error = req.grammar.exception()
            if error is not None:
                self._fail(req.request_id, str(error), outputs)
                continue
            for seq in req.seqs:
                seq.matcher = req.grammar.result().deep_copy()
                seq.is_waiting_for_grammar = False
            req.grammar = None
        self._compiling = still

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
                self._fail(seq.request_id, cause, outputs)
            return None

    def _count_prompt_tokens(self, batch) -> None:
        now = None
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            c = seq.num_computed_tokens
            if c < seq.num_prompt_tokens:  # some prompt tokens: a prefill, or a 1-token tail
                req = self._requests[seq.request_id]
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now = now or time.time()
                self._prompt_tokens_total += min(c + n, seq.num_prompt_tokens) - c

    def _collect_prompt_logprobs(self, scored: list) -> None:
        """Keep each request's scored prompt positions, in order; a recompute's repeats are
        dropped."""
        for item in scored:
            seq = item.seq
            req = self._requests.get(seq.request_id)
            if req is None or req.prompt_logprobs is None:
                continue
            collected = req.prompt_logprobs
            for position, entry in enumerate(item.entries, item.start):
                if position == len(collected):
                    collected.append(entry)
            seq.next_prompt_logprob = len(collected)

    def _postprocess(self, seqs: list[Sequence], sampled, outputs: list[SeqOutput],
                     on_advanced=None) -> None:
        """Append each sampled token, check the id stop rules, free finished sequences. The token
        of a sequence that finished after the step was launched is dropped. A sequence that
        verified k drafts owns k + 1 rows: it takes its accepted drafts and one more token, and
        its KV slots past them are rolled back. on_advanced() runs once the matchers have taken
        their tokens, before the rest."""
        tokens, logprobs = sampled.token_ids.tolist(), sampled.logprobs.tolist()
        errors = sampled.errors or {}
        top = None
        if sampled.top_ids is not None and sampled.top_ids.size:
            top = (sampled.top_ids.tolist(), sampled.top_logprobs.tolist())
        if sampled.row_logprobs:  # chosen ids or the whole vocabulary instead of the top-k
            top = top or ([[]] * len(tokens), [[]] * len(tokens))
            for r, (ids, lps) in sampled.row_logprobs.items():
                top[0][r], top[1][r] = ids.tolist(), lps.tolist()
        num_appended = 0
        verdicts = None
        if any(seq.matcher is not None for seq in seqs):
            # Constrained steps never speculate (step()), so row i is sequence i here.
            verdicts = self.grammars.advance([seq.matcher for seq in seqs], tokens, errors)
        if on_advanced is not None:
            on_advanced()
        r = 0  # this sequence's first row
        for i, seq in enumerate(seqs):
            k = len(seq.spec_token_ids)
            first, r = r, r + 1 + k
            seq.has_pending_token = False
            if seq.finish_reason is not None:
                continue
            req = self._requests[seq.request_id]
            if errors and any(j in errors for j in range(first, r)):
                self._fail(seq.request_id, next(errors[j] for j in range(first, r)
                                                if j in errors), outputs)
                continue
            verdict = ACCEPTED if verdicts is None else verdicts[i]
            if verdict is not ACCEPTED and verdict is not ENDED:
                self._fail(seq.request_id,
                           f"the grammar refused token {tokens[first]}: {verdict}", outputs)
                continue
            try:
                if req.beam is not None:  # beams never speculate: k == 0
                    self._beam_row(req, seq, top[0][first], top[1][first], outputs)
                    continue
                if k:
                    out = self._append_verified(req, seq, tokens, logprobs, top, first)
                else:
                    out = self._append(req, seq, tokens[first], logprobs[first], top, first,
                                       verdict is ENDED)
                outputs.append(out)
                num_appended += len(out.new_token_ids)
            except Exception as e:  # the stop check, for this request alone
                logger.exception("request %s failed after its step", seq.request_id)
                self._fail(seq.request_id, f"{type(e).__name__}: {e}", outputs)
        self._generation_tokens_total += num_appended

    def _beam_row(self, req: _CoreRequest, seq: Sequence, top_ids: list[int],
                  top_logprobs: list[float], outputs: list[SeqOutput]) -> None:
        """One beam's candidates; once all live beams have theirs, the next beams (forks share
        the KV blocks) or, at the end, the request's outputs."""
        beam = req.beam
        if not beam.report(seq, top_ids, top_logprobs):
            return
        done = beam.expand(self.scheduler, self._fork_beam)
        if done is None:
            return
        done[0].prompt_logprobs = req.prompt_logprobs
        done[0].num_cached_tokens = req.seqs[0].num_cached_tokens
        done[0].first_scheduled_time = req.first_scheduled_time
        self._generation_tokens_total += sum(len(o.new_token_ids) for o in done)
        outputs += done
        del self._requests[req.request_id]

    @staticmethod
    def _fork_beam(parent: Sequence) -> Sequence:
        child = Sequence(parent.request_id, list(parent.token_ids), parent.num_prompt_tokens,
                         parent.sampling_params, seed=parent.seed,
                         cumulative_logprob=parent.cumulative_logprob,
                         next_prompt_logprob=parent.num_prompt_tokens)
        child.num_cached_tokens = parent.num_cached_tokens
        return child

    def _append(self, req: _CoreRequest, seq: Sequence, token: int, logprob: float, top,
                r: int, grammar_ended: bool = False) -> SeqOutput:
        """Row r of the step: append its token to `seq`, check stops, free it if it ends.
        grammar_ended: the sequence's grammar was complete (it allowed only eos)."""
        if not 0 <= token < self.model_config.vocab_size:  # never hand the front garbage
            raise RuntimeError(f"the sampler returned token id {token}, outside the vocabulary")
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
            out.num_cached_tokens = seq.num_cached_tokens
        if reason is not None:
            self._finish(req, seq, reason)
        return out

    def _append_verified(self, req: _CoreRequest, seq: Sequence, tokens: list[int],
                         logprobs: list[float], top, first: int) -> SeqOutput:
        """A sequence that verified drafts in rows first..: append what the verdict keeps, one
        token at a time until a stop rule ends it (the rest are dropped), in one SeqOutput; roll
        back the KV slots past them (the rejected drafts' k/v are garbage)."""
        num = self.spec.verify(seq, tokens, first)
        outs = []
        for r in range(first, first + num):
            outs.append(self._append(req, seq, tokens[r], logprobs[r], top, r))
            if outs[-1].finish_reason is not None:
                break
        out = outs[-1]
        out.first_scheduled_time = outs[0].first_scheduled_time
        out.prompt_logprobs = outs[0].prompt_logprobs
        out.num_cached_tokens = outs[0].num_cached_tokens
        out.new_token_ids = [o.new_token_ids[0] for o in outs]
        if out.new_logprobs is not None:
            out.new_logprobs = [o.new_logprobs[0] for o in outs]
        out.token_logprobs = logprobs[first : first + len(outs)]
        if out.finish_reason is None:
            self.block_manager.truncate(seq, len(seq.token_ids) - 1)
        return out

    # ------------------------------------------------------------------ stats

    def get_stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_blocks_used=bm.num_used_blocks,
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
        return self._introspector.snapshot(s.running, s.waiting,
                                           dataclasses.asdict(self.get_stats()), since)

    @functools.cached_property
    def _introspector(self) -> Introspector:
        return Introspector(self.block_manager)

    def shutdown(self) -> None:
        """Drop every request and free the core's memory: on the GPU the KV cache, weights,
        decode graphs, cuBLAS workspace and the pool blocks they used. Idempotent; any later
        call but this one raises RuntimeError."""
        if self.is_closed:
            return
        self._requests.clear()
        self._in_flight = None
        if self.grammars is not None:
            self.grammars.shutdown()
        # Every reference to a device array goes before the backend hands its pools back.
        self.runner.close()
        self.runner = self.model = self.kv_cache = None
        if self.workers is not None:
            self.workers.close()
        self.ops.close()
