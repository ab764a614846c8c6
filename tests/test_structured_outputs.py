"""Structured outputs on the numpy engine: a tiny random model (its free output is noise) with the
real SmolLM2 vocabulary, so only the mask can make its outputs parse."""

import json
import re

import numpy as np
import pytest

from engine import SamplingParams, StructuredOutputsParams
from engine.core.block_manager import BlockManager
from engine.core.outputs import EngineCoreRequest
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.structured_outputs import ACCEPTED, GrammarCompiler

jsonschema = pytest.importorskip("jsonschema")
llguidance_numpy = pytest.importorskip("llguidance.numpy")

PERSON = {  # nested: objects, arrays, enums, bounded numbers, required fields
    "type": "object",
    "properties": {
        "pet": {"enum": ["cat", "dog"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "pos": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5,
                                                       "maximum": 5}},
                "required": ["x"], "additionalProperties": False},
    },
    "required": ["pet", "age", "pos"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,3}-[0-9]{2}"
CHOICES = ["red", "green", "blue violet"]
LARK = """
start: expr
expr: NUM | "(" expr OP expr ")"
OP: "+" | "*"
NUM: /[0-9]/
"""


def _sample(engine, so, n=200, max_tokens=60, prompt="Answer:", **kw):
    """n seeded samples at temperature 1 (requests of at most 100 sequences, as n is capped);
    their CompletionOutputs."""
    for k in range(0, n, 100):
        params = SamplingParams(n=min(100, n - k), temperature=1.0, seed=7 + k,
                                max_tokens=max_tokens, structured_outputs=so, **kw)
        engine.add_request(f"r{k}", prompt, params)
    final = {}
    while engine.has_unfinished_requests():
        final |= {out.request_id: out for out in engine.step() if out.finished}
    return [c for k in range(0, n, 100) for c in final[f"r{k}"].outputs]


@pytest.fixture
def engine(make_engine):
    return make_engine(text=True, max_num_seqs=256, num_kv_blocks=1024, max_model_len=256,
                       max_num_batched_tokens=2048)


def _lark_value(text: str) -> int:
    """Evaluate the LARK grammar's expressions (and so check they parse)."""
    assert re.fullmatch(r"[0-9()+*]+", text), text
    return eval(text)  # noqa: S307 - only digits, parentheses, + and *


@pytest.mark.parametrize("kind", ["json", "regex", "choice", "grammar"])
def test_every_sample_matches(engine, kind):
    so = {"json": StructuredOutputsParams(json=PERSON),
          "regex": StructuredOutputsParams(regex=REGEX),
          "choice": StructuredOutputsParams(choice=CHOICES),
          "grammar": StructuredOutputsParams(grammar=LARK)}[kind]
    outputs = _sample(engine, so, max_tokens=60 if kind != "grammar" else 200)
    assert len(outputs) == 200
    texts = [c.text for c in outputs]
    assert all(c.finish_reason == "stop" for c in outputs), [c.text for c in outputs
                                                             if c.finish_reason != "stop"]
    for text in texts:
        if kind == "json":
            jsonschema.validate(json.loads(text), PERSON)
        elif kind == "regex":
            assert re.fullmatch(REGEX, text), text
        elif kind == "choice":
            assert text in CHOICES
        else:
            _lark_value(text)
    assert len(set(texts)) > 5 if kind != "choice" else set(texts) == set(CHOICES)
    assert engine.get_stats().kv_blocks_used == 0


def test_unconstrained_output_is_noise(engine):
    """The control: without the mask the same model does not write JSON."""
    params = SamplingParams(n=20, temperature=1.0, seed=7, max_tokens=20)
    engine.add_request("r", "Answer:", params)
    texts = []
    while engine.has_unfinished_requests():
        texts += [c.text for o in engine.step() if o.finished for c in o.outputs]
    assert not any(t.startswith('{"pet": ') for t in texts)


