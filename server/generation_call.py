"""One generation call (completions or chat) once its request is checked: it submits each prompt
as an engine request, then answers with one JSON body or hands its outputs to the SSE stream
(server/sse_stream.py). Choice `index` = prompt index * n + output index.
"""

from __future__ import annotations

import time

from starlette.requests import Request

from engine.core.sampling_params import ParamError
from server.async_engine import EngineFault
from server.extras import ChatOptions, echo_logprobs, join_logprobs, prompt_logprobs_json, usage
from server.handlers import large_json, off_loop, until_disconnect
from server.protocol import (
    APIError,
    bad_request,
    chat_body,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    param_error,
)
from server.reasoning import ReasoningParser, reasoning_delta
from server.sse_stream import SSEResponse, events
from server.timeline import arrival_of
from server.tool_calls import ToolCallParser


class GenerationCall:
    """One HTTP call: submits its prompts, then answers with JSON or an SSE stream."""

    def __init__(self, request: Request, engine, call_id: str, model: str, params, chat: bool,
                 extras):
        self.request, self.engine, self.id, self.model = request, engine, call_id, model
        self.params, self.chat, self.extras = params, chat, extras
        self.echo: list[str] | None = None  # completions: each prompt's text, echoed
        self.chat_options: ChatOptions | None = None
        self.tokens_field = "max_tokens"  # chat: max_completion_tokens when the body set that
        self.first: dict[str, object] = {}  # request id -> its first RequestOutput
        self.tool_parser: ToolCallParser | None = None  # chat with tools: output read as calls
        self.reasoning: ReasoningParser | None = None  # chat: <think> blocks read as reasoning
        self.created = int(time.time())
        self._admitted = 0  # requests this call counts in engine.admitting
        # (request id, choice index) -> where a streamed completions choice's next token starts in
        # its text (its logprobs' text_offset; past the prompt when it is echoed)
        self.stream_offsets: dict[tuple[str, int], int] = {}
        if engine.tokenizer is None or extras.tokens_as_ids:  # vLLM's names for token ids
            self.token_str = lambda t: f"token_id:{t}"
        else:
            self.token_str = lambda t: engine.tokenizer.decode([t], skip_special_tokens=False)
        self.token_bytes = (engine.tokenizer.token_bytes if engine.tokenizer is not None
                            else lambda t: self.token_str(t).encode())

    async def run(self, token_lists: list[list[int]], stream: bool, include_usage: bool):
        state = self.request.app.state
        engine, limit = state.engine, state.settings.max_waiting_requests
        # Requests, not sequences: each prompt of the call is one, whatever its n. A call of more
        # prompts than the limit could never pass, so it is a bad request, not one to retry.
        if limit is not None and len(token_lists) > limit:
            field, what = ("messages", "conversations") if self.chat else ("prompt", "prompts")
            raise bad_request(field, f"'{field}' holds {len(token_lists)} {what}; the server "
                                     f"lets at most {limit} wait at once "
                                     "(--max-waiting-requests): send them in smaller calls")
        # The check and the count go together (no await between): a burst of calls cannot all
        # pass it.
        if limit is not None and (engine.num_waiting_requests + engine.admitting
                                  + len(token_lists) > limit):
            raise APIError(429, f"the server's waiting queue is full ({limit} requests); retry "
                                "later", type="rate_limit_exceeded", code="too_many_requests")
        engine.admitting += len(token_lists)
        self._admitted = len(token_lists)
        try:
            group = engine.group()
            self.index_of = {f"{self.id}-{i}": i for i in range(len(token_lists))}
            self.token_lists = token_lists
            self.num_prompt_tokens = sum(len(ids) for ids in token_lists)
            if not stream:
                return await until_disconnect(self.request, self._collect(group, token_lists))
            try:
                await self._submit(group, token_lists)
            except BaseException:
                group.close()
                raise
            return SSEResponse(group, self.stream(group, include_usage))
        finally:
            self._release()

    def stream(self, group, include_usage: bool):
        """The SSE body of a streamed call; a subclass may speak another API's events
        (server/responses.py)."""
        return events(self, group, include_usage)

    def reply(self, body: dict) -> dict:
        """The JSON body of a finished call, on the event loop; a subclass may reshape it."""
        return body

    def _release(self):
        """The call's requests are with the core (or never will be): no longer admitting."""
        self.request.app.state.engine.admitting -= self._admitted
        self._admitted = 0

    async def _submit(self, group, token_lists):
        arrived, tokenized = arrival_of(self.request), time.monotonic()
        words = self.params.bad_words
        if words:  # once for the call's prompts; 128 long words take ~20 ms
            try:
                await off_loop(sum(map(len, words)), group.engine.processor.tokenize_bad_words,
                               self.params)
            except ParamError as e:
                self._release()
                raise param_error(e, self.chat, self.tokens_field) from None
        try:
            for request_id, ids in zip(self.index_of, token_lists, strict=True):
                group.engine.timeline.start(request_id, arrived, tokenized)
                # It counts among the engine's waiting requests from group.add's first line on
                # (no await between): counted in both, it would make a burst look bigger.
                group.engine.admitting -= 1
                self._admitted -= 1
                try:
                    await group.add(request_id, {"prompt_token_ids": ids}, self.params)
                    if self.params.structured_outputs is not None:
                        self.request.app.state.metrics.constrained_requests.inc()
                except ParamError as e:
                    raise param_error(e, self.chat, self.tokens_field) from None
                except ValueError as e:  # the prompt's own checks (length, KV-cache capacity)
                    raise bad_request("messages" if self.chat else "prompt", str(e)) from None
        finally:
            self._release()  # the prompts never handed over (a rejection stopped the loop)

    def choice_index(self, request_id: str, index: int) -> int:
        return self.index_of[request_id] * self.params.n + index

    async def _collect(self, group, token_lists):
        final = {}
        async with group:
            await self._submit(group, token_lists)
            try:
                async for out in group.outputs():
                    self.first.setdefault(out.request_id, out)
                    if out.finished:
                        final[out.request_id] = out
            except EngineFault as e:
                raise APIError(500, str(e), type="server_error") from None
        # Logprobs (prompt_logprobs: ~21 entries per prompt token, 256 prompts in a call) can
        # make an answer of gigabytes: built and encoded on a worker thread when it is large.
        p = self.params
        scored = self.num_prompt_tokens if p.prompt_logprobs is not None else 0
        generated = sum(len(c.token_ids) for out in final.values() for c in out.outputs)
        size = scored + (generated if p.logprobs is not None else 0)
        body = await off_loop(size * 16, self._answer, final)
        return await large_json(self.reply(body), size * 16)

    def _answer(self, final: dict) -> dict:
        """The JSON body of a finished call."""
        choices, num_generated, longest = [], 0, 0
        for request_id in self.index_of:
            for c in final[request_id].outputs:
                if not self.extras.score_only:
                    num_generated += len(c.token_ids)
                    longest = max(longest, len(c.token_ids))
                choices.append(self.choice(request_id, c, whole=True))
        choices.sort(key=lambda c: c["index"])
        build = chat_body if self.chat else completion_body
        body = build(self.id, self.model, choices, self.usage(num_generated), self.created)
        if (metrics := self.request_metrics(num_generated, longest)) is not None:
            body["metrics"] = metrics
        if self.chat:  # one prompt: its scores and ids sit beside the choices (a batch's: none)
            body["prompt_logprobs"] = self._prompt_logprobs(next(iter(self.index_of)))
            one = self.extras.return_token_ids and len(self.token_lists) == 1
            body["prompt_token_ids"] = self.token_lists[0] if one else None
        return body

    def usage(self, num_generated: int) -> dict:
        cached = sum(out.num_cached_tokens for out in self.first.values())
        created = sum(out.num_created_cache_tokens for out in self.first.values())
        return usage(self.num_prompt_tokens, num_generated, cached, created)

    @property
    def per_request_metrics(self) -> bool:
        """--enable-per-request-metrics: answers carry their request's timings."""
        settings = getattr(self.request.app.state, "settings", None)
        return settings is not None and settings.per_request_metrics

    def request_metrics(self, num_generated: int, longest: int) -> dict | None:
        """vLLM's per-request timings (--enable-per-request-metrics), for a call of one request:
        queue wait, time to the first token from scheduling, decode time (first to last token),
        mean inter-token latency (when a choice has >1 token: `longest`, the most one choice
        generated; n choices decode side by side) and tokens per second (all `num_generated`)
        from scheduling; None when off, for several requests, or before the request has its
        times."""
        if not self.per_request_metrics or len(self.first) != 1:
            return None
        m = next(iter(self.first.values())).metrics
        if None in (m.first_scheduled_time, m.first_token_time, m.finished_time):
            return None
        decode = m.finished_time - m.first_token_time
        out = {"time_to_first_token_ms": (m.first_token_time - m.first_scheduled_time) * 1000,
               "generation_time_ms": decode * 1000,
               "queue_time_ms": max(0.0, m.first_scheduled_time - m.arrival_time) * 1000}
        if longest > 1:
            out["mean_itl_ms"] = decode / (longest - 1) * 1000
        inference = m.finished_time - m.first_scheduled_time
        out["tokens_per_second"] = num_generated / inference if inference > 0 else 0.0
        return out

    def choice_usage(self, request_id: str, num_generated: int) -> dict:
        """One choice's usage so far: its own prompt's tokens and its tokens generated."""
        first = self.first.get(request_id)
        return usage(len(self.token_lists[self.index_of[request_id]]), num_generated,
                     first.num_cached_tokens if first is not None else 0,
                     first.num_created_cache_tokens if first is not None else 0)

    def _prompt_logprobs(self, request_id: str) -> list | None:
        out = self.first.get(request_id)
        if out is None:
            return None
        return prompt_logprobs_json(out.prompt_logprobs, self.token_str, out.prompt_token_ids,
                                    out.prompt_logprob_ranks)

    def choice(self, request_id: str, c, whole: bool) -> dict:
        """A choice for the whole output (`whole`) or for this step's delta."""
        text = c.text if whole else c.delta_text
        token_ids = c.token_ids if whole else c.delta_token_ids
        lps = c.logprobs if whole else c.delta_logprobs
        if self.extras.score_only:  # the one token made to score the prompt is not sent
            text, token_ids, lps = "", [], []
        index = self.choice_index(request_id, c.index)
        if self.chat:
            return self._chat_choice(index, text, token_ids, lps, c.finish_reason, whole,
                                     c.stop_reason)
        i = self.index_of[request_id]
        echo = self.echo[i] if whole and self.echo else ""
        logprobs = None
        if self.params.logprobs is not None and lps is not None:
            # Offsets run on from the echoed prompt's tokens (each token's text counted, as
            # vLLM counts them), not from the prompt's text: the two differ where a token holds
            # part of a character (U+FFFD) or is a special token (a BOS), and the offsets must
            # not run backwards at the prompt's end.
            key = (request_id, c.index)
            start = None if whole else self.stream_offsets.get(key)
            if start is None:
                start = self._echo_end(request_id) if self.echo else 0
            logprobs = completion_logprobs(token_ids, lps, self.token_str, start)
            if not whole:
                self.stream_offsets[key] = start + sum(len(t) for t in logprobs["tokens"])
            if echo:
                logprobs = join_logprobs(self.echo_logprobs(request_id), logprobs)
        choice = {"index": index, "text": echo + text, "logprobs": logprobs,
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        ids = self.extras.return_token_ids
        if whole:  # vLLM's fields, null when not asked for
            choice["prompt_logprobs"] = self._prompt_logprobs(request_id)
            choice["prompt_token_ids"] = self.token_lists[i] if ids else None
            choice["token_ids"] = list(token_ids) if ids else None
        elif ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def _chat_choice(self, index: int, text: str, token_ids, lps, finish_reason,
                     whole: bool, stop_reason=None) -> dict:
        """vLLM's stop_reason: the stop string or stop token id that ended the choice, else
        None (eos, length, a tool call)."""
        logprobs = None
        if self.params.logprobs is not None and lps is not None:
            p = self.params
            num_top = None if p.logprobs == -1 or p.logprob_token_ids else p.logprobs
            logprobs = chat_logprobs(token_ids, lps, self.token_str, self.token_bytes, num_top)
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason,
                  "stop_reason": stop_reason}
        if whole:
            options = self.chat_options
            reasoning = None
            if self.reasoning is not None:
                reasoning, text = self.reasoning.split(text)
                text = text or ""
            choice["message"] = {"role": options.role, "content": options.echo + text}
            if self.tool_parser is not None:
                # (not `whole`: that names this answer's kind, read again below)
                content, calls, whole_calls = self.tool_parser.read(text)
                if calls:
                    if options.echo:
                        content = options.echo + (content or "")
                    choice["message"] = {"role": options.role, "content": content,
                                         "tool_calls": calls}
                    choice["finish_reason"] = self.tool_parser.finish_reason(finish_reason,
                                                                             whole_calls)
            if self.reasoning is not None:
                message = choice["message"]
                if not message["content"] and reasoning is not None:
                    message["content"] = None  # an answer that never left its reasoning
                if self.extras.include_reasoning:
                    message.update(reasoning_delta(reasoning))
        else:
            choice["delta"] = {"content": text} if text else {}
        if self.extras.return_token_ids:
            choice["token_ids"] = list(token_ids)
        elif whole:
            choice["token_ids"] = None
        return choice

    def _echo_end(self, request_id: str) -> int:
        """Where the echoed prompt's logprobs offsets end: its tokens' texts, counted."""
        ids = self.token_lists[self.index_of[request_id]]
        return sum(len(self.token_str(t)) for t in ids)

    def echo_logprobs(self, request_id: str) -> dict:
        out = self.first[request_id]
        return echo_logprobs(self.token_lists[self.index_of[request_id]], out.prompt_logprobs,
                             self.token_str)
