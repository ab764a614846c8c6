"""OpenAI's request and response shapes: read and check a request body, build the JSON answers.

Every check names the field it rejects, so a client sees `param` and a message it can act on
instead of a stack trace. Nothing here touches the engine: it turns JSON into SamplingParams and
engine outputs back into JSON.
"""

from __future__ import annotations

import re
import time
import uuid
from http import HTTPStatus

from starlette.responses import JSONResponse

from engine.core.limits import MAX_MESSAGES, MAX_PROMPTS
from engine.core.sampling_params import COUNT_LIMITS, ParamError, SamplingParams, check_count


class APIError(Exception):
    """An error answered in OpenAI's schema: {"error": {message, type, param, code}}.

    `code` is always a string: the specific one given ("model_not_found"), else the HTTP
    status's name in snake case ("bad_request", "internal_server_error").
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type, code)
        self.headers = headers  # what HTTP asks of the status: Allow (405), WWW-Authenticate

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param,
                "code": self.code or HTTPStatus(self.status).phrase.lower().replace(" ", "_")}
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds: what vLLM (a C long) accepts


def bad_request(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


# ---------------------------------------------------------------- field readers

_KINDS = {  # name -> (python types, what to call it in a message)
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
    "bool": ((bool,), "a boolean"),
    "str": ((str,), "a string"),
    "list": ((list,), "an array"),
    "dict": ((dict,), "an object"),
}


def get_field(body: dict, name: str, kind: str, default=None, *, nullable: bool = True):
    """body[name] checked against `kind`; a missing or null field gives `default`."""
    value = body.get(name)
    if value is None:
        if name in body and not nullable:
            raise bad_request(name, f"'{name}' must not be null")
        return default
    types, what = _KINDS[kind]
    # bool is an int in Python, but `"max_tokens": true` is a client bug, not 1.
    if not isinstance(value, types) or (kind in ("int", "number") and isinstance(value, bool)):
        raise bad_request(name, f"'{name}' must be {what}, got {type(value).__name__}")
    if kind == "int" and not INT64_MIN <= value <= INT64_MAX:
        # JSON integers have no bound, the engine's fields do (and its messages carry int64 at
        # most). The name of the bound broken, as pydantic (and so vLLM) reports it.
        rule = "less_than_equal" if value > INT64_MAX else "greater_than_equal"
        raise bad_request(name, f"'{name}' must be in [{INT64_MIN}, {INT64_MAX}] (int64), got "
                                f"{value} ({rule})")
    if kind == "number":  # a float from here on: 1e400 is inf, a 400-digit integer no number
        try:
            return float(value)
        except OverflowError:
            raise bad_request(name, f"'{name}' must be a finite number") from None
    return value


def _is_token_list(value) -> bool:
    """A list of ints in [0, 2**63) (not bools), checked at C speed: prompts may hold a million
    ids. (Ids past the vocabulary are the engine's to refuse, by index; past int64 they could
    not even reach it.)"""
    return isinstance(value, list) and (
        not value or (set(map(type, value)) == {int} and min(value) >= 0
                      and max(value) <= INT64_MAX))


def parse_prompts(body: dict) -> list[str | list[int]]:
    """`prompt` as OpenAI allows it: a string, strings, a token id list, or token id lists."""
    prompt = body.get("prompt")
    error = bad_request("prompt", "'prompt' must be a string, an array of strings, an array of "
                                  "token ids, or an array of token id arrays")
    if prompt is None:  # vLLM's words, which its clients match on
        raise bad_request("prompt", "Either prompt or prompt_embeds must be provided and "
                                    "non-empty. ('prompt' is required here: prompt_embeds are "
                                    "not supported)")
    if body.get("prompt_embeds") is not None:
        raise bad_request("prompt_embeds", "'prompt_embeds' are not supported; send text or "
                                           "token ids in 'prompt'")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif _is_token_list(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token_list(p) and p for p in prompt):
        prompts = list(prompt)
    else:
        raise error
    if len(prompts) > MAX_PROMPTS:
        raise bad_request("prompt", f"'prompt' holds {len(prompts)} prompts; at most "
                                    f"{MAX_PROMPTS} are served in one call")
    if any(p == "" for p in prompts):
        raise bad_request("prompt", "'prompt' must not be empty")
    return prompts


def parse_messages(body: dict) -> list[dict]:
    """The chat messages, checked, with content as text: a list of text parts joined by newlines
    (as vLLM joins them), and an
    assistant's null or missing content (a turn of tool calls) as "", as chat templates concatenate
    it. Each fault is a 400 whose param names the element (messages[2].tool_calls[0].function)."""
    messages = get_field(body, "messages", "list")
    if not messages:
        raise bad_request("messages", "'messages' is required and must be a non-empty array")
    if len(messages) > MAX_MESSAGES:
        raise bad_request("messages", f"'messages' holds {len(messages)} messages; at most "
                                      f"{MAX_MESSAGES} are served in one call")
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(at, f"{at} must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: only text ones are understood
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(p, str) for p in parts) or len(parts) != len(content):
                raise bad_request(f"{at}.content", f"{at}.content: only text parts are "
                                                   "supported")
            m = {**m, "content": "\n".join(parts)}
        elif content is None:
            if m["role"] != "assistant":
                raise bad_request(f"{at}.content", f"{at}.content is required for a "
                                                   f"'{m['role']}' message")
            m = {**m, "content": ""}
        elif not isinstance(content, str):
            raise bad_request(f"{at}.content", f"{at}.content must be a string or an array "
                                               "of text parts")
        if "tool_calls" in m and m["tool_calls"] is not None:
            _check_tool_calls(m["tool_calls"], f"{at}.tool_calls")
        messages[i] = m
    return messages


def _check_tool_calls(calls, at: str) -> None:
    """An assistant turn's tool calls as OpenAI writes them: [{"function": {"name": str,
    "arguments": JSON text or an object}, ...}]."""
    if not isinstance(calls, list):
        raise bad_request(at, f"{at} must be an array of tool calls")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{at}[{j}].function", f"{at}[{j}] must be an object whose "
                              "'function' is an object with a string 'name'")
        if not isinstance(fn.get("arguments", ""), (str, dict)):
            raise bad_request(f"{at}[{j}].function.arguments", f"{at}[{j}].function.arguments "
                              "must be JSON text or an object")


# vLLM sampling fields this server does not implement: refused by name rather than ignored, so
# that a client relying on one never gets an unconstrained answer.
UNSUPPORTED_VLLM_FIELDS = ("prompt_logprob_token_ids",)


def parse_sampling_params(body: dict, *, chat: bool, defaults: dict | None = None
                          ) -> SamplingParams:
    """The sampling fields of a completions or chat body, checked, as SamplingParams. `defaults`
    (the model's generation_config.json, AsyncEngine's ModelInfo.sampling_defaults) fill the
    fields the body leaves out or sets to null, as vLLM reads null: unset."""
    defaults = defaults or {}
    f = body.__contains__
    for name in UNSUPPORTED_VLLM_FIELDS:
        if body.get(name) is not None:
            raise bad_request(name, f"'{name}' (a vLLM sampling field) is not supported by "
                                    "this server")
    for name in COUNT_LIMITS:  # before any per-item work below (this is the event loop)
        try:
            check_count(name, body.get(name))
        except ParamError as e:
            raise bad_request(name, str(e)) from None
    kw = {}
    for name, kind in (("n", "int"), ("temperature", "number"), ("top_p", "number"),
                       ("top_k", "int"), ("min_p", "number"), ("seed", "int"),
                       ("presence_penalty", "number"), ("frequency_penalty", "number"),
                       ("repetition_penalty", "number"), ("min_tokens", "int"),
                       ("ignore_eos", "bool"), ("skip_special_tokens", "bool"),
                       ("spaces_between_special_tokens", "bool"),
                       ("include_stop_str_in_output", "bool"), ("prompt_logprobs", "int"),
                       ("use_beam_search", "bool"), ("best_of", "int"),
                       ("length_penalty", "number"), ("early_stopping", "bool")):
        value = get_field(body, name, kind, defaults.get(name))
        if value is not None:
            kw[name] = value
    # No chunk carries a prompt's scores: asked with stream, they would be computed and dropped.
    # vLLM's rule (0 passes there too); completions echo's own scores are set below and stream.
    if kw.get("prompt_logprobs", 0) != 0 and body.get("stream") is True:
        raise bad_request("prompt_logprobs", "'prompt_logprobs' are not available when "
                                             "'stream' is true")
    for name in ("allowed_token_ids", "logprob_token_ids"):
        ids = get_field(body, name, "list")
        if ids is not None and not _is_token_list(ids):
            raise bad_request(name, f"'{name}' must be an array of token ids")
        if ids:  # an empty list asks nothing (vLLM's reading)
            kw[name] = ids
    chosen = "logprob_token_ids" in kw  # logprobs of these ids replace the top-k
    max_tokens = get_field(body, "max_tokens", "int")
    if chat:
        max_tokens = get_field(body, "max_completion_tokens", "int", max_tokens)
        if max_tokens is None:
            max_tokens = defaults.get("max_tokens")
        if get_field(body, "logprobs", "bool", False):
            top = get_field(body, "top_logprobs", "int", 0)  # checked even when ids replace it
            if not chosen:
                kw["logprobs"] = top
        elif f("top_logprobs") and body["top_logprobs"] is not None:
            raise bad_request("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        elif chosen:
            raise bad_request("logprob_token_ids", "'logprob_token_ids' needs 'logprobs': true")
    else:
        # OpenAI's completions default, as vLLM keeps it: the model's applies to a null only
        max_tokens = 16 if not f("max_tokens") else max_tokens
        if max_tokens is None:
            max_tokens = defaults.get("max_tokens")
        echo = get_field(body, "echo", "bool", False)
        if echo and max_tokens == 0:  # score the prompt: one token is made, and dropped
            max_tokens = 1
        if (logprobs := get_field(body, "logprobs", "int")) is not None:
            if not chosen:
                kw["logprobs"] = logprobs
            if echo:  # the echoed prompt's tokens get logprobs too
                kw.setdefault("prompt_logprobs", logprobs)
        elif chosen:
            raise bad_request("logprob_token_ids", "'logprob_token_ids' needs 'logprobs' set")
        if chosen and echo and body.get("max_tokens") == 0:
            raise bad_request("logprob_token_ids", "'logprob_token_ids' needs generated tokens: "
                                                   "echo with max_tokens 0 generates none")
    kw["max_tokens"] = max_tokens
    if (salt := get_field(body, "cache_salt", "str")) is not None:
        kw["cache_salt"] = salt  # its rule: SamplingParams, as ParamError naming it
    for name in ("stop", "bad_words"):  # their other rules: SamplingParams, naming them
        strings = body.get(name)
        if strings is not None:
            if isinstance(strings, str):
                strings = [strings]
            if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
                raise bad_request(name, f"'{name}' must be a string or an array of strings")
            kw[name] = strings
    stop_token_ids = get_field(body, "stop_token_ids", "list")
    if stop_token_ids is not None:
        if not _is_token_list(stop_token_ids):
            raise bad_request("stop_token_ids", "'stop_token_ids' must be an array of token ids")
        kw["stop_token_ids"] = stop_token_ids
    logit_bias = get_field(body, "logit_bias", "dict")
    if logit_bias is not None:
        bad = [k for k in logit_bias
               if not _TOKEN_ID_KEY.fullmatch(k) or len(k) > 20  # int() refuses 4,301 digits
               or not INT64_MIN <= int(k) <= INT64_MAX]
        if bad:
            raise bad_request("logit_bias", f"'logit_bias' keys must be token ids; "
                                            f"{_some(bad)} are not")
        try:
            kw["logit_bias"] = {int(k): _number(v) for k, v in logit_bias.items()}
        except (TypeError, ValueError, OverflowError):
            bad = [k for k, v in logit_bias.items() if not _is_number(v)]
            raise bad_request("logit_bias", f"'logit_bias' values must be finite numbers; those "
                                            f"of {_some(bad)} are not") from None
    try:
        return SamplingParams(**kw)
    except ParamError as e:
        raise param_error(e, chat, max_tokens_field(body, chat)) from None


def max_tokens_given(body: dict, chat: bool) -> bool:
    """Whether the body sets the output's length (completions: OpenAI's 16 when left out)
    rather than leaving it to the model's generation config, whose max_new_tokens only caps the
    output: the context's end comes first, as vLLM takes the least of the two."""
    if chat:
        return body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None
    return "max_tokens" not in body or body["max_tokens"] is not None


