"""The engine's two halves apart: EngineCore on token ids, OutputProcessor on text."""

import time

import pytest
from conftest import _smollm2_tokenizer, _tiny_loaded

from engine.core.outputs import EngineCoreRequest, SeqOutput
from engine.core.sampling_params import ParamError, SamplingParams
from engine.engine_core import EngineCore
from engine.model.config import EngineConfig
from engine.output_processor import OutputProcessor


def make_core(**fields) -> EngineCore:
    fields.setdefault("device", "numpy")
    return EngineCore(EngineConfig(**fields), loaded_model=_tiny_loaded(512, False))


def request(request_id, prompt, **params) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, list(prompt), SamplingParams(**params), time.time())


def run(core) -> dict[tuple[str, int], list[SeqOutput]]:
    seen = {}
    while core.has_unfinished_requests():
        for out in core.step():
            seen.setdefault((out.request_id, out.index), []).append(out)
    return seen


def test_core_runs_token_ids_to_their_stop_rules():
    core = make_core(max_num_batched_tokens=32)
    core.add_request(request("len", range(3, 50), max_tokens=5, ignore_eos=True, n=2,
                             temperature=0.7, logprobs=2))
    core.add_request(request("stop", range(3, 10), max_tokens=30, ignore_eos=True,
                             temperature=0))
    seen = run(core)
    for index in (0, 1):
        outs = seen[("len", index)]
        assert [len(o.new_token_ids) for o in outs] == [1] * 5
        assert [o.finish_reason for o in outs] == [None] * 4 + ["length"]
        assert all(len(o.new_logprobs[0]) >= 2 and o.new_token_ids[0] in o.new_logprobs[0]
                   for o in outs)
        assert outs[0].first_scheduled_time is not None and outs[1].first_scheduled_time is None
    # Run again with the 3rd greedy token as a stop id: it ends there, naming the id.
    greedy = [o.new_token_ids[0] for o in seen[("stop", 0)]]
    core.add_request(request("stop2", range(3, 10), max_tokens=30, ignore_eos=True,
                             temperature=0, stop_token_ids=[greedy[2]]))
    outs = run(core)[("stop2", 0)]
    cut = greedy.index(greedy[2]) + 1
    assert [o.new_token_ids[0] for o in outs] == greedy[:cut]
    assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", greedy[2])
    stats = core.get_stats()
    assert stats.kv_blocks_used == 0 and stats.generation_tokens_total == 10 + 30 + cut
    core.block_manager.check_invariants([])


def test_core_finish_sequences_and_abort_free_blocks():
    core = make_core()
    core.add_request(request("a", range(3, 40), max_tokens=50, ignore_eos=True, n=2))
    core.add_request(request("b", range(3, 40), max_tokens=50, ignore_eos=True))
    core.step()
    core.finish_sequences([("a", 0, "x"), ("missing", 0, "x")])
    outs = core.step()
    assert {(o.request_id, o.index) for o in outs} == {("a", 1), ("b", 0)}
    core.abort_requests(["a", "b", "missing"])
    assert not core.has_unfinished_requests() and core.get_stats().kv_blocks_used == 0
    assert core.step() == []
    core.block_manager.check_invariants([])


def test_output_processor_finds_stop_strings_and_drops_late_tokens():
    tok = _smollm2_tokenizer()
    ids = tok.encode("Hello there, general Kenobi", add_special_tokens=False)
    prompt = tok.encode("Say:", add_special_tokens=False)
    proc = OutputProcessor(tok)
    proc.add_request("r", "Say:", prompt, SamplingParams(stop=["general"], logprobs=0),
                     time.time())
    texts, stopped = [], []
    for t in ids:
        outs, hits = proc.process([SeqOutput("r", 0, [t], [{t: -1.0}], -1.0, None, None)])
        texts += [o.outputs[0].delta_text for o in outs]
        stopped += hits
    assert stopped == [("r", 0, "general")]
    assert "".join(texts) == "Hello there, "
    assert outs == []  # the tokens after the stop were dropped: no output for them
    assert not proc.has_request("r")


def test_output_processor_stop_string_wins_over_length_in_the_same_token():
    tok = _smollm2_tokenizer()
    ids = tok.encode("one two", add_special_tokens=False)
    proc = OutputProcessor(tok)
    proc.add_request("r", None, [1], SamplingParams(stop=["two"], max_tokens=len(ids)), 0.0)
    for k, t in enumerate(ids):
        reason = "length" if k == len(ids) - 1 else None
        outs, hits = proc.process([SeqOutput("r", 0, [t], None, 0.0, reason, None)])
    c = outs[0].outputs[0]
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", "two", "one ")
    assert hits == []  # the core finished it already