def test_json_object_stop_strings_max_tokens_and_logprobs(engine):
    outputs = _sample(engine, StructuredOutputsParams(json_object=True), n=8, max_tokens=30,
                      logprobs=3)
    for c in outputs:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 30
        # Logprobs of the constrained distribution: only allowed tokens, their mass <= 1.
        for entry in c.logprobs:
            assert all(np.isfinite(v) for v in entry.values())
            assert sum(np.exp(v) for v in entry.values()) <= 1 + 1e-4
    # One allowed token, then only eos: each has all the constrained mass.
    [c] = _sample(engine, StructuredOutputsParams(regex="a"), n=1, logprobs=2)
    assert c.text == "a" and c.finish_reason == "stop"
    assert c.token_ids[1] == 2  # eos
    got = [e[t] for t, e in zip(c.token_ids, c.logprobs, strict=True)]
    assert got == pytest.approx([0.0, 0.0], abs=1e-5)
    # A stop string inside the constrained text ends it there, like any other.
    [c] = _sample(engine, StructuredOutputsParams(regex="abc(de)+f"), n=1, stop=["de"])
    assert c.text == "abc" and c.finish_reason == "stop" and c.stop_reason == "de"
    # max_tokens cuts a grammar that needs more: "length", never an unconstrained tail.
    [c] = _sample(engine, StructuredOutputsParams(regex="x{40}"), n=1, max_tokens=3)
    assert c.finish_reason == "length" and len(c.token_ids) == 3 and set(c.text) == {"x"}


def test_prefix_caching_and_n_sequences_keep_their_own_matchers(make_engine):
    engine = make_engine(text=True, enable_prefix_caching=True, num_kv_blocks=256)
    so = StructuredOutputsParams(choice=["alpha beta gamma", "delta"])
    prompt = "Pick one of the names, please, and say nothing else at all. " * 3
    first = _sample(engine, so, n=6, prompt=prompt)
    again = _sample(engine, so, n=6, prompt=prompt)  # the prompt blocks: prefix-cache hits
    assert engine.get_stats().prefix_cache_hits > 0
    assert [c.text for c in first] == [c.text for c in again]
    assert {c.text for c in first} <= {"alpha beta gamma", "delta"}


def test_a_grammar_that_does_not_compile_is_refused_by_name(engine):
    for so, field in ((StructuredOutputsParams(json={"type": "objec"}), "structured_outputs.json"),
                      (StructuredOutputsParams(regex="a(b"), "structured_outputs.regex"),
                      (StructuredOutputsParams(grammar="start: foo"),
                       "structured_outputs.grammar")):
        with pytest.raises(ValueError, match=re.escape(field)):
            engine.add_request("bad", "x", SamplingParams(structured_outputs=so))
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        StructuredOutputsParams(choice=[])


