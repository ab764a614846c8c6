"""A POST /v1/responses body (OpenAI's Responses API) read as a chat completions body, so the chat
path (server/openai_routes.chat_call) renders, samples, constrains and parses tool calls for it as
it does for chat: nothing here touches the engine.

    request = read_request(body)                       # checked; refuses what cannot be honoured
    messages = conversation(history, request.input)    # input items -> chat messages
    chat = chat_body(request, messages)                # -> a chat completions body

Input items (a string is one user message): messages of role user, system, developer (read as
system) or assistant with text content (`input_text` / `output_text` parts); `function_call`
items (joined to the assistant turn before them as its tool_calls) and `function_call_output`
items (a `tool` message). A response's output items are input items too: a stored response's
conversation continues through the same fold (previous_response_id).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from server.protocol import APIError, bad_request, get_field

# Fields that change what a response is and that this server cannot do: refused by name. A
# field set to null (or false, for background) asks nothing and passes.
_REFUSED = {
    "background": "background responses are not supported; send the request without it",
    "conversation": "the Conversations API is not served; send the items in 'input' or use "
                    "'previous_response_id'",
    "prompt": "stored prompt templates are not served; send 'instructions' and 'input'",
    "include": "no 'include' value is supported (no logprobs, reasoning or tool results are "
               "returned)",
    "context_management": "context management (compaction) is not supported",
}
# Accepted and not acted on: they change nothing in the output (routing and billing hints,
# identifiers; max_tool_calls bounds built-in tools, of which there are none).
_HARMLESS = ("service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
             "max_tool_calls", "user", "stream_options")
_READ = ("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
         "tools", "tool_choice", "text", "store", "previous_response_id", "metadata",
         "parallel_tool_calls", "seed", "reasoning", "truncation", "top_logprobs")
# vLLM's sampling extensions, passed on to the chat path (which checks them) as vLLM's own
# Responses route takes them.
_VLLM_SAMPLING = ("top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "min_tokens", "ignore_eos", "stop", "stop_token_ids",
                  "bad_words", "cache_salt")
# Fields the response echoes as sent (any JSON inside): their numbers must be finite.
_ECHOED = ("tools", "text")
_TOOL_KEYS = ("type", "name", "description", "parameters", "strict")
_TEXT_PARTS = ("input_text", "output_text")
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}


@dataclass
class ResponsesRequest:
    body: dict  # the request as sent
    input: list[dict]  # its input items, checked
    tools: list[dict]  # flat function tools, as the response echoes them
    tool_choice: str | dict
    text_format: dict  # text.format
    stream: bool
    store: bool
    previous_response_id: str | None
    metadata: dict | None


def read_request(body: dict) -> ResponsesRequest:
    """The body checked field by field: a 400 names the field it refuses."""
    for name in body:
        if name not in _REFUSED and name not in _HARMLESS and name not in _READ \
                and name not in _VLLM_SAMPLING:
            raise bad_request(name, f"unknown parameter '{name}'")
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, False, []):
            raise bad_request(name, f"'{name}': {why}")
    reasoning = get_field(body, "reasoning", "dict", {})
    if reasoning.get("effort") not in (None, "none") or reasoning.get("summary") is not None:
        raise bad_request("reasoning", "'reasoning': this server sets no reasoning effort and "
                          "writes no summary (a thinking model's reasoning comes back as an "
                          "output item under --reasoning-parser)")
    if get_field(body, "truncation", "str", "disabled") != "disabled":
        raise bad_request("truncation", "'truncation' must be 'disabled': an input longer than "
                                        "the context is refused, never cut")
    if get_field(body, "top_logprobs", "int", 0) != 0:
        raise bad_request("top_logprobs", "'top_logprobs' is not supported (no logprobs are "
                                          "returned)")
    stream = get_field(body, "stream", "bool", False)
    if body.get("stream_options") is not None and not stream:
        raise bad_request("stream_options", "'stream_options' needs 'stream': true")
    get_field(body, "instructions", "str")
    for name in _ECHOED:
        where = _non_finite(body.get(name), name)
        if where is not None:
            raise bad_request(where, f"'{where}' is NaN or infinite: numbers must be finite "
                                     "(the response echoes this field, and JSON has neither)")
    return ResponsesRequest(
        body=body, input=_read_input(body.get("input")), tools=_read_tools(body),
        tool_choice=_read_tool_choice(body), text_format=_read_text(body), stream=stream,
        store=get_field(body, "store", "bool", True),
        previous_response_id=get_field(body, "previous_response_id", "str"),
        metadata=_read_metadata(body))


def _non_finite(value, path: str) -> str | None:
    """The path (e.g. tools[0].parameters.maximum) of the first NaN or infinity in `value` (a
    float past its range, 1e400, is one once parsed); None if it has none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]")
        if found is not None:
            return found
    return None


