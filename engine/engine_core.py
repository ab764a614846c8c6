"""EngineCore: token ids in, token ids out, one model step at a time.

    step():  batch = scheduler.schedule()      which sequences, how many new tokens each
             sampled = runner.run(batch)        one forward, one sample
             return self._postprocess(...)      append, check stop ids, free blocks

It owns the scheduler, the block manager and the runner (and with them the device), and knows no
text: the output processor (engine/output_processor.py) detokenizes and finds stop strings, and
tells the core through finish_sequences. In `pagedserve serve` it runs alone in the engine-core
process (engine/core_process.py); LLMEngine and LLM run it in-process.

Single-threaded by design: nothing here takes a lock.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from engine.core.block_manager import BlockManager
from engine.core.outputs import EngineCoreRequest, EngineStats, SeqOutput
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.core.stopping import check_stop_ids
from engine.executor.ops import get_ops, resolve_device
from engine.executor.runner import ModelRunner, num_kv_blocks
from engine.executor.transformer import Transformer
from engine.model.config import EngineConfig
from engine.model.loader import checkpoint_dtype, load_model
from engine.structured_outputs import GrammarCompiler

logger = logging.getLogger(__name__)


_ACCEPTED, _ENDED = object(), object()  # _advance_matchers' verdicts besides an error text


def auto_dtype(device: str, checkpoint: str) -> str:
    """dtype="auto": numpy computes in fp32; the GPU keeps fp16 checkpoints in fp16 and runs
    bf16 and fp32 ones (and dequantized GGUF) in bf16, whose range fp32 weights fit."""
    if device == "numpy":
        return "float32"
    return "float16" if checkpoint == "float16" else "bfloat16"


@dataclass(eq=False, slots=True)
class _CoreRequest:
    request_id: str
    seqs: list[Sequence]
    first_scheduled_time: float | None = None
    num_unfinished: int = 0
    grammar: Future | None = None  # the compiled grammar (structured outputs), while compiling
    errors: list = field(default_factory=list)  # SeqOutputs of a failed compile, for step()


class EngineCore:
    def __init__(self, engine_config: EngineConfig, loaded_model=None):
        """`loaded_model` (anything with .config, .weights, .tokenizer) skips load_model; tests use
        it to run tiny random models."""
        engine_config.validate()
        self.config = engine_config
        device = resolve_device(engine_config.device)
        logger.info("pagedserve device: %s", device)
        dtype = engine_config.dtype
        if dtype == "auto":
            dtype = auto_dtype(device, loaded_model.config.dtype if loaded_model else
                               checkpoint_dtype(engine_config.model))
        if device == "cuda" and dtype == "float32":
            raise ValueError("dtype 'float32' is the numpy backend's; the cuda backend computes in "
                             "'float16' or 'bfloat16'")
        self.ops = get_ops(device, dtype)
        if loaded_model is None:
            loaded_model = load_model(engine_config.model, self.ops,
                                      load_format=engine_config.load_format,
                                      seed=engine_config.seed)
        self.model_config = mc = loaded_model.config
        self.ops.check_model(mc)
        # Kept for the in-process front (LLMEngine); the core itself reads only its eos id.
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
        logger.info("KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, bs, num_blocks * bs)
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

        # Structured outputs need the tokens' bytes: only a model with a tokenizer has them (a
        # benchmark may set a compiler of its own on dummy weights).
        self.grammars = None
        if self.tokenizer is not None:
            self.grammars = GrammarCompiler.for_tokenizer(self.tokenizer, mc.vocab_size, eos)
        self._compiling: list[_CoreRequest] = []  # requests whose grammar is compiling

        self._rng = np.random.default_rng(engine_config.seed)
        self._requests: dict[str, _CoreRequest] = {}
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0

    # ------------------------------------------------------------------ requests

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; raise ValueError naming the field if it can never run."""
        if req.request_id in self._requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        ids, params = req.prompt_token_ids, req.params
        vocab = self.model_config.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids[{i}] = {t!r} is not a token id "
                                 f"(vocab_size {vocab})")
        for name, bad in (("logit_bias", params.logit_bias), ("stop_token_ids",
                                                               params.stop_token_ids)):
            for t in bad:
                if not 0 <= t < vocab:
                    raise ValueError(f"{name} has token id {t}, outside the vocabulary "
                                     f"(vocab_size {vocab})")
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
        for i in range(params.n):
            if params.seed is not None:
                seq_seed = np.random.SeedSequence([params.seed & (2**64 - 1), i])
                seed = int(seq_seed.generate_state(1, np.uint64)[0])
            else:
                seed = int(self._rng.integers(0, 2**63))
            seqs.append(Sequence(req.request_id, list(ids), len(ids), params, index=i,
                                 seed=seed, is_waiting_for_grammar=grammar is not None))
        for seq in seqs:
            # The scheduler rejects a prompt that can never fit before anything is queued: all n
            # sequences share the prompt, so the first one fails or none does.
            self.scheduler.add(seq)
        core_req = _CoreRequest(req.request_id, seqs, num_unfinished=len(seqs), grammar=grammar)
        self._requests[req.request_id] = core_req
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

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ------------------------------------------------------------------ one step

    def step(self) -> list[SeqOutput]:
        failed = self._start_grammars() if self._compiling else []
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self._compiling and not failed:
                # Only grammars to wait for: sleep on them rather than spin.
                concurrent.futures.wait([r.grammar for r in self._compiling], timeout=0.05,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
            return failed
        sampling = batch.sampling_seqs
        self._count_prompt_tokens(batch)  # before finish_step moves num_computed_tokens
        fill_bitmask = None
        if any(s.matcher is not None for s in sampling):
            # Read when called, after the forward is queued: each matcher as it stands then.
            fill_bitmask = lambda: self.grammars.fill_bitmask(  # noqa: E731
                [s.matcher for s in sampling])
        sampled = self.runner.run(batch, fill_bitmask)
        self.scheduler.finish_step(batch)
        if not sampling:
            return failed
        return failed + self._postprocess(sampling, sampled)

    def _start_grammars(self) -> list[SeqOutput]:
        """Give every sequence whose grammar finished compiling its own matcher, so the scheduler
        takes it; a grammar that failed ends its request with "error"."""
        still, failed = [], []
        for req in self._compiling:
            if not req.grammar.done():
                still.append(req)
                continue
            if self._requests.get(req.request_id) is not req:  # aborted while compiling
                continue
            error = req.grammar.exception()
            for seq in req.seqs:
                if error is not None:
                    failed.append(SeqOutput(req.request_id, seq.index, [], None, 0.0, "error",
                                            None, error=str(error)))
                    self._finish(req, seq, "error")
                else:
                    seq.matcher = req.grammar.result().deep_copy()
                    seq.is_waiting_for_grammar = False
            req.grammar = None
        self._compiling = still
        return failed

    def _count_prompt_tokens(self, batch) -> None:
        now = None
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            c = seq.num_computed_tokens
            if c < seq.num_prompt_tokens:  # some prompt tokens: a prefill, or a 1-token tail
                req = self._requests[seq.request_id]
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now = now or time.time()
                self._prompt_tokens_total += min(c + n, seq.num_prompt_tokens) - c

    def _postprocess(self, seqs: list[Sequence], sampled) -> list[SeqOutput]:
        """Append each sampled token, check the id stop rules, free finished sequences."""
        requests = self._requests
        eos, max_len = self.eos_token_ids, self.max_model_len
        tokens, logprobs = sampled.token_ids.tolist(), sampled.logprobs.tolist()
        top_ids = top_logprobs = None
        outputs = []
        verdicts = self._advance_matchers(seqs, tokens)
        for r, seq in enumerate(seqs):
            req = requests[seq.request_id]
            token, logprob = tokens[r], logprobs[r]
            seq.token_ids.append(token)
            seq.cumulative_logprob += logprob
            p = seq.sampling_params
            new_logprobs = None
            if p.logprobs is not None:
                entry = {}
                if p.logprobs:
                    if top_ids is None:
                        top_ids, top_logprobs = sampled.top_ids.tolist(), \
                            sampled.top_logprobs.tolist()
                    k = p.logprobs
                    # A masked token's logprob is -inf: not a number JSON can carry, and not
                    # a choice the model had.
                    entry = {t: v for t, v in zip(top_ids[r][:k], top_logprobs[r][:k],
                                                  strict=True) if v != -np.inf}
                entry[token] = logprob
                new_logprobs = [entry]
            reason, stop = check_stop_ids(seq, token, eos, max_len)
            error = None
            if verdicts is not None and reason is None and verdicts[r] is not _ACCEPTED:
                if verdicts[r] is _ENDED:
                    # The grammar was complete and allowed only eos, yet the sequence goes on
                    # (ignore_eos, min_tokens): the token stands for eos.
                    reason = "stop"
                else:
                    reason, error = "error", f"the grammar refused token {token}: {verdicts[r]}"
            out = SeqOutput(seq.request_id, seq.index, [token], new_logprobs,
                            seq.cumulative_logprob, reason, stop, error)
            if seq.num_output_tokens == 1:
                out.first_scheduled_time = req.first_scheduled_time
            outputs.append(out)
            if reason is not None:
                self._finish(req, seq, reason)
        self._generation_tokens_total += len(seqs)
        return outputs

    def _advance_matchers(self, seqs: list[Sequence], tokens: list[int]) -> list | None:
        """Feed each constrained sequence's matcher its sampled token (in parallel, off the GIL).
        Per row: _ACCEPTED, _ENDED (its grammar had already ended), or the grammar's error text;
        None when no row is constrained."""
        if all(seq.matcher is None for seq in seqs):
            return None
        verdicts = [_ACCEPTED] * len(seqs)
        rows = []
        for r, seq in enumerate(seqs):
            if seq.matcher is None:
                continue
            if seq.matcher.is_stopped():
                verdicts[r] = _ENDED
            else:
                rows.append(r)
        accepted = self.grammars.consume([(seqs[r].matcher, tokens[r]) for r in rows]) \
            if rows else []
        for r, ok in zip(rows, accepted, strict=True):
            if not ok:
                verdicts[r] = seqs[r].matcher.get_error()
        return verdicts

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

    def shutdown(self) -> None:
        """Drop the device arrays (weights, KV cache, graphs) so their memory can be freed."""
        self.runner = self.model = self.kv_cache = None
        self._requests.clear()
        if self.grammars is not None:
            self.grammars.shutdown()
