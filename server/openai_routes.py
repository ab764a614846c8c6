"""POST /v1/completions and /v1/chat/completions, streamed (SSE) or not.

Each prompt of a call becomes one engine request; choice `index` = prompt index * n + output index.
All checks run before anything is sent, so a bad request is a 400 with no request in the engine;
the RequestGroup aborts whatever is unfinished when a handler leaves for any reason.
"""

from __future__ import annotations

import json
import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse

from engine.core.sampling_params import ParamError
from server.async_engine import EngineFault
from server.handlers import (
    chat_token_ids,
    check_model,
    check_token_ids,
    off_loop,
    read_json,
    ready_engine,
    tokenizer_of,
    until_disconnect,
)
from server.protocol import (
    APIError,
    bad_request,
    chat_body,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    get_field,
    new_id,
    parse_messages,
    parse_prompts,
    parse_sampling_params,
    usage,
)


async def completions(request: Request):
    engine = ready_engine(request)
    body = await read_json(request)
    model = check_model(request, body)
    prompts = parse_prompts(body)
    params = parse_sampling_params(body, chat=False)
    stream, include_usage = _stream_flags(body)
    echo = get_field(body, "echo", "bool", False)
    get_field(body, "user", "str")
    token_lists = []
    for p in prompts:
        if isinstance(p, str):
            # The count first: an over-long text's ids never become a list (encode_within).
            num_tokens, ids = await off_loop(len(p), tokenizer_of(engine, "prompt").encode_within,
                                             p, engine.max_model_len)
        else:
            num_tokens, ids = len(p), p
        _check_length(engine, num_tokens, params.max_tokens, "prompt")  # before a long id check
        if ids is p:
            check_token_ids(engine, p, "prompt")
        token_lists.append(ids)
    call = _Call(request, engine, new_id("cmpl"), model, params, chat=False)
    if echo:
        call.echo = [p if isinstance(p, str) else tokenizer_of(engine, "echo").decode(p)
                     for p in prompts]
    return await call.run(token_lists, stream, include_usage)


