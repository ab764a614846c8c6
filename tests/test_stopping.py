"""Stop strings against a brute-force reference: streamed deltas add up to the final text, a stop
string is cut where it first ends (from min_tokens on) and never streamed unless asked for."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.sampling_params import SamplingParams

PROMPT = "Once upon a time"
SEEDS = (1, 2, 3)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def engine():
    from conftest import _tiny_loaded

    from engine.engine import LLMEngine
    from engine.model.config import EngineConfig

    return LLMEngine(EngineConfig(device="numpy"), loaded_model=_tiny_loaded(49152, True))


def run(engine, params):
    """(final CompletionOutput, every streamed CompletionOutput) of one request."""
    engine.add_request("r", PROMPT, params)
    steps = []
    while engine.has_unfinished_requests():
        steps += [o.outputs[0] for o in engine.step()]
    return steps[-1], steps


@pytest.fixture(scope="module")
def free_runs(engine):
    """free_runs(seed, min_tokens) -> texts[k]: the output text after k tokens, run without
    stop strings (min_tokens bans eos for a while, which moves the seeded draws)."""
    cache = {}

    def texts(seed, min_tokens):
        if (seed, min_tokens) not in cache:
            _, steps = run(engine, SamplingParams(seed=seed, max_tokens=MAX_TOKENS,
                                                  ignore_eos=True, min_tokens=min_tokens))
            out = [""]
            for s in steps:
                out.append(out[-1] + s.delta_text)
            cache[seed, min_tokens] = out
        return cache[seed, min_tokens]

    return texts


def reference(texts: list[str], stops: list[str], min_tokens: int, include: bool):
    """(final text, stop string or None): the first token k >= min_tokens whose new text ends
    an occurrence of some stop; cut at the earliest such occurrence (the shorter on a tie)."""
    for k in range(max(1, min_tokens), len(texts)):
        old, text = len(texts[k - 1]), texts[k]
        hits = []
        for s in stops:
            hits += [(i, len(s), s) for i in range(len(text)) if text.startswith(s, i)
                     and i + len(s) > old]
        if hits:
            i, n, s = min(hits)
            return text[: i + n] if include else text[:i], s
    return texts[-1], None


@settings(max_examples=60, deadline=None)
@given(data=st.data(), seed=st.sampled_from(SEEDS), min_tokens=st.integers(0, 6),
       include=st.booleans())
def test_stop_strings_match_the_reference_and_never_leak(engine, free_runs, data, seed,
                                                         min_tokens, include):
    texts = free_runs(seed, min_tokens)
    full = texts[-1]
    # Mostly substrings of the text the request will produce, so that stops do hit.
    def piece(i):
        return full[i : i + data.draw(st.integers(1, 6))]

    substring = st.integers(0, max(0, len(full) - 1)).map(piece).filter(bool)
    stops = data.draw(st.lists(substring | st.text(min_size=1, max_size=4), min_size=1,
                               max_size=4))
    params = SamplingParams(seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True, stop=stops,
                            min_tokens=min_tokens, include_stop_str_in_output=include)
    final, steps = run(engine, params)
    want_text, want_stop = reference(texts, stops, min_tokens, include)
    assert final.text == want_text
    assert final.stop_reason == want_stop
    assert final.finish_reason == ("stop" if want_stop else "length")
    streamed = ""
    for s in steps:
        streamed += s.delta_text
        assert full.startswith(streamed)
        if not include:  # a stop may only show where it ended before min_tokens' token
            boundary = len(texts[max(0, min_tokens - 1)])
            for stop in stops:
                at = streamed.find(stop)
                while at >= 0:
                    assert at + len(stop) <= boundary, (stop, streamed)
                    at = streamed.find(stop, at + 1)
    assert streamed == final.text


def test_a_short_stop_is_cut_at_the_min_tokens_token(engine, free_runs):
    """Issue 9's case: a short stop in the first token with min_tokens=1 and a longer stop in the
    list used to be found a token late, after it had streamed."""
    texts = free_runs(1, 1)
    first = texts[1]
    assert first
    final, steps = run(engine, SamplingParams(seed=1, max_tokens=MAX_TOKENS, ignore_eos=True,
                                              stop=[first[-1], "QQQQ"], min_tokens=1))
    assert final.text == first[: first.index(first[-1])] and final.stop_reason == first[-1]
    assert "".join(s.delta_text for s in steps) == final.text
