"""OutputProcessor: the engine core's token ids in, RequestOutputs (text, deltas, logprobs) out.

It holds, per request, the state of its n sequences as the user sees them: tokens, incremental
text, what was already sent. Stop strings are found here, next to the text, so one never reaches
a delta; the sequences they end are returned to the caller, which tells the core to free them
(EngineCore.finish_sequences). Tokens the core made for a sequence after that are dropped.

It runs wherever the tokenizer runs: in LLMEngine's process, or in the API process when serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from engine.core.outputs import (
    CompletionOutput,
    ListPrefix,
    RequestMetrics,
    RequestOutput,
    SeqOutput,
)
from engine.core.sampling_params import ParamError, SamplingParams
from engine.core.stopping import SeqState, text_delta

logger = logging.getLogger("pagedserve.output_processor")


@dataclass(eq=False, slots=True)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    states: list[SeqState]
    metrics: RequestMetrics
    num_unfinished: int
    prompt_logprobs: list | None = None
    prompt_logprob_ranks: list | None = None
    num_cached_tokens: int = 0
    num_created_cache_tokens: int = 0


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's reading of bad_words as token sequences: each word without its leading
    whitespace, then with one space before it, which most tokenizers spell with other tokens
    (a word inside a text rather than at its start). The spaced form is kept only where it
    begins with another token and has as many tokens as the bare one."""
    out = []
    for i, word in enumerate(words):
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not bare:  # its characters are all ones the tokenizer drops
            raise ParamError("bad_words", f"bad_words[{i}] ({word!r}) has no tokens")
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(bare)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return out


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # None: token ids only, no text and no stop strings
        self._requests: dict[str, _Request] = {}
        self._bad_words: dict[tuple[str, ...], list[list[int]]] = {}  # tokenize_bad_words
        self._bad_words_lock = threading.Lock()

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> None:
        if params.stop_list and self.tokenizer is None:
            raise ParamError("stop", "stop strings need a tokenizer, and the model has none")
        if params.bad_words and params.bad_words_token_ids is None:
            self.tokenize_bad_words(params)
        states = []
        for i in range(params.n):
            detok = None
            if self.tokenizer is not None and params.detokenize:
                from engine.model.tokenizer import IncrementalDetokenizer

                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                               params.skip_special_tokens)
            states.append(SeqState(i, params, list(prompt_token_ids), len(prompt_token_ids),
                                   detok, logprobs=[] if params.logprobs is not None else None))
        self._requests[request_id] = _Request(request_id, prompt, prompt_token_ids, params,
                                              states, RequestMetrics(arrival_time), params.n)

    def tokenize_bad_words(self, params: SamplingParams) -> None:
        """Set params.bad_words_token_ids from params.bad_words (add_request does it when the
        caller has not: the server does it once a call, off its event loop for long lists).
        The last lists are kept: LLM.generate's prompts share one list."""
        if self.tokenizer is None:
            raise ParamError("bad_words", "bad_words need a tokenizer, and the model has none")
        key = tuple(params.bad_words)
        with self._bad_words_lock:  # the server's tokenizing threads and its event loop
            ids = self._bad_words.get(key)
        if ids is None:
            ids = bad_words_token_ids(self.tokenizer, params.bad_words)
        with self._bad_words_lock:
            self._bad_words.pop(key, None)
            self._bad_words[key] = ids  # the newest last
            if len(self._bad_words) > 16:
                del self._bad_words[next(iter(self._bad_words))]
        params.bad_words_token_ids = [list(w) for w in ids]  # the caller's own copy

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End the request with "abort"; its final output, or None if it had already ended."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        for state in req.states:
            if state.finish_reason is None:
                state.finish_reason = "abort"
        return self._make_output(req)

    def process(self, outputs: list[SeqOutput]
                ) -> tuple[list[RequestOutput], list[tuple[str, int, str]]]:
        """(one RequestOutput per request that changed, the sequences to free as
        (request_id, index, stop string) for EngineCore.finish_sequences: those a stop string
        ended, and those of a request whose postprocessing failed, with "")."""
        now = time.time()
        changed: dict[str, _Request] = {}
        stopped = []
        requests = self._requests
        for out in outputs:
            req = requests.get(out.request_id)
            if req is None:  # aborted, or failed, while the step ran
                continue
            state = req.states[out.index]
            if state.finish_reason is not None:  # a stop string ended it: the core's late token
                continue
            metrics = req.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
                metrics.first_scheduled_time = out.first_scheduled_time or now
            if out.num_cached_tokens is not None:
                req.prompt_logprobs = out.prompt_logprobs
                req.prompt_logprob_ranks = out.prompt_logprob_ranks
                req.num_cached_tokens = out.num_cached_tokens
                req.num_created_cache_tokens = out.num_created_cache_tokens
            changed[out.request_id] = req
            if out.finish_reason == "error":
                state.finish_reason, state.error = "error", out.error
            else:
                try:
                    last = len(out.new_token_ids) - 1
                    lps = out.new_logprobs
                    for k, token in enumerate(out.new_token_ids):
                        if state.logprobs is not None:
                            state.logprobs.append(lps[k])
                        if k == last:
                            ended = state.append(token, out.finish_reason, out.stop_reason)
                        else:
                            ended = state.append(token, None, None)
                        if ended:
                            if k < last or out.finish_reason is None:  # the core runs it still
                                stopped.append((out.request_id, out.index, state.stop_reason))
                            break
                    state.cumulative_logprob = out.cumulative_logprob
                    if k < last and out.token_logprobs:  # tokens past a stop string: not output
                        state.cumulative_logprob -= sum(out.token_logprobs[k + 1 :])
                except Exception as e:  # the text of this request alone (its detokenizer)
                    logger.exception("request %s failed in its postprocessing", out.request_id)
                    self._fail(req, f"{type(e).__name__}: {e}", stopped, now)
                    continue
            if state.finish_reason is not None:
                req.num_unfinished -= 1
                if req.num_unfinished == 0:
                    metrics.finished_time = now
                    del requests[out.request_id]
        make_output = self._make_output
        return [make_output(req) for req in changed.values()], stopped

    def _fail(self, req: _Request, cause: str, stopped: list, now: float) -> None:
        """End every unfinished sequence of the request with "error" and `cause`; the core is
        told to free them (with the sequences stop strings ended), and its later tokens for them
        are dropped."""
        for state in req.states:
            if state.finish_reason is None:
                state.finish_reason, state.error = "error", cause
                stopped.append((req.request_id, state.index, ""))
        req.num_unfinished = 0
        req.metrics.finished_time = now
        del self._requests[req.request_id]

    def _make_output(self, req: _Request) -> RequestOutput:
        outputs = []
        finished = True
        for state in req.states:
            token_ids, num_prompt = state.token_ids, state.num_prompt_tokens
            num_tokens = len(token_ids)
            num_sent = state.num_sent_tokens
            state.num_sent_tokens = num_tokens - num_prompt
            if state.detokenizer is None:  # no tokenizer or detokenize False: no text
                text = delta_text = ""
            else:
                text, delta_text = text_delta(state)
            lps = state.logprobs
            # The whole token_ids / logprobs are copied only if read (outputs.ListPrefix).
            outputs.append(CompletionOutput(
                state.index, text, ListPrefix(token_ids, num_prompt, num_tokens),
                state.cumulative_logprob, None if lps is None else ListPrefix(lps, 0, len(lps)),
                state.finish_reason, state.stop_reason, delta_text,
                token_ids[num_prompt + num_sent :], None if lps is None else lps[num_sent:],
                state.error))
            if state.finish_reason is None:
                finished = False
        if finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.time()
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, finished,
                             req.metrics, req.prompt_logprobs, req.num_cached_tokens,
                             req.prompt_logprob_ranks,
                             num_created_cache_tokens=req.num_created_cache_tokens)
