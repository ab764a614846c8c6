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


def test_a_failing_detokenizer_fails_its_request_alone(make_engine, monkeypatch):
    """The front's postprocessing (detokenizer, stop strings) of one request raising ended the
    whole step: LLMEngine.step raised (LLM.generate lost every request; the server's API process
    failed every request in flight and stopped). Now that request alone ends with "error", and
    its sequences are freed in the core."""
    from engine.model.tokenizer import IncrementalDetokenizer

    init, step = IncrementalDetokenizer.__init__, IncrementalDetokenizer.step

    def tagged(self, tokenizer, prompt_token_ids, *a):
        init(self, tokenizer, prompt_token_ids, *a)
        self.bad, self.num_steps = prompt_token_ids[0] == 499, 0

    def flaky(self, new_token_ids, final=False):
        self.num_steps += 1
        if self.bad and self.num_steps == 3:  # "bad"'s third token
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        return step(self, new_token_ids, final)

    monkeypatch.setattr(IncrementalDetokenizer, "__init__", tagged)
    monkeypatch.setattr(IncrementalDetokenizer, "step", flaky)
    engine = make_engine(text=True)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=["never seen"])
    engine.add_request("good", {"prompt_token_ids": [5, 6, 7]}, sp)
    engine.add_request("bad", {"prompt_token_ids": [499, 6, 7]}, SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, n=2))
    final = step_to_end(engine)
    assert [c.finish_reason for c in final["bad"].outputs] == ["error", "error"]
    assert "bad byte" in final["bad"].outputs[0].error
    good = final["good"].outputs[0]
    assert good.finish_reason == "length" and len(good.token_ids) == 8 and good.error is None
    assert not engine.has_unfinished_requests()


def test_a_failing_detokenizer_in_the_api_process_fails_its_call_alone(app_client, monkeypatch):
    """Served, the detokenizer runs in the API process: one request's failure there failed
    every request in flight and took the engine down (its output reader died: /health 503)."""
    from engine.model.tokenizer import IncrementalDetokenizer

    init, step = IncrementalDetokenizer.__init__, IncrementalDetokenizer.step

    def tagged(self, tokenizer, prompt_token_ids, *a):
        init(self, tokenizer, prompt_token_ids, *a)
        self.bad = prompt_token_ids[0] == 499

    def flaky(self, new_token_ids, final=False):
        if self.bad and new_token_ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        return step(self, new_token_ids, final)

    monkeypatch.setattr(IncrementalDetokenizer, "__init__", tagged)
    monkeypatch.setattr(IncrementalDetokenizer, "step", flaky)
    client = app_client()
    body = {"model": "tiny", "max_tokens": 4, "ignore_eos": True}
    bad = client.post("/v1/completions", json={**body, "prompt": [499, 6, 7]})
    assert bad.status_code == 500 and "bad byte" in bad.json()["error"]["message"]
    assert client.get("/health").status_code == 200
    good = client.post("/v1/completions", json={**body, "prompt": [5, 6, 7]})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
