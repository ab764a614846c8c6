"""POST /v1/completions and /v1/chat/completions, streamed (SSE) or not.

Here a call's body is read and checked; server/generation_call.py then runs it (answered as JSON,
or as SSE by server/sse_stream.py). Each prompt of a call becomes one engine request. All checks
run before anything is sent, so a bad request is a 400 with no request in the engine; the
RequestGroup aborts whatever is unfinished when a handler leaves for any reason.
"""

from __future__ import annotations

import re
import sys

from starlette.requests import Request

from engine.core.limits import MAX_PROMPTS
from engine.model.chat_template import template_messages
from server.extras import ChatOptions, chat_options, read_extras, truncate
from server.generation_call import GenerationCall
from server.handlers import (
    chat_token_ids,
    check_model,
    check_token_ids,
    off_loop,
    read_json,
    ready_engine,
    tokenizer_of,
)
from server.protocol import (
    APIError,
    bad_request,
    get_field,
    max_tokens_field,
    max_tokens_given,
    new_id,
    parse_messages,
    parse_prompts,
    parse_sampling_params,
)
from server.reasoning import (
    END,
    PROMPT_TAIL_TOKENS,
    START,
    ReasoningParser,
    prompt_closes_reasoning,
)
from server.structured import check_compiles, parse_structured_outputs
from server.timeline import mark_arrival
from server.tool_calls import ToolCallParser, parse_tools, referring_parameters, tool_grammar


async def completions(request: Request):
    mark_arrival(request)
    return await completions_body(request, await read_json(request))


async def completions_body(request: Request, body: dict):
    engine = ready_engine(request)
    model = check_model(request, body)
    prompts = parse_prompts(body)
    if body.get("suffix") is not None:  # refused as vLLM does, never silently dropped
        raise bad_request("suffix", "'suffix' (text after the insertion) is not supported by "
                                    "this server")
    extras = read_extras(body, chat=False, settings=request.app.state.settings)
    params = parse_sampling_params(body, chat=False, defaults=engine.sampling_defaults)
    await _constrain(request, engine, params, *parse_structured_outputs(body), len(prompts))
    stream, include_usage = _stream_flags(body, request.app.state.settings)
    get_field(body, "user", "str")
    # A prompt to be truncated is tokenized whole, whatever its length.
    limit = engine.max_model_len if extras.truncate is None else sys.maxsize
    token_lists = []
    for p in prompts:
        if isinstance(p, str):
            # The count first: an over-long text's ids never become a list (encode_within).
            num_tokens, ids = await off_loop(len(p), tokenizer_of(engine, "prompt").encode_within,
                                             p, limit, extras.add_special_tokens)
        else:
            num_tokens, ids = len(p), p
        if ids is not None and extras.truncate is not None:
            ids = truncate(ids, extras, engine.max_model_len)
            num_tokens = len(ids)
        _check_length(engine, num_tokens, _asked_tokens(body, params, False),
                      "prompt")  # before a long id check
        if isinstance(p, list):
            check_token_ids(engine, ids, "prompt")
        token_lists.append(ids)
    call = GenerationCall(request, engine, new_id("cmpl"), model, params, chat=False,
                          extras=extras)
    if extras.echo:
        call.echo = [p if isinstance(p, str) and extras.truncate is None
                     else tokenizer_of(engine, "echo").decode(ids, skip_special_tokens=False)
                     for p, ids in zip(prompts, token_lists, strict=True)]
    return await call.run(token_lists, stream, include_usage)


async def chat_completions(request: Request):
    mark_arrival(request)
    return await chat_completions_body(request, await read_json(request))


async def chat_completions_body(request: Request, body: dict):
    call, ids = await chat_call(request, body, new_id("chatcmpl"))
    stream, include_usage = _stream_flags(body, request.app.state.settings)
    return await call.run([ids], stream, include_usage)


