"""LLMEngine: requests in, RequestOutputs out, one model step at a time, all in this process.

    LLMEngine = tokenizer + OutputProcessor (text, stop strings)  +  EngineCore (token ids, model)

    step():  outputs = client.get_output()                  core.step(): schedule, forward,
                                                             sample, stop ids
             results, stopped = processor.process(outputs)   detokenize, stop strings
             client.finish_sequences(stopped)                free what a stop string ended

`pagedserve serve` splits the same two halves over two processes (server/async_engine.py,
engine/core_client.py); LLM uses this class.
"""

from __future__ import annotations

import time

import numpy as np

from engine.core.outputs import EngineCoreRequest, EngineStats, RequestOutput
from engine.core.sampling_params import SamplingParams, truncated_prompt
from engine.core_client import EngineCoreClient
from engine.core_setup import auto_dtype
from engine.engine_core import EngineCore
from engine.model.config import ConfigError, EngineConfig
from engine.output_processor import OutputProcessor

__all__ = ["EngineStats", "LLMEngine", "auto_dtype"]


class LLMEngine:
    def __init__(self, engine_config: EngineConfig, loaded_model=None):
        """`loaded_model` (anything with .config, .weights, .tokenizer) skips load_model; tests use
        it to run tiny random models."""
        if engine_config.data_parallel_size > 1:
            raise ConfigError(
                f"data_parallel_size {engine_config.data_parallel_size}: LLM and LLMEngine run "
                "one engine core in this process; serve several with `pagedserve serve "
                "--data-parallel-size N`")
        self.core = core = EngineCore(engine_config, loaded_model)
        self.client = EngineCoreClient(core)
        self.config = engine_config
        self.tokenizer = core.tokenizer
        self.model_config = core.model_config
        self.max_model_len = core.max_model_len
        self.num_kv_blocks = core.num_kv_blocks
        self.processor = OutputProcessor(self.tokenizer)
        self._aborted: list[RequestOutput] = []  # reported by the next step()
        # Outputs a step() handed to a caller who does not own their requests (LLM on an engine
        # shared with others): the next step() reports them first, to whoever steps it then.
        self._handed_back: list[RequestOutput] = []

    # The core's parts, for tools and tests that look inside a step.
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def block_manager(self):
        return self.core.block_manager

    @property
    def runner(self):
        return self.core.runner

    @property
    def ops(self):
        return self.core.ops

    @property
    def model(self):
        return self.core.model

    @property
    def kv_cache(self):
        return self.core.kv_cache

    @property
    def async_scheduling(self) -> bool:
        return self.core.async_scheduling

    @property
    def dead_error(self):
        """The EngineDeadError that stopped the core, or None while it runs."""
        return self.core.dead_error

    @property
    def is_closed(self) -> bool:
        return self.core.is_closed

    def shutdown(self) -> None:
        """Drop every request and free the engine's memory (the GPU's included); idempotent.
        After it, add_request and step raise RuntimeError, has_unfinished_requests is False and
        aborts are ignored."""
        self.core.shutdown()
        self._aborted = []
        self._handed_back = []

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. `prompt`: text, or {"prompt_token_ids": [...]}."""
        if self.processor.has_request(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise TypeError("sampling_params must be a SamplingParams, "
                            f"got {type(params).__name__}")
        text, ids = encode_prompt(self.tokenizer, prompt)
        if params.truncate_prompt_tokens is not None:
            ids = truncated_prompt(ids, params.truncate_prompt_tokens, self.max_model_len)
        if params.bad_words:  # afresh: the caller's params may have met another tokenizer
            self.processor.tokenize_bad_words(params)
        if params.structured_outputs is not None:
            # Compiled here, in the caller's thread, so a grammar that does not compile is this
            # call's ValueError; the core then finds it in the compiler's cache.
            self.check_structured_outputs(params.structured_outputs)
        arrival = arrival_time if arrival_time is not None else time.time()
        self.processor.add_request(request_id, text, ids, params, arrival)
        try:
            self.client.add_request(EngineCoreRequest(request_id, ids, params, arrival))
        except Exception:
            self.processor.abort(request_id)
            raise
        # An ended request of this id whose ending the next step() would report (an abort, or
        # a handed-back output): the new request takes the id, and that report would read as
        # its own ending.
        self._aborted = [out for out in self._aborted if out.request_id != request_id]
        if self._handed_back:
            self._handed_back = [out for out in self._handed_back
                                 if out.request_id != request_id]

    def has_request(self, request_id: str) -> bool:
        """Whether `request_id` is taken: a request runs under it, or one ended whose ending the
        next step() reports (an abort, a handed-back output)."""
        return (self.processor.has_request(request_id)
                or any(out.request_id == request_id for out in self._aborted)
                or any(out.request_id == request_id for out in self._handed_back))

    @property
    def grammars(self):
        """The structured-outputs compiler (engine/structured_outputs.py); None without a
        tokenizer."""
        return self.core.grammars

    def check_structured_outputs(self, so) -> None:
        """Compile `so` (cached); ValueError naming the field if it cannot constrain this model.
        Thread-safe: the server calls it off its event loop before submitting."""
        self.core.grammar_compiler().check(so)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; a request that already finished is ignored."""
        self.client.abort_requests([request_id])
        out = self.processor.abort(request_id)
        if out is not None:
            self._aborted.append(out)

    def has_unfinished_requests(self) -> bool:
        """False once the engine is dead or shut down: nothing it holds can run any more."""
        if self.core.dead_error is not None or self.core.is_closed:
            return False
        return (self.core.has_unfinished_requests() or bool(self._aborted)
                or bool(self._handed_back))

    def hand_back(self, outputs: list[RequestOutput]) -> None:
        """Give back outputs a step() returned to a caller that does not own their requests (LLM
        stepping an engine that others added requests to): the next step() reports them again,
        before its own, so that their owner still gets every output (the final one included)."""
        if self.core.is_closed:
            return
        self._handed_back.extend(outputs)

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        """One model step. A failure of one sequence fails its request alone (finish_reason
        "error", the cause in CompletionOutput.error); a failure of the whole forward fails the
        step's requests; either way the engine goes on. EngineDeadError: it cannot go on."""
        self.core.check_alive()
        results = self._handed_back + self._aborted
        self._handed_back, self._aborted = [], []
        if self.core.has_unfinished_requests():
            processed, stopped = self.processor.process(self.client.get_output().outputs)
            if stopped:
                self.client.finish_sequences(stopped)
            results += processed
        return results

    def get_stats(self) -> EngineStats:
        return self.core.get_stats()


    def snapshot(self, since: int | None = None) -> dict:
        """The dashboard's view (engine/core/introspect.py); EngineCore.snapshot says more."""
        return self.core.snapshot(since)

