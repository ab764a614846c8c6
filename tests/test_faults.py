"""Fault isolation (numpy backend, failures injected): one request's failure ends that request
alone, a failed forward ends that step's requests, and an engine that cannot go on says so."""

from __future__ import annotations

import pytest
from conftest import step_to_end

from engine.core.outputs import EngineDeadError
from engine.core.sampling_params import SamplingParams

PROMPTS = {f"r{i}": {"prompt_token_ids": list(range(3 + i, 30 + i))} for i in range(3)}


def params(**kw):
    kw.setdefault("max_tokens", 6)
    return SamplingParams(temperature=0.8, seed=1, ignore_eos=True, **kw)


def run(engine, prompts=PROMPTS, **kw):
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params(**kw))
    return {request_id: out.outputs[0] for request_id, out in step_to_end(engine).items()}


@pytest.fixture
def reference(make_engine):
    return run(make_engine())


def test_bad_sampling_settings_fail_their_request_alone(make_engine, reference, monkeypatch):
    engine = make_engine()
    prepare = engine.runner.prepare_sampling

    def flaky(seqs):
        if any(s.request_id == "r1" for s in seqs):
            raise FloatingPointError("r1's settings")
        return prepare(seqs)

    monkeypatch.setattr(engine.runner, "prepare_sampling", flaky)
    out = run(engine)
    assert out["r1"].finish_reason == "error" and "r1's settings" in out["r1"].error
    assert "FloatingPointError" in out["r1"].error
    for request_id in ("r0", "r2"):
        assert out[request_id].token_ids == reference[request_id].token_ids
        assert out[request_id].finish_reason == "length" and out[request_id].error is None


def test_a_failing_stop_check_fails_its_request_alone(make_engine, reference, monkeypatch):
    import engine.core_postprocess as core_module

    check_stop = core_module.check_stop_ids

    def flaky(seq, token, *a):
        if seq.request_id == "r2" and seq.num_output_tokens == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        return check_stop(seq, token, *a)

    monkeypatch.setattr(core_module, "check_stop_ids", flaky)
    out = run(make_engine())
    assert out["r2"].finish_reason == "error" and "bad byte" in out["r2"].error
    # The token whose check failed never reaches the front.
    assert out["r2"].token_ids == reference["r2"].token_ids[:2]
    for request_id in ("r0", "r1"):
        assert out[request_id].token_ids == reference[request_id].token_ids


def test_a_failed_forward_fails_its_step_and_the_engine_goes_on(make_engine, reference,
                                                                 monkeypatch):
    engine = make_engine(max_num_seqs=2)  # r2 waits while the failing step runs
    forward = engine.runner._forward_eager
    calls = []

    def flaky(inputs, *rest):
        calls.append(len(calls))
        if len(calls) == 3:
            raise MemoryError("out of scratch space")
        return forward(inputs, *rest)

    monkeypatch.setattr(engine.runner, "_forward_eager", flaky)
    out = run(engine)
    for request_id in ("r0", "r1"):
        assert out[request_id].finish_reason == "error"
        assert out[request_id].error == ("the model step failed: MemoryError: out of scratch "
                                         "space")
    assert out["r2"].token_ids == reference["r2"].token_ids
    again = run(engine, {"r0": PROMPTS["r0"]})  # and it goes on serving
    assert again["r0"].token_ids == reference["r0"].token_ids


def test_n_siblings_fail_together(make_engine, monkeypatch):
    engine = make_engine()
    prepare = engine.runner.prepare_sampling

    def flaky(seqs):
        if any(s.index == 2 for s in seqs):
            raise ValueError("third sibling")
        return prepare(seqs)

    monkeypatch.setattr(engine.runner, "prepare_sampling", flaky)
    engine.add_request("n", PROMPTS["r0"], params(n=4))
    engine.add_request("one", PROMPTS["r1"], params())
    final = {}
    while engine.has_unfinished_requests():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    assert {o.finish_reason for o in final["n"].outputs} == {"error"}
    assert final["one"].outputs[0].finish_reason == "length"
    assert engine.get_stats().kv_blocks_used == 0


def test_an_engine_that_cannot_go_on_says_so(make_engine, monkeypatch):
    engine = make_engine()

    def lost(inputs, *rest):
        raise RuntimeError("an illegal memory access was encountered")

    monkeypatch.setattr(engine.runner, "_forward_eager", lost)
    monkeypatch.setattr(engine.ops, "is_fatal", lambda e: "illegal" in str(e))
    engine.add_request("r0", PROMPTS["r0"], params())
    with pytest.raises(EngineDeadError, match="illegal memory access"):
        engine.step()
    with pytest.raises(EngineDeadError, match="stopped"):
        engine.step()
    with pytest.raises(EngineDeadError):
        engine.add_request("r1", PROMPTS["r1"], params())
    assert isinstance(engine.dead_error, EngineDeadError)
    assert not engine.has_unfinished_requests()  # a serving loop waiting on it stops stepping
    assert not issubclass(EngineDeadError, ValueError)  # never mistaken for a bad request