def _read_input(value) -> list[dict]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("input", "'input' is required: a string or a non-empty array of "
                                   "input items")
    return [_read_item(item, f"input[{i}]") for i, item in enumerate(value)]


def _read_item(item, at: str) -> dict:
    if not isinstance(item, dict):
        raise bad_request(at, f"{at} must be an object")
    kind = item.get("type", "message")
    if kind == "message":
        if not isinstance(item.get("role"), str) or item["role"] not in _ROLES:
            raise bad_request(f"{at}.role", f"{at}.role must be one of {list(_ROLES)}, got "
                                            f"{item.get('role')!r}")
        return {"type": "message", "role": item["role"],
                "content": _text_content(item.get("content"), f"{at}.content")}
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise bad_request(f"{at}.{key}", f"{at}.{key} must be a string")
        return {"type": kind, "call_id": item["call_id"], "name": item["name"],
                "arguments": item["arguments"]}
    if kind == "reasoning":  # an earlier answer's (--reasoning-parser), sent back
        content, summary = item.get("content") or [], item.get("summary") or []
        parts = [*content, *summary] if isinstance(content, list) \
            and isinstance(summary, list) else [None]
        if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
            raise bad_request(f"{at}.content", f"{at}: a reasoning item's content and summary "
                                               "are text parts")
        if item.get("encrypted_content") is not None:
            raise bad_request(f"{at}.encrypted_content", f"{at}.encrypted_content is not "
                              "supported: this server sends its reasoning as text")
        text = "".join(p["text"] for p in content) or "\n".join(p["text"] for p in summary)
        return {"type": kind, "text": text}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise bad_request(f"{at}.call_id", f"{at}.call_id must be a string")
        return {"type": kind, "call_id": item["call_id"],
                "output": _text_content(item.get("output"), f"{at}.output")}
    raise bad_request(f"{at}.type", f"{at}.type {kind!r} is not supported: input items are "
                                    "messages, reasoning, function_call and "
                                    "function_call_output")


def _text_content(content, at: str) -> str | list[dict]:
    """A string, or text parts as chat content parts (parse_messages joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(at, f"{at} must be a string or an array of text parts")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS \
                or not isinstance(part.get("text"), str):
            raise bad_request(f"{at}[{j}]", f"{at}[{j}]: only text parts (input_text, "
                                            "output_text) are supported")
    return [{"type": "text", "text": part["text"]} for part in content]


def _read_tools(body: dict) -> list[dict]:
    tools = get_field(body, "tools", "list", [])
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request("tools", f"{at}: only function tools are supported, got type "
                                       f"{kind!r} (built-in tools are not served)")
        if not isinstance(tool.get("name"), str):
            raise bad_request("tools", f"{at}.name must be a string")
        extra = [k for k, v in tool.items() if k not in _TOOL_KEYS and v is not None]
        if extra:
            raise bad_request("tools", f"{at}: {extra} are not supported")
    return [{k: t.get(k) for k in _TOOL_KEYS} for t in tools]


def _read_tool_choice(body: dict) -> str | dict:
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto"
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("name"), str):
        return {"type": "function", "name": choice["name"]}
    raise bad_request("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or "
                                     f"{{'type': 'function', 'name': ...}}, got {choice!r}")


def _read_text(body: dict) -> dict:
    text = get_field(body, "text", "dict", {})
    if text.get("verbosity") not in (None, "medium"):
        raise bad_request("text.verbosity", "'text.verbosity' other than 'medium' is not "
                                            "supported")
    fmt = text.get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise bad_request("text.format", "'text.format' must be an object")
    if fmt.get("type") == "json_schema" and not isinstance(fmt.get("schema"), dict):
        # chat's json_schema may leave its schema out (then any JSON object); this API's may not
        raise bad_request("text.format", "'text.format.schema' is required for 'json_schema': "
                                         "a JSON schema object")
    return fmt


def _read_metadata(body: dict) -> dict | None:
    """OpenAI's bounds: at most 16 pairs, string keys of 64 characters, values of 512."""
    metadata = get_field(body, "metadata", "dict")
    if metadata is not None and (len(metadata) > 16 or not all(
            isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items())):
        raise bad_request("metadata", "'metadata' holds at most 16 pairs of strings: keys of at "
                                      "most 64 characters, values of at most 512")
    return metadata