def encode_prompt(tokenizer, prompt) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt given as text, as {"prompt_token_ids": [...]} or as vLLM's
    TextPrompt {"prompt": text}; the core checks the ids against the vocabulary. Any other field
    of vLLM's prompt dicts (multi_modal_data, cache_salt, ...) is a ValueError naming it."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt is text but the model has no tokenizer; "
                             "pass {'prompt_token_ids': [...]}")
        return prompt, [int(t) for t in tokenizer.encode(prompt)]
    if isinstance(prompt, dict):
        extra = [k for k in prompt if k not in ("prompt", "prompt_token_ids")]
        if extra:  # vLLM's multi_modal_data, cache_salt, ...: refused, never run without
            raise ValueError(f"prompt field(s) {extra} not supported: a prompt dict takes "
                             "'prompt' and 'prompt_token_ids' only (cache_salt: "
                             "SamplingParams.cache_salt)")
        if prompt.get("prompt") is not None and not isinstance(prompt["prompt"], str):
            raise TypeError(f"prompt['prompt'] must be a str, got "
                            f"{type(prompt['prompt']).__name__}")
        if prompt.get("prompt") is None and "prompt_token_ids" not in prompt:
            raise TypeError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple, np.ndarray)):
            raise TypeError("prompt_token_ids must be a list of token ids, "
                            f"got {type(ids).__name__}")
        # the common case at C speed (W1's 256 requests: add_request 40 -> 21 ms on the CPU);
        # the loop below finds and names the first bad id otherwise
        if (not isinstance(ids, np.ndarray) and set(map(type, ids)) == {int}
                and 0 <= min(ids) and max(ids) < 2**31):
            return prompt.get("prompt"), list(ids)
        for i, t in enumerate(ids):
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
                raise ValueError(f"prompt_token_ids[{i}] = {t!r} is not a token id")
            # (the core checks the model's vocabulary; these would not even reach it: the
            # detokenizer takes 32-bit ids)
            if not 0 <= t < 2**31:
                raise ValueError(f"prompt_token_ids[{i}] = {t!r}: token id {t} is out of "
                                 "vocabulary")
        return prompt.get("prompt"), [int(t) for t in ids]
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return encode_prompt(tokenizer, prompt["prompt"])  # vLLM's TextPrompt
    raise TypeError("prompt must be a str or a dict with 'prompt_token_ids' or 'prompt', "
                    f"got {type(prompt).__name__}")