async def chat_call(request: Request, body: dict, call_id: str,
                    call_class: type[GenerationCall] = GenerationCall
                    ) -> tuple[GenerationCall, list[int]]:
    """A chat body checked and rendered into one call of `call_class` (not run yet), and the
    prompt's ids. Its streaming fields are the caller's to read."""
    engine = ready_engine(request)
    model = check_model(request, body)
    messages = parse_messages(body)
    extras = read_extras(body, chat=True, settings=request.app.state.settings)
    params = parse_sampling_params(body, chat=True, defaults=engine.sampling_defaults)
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
    if tool_choice == "required":
        await _check_a_call_can_begin(engine, tools)
    get_field(body, "user", "str")
    tokens_field = max_tokens_field(body, chat=True)
    ids, options = await _chat_prompt(request, engine, body, messages, tools, tool_choice, extras,
                                      params, tokens_field)
    call = _chat_call(request, engine, model, params, extras, tokens_field, options, call_id,
                      call_class)
    if tools and tool_choice != "none":
        call.tool_parser = ToolCallParser(
            tool_choice, [t["function"]["name"] for t in tools], parallel,
            {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools})
    call.reasoning = _reasoning_parser(request, engine, ids, params)
    return call, ids


async def _check_a_call_can_begin(engine, tools: list[dict]) -> None:
    """tool_choice "required": a 400 naming tools for a tool whose arguments cannot begin (its
    parameters allow no first token, as {"$ref": "#"}), as a named tool_choice of it is. The
    grammar of the calls compiled and let such a call open, and the request failed in the
    core at its '"arguments": ' (a 500) whenever the model picked it."""
    for i, so in referring_parameters(tools):
        try:
            await check_compiles(engine, so, "tools")
        except APIError as e:
            e.message = e.message.replace("'tools':", f"'tools[{i}].function.parameters':", 1)
            raise