# ---------------------------------------------------------------- to chat


def conversation(messages: list[dict], items: list[dict]) -> list[dict]:
    """`messages` (a chat so far, not changed) followed by the checked input `items`, as chat
    messages: a function_call joins the assistant turn before it (one turn, several calls), and a
    function_call_output must answer a call made before it."""
    messages = list(messages)
    reasoning = None  # a reasoning item's text, for the assistant turn that follows it
    for i, item in enumerate(items):
        if item["type"] == "reasoning":
            reasoning = item["text"] or None  # an empty one (no text, no summary): none
            continue
        if reasoning is not None:
            turn = {"role": "assistant", "content": None, "reasoning": reasoning}
            if item["type"] == "message" and item["role"] == "assistant":
                messages.append({**turn, "content": item["content"]})
                reasoning = None
                continue
            messages.append(turn)
            reasoning = None
        if item["type"] == "message":
            messages.append({"role": _ROLES[item["role"]], "content": item["content"]})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant":  # a copy: `messages` may be a stored chat's
                messages[-1] = {**last, "tool_calls": [*(last.get("tool_calls") or []), call]}
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            if not any(c["id"] == item["call_id"] for m in messages
                       for c in m.get("tool_calls") or ()):
                raise bad_request("input", f"no function_call with call_id "
                                           f"{item['call_id']!r} comes before input[{i}]")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": item["output"]})
    if reasoning is not None:  # the input ends with a reasoning item
        messages.append({"role": "assistant", "content": None, "reasoning": reasoning})
    return messages


def continued(messages: list[dict], output: list[dict]) -> list[dict]:
    """The chat `messages` followed by a response's `output` items, as the next request's
    input would send them: the conversation a stored response continues."""
    return conversation(messages, [_read_item(item, "output") for item in output])


def chat_body(request: ResponsesRequest, messages: list[dict], model: str) -> dict:
    """The chat completions body that asks what `request` asks, of `messages` (its instructions
    come first, as a system message)."""
    body = request.body
    instructions = body.get("instructions")
    chat = {"model": model, "messages": ([{"role": "system", "content": instructions}]
                                         if instructions is not None else []) + messages}
    for name in ("temperature", "top_p", "seed", "parallel_tool_calls", "user", *_VLLM_SAMPLING):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if request.tools:
        chat["tools"] = [{"type": "function", "function": {k: v for k, v in t.items()
                                                           if k != "type" and v is not None}}
                         for t in request.tools]
        choice = request.tool_choice
        chat["tool_choice"] = ({"type": "function", "function": {"name": choice["name"]}}
                               if isinstance(choice, dict) else choice)
    elif request.tool_choice not in ("auto", "none"):
        chat["tool_choice"] = request.tool_choice  # the chat path's 400: it needs tools
    fmt = request.text_format
    if fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt.get(k) for k in ("name", "schema", "strict", "description") if k in fmt}}
    else:
        chat["response_format"] = fmt
    return chat


# The chat path's words for the fields it names, and this API's.
_RENAMED = ((re.compile(r"\bmessages(?=[\[.'])"), "input"),
            (re.compile(r"\bmax_completion_tokens\b"), "max_output_tokens"),
            (re.compile(r"\bresponse_format(\.json_schema)?\b"), "text.format"),
            (re.compile(r"\b(tools\[\d+\])\.function\b"), r"\1"))


def in_responses_words(e: APIError) -> APIError:
    """A chat path's error about a field, naming this API's field instead."""
    for pattern, name in _RENAMED:
        e.message = pattern.sub(name, e.message)
        if e.param is not None:
            e.param = pattern.sub(name, e.param)
    if e.param is not None and (e.param == "messages" or e.param.startswith("input")):
        e.param = "input"  # the chat's indices are not the input's
    return e
