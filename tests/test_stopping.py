"""Stop strings against a brute-force reference: streamed deltas add up to the final text, a stop
string is cut where it first ends (past min_tokens' token, vLLM's rule) and never streamed unless
asked for."""

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
    """(final text, stop string or None): the first token k > min_tokens whose new text ends an
    occurrence of some stop; of those, the first in the list (vLLM's order), cut at its earliest
    such occurrence."""
    for k in range(min_tokens + 1, len(texts)):
        old, text = len(texts[k - 1]), texts[k]
        for s in stops:
            starts = [i for i in range(len(text)) if text.startswith(s, i) and i + len(s) > old]
            if starts:
                i = min(starts)
                return text[: i + len(s)] if include else text[:i], s
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
    # Never leaked: what went out at any step is a start of the final text, which is cut at the
    # stop. (A stop may still show in it: inside min_tokens' text, or before where the first
    # listed of two stops ending in one token was found, as in vLLM.)
    streamed = ""
    for s in steps:
        streamed += s.delta_text
        assert final.text.startswith(streamed), (streamed, final.text)
    assert streamed == final.text


def test_a_stop_within_min_tokens_is_passed_over(engine, free_runs):
    """vLLM's rule (its test_min_tokens_with_stop): the text of the first min_tokens tokens is
    not searched. A stop in the first token cuts there with min_tokens 0; with min_tokens 1 it
    is passed over (it had cut there too, a token early) and found where it comes again, if
    it does, past the first token."""
    texts = free_runs(1, 0)
    first = texts[1]
    assert first
    stop = first[-1]
    final, steps = run(engine, SamplingParams(seed=1, max_tokens=MAX_TOKENS, ignore_eos=True,
                                              stop=[stop, "QQQQ"], min_tokens=0))
    assert final.text == first[: first.index(stop)] and final.stop_reason == stop
    texts = free_runs(1, 1)
    final, steps = run(engine, SamplingParams(seed=1, max_tokens=MAX_TOKENS, ignore_eos=True,
                                              stop=[stop, "QQQQ"], min_tokens=1))
    later = texts[-1].find(stop, len(texts[1]) - len(stop) + 1)
    want = texts[-1] if later < 0 else texts[-1][:later]
    assert final.text == want and final.text.startswith(texts[1])
    assert "".join(s.delta_text for s in steps) == final.text


def test_vllm_rules_for_several_stops_eos_and_small_temperatures(engine, free_runs):
    """Where two stops end in one token the first in the list wins; eos's own text is in the
    output when include_stop_str_in_output asks (with skip_special_tokens off); a token that is
    both eos and a stop id ends as eos; temperature in (0, 0.01) samples at 0.01; seed -1 is
    no seed. Each as vLLM does (a reviewer found them otherwise)."""
    from engine.core.sequence import Sequence
    from engine.core.stopping import check_stop_ids

    texts = free_runs(1, 0)
    token_text = texts[1]
    assert len(token_text) >= 2
    late, early = token_text[-1], token_text[0]  # both end in the first token's text
    final, _ = run(engine, SamplingParams(seed=1, max_tokens=MAX_TOKENS, ignore_eos=True,
                                          stop=[late, early]))
    assert final.stop_reason == late and final.text == token_text[: token_text.index(late)]
    eos = engine.tokenizer.eos_token_id
    final, _ = run(engine, SamplingParams(max_tokens=4, logit_bias={eos: 100.0},
                                          include_stop_str_in_output=True,
                                          skip_special_tokens=False))
    assert final.finish_reason == "stop" and final.text == engine.tokenizer.eos_token
    # ... and a stop string inside a stop token's text (asked for) wins, cut there (vLLM >= 0.10.2)
    half = engine.tokenizer.eos_token[:4]
    final, _ = run(engine, SamplingParams(max_tokens=4, logit_bias={eos: 100.0},
                                          include_stop_str_in_output=True, stop=[half],
                                          skip_special_tokens=False))
    assert (final.finish_reason, final.stop_reason, final.text) == ("stop", half, half)
    final, _ = run(engine, SamplingParams(max_tokens=4, logit_bias={eos: 100.0}, stop=[half],
                                          skip_special_tokens=False))
    assert (final.finish_reason, final.stop_reason, final.text) == ("stop", None, "")
    seq = Sequence("r", [5, 6, eos], 2, SamplingParams(stop_token_ids=[eos]))
    assert check_stop_ids(seq, eos, [eos], 100) == ("stop", None)
    assert SamplingParams(temperature=0.001).temperature == 0.01
    assert SamplingParams(temperature=0).temperature == 0
    assert SamplingParams(seed=-1).seed is None