def _reasoning_parser(request: Request, engine, ids: list[int], params
                      ) -> ReasoningParser | None:
    """--reasoning-parser's reader of answers to the prompt `ids`; None without the flag. Where
    the answer starts inside the reasoning block, a grammar (params.structured_outputs) holds
    only after the block: from the token after its closing tag. Where the model may open one
    (the prompt's end left none open or closed), it holds from the first token, or after the
    block if that token opens one."""
    kind = request.app.state.settings.reasoning_parser
    if kind is None:
        return None
    tail = engine.tokenizer.decode(ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
    parser = ReasoningParser.for_prompt(kind, tail, constrained=False)
    if params.structured_outputs is None:
        return parser
    end = engine.tokenizer.encode(END, add_special_tokens=False)
    if parser.open_at_start:
        params.structured_outputs_after = end
        return parser
    start = engine.tokenizer.encode(START, add_special_tokens=False)
    if len(start) == 1 and not prompt_closes_reasoning(tail):
        params.structured_outputs_after = end
        params.structured_outputs_deferred_by = start[0]
    # The answer starts outside the block: the grammar (or its first token) decides whether
    # one comes.
    return ReasoningParser.for_prompt(kind, tail, constrained=True)


# Chat fields that hold for one conversation, or answer in pieces: not taken by the batch route.
_NOT_IN_A_BATCH = ("stream", "tools", "use_beam_search", "echo", "prompt_logprobs")


async def chat_completions_batch(request: Request):
    """vLLM's POST /v1/chat/completions/batch: `messages` holds several conversations, and choice
    i of the one answer is conversation i's. The other fields apply to every conversation;
    streaming (and stream_options), tools, n > 1, beam search, echo and prompt_logprobs are
    refused (400 naming the field); with return_token_ids each choice has its token_ids (the
    prompts' ids are not sent)."""
    mark_arrival(request)
    body = await read_json(request)
    conversations = body.get("messages")
    if (not isinstance(conversations, list) or not conversations
            or not all(isinstance(c, list) for c in conversations)):
        raise bad_request("messages", "a batch's 'messages' must be a non-empty array of "
                                      "conversations, each an array of messages")
    if len(conversations) > MAX_PROMPTS:
        raise bad_request("messages", f"'messages' holds {len(conversations)} conversations; "
                                      f"at most {MAX_PROMPTS} are served in one call")
    for name in _NOT_IN_A_BATCH:
        if body.get(name) is not None and body.get(name) is not False:
            raise bad_request(name, f"'{name}' is not supported by the batch endpoint")
    if body.get("n") not in (None, 1):
        raise bad_request("n", "the batch endpoint makes one choice per conversation: 'n' must "
                               "be 1")
    if body.get("tool_choice") not in (None, "none"):  # as the chat route answers it
        raise bad_request("tool_choice", "'tool_choice' needs 'tools', which the batch endpoint "
                                         "does not take")
    engine = ready_engine(request)
    model = check_model(request, body)
    extras = read_extras(body, chat=True, settings=request.app.state.settings)
    params = parse_sampling_params(body, chat=True, defaults=engine.sampling_defaults)
    so, so_field = parse_structured_outputs(body)
    await _constrain(request, engine, params, so, so_field, len(conversations))
    _stream_flags(body, request.app.state.settings)  # stream_options, never streamed: a 400
    get_field(body, "user", "str")
    tokens_field = max_tokens_field(body, chat=True)
    token_lists, options = [], None
    for i, conversation in enumerate(conversations):
        one = {**body, "messages": conversation}
        try:
            ids, options = await _chat_prompt(request, engine, one, parse_messages(one), None,
                                              None, extras, params, tokens_field)
        except APIError as e:  # its param and message name the conversation: messages[i][j]...
            if e.param and e.param.startswith("messages"):
                e.param = f"messages[{i}]" + e.param[len("messages"):]
                e.message = re.sub(r"\bmessages(?=[\[.'])", f"messages[{i}]", e.message)
            raise
        token_lists.append(ids)
    call = _chat_call(request, engine, model, params, extras, tokens_field, options,
                      new_id("chatcmpl"))
    # one template renders every conversation: where the first leaves the answer, all do
    call.reasoning = _reasoning_parser(request, engine, token_lists[0], params)
    return await call.run(token_lists, False, False)


async def _chat_prompt(request: Request, engine, body: dict, messages: list[dict], tools,
                       tool_choice, extras, params, tokens_field: str
                       ) -> tuple[list[int], ChatOptions]:
    """A conversation's prompt ids (rendered, truncated as asked, checked against the context)
    and how it was rendered."""
    ids, options = await render_chat(request, engine, body, messages, tools, tool_choice)
    ids = truncate(ids, extras, engine.max_model_len)
    _check_length(engine, len(ids), _asked_tokens(body, params, True), "messages",
                  tokens_field)
    return ids, options


def _chat_call(request: Request, engine, model: str, params, extras, tokens_field: str,
               options: ChatOptions, call_id: str,
               call_class: type[GenerationCall] = GenerationCall) -> GenerationCall:
    call = call_class(request, engine, call_id, model, params, chat=True, extras=extras)
    call.tokens_field, call.chat_options = tokens_field, options
    return call


async def invocations(request: Request):
    """SageMaker's one route: a chat body (it has `messages`) or a completions body."""
    mark_arrival(request)
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
    await check_compiles(engine, so, field, params.allowed_token_ids)
    params.structured_outputs = so  # counted in the metrics once the engine accepts it


def _stream_flags(body: dict, settings) -> tuple[bool, bool]:
    stream = get_field(body, "stream", "bool", False)
    options = get_field(body, "stream_options", "dict", {})
    include_usage = options.get("include_usage")
    include_usage = False if include_usage is None else include_usage  # null: not given
    if not isinstance(include_usage, bool):
        raise bad_request("stream_options", "'stream_options.include_usage' must be a boolean")
    if options and not stream:
        raise bad_request("stream_options", "'stream_options' needs 'stream': true")
    return stream, include_usage or settings.force_include_usage


async def render_chat(request: Request, engine, body: dict, messages: list[dict], tools,
                      tool_choice) -> tuple[list[int], ChatOptions]:
    """The chat's prompt ids as the body asks them rendered (generation prompt, continued final
    message, template kwargs, tools), and those options: chat and /tokenize agree on the count."""
    options = chat_options(messages, body)
    extra = {"tools": tools} if tools and tool_choice != "none" else {}
    ids = await chat_token_ids(request, engine, template_messages(messages),
                               **{**options.template_options, **extra})
    return ids, options


def _asked_tokens(body: dict, params, chat: bool) -> int | None:
    """The max_tokens a prompt must leave room for: the request's own; a default from the
    model's generation config only caps the output (protocol.max_tokens_given)."""
    return params.max_tokens if max_tokens_given(body, chat) else None


def _check_length(engine, num_prompt: int, max_tokens: int | None, param: str,
                  tokens_field: str = "max_tokens"):
    limit = engine.max_model_len
    if num_prompt >= limit:
        what = "the rendered messages hold" if param == "messages" else f"the {param} has"
        raise bad_request(param, f"this model's maximum context length is {limit} tokens, but "
                                 f"{what} {num_prompt} tokens")
    if max_tokens is not None and num_prompt + max_tokens > limit:
        raise bad_request(tokens_field, f"this model's maximum context length is {limit} "
                          f"tokens, but {num_prompt} prompt tokens + {tokens_field} {max_tokens} "
                          f"= {num_prompt + max_tokens}")