async def chat_completions(request: Request):
    engine = ready_engine(request)
    body = await read_json(request)
    model = check_model(request, body)
    messages = parse_messages(body)
    params = parse_sampling_params(body, chat=True)
    stream, include_usage = _stream_flags(body)
    get_field(body, "user", "str")
    ids = await chat_token_ids(request, engine, messages)
    _check_length(engine, len(ids), params.max_tokens, "messages")
    call = _Call(request, engine, new_id("chatcmpl"), model, params, chat=True)
    return await call.run([ids], stream, include_usage)


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = get_field(body, "stream", "bool", False)
    options = get_field(body, "stream_options", "dict", {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("stream_options", "'stream_options.include_usage' must be a boolean")
    if options and not stream:
        raise bad_request("stream_options", "'stream_options' needs 'stream': true")
    return stream, include_usage


def _check_length(engine, num_prompt: int, max_tokens: int | None, param: str):
    limit = engine.max_model_len
    if num_prompt >= limit:
        raise bad_request(param, f"this model's maximum context length is {limit} tokens, but the "
                                 f"{param} has {num_prompt} tokens")
    if max_tokens is not None and num_prompt + max_tokens > limit:
        raise bad_request("max_tokens", f"this model's maximum context length is {limit} tokens, "
                          f"but {num_prompt} prompt tokens + max_tokens {max_tokens} = "
                          f"{num_prompt + max_tokens}")


class _Call:
    """One HTTP call: submits its prompts, then answers with JSON or an SSE stream."""

    def __init__(self, request: Request, engine, call_id: str, model: str, params, chat: bool):
        self.request, self.engine, self.id, self.model = request, engine, call_id, model
        self.params, self.chat = params, chat
        self.echo: list[str] | None = None
        self.created = int(time.time())
        if engine.tokenizer is None:  # token ids in, token ids out: name them as vLLM does
            self.token_str = lambda t: f"token_id:{t}"
        else:
            self.token_str = lambda t: engine.tokenizer.decode([t], skip_special_tokens=False)

    async def run(self, token_lists: list[list[int]], stream: bool, include_usage: bool):
        state = self.request.app.state
        limit = state.settings.max_waiting_requests
        # Requests, not sequences: each prompt of the call is one, whatever its n.
        if limit is not None and state.engine.num_waiting_requests + len(token_lists) > limit:
            raise APIError(429, f"the server's waiting queue is full ({limit} requests); retry "
                                "later", type="rate_limit_exceeded", code="too_many_requests")
        group = state.engine.group()
        self.index_of = {f"{self.id}-{i}": i for i in range(len(token_lists))}
        self.num_prompt_tokens = sum(len(ids) for ids in token_lists)
        if not stream:
            return await until_disconnect(self.request, self._collect(group, token_lists))
        try:
            await self._submit(group, token_lists)
        except BaseException:
            group.close()
            raise
        return _SSEResponse(group, self._events(group, include_usage))

    async def _submit(self, group, token_lists):
        for request_id, ids in zip(self.index_of, token_lists, strict=True):
            try:
                await group.add(request_id, {"prompt_token_ids": ids}, self.params)
            except ParamError as e:
                raise bad_request(e.field, str(e)) from None
            except ValueError as e:  # the prompt's own checks (length, KV-cache capacity)
                raise bad_request("messages" if self.chat else "prompt", str(e)) from None

    def _choice_index(self, request_id: str, index: int) -> int:
        return self.index_of[request_id] * self.params.n + index

    # ------------------------------------------------------------ non-streamed

    async def _collect(self, group, token_lists):
        final = {}
        async with group:
            await self._submit(group, token_lists)
            try:
                async for out in group.outputs():
                    if out.finished:
                        final[out.request_id] = out
            except EngineFault as e:
                raise APIError(500, str(e), type="server_error") from None
        choices, num_generated = [], 0
        for request_id in self.index_of:
            for c in final[request_id].outputs:
                num_generated += len(c.token_ids)
                choices.append(self._choice(request_id, c, whole=True))
        choices.sort(key=lambda c: c["index"])
        build = chat_body if self.chat else completion_body
        use = usage(self.num_prompt_tokens, num_generated)
        return JSONResponse(build(self.id, self.model, choices, use, self.created))

    def _choice(self, request_id: str, c, whole: bool) -> dict:
        """A choice for the whole output (`whole`) or for this step's delta."""
        text = c.text if whole else c.delta_text
        token_ids = c.token_ids if whole else c.delta_token_ids
        lps = c.logprobs if whole else c.delta_logprobs
        index = self._choice_index(request_id, c.index)
        if self.chat:
            logprobs = None
            if self.params.logprobs is not None and lps is not None:
                logprobs = chat_logprobs(token_ids, lps, self.token_str, self.params.logprobs)
            choice = {"index": index, "logprobs": logprobs, "finish_reason": c.finish_reason}
            if whole:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["delta"] = {"content": text} if text else {}
            return choice
        logprobs = None
        if self.params.logprobs is not None and lps is not None:
            logprobs = completion_logprobs(token_ids, lps, self.token_str)
        if whole and self.echo:
            text = self.echo[self.index_of[request_id]] + text
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": c.finish_reason}

    # ------------------------------------------------------------ streamed

    async def _events(self, group, include_usage: bool):
        build = chat_body if self.chat else completion_body
        chunk = lambda choices, use=None: _sse(  # noqa: E731
            build(self.id, self.model, choices, use, self.created, chunk=True))
        async with group:
            for i in self.index_of.values():  # the opening chunk of every choice
                for j in range(self.params.n):
                    index = i * self.params.n + j
                    if self.chat:
                        opening = {"index": index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}
                        yield chunk([opening])
                    elif self.echo:
                        yield chunk([{"index": index, "text": self.echo[i], "logprobs": None,
                                      "finish_reason": None}])
            num_generated = 0
            try:
                async for out in group.outputs():
                    for c in out.outputs:
                        num_generated += len(c.delta_token_ids)
                        if not c.delta_text and not c.delta_token_ids and not c.finished:
                            continue
                        choice = self._choice(out.request_id, c, whole=False)
                        if self.chat and c.finished:
                            choice["finish_reason"] = None
                            if choice["delta"]:
                                yield chunk([choice])
                            choice = {"index": choice["index"], "delta": {}, "logprobs": None,
                                      "finish_reason": c.finish_reason}
                        yield chunk([choice])
            except EngineFault as e:
                error = APIError(500, str(e), type="server_error")
                yield _sse(json.loads(error.response().body))
                yield "data: [DONE]\n\n"
                return
        if include_usage:
            yield chunk([], usage(self.num_prompt_tokens, num_generated))
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """An SSE stream that owns the call's RequestGroup from its submission: however the response
    ends (done, client gone before the first chunk or mid-stream, error) the group is closed, so
    its unfinished requests are aborted at once. Closing the generator alone would not do: a
    client gone before the first chunk leaves it unstarted, and closing it then runs nothing."""

    def __init__(self, group, events):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.group = group

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except (OSError, ClientDisconnect):
            pass  # the client went away
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.group.close()