def max_tokens_field(body: dict, chat: bool) -> str:
    """The field that set max_tokens: chat's max_completion_tokens when the body gives it."""
    return ("max_completion_tokens" if chat and body.get("max_completion_tokens") is not None
            else "max_tokens")


def param_error(e: ParamError, chat: bool, tokens_field: str = "max_tokens") -> APIError:
    """A 400 for SamplingParams' (or the engine's) check of a field, in the request's words:
    chat's top_logprobs is SamplingParams' logprobs, and its max_tokens the field that set it
    (tokens_field)."""
    field, message = e.field, str(e)
    if chat and field == "logprobs":
        field = "top_logprobs"
        if message.startswith("logprobs"):
            message = "top_logprobs" + message[len("logprobs"):]
    if tokens_field != "max_tokens":
        field = tokens_field if field == "max_tokens" else field
        message = message.replace("max_tokens", tokens_field)
    return bad_request(field, message)


_TOKEN_ID_KEY = re.compile(r"-?[0-9]+")  # ASCII digits: str.isdigit() also takes '²'


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("not a number")
    return float(value)


def _is_number(value) -> bool:
    try:
        _number(value)
    except (TypeError, OverflowError):
        return False
    return True


def _some(keys: list[str]) -> str:
    """A few of the keys, each cut short, for a message that must stay small."""
    shown = [k if len(k) <= 24 else k[:21] + "..." for k in keys[:3]]
    return repr(shown)[:-1] + (", ...]" if len(keys) > 3 else "]")


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# The lowest logprob an answer shows, as vLLM's: a token the sampler took from a row where
# everything was masked (a grammar that reached its end while min_tokens still held eos back)
# has -inf, which JSON cannot carry.
MIN_LOGPROB = -9999.0


