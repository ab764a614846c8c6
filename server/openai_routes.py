"""POST /v1/completions and /v1/chat/completions, streamed (SSE) or not.

Each prompt of a call becomes one engine request; choice `index` = prompt index * n + output index.
All checks run before anything is sent, so a bad request is a 400 with no request in the engine;
the RequestGroup aborts whatever is unfinished when a handler leaves for any reason.
"""

from __future__ import annotations

import json
import sys
import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse

from engine.core.sampling_params import ParamError
from server.async_engine import EngineFault
from server.extras import (
    ChatOptions,
    chat_options,
    echo_logprobs,
    join_logprobs,
    prompt_logprobs_json,
    read_extras,
    truncate,
    usage,
)
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
)
from server.structured import check_compiles, parse_structured_outputs
from server.tool_calls import (
    ToolCallParser,
    ToolCallStream,
    parse_tools,
    template_messages,
    tool_grammar,
)


async def completions(request: Request):
    return await completions_body(request, await read_json(request))


async def completions_body(request: Request, body: dict):
    engine = ready_engine(request)
    model = check_model(request, body)
    prompts = parse_prompts(body)
    extras = read_extras(body, chat=False)
    params = parse_sampling_params(body, chat=False)
    await _constrain(request, engine, params, *parse_structured_outputs(body), len(prompts))
    stream, include_usage = _stream_flags(body)
    get_field(body, "user", "str")
    # A prompt to be truncated is tokenized whole, whatever its length.
    limit = engine.max_model_len if extras.truncate is None else sys.maxsize
    token_lists = []
    for p in prompts:
        if isinstance(p, str):
            # The count first: an over-long text's ids never become a list (encode_within).
            num_tokens, ids = await off_loop(len(p), tokenizer_of(engine, "prompt").encode_within,
                                             p, limit)
        else:
            num_tokens, ids = len(p), p
        if ids is not None and extras.truncate is not None:
            ids = truncate(ids, extras, engine.max_model_len)
            num_tokens = len(ids)
        _check_length(engine, num_tokens, params.max_tokens, "prompt")  # before a long id check
        if isinstance(p, list):
            check_token_ids(engine, ids, "prompt")
        token_lists.append(ids)
    call = _Call(request, engine, new_id("cmpl"), model, params, chat=False, extras=extras)
    if extras.echo:
        call.echo = [p if isinstance(p, str) and extras.truncate is None
                     else tokenizer_of(engine, "echo").decode(ids)
                     for p, ids in zip(prompts, token_lists, strict=True)]
    return await call.run(token_lists, stream, include_usage)


async def chat_completions(request: Request):
    return await chat_completions_body(request, await read_json(request))


async def chat_completions_body(request: Request, body: dict):
    engine = ready_engine(request)
    model = check_model(request, body)
    messages = parse_messages(body)
    extras = read_extras(body, chat=True)
    params = parse_sampling_params(body, chat=True)
    so, so_field = parse_structured_outputs(body)
    tools, tool_choice = parse_tools(body)
    parallel = get_field(body, "parallel_tool_calls", "bool", True)
    forced = tool_grammar(tools, tool_choice, parallel) if tools else None
    if forced is not None:
        if so is not None:
            raise bad_request("tool_choice", f"tool_choice {tool_choice!r} constrains the output "
                                             f"itself; it cannot be combined with '{so_field}'")
        so, so_field = forced, "tools"
    await _constrain(request, engine, params, so, so_field)
    stream, include_usage = _stream_flags(body)
    get_field(body, "user", "str")
    options = chat_options(messages, body)
    extra = {"tools": tools} if tools and tool_choice != "none" else {}
    ids = await chat_token_ids(request, engine, template_messages(messages),
                               **{**options.template_options, **extra})
    ids = truncate(ids, extras, engine.max_model_len)
    _check_length(engine, len(ids), params.max_tokens, "messages")
    call = _Call(request, engine, new_id("chatcmpl"), model, params, chat=True, extras=extras)
    call.chat_options = options
    if extra:
        call.tool_parser = ToolCallParser(tool_choice, [t["function"]["name"] for t in tools])
    return await call.run([ids], stream, include_usage)


async def invocations(request: Request):
    """SageMaker's one route: a chat body (it has `messages`) or a completions body."""
    body = await read_json(request)
    if "messages" in body:
        return await chat_completions_body(request, body)
    if "prompt" in body:
        return await completions_body(request, body)
    raise bad_request("body", "an /invocations body must be a chat completions request (with "
                              "'messages') or a completions request (with 'prompt')")


