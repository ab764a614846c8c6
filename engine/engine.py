"""LLMEngine: requests in, RequestOutputs out, one model step at a time.

    step():  batch = scheduler.schedule()      which sequences, how many new tokens each
             sampled = runner.run(batch, rows)  one forward, one sample
             return self._postprocess(...)      append, detokenize, check stop, free blocks

Single-threaded by design: the server queues add_request/abort and calls them from the engine's
own thread, so nothing here takes a lock.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from engine.core.block_manager import BlockManager
from engine.core.introspect import Introspector
from engine.core.outputs import (
    CompletionOutput,
    EngineDeadError,
    ListPrefix,
    RequestMetrics,
    RequestOutput,
)
from engine.core.sampling_params import ParamError, SamplingParams
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.core.stopping import SeqState, check_stop, text_delta
from engine.executor.ops import get_ops, resolve_device
from engine.executor.runner import ModelRunner, num_kv_blocks
from engine.executor.transformer import Transformer
from engine.model.config import EngineConfig
from engine.model.loader import checkpoint_dtype, load_model

logger = logging.getLogger("pagedserve." + __name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int  # prompt tokens run through the model (prefix-cache hits excluded)
    generation_tokens_total: int
    num_steps: int
    num_chunked_prefill_steps: int
    num_mixed_steps: int


@dataclass(eq=False, slots=True)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    states: list[SeqState]
    metrics: RequestMetrics
    finished: bool = field(default=False)


def auto_dtype(device: str, checkpoint: str) -> str:
    """dtype="auto": numpy computes in fp32; the GPU keeps fp16 checkpoints in fp16 and runs
    bf16 and fp32 ones (and dequantized GGUF) in bf16, whose range fp32 weights fit."""
    if device == "numpy":
        return "float32"
    return "float16" if checkpoint == "float16" else "bfloat16"


class LLMEngine:
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
        if loaded_model is None:
            loaded_model = load_model(engine_config.model, self.ops,
                                      load_format=engine_config.load_format,
                                      seed=engine_config.seed)
        self.model_config = mc = loaded_model.config
        self.ops.check_model(mc)
        self.tokenizer = loaded_model.tokenizer
        self.max_model_len = engine_config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d",
                           self.max_model_len, mc.max_position_embeddings)
        self.model = Transformer(mc, loaded_model.weights, self.ops, self.max_model_len)

        self.num_kv_blocks = num_blocks = num_kv_blocks(mc, engine_config, self.ops,
                                                        self.max_model_len)
        bs = engine_config.block_size
        self.kv_cache = self.ops.alloc_kv_cache(mc.num_layers, num_blocks, mc.num_kv_heads, bs,
                                                mc.head_dim)
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
        self.runner = ModelRunner(mc, engine_config, self.ops, self.model, self.kv_cache,
                                  eos_token_ids=eos, max_model_len=self.max_model_len)

        self._rng = np.random.default_rng(engine_config.seed)
        self._requests: dict[str, _Request] = {}
        self._seq_states: dict[int, tuple[_Request, SeqState]] = {}  # seq_id -> its request
        self._aborted: list[_Request] = []  # reported as finished by the next step()
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self.dead_error: EngineDeadError | None = None  # set once the engine cannot go on

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. `prompt`: text, or {"prompt_token_ids": [...]}."""
        self._check_alive()
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError("sampling_params must be a SamplingParams, "
                            f"got {type(params).__name__}")
        text, ids = self._encode(prompt)
        self._check_params(params)
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, more than max_model_len "
                             f"({self.max_model_len})")
        req = _Request(request_id, text, ids, params, [],
                       RequestMetrics(arrival_time if arrival_time is not None else time.time()))
        for i in range(params.n):
            if params.seed is not None:
                seq_seed = np.random.SeedSequence([params.seed & (2**64 - 1), i])
                seed = int(seq_seed.generate_state(1, np.uint64)[0])
            else:
                seed = int(self._rng.integers(0, 2**63))
            seq = Sequence(request_id, list(ids), len(ids), params, index=i, seed=seed)
            detok = None
            if self.tokenizer is not None:
                from engine.model.tokenizer import IncrementalDetokenizer

                detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            req.states.append(SeqState(seq, detok, logprobs=[] if params.logprobs is not None
                                        else None))
        # Only the first sequence is queued: the other n - 1 fork from it once its prompt is
        # computed, sharing the prompt's blocks. The scheduler rejects a prompt that can never
        # fit before anything is queued.
        first = req.states[0].seq
        self.scheduler.add(first)
        first.forks = [state.seq for state in req.states[1:]]
        for state in req.states:
            self._seq_states[state.seq.seq_id] = (req, state)
        self._requests[request_id] = req

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the model has no tokenizer; "
                                 "pass {'prompt_token_ids': [...]}")
            text, ids = prompt, list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            vocab = self.model_config.vocab_size
            for i, t in enumerate(ids):
                is_int = isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                if not is_int or not 0 <= t < vocab:
                    raise ValueError(f"prompt_token_ids[{i}] = {t!r} is not a token id "
                                     f"(vocab_size {vocab})")
            ids = [int(t) for t in ids]
        else:
            raise TypeError("prompt must be a str or a dict with 'prompt_token_ids', "
                            f"got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty: it must have at least one token")
        return text, ids

    def _check_params(self, p: SamplingParams):
        if p.n > self.config.max_num_seqs:  # the n sequences must fit in one batch
            raise ParamError("n", f"n ({p.n}) must be <= max_num_seqs ({self.config.max_num_seqs})")
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", p.logit_bias), ("stop_token_ids", p.stop_token_ids)):
            for t in ids:
                if not 0 <= t < vocab:
                    raise ParamError(name, f"{name} has token id {t}, outside the vocabulary "
                                           f"(vocab_size {vocab})")
        if p.stop_list and self.tokenizer is None:
            raise ParamError("stop", "stop strings need a tokenizer, and the model has none")

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; a request that already finished is ignored."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort(request_id)
        for state in req.states:
            self._seq_states.pop(state.seq.seq_id, None)
            if state.seq.finish_reason is None:
                state.seq.finish_reason = "abort"
        self._aborted.append(req)

    def has_unfinished_requests(self) -> bool:
        """False once the engine is dead or shut down: nothing it holds can run any more."""
        if self.dead_error is not None or self.is_closed:
            return False
        return bool(self._requests) or bool(self._aborted)

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        """One model step. A failure of one sequence fails its request alone (finish_reason
        "error", the cause in CompletionOutput.error); a failure of the whole forward fails the
        step's requests; either way the engine goes on. EngineDeadError: it cannot go on."""
        self._check_alive()
        changed = {id(r): r for r in self._aborted}
        self._aborted = []
        batch = self.scheduler.schedule()
        if batch.seqs:
            sampling = self._start_step(batch)
            try:
                sampled = self.runner.run(batch, sampling)
            except EngineDeadError as e:
                self.dead_error = e
                raise
            except Exception as e:
                logger.exception("the model step failed; failing its requests")
                cause = f"the model step failed: {type(e).__name__}: {e}"
                for seq in batch.seqs:
                    self._fail(seq.request_id, cause, changed)
            else:
                self.scheduler.finish_step(batch)
                if sampling[0]:
                    self._postprocess(sampling[0], sampled, changed)
        make_output = self._make_output
        return [make_output(req) for req in changed.values()]

    def _check_alive(self) -> None:
        if self.is_closed:
            raise RuntimeError("this engine was shut down; build a new one")
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead_error}") from self.dead_error

    @property
    def is_closed(self) -> bool:
        return self.runner is None

    def shutdown(self) -> None:
        """Drop every request and free the engine's memory: on the GPU the KV cache, weights,
        decode graphs, cuBLAS workspace and the pool blocks they used. Idempotent; any later
        call but this one raises RuntimeError."""
        if self.is_closed:
            return
        self._requests.clear()
        self._seq_states.clear()
        self._aborted = []
        # Every reference to a device array goes before the backend hands its pools back.
        self.runner.close()
        self.runner = self.model = self.kv_cache = None
        self.ops.close()

    def _fail(self, request_id: str, cause: str, changed: dict[int, _Request]) -> None:
        """End every sequence of the request with finish_reason "error" and `cause`, freeing
        its blocks; a request that already ended is left alone."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for state in req.states:
            seq = state.seq
            self._seq_states.pop(seq.seq_id, None)
            if seq.finish_reason is None:
                self.scheduler.finish_seq(seq, "error")  # its pending forks end with it
            if seq.finish_reason == "error" and seq.error is None:
                seq.error = cause
        req.metrics.finished_time = time.time()
        changed[id(req)] = req

    def _start_step(self, batch) -> tuple[list[Sequence], list[int]]:
        """Count the prompt tokens the batch computes; batch.sampling_rows(), which must be read
        before finish_step moves num_computed_tokens."""
        now = None
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            c = seq.num_computed_tokens
            if c < seq.num_prompt_tokens:  # some prompt tokens: a prefill, or a 1-token tail
                metrics = self._seq_states[seq.seq_id][0].metrics
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = now = now or time.time()
                self._prompt_tokens_total += min(c + n, seq.num_prompt_tokens) - c
        return batch.sampling_rows()

    def _postprocess(self, seqs: list[Sequence], sampled, changed: dict[int, _Request]) -> None:
        """Append each sampled token, check stops, free finished sequences; add every request
        that got a token to `changed`."""
        now = time.time()
        seq_states = self._seq_states
        tokens, logprobs = sampled.token_ids.tolist(), sampled.logprobs.tolist()
        errors = sampled.errors or {}
        for r, seq in enumerate(seqs):
            entry = seq_states.get(seq.seq_id)
            if entry is None:  # its request failed earlier in this loop
                continue
            req, state = entry
            if r in errors:
                self._fail(req.request_id, errors[r], changed)
                continue
            try:
                self._append(seq, req, state, r, tokens[r], logprobs[r], sampled, now, changed)
            except Exception as e:  # the stop check or the detokenizer, for this request alone
                logger.exception("request %s failed after its step", req.request_id)
                self._fail(req.request_id, f"{type(e).__name__}: {e}", changed)
        self._generation_tokens_total += len(seqs)

    def _append(self, seq: Sequence, req: _Request, state: SeqState, r: int, token: int,
                logprob: float, sampled, now: float, changed: dict[int, _Request]) -> None:
        """Row r of `sampled`: append its token to `seq`, check stops, free it if it ends."""
        if not 0 <= token < self.model_config.vocab_size:  # never hand the detokenizer garbage
            raise RuntimeError(f"the sampler returned token id {token}, outside the vocabulary")
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        if state.logprobs is not None:
            k = req.params.logprobs
            entry = {}
            if k:
                entry = dict(zip(sampled.top_ids[r, :k].tolist(),
                                 sampled.top_logprobs[r, :k].tolist(), strict=True))
            entry[token] = logprob
            state.logprobs.append(entry)
        changed[id(req)] = req
        reason = check_stop(state, seq, token, self.eos_token_ids, self.max_model_len)
        if reason is not None:
            self.scheduler.finish_seq(seq, reason)
            seq.finish_reason = reason
            del self._seq_states[seq.seq_id]
            if all(s.seq.finish_reason is not None for s in req.states):
                req.metrics.finished_time = now
                self._requests.pop(req.request_id, None)

    def _make_output(self, req: _Request) -> RequestOutput:
        outputs = []
        finished = True
        for state in req.states:
            seq = state.seq
            token_ids, num_prompt = seq.token_ids, seq.num_prompt_tokens
            num_tokens = len(token_ids)
            num_sent = state.num_sent_tokens
            state.num_sent_tokens = num_tokens - num_prompt
            if state.detokenizer is None:  # no tokenizer: no text, and no stop strings
                text = delta_text = ""
            else:
                text, delta_text = text_delta(state, req.params)
            lps = state.logprobs
            # The whole token_ids / logprobs are copied only if read (outputs.ListPrefix).
            outputs.append(CompletionOutput(
                seq.index, text, ListPrefix(token_ids, num_prompt, num_tokens),
                seq.cumulative_logprob, None if lps is None else ListPrefix(lps, 0, len(lps)),
                seq.finish_reason, state.stop_reason, delta_text,
                token_ids[num_prompt + num_sent :], None if lps is None else lps[num_sent:],
                seq.error))
            if seq.finish_reason is None:
                finished = False
        if finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.time()
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, finished,
                             req.metrics)

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
        )

    def snapshot(self, since: int | None = None) -> dict:
        """The dashboard's view (engine/core/introspect.py): block tables, queues and counters,
        as a keyframe or, when `since` is the number of the last snapshot, as the changes."""
        s = self.scheduler
        return self._introspector.snapshot(s.running, s.waiting,
                                           dataclasses.asdict(self.get_stats()), since)

    @functools.cached_property
    def _introspector(self) -> Introspector:
        return Introspector(self.block_manager)