def finite_logprob(value: float | None) -> float | None:
    return value if value is None or value >= MIN_LOGPROB else MIN_LOGPROB  # NaN too


def completion_logprobs(token_ids, logprobs, token_str, text_offset: int = 0) -> dict:
    """The legacy completions `logprobs` object for the given tokens."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, lp in zip(token_ids, logprobs, strict=False):
        text = token_str(tid)
        out["tokens"].append(text)
        out["token_logprobs"].append(finite_logprob(lp.get(tid)))
        out["top_logprobs"].append(legacy_top_logprobs(tid, lp, token_str))
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(token_ids, logprobs, token_str, token_bytes, num_top: int | None) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]};
    num_top None: every entry (logprob_token_ids, top_logprobs -1). `bytes` are the token's own
    (token_bytes), not those of its text: a token holding part of a character shows as U+FFFD."""
    def entry(tid, value):
        return {"token": token_str(tid), "logprob": finite_logprob(value),
                "bytes": list(token_bytes(tid))}

    content = []
    for tid, lp in zip(token_ids, logprobs, strict=False):
        item = entry(tid, lp.get(tid))
        item["top_logprobs"] = [entry(t, v) for t, v in _top(lp)[:num_top]]
        content.append(item)
    return {"content": content}


def legacy_top_logprobs(tid: int, lp: dict[int, float], token_str) -> dict[str, float]:
    """One position's legacy `top_logprobs`: its own token first, as vLLM orders them (clients
    read the first key as the token), then the others by logprob."""
    ranked = sorted(lp.items(), key=lambda kv: (kv[0] != tid, -kv[1]))
    return {token_str(t): finite_logprob(v) for t, v in ranked}


def _top(lp: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(lp.items(), key=lambda kv: -kv[1])


def completion_body(request_id: str, model: str, choices: list[dict], use: dict | None,
                    created: int | None = None, chunk: bool = False) -> dict:
    body = {"id": request_id, "object": "text_completion", "created": created or int(time.time()),
            "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(request_id: str, model: str, choices: list[dict], use: dict | None,
              created: int | None = None, chunk: bool = False) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": created or int(time.time()), "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body
