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


class _Tokenizer:
    """Tags as the vocabulary spells them: <think> one token (Qwen3's) or three (SmolLM2's)."""

    def __init__(self, think_ids):
        self.ids = {"<think>": think_ids, "</think>": [9]}

    def encode(self, text, add_special_tokens=True):
        return self.ids[text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ids)  # the "ids" of these tests are pieces of text


@pytest.mark.parametrize("kind, tail, think_ids, want", [
    # the model may open a block or answer at once: the first token decides
    ("qwen3", ["<|im_start|>", "assistant\n"], [8], ([9], 8, False)),
    ("qwen3", ["assistant\n"], [1, 2, 3], (None, None, False)),  # <think> not one token
    ("qwen3", ["assistant\n", "<think>", "\n\n", "</think>", "\n\n"], [8], (None, None, False)),
    ("qwen3", ["assistant\n", "<think>", "\n"], [8], ([9], None, True)),  # open: after it
    # a tool loop: the turn before the tool's answer keeps its block, which ends nothing now
    ("qwen3", ["assistant\n", "<think>", "plan", "</think>", "<tool_call>{}</tool_call>\n",
               "user\n<tool_response>1</tool_response>\n", "assistant\n"], [8], ([9], 8, False)),
    ("deepseek_r1", ["<think>", "plan", "</think>", "Hi.", "<｜User｜>", "More.",
                     "<｜Assistant｜>"], [8], ([9], None, True)),
    ("deepseek_r1", ["<｜Assistant｜>"], [8], ([9], None, True)),
    ("deepseek_r1", ["<｜Assistant｜>", "<think>", "</think>"], [8], (None, None, False)),
])
def test_where_a_grammar_starts_beside_reasoning(kind, tail, think_ids, want):
    """server/openai_routes.py's reading of the prompt's end for a request with a grammar:
    (structured_outputs_after, structured_outputs_deferred_by, the answer opens inside)."""
    import types

    from engine import SamplingParams, StructuredOutputsParams
    from server.openai_routes import _reasoning_parser

    request = types.SimpleNamespace(app=types.SimpleNamespace(state=types.SimpleNamespace(
        settings=types.SimpleNamespace(reasoning_parser=kind))))
    engine = types.SimpleNamespace(tokenizer=_Tokenizer(think_ids))
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    parser = _reasoning_parser(request, engine, tail, params)
    assert (params.structured_outputs_after, params.structured_outputs_deferred_by,
            parser.open_at_start) == want
    free = SamplingParams()  # without a grammar: only where the answer starts
    assert _reasoning_parser(request, engine, tail, free) == ReasoningParser.for_prompt(
        kind, "".join(tail), constrained=False)
    assert free.structured_outputs_after is free.structured_outputs_deferred_by is None
