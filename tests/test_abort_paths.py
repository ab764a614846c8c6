"""Abort, reuse and ending paths of the engine core, each at the step where it once went wrong:
stale rows, another request's prompt logprobs, an unread step, fork copies and grammars left
behind (numpy backend, tiny models; test_abort_stress.py found them)."""

from __future__ import annotations

import pytest

from engine.core.sampling_params import SamplingParams


def _drain(engine) -> dict:
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


# ---- a beam's stale row ------------------------------------------------------------------------

# (request id, prompt, ("beam", width, max_tokens) | ("plain", max_tokens), arrival step);
# found by a randomized search (seed 591), minimal in the number of requests: each is needed
# for the timing (r2's beams make way and recompute under KV pressure).
_BEAM_CASE = [
    ("r0", [262, 60, 229, 432, 68, 43, 93, 148, 102, 104, 449, 27, 301, 270, 504],
     ("beam", 2, 3), 2),
    ("r1", [31, 53, 503, 485, 451, 179, 244, 86, 373, 139, 468, 255, 29, 322, 137, 475, 97, 80,
            457], ("plain", 9), 1),
    ("r2", [155, 94, 196, 285, 194, 239, 124, 165, 171, 444, 271, 501, 263, 245, 92, 349, 136,
            482, 481, 246, 283, 285, 17], ("beam", 2, 8), 3),
    ("r3", [131, 61, 121, 499, 344, 330, 505, 205, 410, 104, 499, 236, 335, 78, 101, 417, 343,
            132, 337, 245, 61, 308], ("plain", 7), 12),
    ("r4", [504, 148, 211, 332, 313, 203, 404, 65, 86, 392, 203, 472, 158, 240, 376, 208, 168,
            215, 176, 363, 453, 222, 310, 385, 377, 162, 278, 55, 63], ("plain", 3), 10),
    ("r5", [251, 189, 203, 422], ("beam", 3, 4), 3),
]


def _params(spec) -> SamplingParams:
    if spec[0] == "beam":
        return SamplingParams(n=spec[1], use_beam_search=True, temperature=0,
                              max_tokens=spec[2], ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=spec[1], ignore_eos=True)


def _run_beam_case(make_engine, async_scheduling: bool) -> dict:
    engine = make_engine(async_scheduling=async_scheduling, block_size=4, num_kv_blocks=20,
                         max_num_seqs=6, max_num_batched_tokens=8, max_model_len=64)
    final, step = {}, 0
    while step <= 12 or engine.has_unfinished_requests():
        for rid, prompt, spec, at in _BEAM_CASE:
            if at == step:
                engine.add_request(rid, {"prompt_token_ids": prompt}, _params(spec))
        for out in engine.step():
            if out.finished:
                final[out.request_id] = [c.token_ids for c in out.outputs]
        step += 1
        assert step < 2000
    return final


def test_overlapped_beam_search_takes_no_stale_row(make_engine):
    """Under async_scheduling, a beam that made way and recomputes samples a row at the end of
    its recompute; if the round ends meanwhile on its kept candidates (its new token appended),
    the beam must not decode before that row is read: BeamSearch.report then drops it as stale.
    Scheduled at once, the stale row (logits from before the new token) was taken as the next
    round's candidates: r2 repeated a token at the old position's logprob."""
    want = _run_beam_case(make_engine, async_scheduling=False)  # equals the brute force
    got = _run_beam_case(make_engine, async_scheduling=True)
    assert got == want


# ---- a reused request id -----------------------------------------------------------------------

