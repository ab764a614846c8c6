"""server/reasoning.py: the split of a whole answer by hand, and a streamed answer, cut anywhere,
sending exactly that split."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.reasoning import ReasoningParser, ReasoningStream, prompt_opens_reasoning


@pytest.mark.parametrize("text, opened, want", [
    ("<think>plan</think>answer", False, ("plan", "answer")),
    ("\n <think>\nplan\n</think>\n\nanswer", False, ("\nplan\n", "\n\nanswer")),
    ("plan</think>answer", True, ("plan", "answer")),
    ("plan, cut off", True, ("plan, cut off", None)),
    ("<think>plan, cut off", False, ("plan, cut off", None)),
    ("just an answer", False, (None, "just an answer")),
    ("an answer with </think> in it", False, (None, "an answer with </think> in it")),
    ("<think></think>answer", False, (None, "answer")),
    ("<think>plan</think>", True, ("plan", None)),
    ("x<think>y</think>z", False, (None, "x<think>y</think>z")),  # opens only at the start
    ("", True, (None, None)),
])
def test_split_by_hand(text, opened, want):
    assert ReasoningParser("qwen3", opened).split(text) == want


@pytest.mark.parametrize("kind, tail, constrained, want", [
    ("qwen3", "<|im_start|>assistant\n", False, False),
    ("qwen3", "<|im_start|>assistant\n<think>\n", False, True),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", False, False),  # thinking off
    ("qwen3", "<|im_start|>assistant\n<think>\n", True, False),  # a grammar decides
    ("deepseek_r1", "<｜Assistant｜>", False, True),
    ("deepseek_r1", "<｜Assistant｜>", True, False),
    ("deepseek_r1", "<｜Assistant｜><think>\n\n</think>\n\n", False, False),  # thinking off
])
def test_where_the_block_is_open(kind, tail, constrained, want):
    assert ReasoningParser.for_prompt(kind, tail, constrained).open_at_start is want
    assert prompt_opens_reasoning(tail) is tail.rstrip().endswith("<think>")
    if kind == "deepseek_r1" and not constrained:
        assert want is not tail.rstrip().endswith("</think>")


PIECES = ["<think>", "</think>", "<thi", "nk>", "</th", "ink>", "<", "/", ">", "plan", " ", "\n",
          "answer", "é"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12), st.booleans(), st.data())
def test_a_stream_cut_anywhere_sends_the_split(pieces, opened, data):
    text = "".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    parser = ReasoningParser("qwen3", opened)
    stream = ReasoningStream(parser)
    parts = [p for d in deltas for p in stream.feed(d)] + stream.finish()
    got = ("".join(t for k, t in parts if k == "reasoning") or None,
           "".join(t for k, t in parts if k == "content") or None)
    assert got == parser.split(text)
    # the parts come in order: reasoning, then content, never back
    kinds = [k for k, _ in parts]
    assert kinds == sorted(kinds, key=["reasoning", "content"].index)