def test_a_character_cut_off_at_the_end_is_in_the_text(engine):
    """The last token (max_tokens, or one before eos) leaves a character's bytes incomplete: the
    text ends in U+FFFD as decoding the output gives it, streamed too, instead of losing it."""
    tok = engine.tokenizer
    first_byte = tok.encode("🎉")[0]
    assert tok.decode([first_byte]) == "\ufffd"
    cases = [SamplingParams(max_tokens=1, logit_bias={first_byte: 100}),
             SamplingParams(max_tokens=5, min_tokens=1,
                            logit_bias={first_byte: 90, tok.eos_token_id: 100})]
    for params, ids, reason in zip(cases, ([first_byte], [first_byte, tok.eos_token_id]),
                                   ("length", "stop"), strict=True):
        final, steps = run(engine, params)
        assert final.token_ids == ids and final.finish_reason == reason
        assert final.text == "\ufffd" == "".join(s.delta_text for s in steps)


@pytest.mark.parametrize("stop_id", [None, 5])  # eos, or a stop token id
def test_a_stop_string_in_text_held_back_until_eos_is_cut(make_engine, monkeypatch, stop_id):
    """The token before eos (or a stop id) ends inside a character, so its text (" " and half
    an emoji) is held back; eos flushes it, and the stop string " " in it ends the text there,
    as anywhere else (it once went out whole, the stop string with it, in the stream too)."""
    import numpy as np

    x, space_half_emoji, eos = 72, 15107, 2  # SmolLM2: "X", b" \xf0\x9f", <|im_end|>
    engine = make_engine(text=True)
    script = [x, space_half_emoji, eos if stop_id is None else stop_id]
    real, calls = engine.runner.ops.sample_start, [0]

    def sample_start(logits, t, prev=None):  # each draw takes the script's next id
        logits = np.array(logits, np.float32, copy=True)
        logits[:, script[min(calls[0], len(script) - 1)]] += 1e4
        calls[0] += 1
        return real(logits, t, prev)

    monkeypatch.setattr(engine.runner.ops, "sample_start", sample_start)
    engine.add_request("r", "Once upon a time", SamplingParams(
        temperature=0, max_tokens=8, stop=[" "],
        stop_token_ids=None if stop_id is None else [stop_id]))
    steps = []
    while engine.has_unfinished_requests():
        steps += [o.outputs[0] for o in engine.step()]
    final = steps[-1]
    assert list(final.token_ids) == script
    assert engine.tokenizer.decode(script[:2]) == "X \ufffd"
    assert (final.text, final.finish_reason, final.stop_reason) == ("X", "stop", " ")
    assert "".join(s.delta_text for s in steps) == "X"


def test_stop_ids_end_a_sequence_from_the_min_tokens_th_output_on():
    """check_stop_ids' bounds (vLLM's check_stop): eos and stop ids end a sequence once it has
    min_tokens outputs, the min_tokens-th included (where a row was all masked, the sampler's ban
    did not hold); before that they are passed over; max_tokens ends it at exactly max_tokens."""
    from engine.core.sequence import Sequence
    from engine.core.stopping import check_stop_ids

    eos, stop = 2, 9
    params = SamplingParams(min_tokens=2, max_tokens=4, stop_token_ids=[stop])
    for token, want in ((eos, ("stop", None)), (stop, ("stop", stop))):
        assert check_stop_ids(Sequence("r", [5, 6, token], 2, params), token, [eos],
                              100) == (None, None)  # 1 output < min_tokens
        assert check_stop_ids(Sequence("r", [5, 6, 7, token], 2, params), token, [eos],
                              100) == want  # the min_tokens-th output
    assert check_stop_ids(Sequence("r", [5, 6, 7, 8, 10], 2, params), 10, [eos],
                          100) == (None, None)
    assert check_stop_ids(Sequence("r", [5, 6, 7, 8, 10, 11], 2, params), 11, [eos],
                          100) == ("length", None)


def test_text_delta_holds_back_the_longest_tail_that_could_become_a_stop():
    """Only a tail that is a proper prefix of some stop waits; of several stops the longest such
    tail wins, even when a later stop matches a shorter one; a whole stop string left in the
    text (inside min_tokens, never searched) is not one of them."""
    from engine.core.stopping import SeqState, text_delta

    def delta(text, stops, min_tokens=0):
        state = SeqState(0, SamplingParams(stop=stops, min_tokens=min_tokens), [1, 2], 1, None,
                         text=text)
        return text_delta(state)

    assert delta("zab", ["abc", "bd"]) == ("z", "z")  # "ab" of "abc", not just "b" of "bd"
    assert delta("zab", ["bd", "abc"]) == ("z", "z")
    assert delta("xab", ["ab"], min_tokens=5) == ("xab", "xab")
    assert delta("xa", ["ab"]) == ("x", "x")


