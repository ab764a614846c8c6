"""The rules that end a sequence, split by what they need to see.

- Token ids only (the engine core): eos and stop token ids (not before min_tokens), max_tokens,
  max_model_len. `check_stop_ids`.
- Text (the output processor, next to the detokenizer): stop strings found across token
  boundaries and never leaked into a delta. `SeqState.append`, `text_delta`.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence


def check_stop_ids(seq: Sequence, token: int, eos_token_ids: list[int],
                   max_model_len: int) -> tuple[str | None, int | None]:
    """(finish_reason, stop_reason) after `token` was appended to `seq`; (None, None) if it goes
    on."""
    p = seq.sampling_params
    num_output_tokens = len(seq.token_ids) - seq.num_prompt_tokens
    # vLLM's check_stop. The runner's bias keeps eos and stop ids out of the first min_tokens
    # tokens (the min_tokens-th included), so they can first end a sequence at the next one; the
    # >= matters where a row was all masked (a finished grammar). Stop strings are searched past
    # min_tokens too. Eos first: a token that is both ends as eos (stop_reason None).
    if num_output_tokens >= p.min_tokens:
        if not p.ignore_eos and token in eos_token_ids:
            return "stop", None
        if p.stop_token_ids and token in p.stop_token_ids:
            return "stop", token
    if p.max_tokens is not None and num_output_tokens >= p.max_tokens:
        return "length", None
    if len(seq.token_ids) >= max_model_len:
        return "length", None
    return None, None


@dataclass(eq=False, slots=True)
class SeqState:
    """One sequence as the output processor sees it: its tokens, its text, what was sent."""

    index: int
    params: SamplingParams
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    detokenizer: object | None  # None without a tokenizer: no text, no stop strings
    text: str = ""  # decoded output, cut at a stop string once one is found
    num_sent_chars: int = 0  # text[:num_sent_chars] has gone out in deltas
    num_sent_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # the cause, when finish_reason is "error"

    def append(self, token: int, finish_reason: str | None, stop_reason: int | None) -> bool:
        """Take one token with the core's verdict on it; True if the sequence ends here (a stop
        string overrides "length": it was found in the same token)."""
        self.token_ids.append(token)
        p = self.params
        old_len = len(self.text)
        if finish_reason == "stop" and not p.include_stop_str_in_output:
            # a stop token id or eos: its text is left out (asked for, it joins below, eos's
            # too unless skip_special_tokens hides it, and a stop string in it wins, as in vLLM)
            if self.detokenizer is not None:  # text held back before it is final now
                self.text += self.detokenizer.flush()
            if not (p.stop_list and self._stop_string(old_len)):  # held-back text may hold one
                self.finish_reason, self.stop_reason = finish_reason, stop_reason
            return True
        if self.detokenizer is not None:  # the last token flushes what was held back
            self.text += self.detokenizer.step([token], final=finish_reason is not None)
        if p.stop_list and self._stop_string(old_len):
            return True
        if finish_reason is not None:
            self.finish_reason, self.stop_reason = finish_reason, stop_reason
            return True
        return False

    def _stop_string(self, old_len: int) -> bool:
        """Whether a stop string ends in the text past old_len (then the text is cut there and
        the sequence ends with it).

        vLLM's rule: stop strings are searched in the text of the tokens past min_tokens (a stop
        may begin in the text just before). Each stop only where it would end in the new text:
        an earlier match was found by an earlier search, or came before (and went out, as it
        should have). A window shared by all stops (the longest one's) would find a short stop
        again, late."""
        p = self.params
        num_output_tokens = len(self.token_ids) - self.num_prompt_tokens
        if num_output_tokens <= p.min_tokens or self.detokenizer is None:
            return False
        text = self.text
        hits = [(i, s) for s in p.stop_list
                if (i := text.find(s, max(0, old_len - len(s) + 1))) >= 0]
        if not hits:
            return False
        i, stop = hits[0]  # several in one token: the first in the list wins, as in vLLM
        self.text = text[: i + (len(stop) if p.include_stop_str_in_output else 0)]
        self.finish_reason, self.stop_reason = "stop", stop
        return True


def text_delta(state: SeqState) -> tuple[str, str]:
    """(text that may go out so far, what of it is new); marks the new part sent."""
    p = state.params
    sendable = len(state.text)
    if state.finish_reason is None and p.stop_list and not p.include_stop_str_in_output:
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
