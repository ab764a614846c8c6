"""Features that share a step's rows or a sequence's life: prompt-logprob rows next to speculative
draft rows, beam search under a speculating engine (beams never speculate), and beam search with
structured outputs (refused, naming the field)."""

import numpy as np
import pytest
from conftest import step_to_end

from engine.core.sampling_params import ParamError, SamplingParams, StructuredOutputsParams


def spec(k=3):
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2, "disable_by_batch_size": 64}


def drive(engine, requests: dict, late: dict = {}, after: int = 0) -> dict:  # noqa: B006
    """Run to the end; `late` requests join after `after` steps."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    final = {}
    for _ in range(after if late else 0):
        final.update((out.request_id, out) for out in engine.step() if out.finished)
        engine.block_manager.check_invariants(engine.scheduler.running)
    for request_id, (prompt, params) in late.items():
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    return final | step_to_end(engine)


def test_prompt_logprob_rows_after_draft_rows(make_engine):
    """A long prompt scored in chunks while a copy-heavy one decodes with drafts: the same
    prompt logprobs and tokens as without speculation."""
    rng = np.random.default_rng(3)
    span = rng.integers(3, 500, 5).tolist()
    copy = {"copy": (span * 6, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))}
    # It joins once the copy's greedy output repeats itself (drafts every step from then on).
    score = {"score": (rng.integers(3, 500, 60).tolist(),
                       SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, logprobs=1))}
    fields = dict(max_num_batched_tokens=16, enable_prefix_caching=False)
    want = drive(make_engine(**fields), copy, score, after=12)
    engine = make_engine(speculative_config=spec(), **fields)
    mixed = []
    launch = engine.runner.launch

    def spy(batch, *args):
        mixed.append(batch.num_spec_tokens > 0 and any(s.wants_prompt_logprobs
                                                       for s in batch.seqs))
        return launch(batch, *args)

    engine.runner.launch = spy
    got = drive(engine, copy, score, after=12)
    assert sum(mixed) >= 2  # steps with draft rows and prompt-logprob rows both
    for request_id in ("copy", "score"):
        assert got[request_id].outputs[0].token_ids == want[request_id].outputs[0].token_ids
    a, b = want["score"].prompt_logprobs, got["score"].prompt_logprobs
    assert a[0] is None and b[0] is None and len(a) == len(b) == 60
    for x, y in zip(a[1:], b[1:], strict=True):
        assert list(x) == list(y)
        assert list(x.values()) == pytest.approx(list(y.values()), abs=1e-5)


def test_beams_do_not_speculate(make_engine):
    span = [11, 12, 13, 14]
    params = SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=8,
                            ignore_eos=True)
    want = drive(make_engine(), {"b": (span * 5, params)})
    engine = make_engine(speculative_config=spec())
    engine.add_request("b", {"prompt_token_ids": span * 5}, params)
    final = None
    while engine.has_unfinished_requests():
        drafted = engine.core.spec.propose(engine.scheduler.running)
        assert drafted == []
        for out in engine.step():
            final = out
    assert engine.get_stats().spec_num_drafts == 0
    assert [c.token_ids for c in final.outputs] == [c.token_ids for c in want["b"].outputs]


def test_beam_search_with_structured_outputs_is_refused():
    with pytest.raises(ParamError, match="structured_outputs") as e:
        SamplingParams(use_beam_search=True, structured_outputs=StructuredOutputsParams(
            choice=["a", "b"]))
    assert e.value.field == "structured_outputs"