async def _constrain(request: Request, engine, params, so, field: str | None,
                     num_prompts: int = 1) -> None:
    """Set `so` on params once its grammar compiles (a 400 naming `field` if it does not)."""
    if so is None:
        return
    if params.use_beam_search:  # SamplingParams' rule: the field is set after it checked
        raise bad_request(field, f"'{field}' is not supported with use_beam_search")
    await check_compiles(engine, so, field)
    params.structured_outputs = so
    request.app.state.metrics.constrained_requests.inc(num_prompts)


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

    def __init__(self, request: Request, engine, call_id: str, model: str, params, chat: bool,
                 extras):
        self.request, self.engine, self.id, self.model = request, engine, call_id, model
        self.params, self.chat, self.extras = params, chat, extras
        self.echo: list[str] | None = None  # completions: each prompt's text, echoed
        self.chat_options: ChatOptions | None = None
        self.first: dict[str, object] = {}  # request id -> its first RequestOutput
        self.tool_parser: ToolCallParser | None = None  # chat with tools: output read as calls
        self._tool_streams: dict[int, ToolCallStream] = {}  # streamed choice index -> its reader
        self.created = int(time.time())
        if engine.tokenizer is None or extras.tokens_as_ids:  # vLLM's names for token ids
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
        self.token_lists = token_lists
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
                    self.first.setdefault(out.request_id, out)
                    if out.finished:
                        final[out.request_id] = out
            except EngineFault as e:
                raise APIError(500, str(e), type="server_error") from None
        choices, num_generated = [], 0
        for request_id in self.index_of:
            for c in final[request_id].outputs:
                num_generated += 0 if self.extras.score_only else len(c.token_ids)
                choices.append(self._choice(request_id, c, whole=True))
        choices.sort(key=lambda c: c["index"])
        build = chat_body if self.chat else completion_body
        body = build(self.id, self.model, choices, self._usage(num_generated), self.created)
        if self.chat:  # one prompt: its scores and ids sit beside the choices
            body["prompt_logprobs"] = self._prompt_logprobs(next(iter(self.index_of)))
            if self.extras.return_token_ids:
                body["prompt_token_ids"] = self.token_lists[0]
        return JSONResponse(body)

    def _usage(self, num_generated: int) -> dict:
        cached = sum(out.num_cached_tokens for out in self.first.values())
        return usage(self.num_prompt_tokens, num_generated, cached)

    def _prompt_logprobs(self, request_id: str) -> list | None:
        out = self.first.get(request_id)
        return prompt_logprobs_json(out and out.prompt_logprobs, self.token_str)

    def _choice(self, request_id: str, c, whole: bool) -> dict:
        """A choice for the whole output (`whole`) or for this step's delta."""
        text = c.text if whole else c.delta_text
        token_ids = c.token_ids if whole else c.delta_token_ids
        lps = c.logprobs if whole else c.delta_logprobs
        if self.extras.score_only:  # the one token made to score the prompt is not sent
            text, token_ids, lps = "", [], []
        index = self._choice_index(request_id, c.index)
        if self.chat:
            logprobs = None
            if self.params.logprobs is not None and lps is not None:
                logprobs = chat_logprobs(token_ids, lps, self.token_str, self.params.logprobs)
            choice = {"index": index, "logprobs": logprobs, "finish_reason": c.finish_reason}
            if whole:
                options = self.chat_options
                choice["message"] = {"role": options.role, "content": options.echo + text}
                if self.tool_parser is not None:
                    content, calls = self.tool_parser.parse(text)
                    if calls:
                        if options.echo:
                            content = options.echo + (content or "")
                        choice["message"] = {"role": options.role, "content": content,
                                             "tool_calls": calls}
                        choice["finish_reason"] = "tool_calls"
            else:
                choice["delta"] = {"content": text} if text else {}
            if self.extras.return_token_ids:
                choice["token_ids"] = list(token_ids)
            return choice
        i = self.index_of[request_id]
        echo = self.echo[i] if whole and self.echo else ""
        logprobs = None
        if self.params.logprobs is not None and lps is not None:
            logprobs = completion_logprobs(token_ids, lps, self.token_str, len(echo))
            if echo:
                logprobs = join_logprobs(self._echo_logprobs(request_id), logprobs)
        choice = {"index": index, "text": echo + text, "logprobs": logprobs,
                  "finish_reason": c.finish_reason}
        if whole:
            choice["prompt_logprobs"] = self._prompt_logprobs(request_id)
        if self.extras.return_token_ids:
            if whole:
                choice["prompt_token_ids"] = self.token_lists[i]
            choice["token_ids"] = list(token_ids)
        return choice

    def _echo_logprobs(self, request_id: str) -> dict:
        out = self.first[request_id]
        return echo_logprobs(self.token_lists[self.index_of[request_id]], out.prompt_logprobs,
                             self.token_str)

    # ------------------------------------------------------------ streamed

    async def _events(self, group, include_usage: bool):
        build = chat_body if self.chat else completion_body
        continuous = include_usage and self.extras.continuous_usage
        num_generated = 0
        sent_prompt_ids = []

        def chunk(choices, use=None):
            if continuous and use is None:
                use = self._usage(num_generated)
            body = build(self.id, self.model, choices, use, self.created, chunk=True)
            if self.chat and self.extras.return_token_ids and not sent_prompt_ids:
                body["prompt_token_ids"] = self.token_lists[0]  # the first chunk only
                sent_prompt_ids.append(True)
            return _sse(body)

        async with group:
            if self.chat:  # the opening chunk of every choice
                options = self.chat_options
                for index in range(len(self.index_of) * self.params.n):
                    delta = {"role": options.role, "content": ""}
                    yield chunk([{"index": index, "delta": delta, "logprobs": None,
                                  "finish_reason": None}])
                    if options.echo:
                        yield chunk([{"index": index, "delta": {"content": options.echo},
                                      "logprobs": None, "finish_reason": None}])
            opened = set()  # completions: the choices whose first chunk went out
            try:
                async for out in group.outputs():
                    self.first.setdefault(out.request_id, out)
                    for c in out.outputs:
                        if not self.extras.score_only:
                            num_generated += len(c.delta_token_ids)
                        first = not self.chat and (out.request_id, c.index) not in opened
                        if first:
                            opened.add((out.request_id, c.index))
                            if self.echo:
                                yield chunk([self._opening(out.request_id, c.index)])
                        if not c.delta_text and not c.delta_token_ids and not c.finished:
                            continue
                        choice = self._choice(out.request_id, c, whole=False)
                        if self.extras.score_only and not c.finished:
                            continue
                        if first and self.extras.return_token_ids and not self.echo:
                            choice["prompt_token_ids"] = self.token_lists[
                                self.index_of[out.request_id]]
                        if self.tool_parser is not None:
                            for tool_chunk in self._tool_chunks(choice, c):
                                yield chunk([tool_chunk])
                            continue
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
            yield chunk([], self._usage(num_generated))
        yield "data: [DONE]\n\n"

    def _opening(self, request_id: str, index: int) -> dict:
        """An echoing completions choice's first chunk: the prompt (scored when logprobs are
        asked), and its ids when return_token_ids is set."""
        i = self.index_of[request_id]
        choice = {"index": self._choice_index(request_id, index), "text": self.echo[i],
                  "logprobs": None, "finish_reason": None}
        if self.params.logprobs is not None:
            choice["logprobs"] = self._echo_logprobs(request_id)
        if self.extras.return_token_ids:
            choice["prompt_token_ids"] = self.token_lists[i]
            choice["token_ids"] = []
        return choice


    def _tool_chunks(self, choice: dict, c) -> list[dict]:
        """The streamed choices for one step of a choice under tools (ToolCallStream)."""
        index = choice["index"]
        stream = self._tool_streams.setdefault(index, ToolCallStream(self.tool_parser))
        deltas = stream.feed(c.delta_text)
        finish_reason = None
        if c.finished:
            last, is_call = stream.finish()
            deltas += last
            finish_reason = "tool_calls" if is_call else c.finish_reason
        out = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None}
               for d in deltas]
        if out and choice["logprobs"] is not None:
            out[0]["logprobs"] = choice["logprobs"]
        if c.finished:
            out.append({"index": index, "delta": {}, "logprobs": None,
                        "finish_reason": finish_reason})
        return out


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """An SSE stream that owns the call's RequestGroup from its submission: however the response
    ends (done, client gone before the first chunk or mid-stream, error) the group is closed, so
    its unfinished requests are aborted at once. Closing the generator alone would not do: a
    client gone before the first chunk leaves it unstarted, and closing it then runs nothing."""

    on_close = None  # called once the stream ends, however it ends (handlers.load_tracked)

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
                if self.on_close is not None:
                    self.on_close()
