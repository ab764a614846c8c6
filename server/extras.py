"""vLLM's extensions to the OpenAI API: what a call asks beyond OpenAI's fields, and the JSON
they add to its answer.

- prompt scoring: `prompt_logprobs`, completions `echo` + `logprobs` (the echoed prompt's tokens
  scored too; `max_tokens: 0` scores without generating);
- `truncate_prompt_tokens` + `truncation_side`, `return_token_ids`, `return_tokens_as_token_ids`;
- usage: `prompt_tokens_details.cached_tokens`, `stream_options.continuous_usage_stats`;
- chat: `echo`, `add_generation_prompt`, `continue_final_message`, `chat_template_kwargs`,
  `documents` (rendered by Tokenizer.apply_chat_template).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.sampling_params import ParamError, truncated_prompt
from server.protocol import bad_request, finite_logprob, get_field, legacy_top_logprobs


@dataclass
class Extras:
    echo: bool = False
    score_only: bool = False  # completions echo with max_tokens 0: nothing generated is sent
    truncate: int | None = None  # keep this many prompt tokens (-1: max_model_len)
    truncation_side: str = "left"  # which end loses tokens
    return_token_ids: bool = False
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:N" (decodes nothing)
    continuous_usage: bool = False  # usage on every streamed chunk
    add_special_tokens: bool = True  # a text prompt's tokenizer specials (completions)
    include_reasoning: bool = True  # chat under --reasoning-parser: send the reasoning


def read_extras(body: dict, *, chat: bool, settings) -> Extras:
    """The extension fields of a completions or chat body, checked; `settings` (app.ServerSettings)
    gives the server-wide defaults."""
    x = Extras()
    x.echo = get_field(body, "echo", "bool", False)
    x.score_only = not chat and x.echo and body.get("max_tokens") == 0
    x.truncate = get_field(body, "truncate_prompt_tokens", "int")
    if x.truncate is not None and x.truncate < 1 and x.truncate != -1:
        raise bad_request("truncate_prompt_tokens", "'truncate_prompt_tokens' must be -1 (the "
                          f"longest prompt the model takes) or >= 1, got {x.truncate}")
    x.truncation_side = get_field(body, "truncation_side", "str", "left")
    if x.truncation_side not in ("left", "right"):
        raise bad_request("truncation_side", "'truncation_side' must be 'left' or 'right', got "
                                             f"{x.truncation_side!r}")
    # vLLM's: a text prompt gets the tokenizer's special tokens (a BOS) unless this is false
    if chat:
        check_chat_special_tokens(body)
        x.add_special_tokens = False
    else:
        x.add_special_tokens = get_field(body, "add_special_tokens", "bool", True)
    x.return_token_ids = get_field(body, "return_token_ids", "bool", False)
    if chat:  # vLLM's: false drops the reasoning of a --reasoning-parser answer
        x.include_reasoning = get_field(body, "include_reasoning", "bool", True)
    x.tokens_as_ids = get_field(body, "return_tokens_as_token_ids", "bool",
                                settings.return_tokens_as_token_ids)
    options = get_field(body, "stream_options", "dict", {})
    x.continuous_usage = options.get("continuous_usage_stats")
    x.continuous_usage = False if x.continuous_usage is None else x.continuous_usage  # null
    if not isinstance(x.continuous_usage, bool):
        raise bad_request("stream_options", "'stream_options.continuous_usage_stats' must be a "
                                            "boolean")
    x.continuous_usage |= settings.force_include_usage
    return x


def check_chat_special_tokens(body: dict) -> None:
    """`add_special_tokens` of a chat (chat completions, /tokenize's messages): a chat's
    template writes its own special tokens, and adding them again is not supported here, so
    true is refused by name rather than ignored."""
    if get_field(body, "add_special_tokens", "bool", False):
        raise bad_request("add_special_tokens", "'add_special_tokens': true is not supported "
                                                "for chat (the chat template writes its tokens)")


def truncate(ids: list[int], x: Extras, max_model_len: int) -> list[int]:
    """The prompt ids truncate_prompt_tokens keeps (all of them when it is not set)."""
    if x.truncate is None:
        return ids
    try:
        return truncated_prompt(ids, x.truncate, max_model_len, x.truncation_side)
    except ParamError as e:
        raise bad_request(e.field, str(e)) from None


# ---------------------------------------------------------------- answers


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int,
          created_cache_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens,
                                      "created_cache_tokens": created_cache_tokens}}


def prompt_logprobs_json(entries: list | None, token_str, prompt_ids: list[int] | None = None,
                         ranks: list | None = None) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or
    {token id: {logprob, rank, decoded_token}}: the top tokens ranked 1, 2, ... and the prompt
    token at its rank in the whole vocabulary (`ranks`, beside `prompt_ids`) when it is not
    among them."""
    if entries is None:
        return None
    out = []
    for i, entry in enumerate(entries):
        if entry is None:
            out.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        rank_of = {t: r for r, (t, _) in enumerate(ranked, 1)}
        if ranks is not None and prompt_ids is not None and ranks[i] is not None:
            # past the top ones the entry's order cannot say it (within them, ties keep theirs)
            token = prompt_ids[i]
            rank_of[token] = max(rank_of[token], ranks[i])
        out.append({str(t): {"logprob": finite_logprob(v), "rank": rank_of[t],
                             "decoded_token": token_str(t)} for t, v in ranked})
    return out


def echo_logprobs(prompt_ids: list[int], entries: list, token_str) -> dict:
    """The legacy completions `logprobs` object of an echoed prompt: the first token has no
    logprob (None), each other one its own and its top ones; offsets count from the prompt's
    start."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for tid, entry in zip(prompt_ids, entries or [None] * len(prompt_ids), strict=True):
        text = token_str(tid)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if entry is None else finite_logprob(entry.get(tid)))
        out["top_logprobs"].append(None if entry is None
                                   else legacy_top_logprobs(tid, entry, token_str))
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def join_logprobs(first: dict, then: dict | None) -> dict:
    """Two legacy logprobs objects, one after the other."""
    if then is None:
        return first
    return {k: first[k] + then[k] for k in first}


# ---------------------------------------------------------------- chat


@dataclass
class ChatOptions:
    template_options: dict  # for Tokenizer.apply_chat_template (handlers.chat_token_ids)
    role: str  # the answer's role: assistant, or the last message's when it is continued
    echo: str  # what the answer's content starts with ("" unless echo)


# Template variables the renderer sets itself, and its own arguments (a render's deadline):
# chat_template_kwargs may not pass them.
_RESERVED = ("messages", "tokenize", "bos_token", "eos_token", "special_tokens_in_content",
             "continue_final_message", "render_seconds", "chat_template", "self")


def chat_options(messages: list[dict], body: dict) -> ChatOptions:
    """How to render the chat, and how the answer starts, as the body asks."""
    add_generation = get_field(body, "add_generation_prompt", "bool", True)
    continue_final = get_field(body, "continue_final_message", "bool", False)
    if body.get("chat_template") is not None:  # refused by name, never silently ignored
        raise bad_request("chat_template", "a chat template sent with the request is not "
                                           "supported: the model's own renders the chat (vLLM "
                                           "also refuses it unless --trust-request-chat-template)")
    options = dict(get_field(body, "chat_template_kwargs", "dict", {}))
    reserved = [k for k in options if k in _RESERVED]
    if reserved:
        raise bad_request("chat_template_kwargs", f"'chat_template_kwargs' may not set {reserved}")
    # chat_template_kwargs' add_generation_prompt wins over the field in the render, as in
    # vLLM; here it must be a boolean, and the answer's role and the check below follow it
    # (vLLM's follow the field, so the answer's role could belie the prompt rendered).
    given = options.get("add_generation_prompt")
    if given is not None:
        if not isinstance(given, bool):
            raise bad_request("chat_template_kwargs", "'chat_template_kwargs.add_generation_"
                              f"prompt' must be a boolean, got {type(given).__name__}")
        add_generation = given
    if add_generation and continue_final:
        raise bad_request("continue_final_message", "Cannot set both `continue_final_message` "
                                                    "and `add_generation_prompt` to True.")
    documents = get_field(body, "documents", "list")
    if documents is not None:
        options["documents"] = documents
    options["add_generation_prompt"] = add_generation
    options["continue_final_message"] = continue_final
    last = messages[-1]
    role = "assistant" if add_generation else last["role"]
    echo = ""
    if get_field(body, "echo", "bool", False) and last["role"] == role:
        echo = last.get("content") or ""
    return ChatOptions(options, role, echo)