def test_output_processor_keeps_the_cores_times_and_times_an_abort():
    """metrics.first_scheduled_time is the core's (not the front's clock), an aborted request's
    output is finished with every open sequence "abort" and a finished_time, and stop strings
    without a tokenizer are refused naming "stop"."""
    proc = OutputProcessor(None)
    with pytest.raises(ParamError) as e:
        proc.add_request("s", None, [1], SamplingParams(stop=["x"]), 0.0)
    assert e.value.field == "stop" and not proc.has_request("s")
    proc.add_request("r", None, [1, 2], SamplingParams(n=2, max_tokens=5), 10.0)
    [o], stopped = proc.process([SeqOutput("r", 0, [7], None, -0.5, None, None,
                                           first_scheduled_time=11.0)])
    m = o.metrics
    assert (m.arrival_time, m.first_scheduled_time, m.finished_time) == (10.0, 11.0, None)
    assert m.first_token_time > 11.0 and stopped == [] and not o.finished
    final = proc.abort("r")
    assert [c.finish_reason for c in final.outputs] == ["abort", "abort"]
    assert [c.token_ids for c in final.outputs] == [[7], []]
    assert final.finished and final.metrics.finished_time >= m.first_token_time
    assert proc.abort("r") is None and not proc.has_request("r")


def test_output_processor_failing_a_request_tells_the_core_to_free_every_sequence():
    """A request whose postprocessing raises ends with "error" on every open sequence, and each
    is handed back as stopped (the core frees them now, not at max_tokens)."""
    proc = OutputProcessor(None)
    proc.add_request("r", None, [1], SamplingParams(n=2, logprobs=0, max_tokens=500), 0.0)
    # logprobs were asked but the core's output has none: indexing them raises in the front
    [o], stopped = proc.process([SeqOutput("r", 1, [7], None, -0.5, None, None)])
    assert stopped == [("r", 0, ""), ("r", 1, "")]
    assert [c.finish_reason for c in o.outputs] == ["error", "error"]
    assert o.outputs[0].error.startswith("TypeError") and o.finished
    assert not proc.has_request("r")


def test_a_token_id_past_the_vocabulary_is_refused_at_its_bound():
    """The sampler's token vocab_size (one past the last id) never reaches the front."""
    from engine.core_postprocess import Postprocessor

    post = Postprocessor(None, None, None, [2], 64, vocab_size=512)
    for bad in (512, -1):
        with pytest.raises(RuntimeError, match=f"token id {bad}, outside the vocabulary"):
            post._append(None, None, bad, 0.0, None, 0)


def test_each_row_of_a_batch_keeps_its_own_number_of_top_logprobs(make_engine, run_engine):
    """The top-k rows are as wide as the batch's largest logprobs: each row takes only its own
    (greedy: the sampled token is the top one, so no extra entry joins)."""
    engine = make_engine()
    prompt = {"prompt_token_ids": list(range(3, 30))}
    final, _ = run_engine(engine, {
        str(k): (prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=k))
        for k in (0, 1, 4)})
    assert {k: [len(e) for e in o.outputs[0].logprobs] for k, o in final.items()} == {
        "0": [1, 1, 1], "1": [1, 1, 1], "4": [4, 4, 4]}


def test_engine_frees_a_sequence_a_stop_string_ended(make_engine, run_engine):
    engine = make_engine(text=True)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    whole, _ = run_engine(engine, {"w": ("Once upon a time", params)})
    text = whole["w"].outputs[0].text
    stop = text[len(text) // 3 : len(text) // 3 + 2]
    cut, _ = run_engine(engine, {"c": ("Once upon a time", SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))})
    o = cut["c"].outputs[0]
    assert o.finish_reason == "stop" and o.text == text[: text.index(stop)]
    assert len(o.token_ids) < 20
    assert not engine.core.has_unfinished_requests()
    assert engine.get_stats().kv_blocks_used == 0


def test_a_step_returns_its_outputs_before_releasing_the_blocks_they_end():
    """A sequence its step's token ends is freed after step() returns (BlockManager.free(defer=
    True): at long contexts the release takes milliseconds that the last token would wait);
    the next look at the blocks releases them."""
    core = make_core()
    core.add_request(request("a", range(3, 40), max_tokens=2, ignore_eos=True))
    finished = []
    while not finished and core.has_unfinished_requests():
        finished = [o for o in core.step() if o.finish_reason]
    assert finished and finished[0].finish_reason == "length"
    bm = core.block_manager
    assert any(b.ref_count for b in bm.blocks)  # still held, unreleased
    assert core.get_stats().kv_blocks_used == 0  # counted off, not released by the stats
    assert any(b.ref_count for b in bm.blocks)
    assert not core.has_unfinished_requests()  # idle: released
    assert not any(b.ref_count for b in bm.blocks)
    bm.check_invariants([])


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stats_after_generate_count_no_finished_blocks(async_scheduling):
    """LLM.generate leaves its loop on the last output, before anything releases the blocks of
    the sequences that step ended: the stats count them off all the same."""
    from engine.engine import LLMEngine
    from engine.llm import LLM

    engine = LLMEngine(EngineConfig(device="numpy", async_scheduling=async_scheduling),
                       loaded_model=_tiny_loaded(512, False))
    LLM.from_engine(engine).generate([{"prompt_token_ids": list(range(3, 40))}],
                                     SamplingParams(max_tokens=3, ignore_eos=True),
                                     use_tqdm=False)
    assert engine.get_stats().kv_blocks_used == 0
    assert engine.core.block_manager.num_used_blocks == 0
