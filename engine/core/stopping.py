"""Each sequence's output text and the rules that end it: eos and stop ids, stop strings found
across token boundaries (never leaked into a delta), max_tokens and max_model_len."""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence


@dataclass(eq=False, slots=True)
class SeqState:
    """What the engine tracks per sequence beyond its tokens: text and what was already sent."""

    seq: Sequence
    detokenizer: object | None
    text: str = ""  # decoded output, cut at a stop string once one is found
    num_sent_chars: int = 0  # text[:num_sent_chars] has gone out in deltas
    num_sent_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None


def check_stop(state: SeqState, seq: Sequence, token: int, eos_token_ids: list[int],
               max_model_len: int) -> str | None:
    """Extend the sequence's text with `token`; the finish reason if it ends here."""
    p = seq.sampling_params
    num_output_tokens = len(seq.token_ids) - seq.num_prompt_tokens
    # vLLM's rule: the min_tokens-th token may already end the sequence (the runner's bias keeps
    # eos and stop ids out of the tokens before it; stop strings are searched from it on).
    past_min = num_output_tokens >= p.min_tokens
    if past_min:
        if p.stop_token_ids and token in p.stop_token_ids:
            state.stop_reason = token
            if p.include_stop_str_in_output:
                _extend_text(state, token)
            return "stop"
        if not p.ignore_eos and token in eos_token_ids:
            return "stop"
    # Without a tokenizer there is no text, so no stop strings either.
    if state.detokenizer is not None and _stop_string(state, token, past_min):
        return "stop"
    if p.max_tokens is not None and num_output_tokens >= p.max_tokens:
        return "length"
    if len(seq.token_ids) >= max_model_len:
        return "length"
    return None

def _stop_string(state: SeqState, token: int, past_min: bool) -> bool:
    """Extend the text with `token`; True (text cut, stop_reason set) if a stop string ends
    in it."""
    p = state.seq.sampling_params
    old_len = len(state.text)
    _extend_text(state, token)
    if past_min and p.stop_list:
        # Each stop only where it would end in the new text: an earlier match was either found
        # by an earlier search or came before min_tokens (and went out, as it should have). A
        # window shared by all stops (the longest one's) would find a short stop again, late.
        text = state.text
        hits = [(i, s) for s in p.stop_list
                if (i := text.find(s, max(0, old_len - len(s) + 1))) >= 0]
        if hits:  # the earliest start; at equal starts the shorter stop, which is a prefix
            i, stop = min(hits)
            state.text = state.text[: i + (len(stop) if p.include_stop_str_in_output else 0)]
            state.stop_reason = stop
            return True
    return False

def _extend_text(state: SeqState, token: int):
    if state.detokenizer is not None:
        state.text += state.detokenizer.step([token])


def text_delta(state: SeqState, p: SamplingParams) -> tuple[str, str]:
    """(text that may go out so far, what of it is new); marks the new part sent."""
    sendable = len(state.text)
    if state.seq.finish_reason is None and p.stop_list and not p.include_stop_str_in_output:
        # Hold back a tail that a later token could complete into a stop string.
        sendable -= _stop_prefix_len(state.text, p.stop_list)
    sendable = max(sendable, state.num_sent_chars)
    delta_text = state.text[state.num_sent_chars : sendable]
    state.num_sent_chars = sendable
    return state.text[:sendable], delta_text


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