def test_apply_token_bitmask_matches_llguidance_reference():
    from engine.executor.ops.numpy_ops import NumpyOps

    rng = np.random.default_rng(0)
    for vocab in (1, 31, 32, 33, 1000):
        logits = rng.standard_normal((3, vocab)).astype(np.float32)
        bitmask = rng.integers(-2**31, 2**31, (3, -(-vocab // 32)), dtype=np.int64).astype(
            np.int32)
        want = logits.copy()
        llguidance_numpy.apply_token_bitmask_inplace(want, bitmask)
        got = NumpyOps().apply_token_bitmask(logits.copy(), bitmask)
        np.testing.assert_array_equal(got, want)


def test_scheduler_skips_a_sequence_whose_grammar_is_compiling():
    scheduler = Scheduler(BlockManager(16, 4, False), 4, 64, 64)
    params = SamplingParams(max_tokens=4)
    waiting = Sequence("a", [1, 2, 3], 3, params, is_waiting_for_grammar=True)
    ready = Sequence("b", [4, 5], 2, params)
    scheduler.add(waiting)
    scheduler.add(ready)
    assert scheduler.schedule().seqs == [ready]
    assert list(scheduler.waiting) == [waiting]
    waiting.is_waiting_for_grammar = False
    assert waiting in scheduler.schedule().seqs


def test_a_request_waits_for_its_grammar_while_others_run(engine):
    """Compiling never holds up the step: the constrained request waits in the queue (others
    run meanwhile), starts once its grammar is ready, and may be aborted while it waits."""
    from concurrent.futures import Future

    grammars = engine.core.grammars
    so = StructuredOutputsParams(choice=["yes", "no"])
    compiled = grammars.check(so)
    pending: list[Future] = []
    grammars.submit = lambda _so, _allowed: pending.append(Future()) or pending[-1]
    engine.add_request("constrained", "Answer:", SamplingParams(structured_outputs=so, seed=1))
    engine.add_request("aborted", "Answer:", SamplingParams(structured_outputs=so))
    engine.add_request("free", "Answer:", SamplingParams(max_tokens=3, ignore_eos=True))
    finished = {}
    for _ in range(4):
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert set(finished) == {"free"} and engine.get_stats().num_waiting == 2
    engine.abort("aborted")
    assert pending[1].cancelled() and not pending[0].cancelled()  # its grammar is not wanted
    pending[0].set_result(compiled)
    while engine.has_unfinished_requests():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert finished["constrained"].outputs[0].text in ("yes", "no")
    assert finished["aborted"].outputs[0].finish_reason == "abort"
    assert engine.get_stats().kv_blocks_used == 0
    # A grammar that fails in the core (the front had not checked it) ends its request "error".
    failed = Future()
    failed.set_exception(ValueError("structured_outputs.regex does not compile: bad"))
    grammars.submit = lambda _so, _allowed: failed
    engine.core.add_request(EngineCoreRequest("core-only", [5, 6], SamplingParams(
        structured_outputs=so), 0.0))
    [out] = engine.core.step()
    assert out.finish_reason == "error" and "does not compile" in out.error
    assert not engine.core.has_unfinished_requests()


def test_overlapped_scheduling_gives_the_same_constrained_outputs(make_engine):
    """With async_scheduling a constrained row's mask waits for its previous token (the step in
    flight is read before the masks are filled): the outputs equal the synchronous loop's, for
    constrained requests beside free ones, n > 1, stop strings and logprobs."""
    def run(async_scheduling: bool):
        engine = make_engine(text=True, async_scheduling=async_scheduling, num_kv_blocks=512,
                             max_num_seqs=64)
        requests = {
            "json": SamplingParams(n=6, temperature=1.0, seed=3, max_tokens=60, logprobs=2,
                                   structured_outputs=StructuredOutputsParams(json=PERSON)),
            "free": SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=12),
            "choice": SamplingParams(n=3, temperature=1.0, seed=5, stop=["ee"],
                                     structured_outputs=StructuredOutputsParams(choice=CHOICES)),
        }
        for request_id, params in requests.items():
            engine.add_request(request_id, "Answer:", params)
        final = {}
        while engine.has_unfinished_requests():
            final |= {o.request_id: o for o in engine.step() if o.finished}
        assert engine.get_stats().kv_blocks_used == 0
        return {k: [(c.text, c.token_ids, c.finish_reason) for c in o.outputs]
                for k, o in final.items()}, final["json"].outputs

    overlapped, overlapped_json = run(True)
    synchronous, synchronous_json = run(False)
    assert overlapped == synchronous
    for a, b in zip(overlapped_json, synchronous_json, strict=True):  # the batches differ:
        for x, y in zip(a.logprobs, b.logprobs, strict=True):  # float rounding may too
            assert x.keys() == y.keys() and list(x.values()) == pytest.approx(list(y.values()),
                                                                              abs=1e-4)
    for text, *_ in overlapped["json"]:
        jsonschema.validate(json.loads(text), PERSON)
    assert {text for text, *_ in overlapped["choice"]} <= {"red", "gr", "blue violet"}


def test_a_grammar_at_a_dead_end_fails_the_sequence(engine):
    """A schema whose only value never ends (a required property of its own type) leaves the
    matcher nothing to allow: the sequence fails with the grammar's error, never finishes
    "stop" on a token no mask allowed."""
    endless = {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}},
               "required": ["a"]}
    [c] = _sample(engine, StructuredOutputsParams(json=endless), n=1, max_tokens=12,
                  logprobs=1)
    assert c.finish_reason == "error" and c.error, (c.text, c.finish_reason)
    assert "no token was left" not in c.error  # no setting of the request's to blame


