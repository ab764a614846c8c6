"""Reasoning in chat answers (`--reasoning-parser`): what a thinking model writes inside
<think> ... </think> goes out as `reasoning` (and `reasoning_content`, the older name that some
clients read), the rest as `content`.

    parser = ReasoningParser.for_prompt(kind, prompt_tail, constrained)
    reasoning, content = parser.split(text)          # a whole answer
    stream = ReasoningStream(parser)                 # an answer as it streams:
    stream.feed(delta) -> [("reasoning" | "content", text), ...]; stream.finish() -> the rest

Where the reasoning starts: at an opening <think> the answer begins with, or at the answer's
first character where the block is already open there: the chat template ended the prompt with
<think> (DeepSeek-R1's, Qwen3.5's and Qwen3-Thinking's templates do), or `deepseek_r1`, whose
models may leave the opening tag out (unless the prompt ends with a closed block: thinking off). The
block ends at </think>; an answer that ends inside it (max_tokens) is all reasoning. Tool calls
are read from the content only. A grammar (structured outputs, forced tool calls) holds after the
block where the answer starts inside it (server/openai_routes.py sets
SamplingParams.structured_outputs_after); elsewhere the answer starts outside the block
(`constrained`) and the grammar holds from the first token, unless that token is <think> where
the model may open a block (the prompt's end neither opened one nor ends with a closed one;
<think> a single token that the grammar does not start with:
SamplingParams.structured_outputs_deferred_by): then it holds after the block.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"
KINDS = ("deepseek_r1", "qwen3")
# Where the prompt's end is looked at for a block left open: its last tokens, decoded.
PROMPT_TAIL_TOKENS = 64


def prompt_opens_reasoning(tail: str) -> bool:
    """Whether the prompt's end (`tail`) leaves a <think> block open."""
    return tail.rfind(START) > tail.rfind(END)


def prompt_closes_reasoning(tail: str) -> bool:
    """Whether the prompt ends with a closed block (a template's thinking off), not only holds
    one: an earlier turn's, which a tool loop keeps, is followed by more."""
    return tail.rstrip().endswith(END)


@dataclass
class ReasoningParser:
    kind: str
    open_at_start: bool  # the answer's first character is inside the block

    @classmethod
    def for_prompt(cls, kind: str, prompt_tail: str, constrained: bool) -> ReasoningParser:
        if kind == "deepseek_r1":  # open unless the prompt ends with a closed block
            opened = not prompt_closes_reasoning(prompt_tail)
        else:
            opened = prompt_opens_reasoning(prompt_tail)
        return cls(kind, opened and not constrained)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole answer; None where a part is empty."""
        body = text.lstrip()
        if body.startswith(START):
            text, opened = body[len(START):], True
        else:
            opened = self.open_at_start
        if not opened:
            return None, text or None
        reasoning, _, content = text.partition(END)
        return reasoning or None, content or None


class ReasoningStream:
    """One streamed answer, split as ReasoningParser.split splits it whole: the text is sent as
    it comes, except a tail that may be the start of the tag looked for (held until the next
    delta tells)."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.state = "start"  # "start": the answer may still open with <think>
        self.held = ""

    def feed(self, delta: str) -> list[tuple[str, str]]:
        text, self.held = self.held + delta, ""
        out = []
        if self.state == "start":
            body = text.lstrip()
            if START.startswith(body):  # only whitespace so far, or part of the tag
                self.held = text
                return out
            if body.startswith(START):
                text, self.state = body[len(START):], "reasoning"
            else:
                self.state = "reasoning" if self.parser.open_at_start else "content"
        if self.state == "reasoning":
            end = text.find(END)
            if end < 0:
                keep = _tag_prefix_at_end(text, END)
                self.held = text[len(text) - keep:]
                return _part(out, "reasoning", text[: len(text) - keep])
            _part(out, "reasoning", text[:end])
            text, self.state = text[end + len(END):], "content"
        return _part(out, "content", text)

    def finish(self) -> list[tuple[str, str]]:
        """What is still held once the answer ended: split as the whole answer would be."""
        text, self.held = self.held, ""
        if self.state == "start":
            reasoning, content = self.parser.split(text)
            return _part(_part([], "reasoning", reasoning or ""), "content", content or "")
        return _part([], self.state, text)


def _part(out: list, kind: str, text: str) -> list:
    if text:
        out.append((kind, text))
    return out


def _tag_prefix_at_end(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    return next((k for k in range(min(len(text), len(tag) - 1), 0, -1)
                 if tag.startswith(text[-k:])), 0)


def reasoning_delta(text: str | None) -> dict:
    """The message (or delta) fields of reasoning `text`: vLLM's `reasoning` and the older
    `reasoning_content`, which other clients read."""
    return {"reasoning": text, "reasoning_content": text}