def test_streams_of_random_tokens_match_one_shot_decoding_with_the_stop_rules():
    """The output processor on random tokens of a byte-level vocabulary whose pieces split
    characters (some end one and begin the next), n sequences fed in random chunks (drafts),
    ended by max_tokens or eos: each sequence stops on its own, its deltas add up to its final
    text, and that is the reference's. The reference decodes in one go: the text after k tokens
    is the longest run of them whose text no later byte changes (all k when the sequence
    ends); a stop is looked for past min_tokens' token, ending in the new text (vLLM's rule),
    the first listed of those found in one token, cut at its earliest place."""
    import codecs
    import random

    from conftest import byte_level_tokenizer

    from engine.core.outputs import SeqOutput
    from engine.output_processor import OutputProcessor

    rng = random.Random(0)
    chars = [c.encode() for c in "ab é€中🎉"] + [b"\xff", b"\xe2"]
    raw = b"".join(rng.choice(chars) for _ in range(400))
    pieces, at = [], 0
    while at < len(raw):
        n = rng.randrange(1, 5)
        pieces.append(raw[at:at + n])
        at += n
    tok = byte_level_tokenizer(sorted(set(pieces)), eos="<eos>")
    ids_of = {tok.token_bytes(i): i for i in range(tok.vocab_size - 1)}
    pool = [ids_of[p] for p in pieces]

    def texts_after(out):
        """[text after k tokens for k in 0..len(out)]."""
        bs = [tok.token_bytes(i) for i in out]
        texts = []
        for k in range(len(out) + 1):
            stable = codecs.getincrementaldecoder("utf-8")("replace").decode(b"".join(bs[:k]))
            j = k
            while not stable.startswith(b"".join(bs[:j]).decode("utf-8", "replace")):
                j -= 1
            texts.append(tok.decode(out[:j]))
        return texts[:-1] + [tok.decode(out)]

    def reference(texts, stops, min_tokens, include):
        for k in range(min_tokens + 1, len(texts)):
            old, text = len(texts[k - 1]), texts[k]
            for s in stops:
                starts = [i for i in range(len(text)) if text.startswith(s, i) and
                          i + len(s) > old]
                if starts:
                    return (text[: min(starts) + len(s)] if include else text[:min(starts)]), s
        return texts[-1], None

    for trial in range(300):
        n, min_tokens = rng.choice([1, 2, 3]), rng.choice([0, 0, 1, 3])
        seqs = []
        for _ in range(n):
            i = rng.randrange(len(pool))
            out = pool[i : i + rng.randrange(1, 10)]
            seqs.append((out, len(out) > min_tokens and rng.random() < 0.5))  # (tokens, eos)
        text = tok.decode(seqs[0][0])
        stops = [text[a : a + rng.randrange(1, 4)] if text and rng.random() < 0.8
                 else rng.choice(["a", "b ", "\ufffd", "é€"])
                 for a in (rng.randrange(max(1, len(text))) for _ in range(rng.randrange(1, 3)))]
        stops = [s for s in stops if s]
        include = rng.random() < 0.4
        params = SamplingParams(n=n, stop=stops, min_tokens=min_tokens, max_tokens=50,
                                include_stop_str_in_output=include)
        proc = OutputProcessor(tok)
        proc.add_request("r", None, pool[:3], params, 0.0)
        feeds = []
        for index, (out, eos) in enumerate(seqs):
            ids, k = out + [tok.eos_token_id] * eos, 0
            while k < len(ids):
                step = ids[k : k + rng.choice([1, 1, 2, 3])]
                k += len(step)
                ended = ("stop" if eos else "length") if k >= len(ids) else None
                feeds.append((k + rng.random(), SeqOutput("r", index, step, None, 0.0, ended,
                                                          None)))
        streamed, final = [""] * n, [None] * n
        for _, feed in sorted(feeds, key=lambda f: f[0]):
            for c in (c for o in proc.process([feed])[0] for c in o.outputs):
                streamed[c.index] += c.delta_text
                if c.finish_reason is not None and final[c.index] is None:
                    final[c.index] = c
        for index, (out, eos) in enumerate(seqs):
            texts = texts_after(out)
            want = reference(texts + texts[-1:] * eos, stops, min_tokens, include)
            c = final[index]
            got = (c.text, c.stop_reason if isinstance(c.stop_reason, str) else None)
            assert got == want and streamed[index] == c.text, (trial, index, out, eos, stops)