def test_min_tokens_past_a_finished_grammar_ends_on_eos(engine):
    """The grammar allows only eos and min_tokens holds eos back: the row is all masked. The
    sequence ends there ("stop"), its last token eos, its logprob -inf (the API shows -9999)."""
    [c] = _sample(engine, StructuredOutputsParams(choice=["yes", "no"]), n=1, max_tokens=8,
                  min_tokens=6, logprobs=1)
    assert c.finish_reason == "stop" and c.text in ("yes", "no")
    assert c.token_ids[-1] == 2  # SmolLM2's eos, <|im_end|>
    assert c.token_ids.count(2) == 1  # the first masked row ends it, not min_tokens
    assert c.logprobs[-1][2] == -np.inf


def test_allowed_token_ids_the_grammar_never_allows_end_the_request_with_their_cause(engine):
    """allowed_token_ids and a grammar with no token in common leave the row all -inf: the
    sampler's pick was arbitrary, the grammar refused it, and the request failed with the
    matcher's state dump as its cause. None may begin the output: the request is refused by
    name before it runs. None may go on after a first token: it fails there, saying why."""
    a = engine.tokenizer.encode("a", add_special_tokens=False)
    assert len(a) == 1
    so = StructuredOutputsParams(regex="[0-9]+")
    with pytest.raises(ValueError, match="allowed_token_ids") as e:
        engine.core.grammars.check(so, a)
    assert e.value.field == "allowed_token_ids"
    engine.core.grammars.check(so, a + engine.tokenizer.encode("7", add_special_tokens=False))
    [c] = _sample(engine, so, n=1, max_tokens=4, allowed_token_ids=a)
    assert c.finish_reason == "error" and "allowed_token_ids" in c.error, c.error
    [c] = _sample(engine, StructuredOutputsParams(regex="a[0-9]"), n=1, max_tokens=4,
                  allowed_token_ids=a)
    assert c.finish_reason == "error" and c.token_ids == a, (c.token_ids, c.error)
    assert "no token was left to sample after 1 output tokens" in c.error, c.error
    assert not engine.has_unfinished_requests() and engine.get_stats().kv_blocks_used == 0
    [c] = _sample(engine, so, n=1, max_tokens=4, allowed_token_ids=list(range(1000)))
    assert c.finish_reason != "error" and re.fullmatch("[0-9]+", c.text), c


def test_bad_words_that_ban_what_the_grammar_allows_end_the_request_with_their_cause(engine):
    """A grammar that forces "a" and bad_words that ban it: the row is all -inf, the sampler's
    pick arbitrary and refused by the grammar. The request fails naming bad_words (before, the
    grammar's refusal of a token it never chose: a parser dump)."""
    for so, after in ((StructuredOutputsParams(choice=["a"]), 0),
                      (StructuredOutputsParams(regex="7a"), 1)):
        [c] = _sample(engine, so, n=1, max_tokens=4, bad_words=["a"])
        assert c.finish_reason == "error", (c.text, c.finish_reason)
        assert c.error == (f"no token was left to sample after {after} output tokens: bad_words "
                           "exclude every token structured_outputs allows next"), c.error
    assert not engine.has_unfinished_requests() and engine.get_stats().kv_blocks_used == 0


class _FailingMatcher:
    """A matcher that hit one of llguidance's limits: its error, then a dump of its state."""

    def __init__(self, failed_already: bool):
        self.failed = failed_already

    def is_error(self):
        return self.failed

    def is_stopped(self):
        return False

    def consume_token(self, token):
        self.failed = True
        return False

    def get_error(self):
        return "Too many items (limit 50000; ff_tokens)\n" + "Parser state: ...\n" * 2000