@pytest.mark.parametrize("idle", [True, False])
def test_reused_request_id_after_abort_gets_its_own_prompt_logprobs(make_engine, idle):
    """Overlapped loop: "a" is aborted while a step holding its prompt chunk is in flight; a new
    request reusing the id "a" (allowed: the id is free again) gets its own prompt logprobs, not
    the aborted prompt's (RequestTable.collect_prompt_logprobs once found the request by id)."""
    p1, p2 = list(range(10, 40)), list(range(100, 130))
    params = SamplingParams(max_tokens=2, prompt_logprobs=0, temperature=0)
    fields = dict(async_scheduling=True, max_num_batched_tokens=8, block_size=4)
    ref = make_engine(**fields)
    ref.add_request("a", {"prompt_token_ids": p2}, params)
    want = _drain(ref)["a"].prompt_logprobs

    engine = make_engine(**fields)
    if not idle:  # another request keeps the engine busy across the abort
        engine.add_request("other", {"prompt_token_ids": list(range(200, 204))},
                           SamplingParams(max_tokens=20, ignore_eos=True, temperature=0))
    engine.add_request("a", {"prompt_token_ids": p1}, params)
    engine.step()  # launches a's first prompt chunk; its logprobs are not read yet
    engine.abort("a")
    engine.add_request("a", {"prompt_token_ids": p2}, params)
    got = _drain(engine)["a"].prompt_logprobs
    assert [None if d is None else sorted(d) for d in got] == \
        [None if d is None else sorted(d) for d in want]


def test_a_reused_id_never_reports_the_aborted_requests_ending(make_engine):
    """abort() reports the ending at the next step(); a request that takes the id before that
    step had the aborted one's output (finish_reason "abort", the old prompt) come out under its
    id as if it had been aborted itself."""
    engine = make_engine()
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, params)
    engine.step()
    engine.abort("a")
    engine.add_request("a", {"prompt_token_ids": [8, 9]}, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == "a"]
    assert [o.prompt_token_ids for o in outs] == [[8, 9]] * len(outs)
    assert [o.outputs[0].finish_reason for o in outs if o.finished] == ["length"]
    assert len(outs[-1].outputs[0].token_ids) == 3


# ---- nothing left after a request ends -----------------------------------------------------------

def test_abort_of_the_last_request_leaves_no_step_in_flight(make_engine):
    """An abort between steps can empty the table with a step in flight: the core still reports
    unfinished work until one more step() has read it, rather than keep the launched batch (its
    sequences, the handle) until the next request."""
    engine = make_engine(async_scheduling=True, block_size=4)
    engine.add_request("a", {"prompt_token_ids": list(range(3, 13))},
                       SamplingParams(max_tokens=5, temperature=0))
    engine.step()
    engine.abort("a")
    _drain(engine)
    assert engine.core._in_flight is None


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("abort", [False, True])
def test_forks_of_an_ended_request_leave_no_block_copies(make_engine, async_scheduling, abort):
    """n > 1: the forks made when the prompt finishes queue their tail-block copies for the next
    batch. If the request ends first (max_tokens=1, or an abort right after that step), its
    copies go with it rather than run, into freed blocks, at the start of a later batch."""
    engine = make_engine(async_scheduling=async_scheduling, block_size=4, num_kv_blocks=32)
    engine.add_request("a", {"prompt_token_ids": list(range(3, 13))},
                       SamplingParams(n=3, max_tokens=5 if abort else 1, temperature=0))
    engine.step()
    if abort:
        engine.abort("a")
    _drain(engine)
    assert engine.block_manager.num_used_blocks == 0
    assert engine.scheduler._block_copies == []


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_while_the_grammar_compiles_leaves_nothing_queued(make_engine, async_scheduling):
    """A structured-outputs request aborted before a step started its grammar leaves
    RequestTable.compiling at once (start_grammars runs only in a step, and with the table empty
    no step comes until the next request)."""
    from engine.core.sampling_params import StructuredOutputsParams

    engine = make_engine(text=True, async_scheduling=async_scheduling, max_model_len=64)
    engine.add_request("a", "Answer:", SamplingParams(
        max_tokens=5, structured_outputs=StructuredOutputsParams(regex="[a-z]{1,5}")))
    engine.abort("a")
    _drain(engine)
    assert engine.core.requests.compiling == []