@pytest.mark.parametrize("failed_already", [True, False], ids=["dead-end", "refused"])
def test_a_grammar_error_reaches_the_request_as_its_first_line(failed_already):
    """A limit hit mid-generation fails the request with llguidance's reason, not the kilobytes
    of parser state after it (the reply's error message carried all of it)."""
    compiler = GrammarCompiler(lambda: None, vocab_size=64)
    verdicts = compiler.advance([_FailingMatcher(failed_already), None], [5, 6], skip=set())
    assert verdicts == ["Too many items (limit 50000; ff_tokens)", ACCEPTED]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_grammar_after_given_tokens_holds_from_the_next_one(make_engine, overlap):
    """structured_outputs_after (the server's --reasoning-parser sets it to </think>): the
    output is free until it ends with those tokens, then held to the grammar; never if they
    never come. The same in the overlapped loop, where the tokens that end the wait are read
    only after the next step is launched."""
    from conftest import step_to_end

    def run(after, n=2, max_tokens=24, seed=3):
        engine = make_engine(text=True, async_scheduling=overlap, num_kv_blocks=256)
        params = SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens,
                                structured_outputs=StructuredOutputsParams(choice=CHOICES))
        params.structured_outputs_after = after
        engine.add_request("r", "Answer:", params)
        return [c.token_ids for c in step_to_end(engine)["r"].outputs]

    free = [c.token_ids for c in _free(make_engine, overlap)]
    tok = make_engine(text=True).tokenizer
    for cut in (2, 5):  # the first sample's own tokens [cut - 2, cut) end the wait
        after = free[0][cut - 2 : cut]
        got = run(after)
        assert got[0][:cut] == free[0][:cut]  # free up to there: the same seeded draws
        assert tok.decode(got[0][cut:]) in CHOICES  # then one of the choices, and the end
        # the other sample never made those tokens: free all the way (noise up to max_tokens;
        # the first sample's end changes the batch, so its last bits may differ from free's)
        assert len(got[1]) == 24 and tok.decode(got[1]) not in CHOICES
        assert not any(got[1][i : i + 2] == after for i in range(23))
    assert run([tok.encode("</think>", add_special_tokens=False)[0], 49151]) == free


@pytest.mark.parametrize("overlap", [False, True])
def test_a_first_token_may_defer_the_grammar(make_engine, overlap):
    """structured_outputs_deferred_by (the server sets it to <think> where the model may open a
    reasoning block or answer at once): the first token may be the grammar's or that id; that
    id frees the output until structured_outputs_after, any other starts the grammar. A bias
    for or against the id decides which, greedily."""
    from conftest import step_to_end

    tok = make_engine(text=True).tokenizer
    opener = tok.encode("</think>", add_special_tokens=False)[0]
    so = StructuredOutputsParams(choice=CHOICES)

    def run(bias, deferred):
        engine = make_engine(text=True, async_scheduling=overlap, num_kv_blocks=256)
        params = SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=so,
                                logit_bias={opener: bias})
        if deferred:
            params.structured_outputs_after = [opener, opener]
            params.structured_outputs_deferred_by = opener
        engine.add_request("r", "Answer:", params)
        [out] = step_to_end(engine)["r"].outputs
        assert not engine.has_unfinished_requests() and engine.get_stats().kv_blocks_used == 0
        return out.token_ids

    against = run(-100.0, deferred=False)
    assert tok.decode(against) in CHOICES and opener not in against
    assert run(-100.0, deferred=True) == against  # the grammar from the first token
    # The grammar alone never lets the favoured id through; deferred, the first token takes it,
    # the next (free) too, which ends the wait; then the grammar holds, and the id is out again.
    assert opener not in run(100.0, deferred=False)
    favoured = run(100.0, deferred=True)
    assert favoured[:2] == [opener, opener] and tok.decode(favoured[2:]) in CHOICES, favoured
    # A grammar that may itself start with the id takes it as its own: nothing is deferred.
    so = StructuredOutputsParams(regex=re.escape(tok.decode([opener])) + "[a-z]{3}")
    own = run(100.0, deferred=True)
    assert own[0] == opener and re.fullmatch(so.regex, tok.decode(own)), tok.decode(own)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_deferring_first_token_joins_a_step_in_flight(make_engine, overlap):
    """A request that arrives while a constrained one runs: in the overlapped loop its first
    mask is filled after the step in flight is read (EngineCore._mask_filler's other path),
    with rows before it; each of its two samples takes the id, then the grammar."""
    from conftest import step_to_end

    engine = make_engine(text=True, async_scheduling=overlap, num_kv_blocks=256)
    tok = engine.tokenizer
    opener = tok.encode("</think>", add_special_tokens=False)[0]
    engine.add_request("a", "Hello:", SamplingParams(
        temperature=0.0, max_tokens=30, ignore_eos=True,
        structured_outputs=StructuredOutputsParams(regex="[a-z]{30}")))
    engine.step()
    params = SamplingParams(n=2, temperature=0.0, max_tokens=12, logit_bias={opener: 100.0},
                            structured_outputs=StructuredOutputsParams(choice=CHOICES))
    params.structured_outputs_after = [opener, opener]
    params.structured_outputs_deferred_by = opener
    engine.add_request("b", "Answer:", params)
    final = step_to_end(engine)
    assert re.fullmatch("[a-z]+", final["a"].outputs[0].text)
    for ids in (c.token_ids for c in final["b"].outputs):
        assert ids[:2] == [opener, opener] and tok.decode(ids[2:]) in CHOICES, ids


def _free(make_engine, overlap):
    from conftest import step_to_end

    engine = make_engine(text=True, async_scheduling=overlap, num_kv_blocks=256)
    engine.add_request("r", "Answer:", SamplingParams(n=2, temperature=1.0, seed=3,
                                                      max_tokens=24))
    return step_to_end(engine)["r"].outputs


def test_structured_outputs_after_is_checked(engine):
    for after, so in (([], CHOICES), ([49152], CHOICES), ([5], None)):
        params = SamplingParams(structured_outputs=so and StructuredOutputsParams(choice=so))
        params.structured_outputs_after = after
        with pytest.raises(ValueError, match="structured_outputs_after") as e:
            engine.add_request("r", "Answer:", params)
        assert e.value.field == "structured_outputs"
    for after, opener in ((None, 5), ([5], 49152), ([5], -1), ([5], "5"), ([5], True)):
        params = SamplingParams(structured_outputs=StructuredOutputsParams(choice=CHOICES))
        params.structured_outputs_after = after
        params.structured_outputs_deferred_by = opener
        with pytest.raises(ValueError, match="structured_outputs_deferred_by") as e:
            engine.add_request("r", "Answer:", params)
        assert e.value.field == "structured_outputs"
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("so, want", [
    (StructuredOutputsParams(regex=r"<\|im_end\|>x"), "<|im_end|>x"),
    (StructuredOutputsParams(choice=["say <|im_start|> now"]), "say <|im_start|> now"),
    (StructuredOutputsParams(json={"type": "object", "properties": {"k": {"const": "<|im_end|>"}},
                                   "required": ["k"], "additionalProperties": False}),
     '{"k": "<|im_end|>"}'),
    (StructuredOutputsParams(grammar='start: "<|endoftext|>" /[0-9]/'), None),
], ids=["regex", "choice", "json-const", "lark-string"])
def test_the_text_of_a_special_token_is_written_in_ordinary_tokens(engine, so, want):
    """A grammar that holds a special token's text: llguidance's mask allowed only the special
    token's id where the text was forced, and then refused that id (a control token, not
    text): the request failed. Now the text is written in ordinary tokens, no special id
    among them, and the output ends on eos as the grammar finishes."""
    specials = engine.tokenizer.all_special_ids
    for c in _sample(engine, so, n=3, max_tokens=40):
        assert c.finish_reason == "stop", (c.finish_reason, c.error)
        assert not specials & set(c.token_ids[:-1]) and c.token_ids[-1] == 2, c.token_ids
        if want is None:
            assert re.fullmatch(r"<\|endoftext\|>[0-9]", c.text), c.text
        else:
            assert c.text == want


def test_a_grammar_may_still_ask_for_a_special_token_by_name(engine):
    """Lark's <|...|> names the special token itself (llguidance's syntax): its id is sampled,
    not its text spelled out."""
    [c] = _sample(engine, StructuredOutputsParams(grammar='start: "a" <|im_start|> "b"'), n=1,
                  max_tokens=10, skip_special_tokens=False)
    assert c.finish_reason == "stop" and 1 in c.token_ids, (c.token_ids, c.error)
    assert c.text == "a<|im_start|>b"
