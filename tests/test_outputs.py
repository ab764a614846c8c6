"""Per-step outputs: the whole token_ids / logprobs of every step are that step's snapshot, even
though the engine copies them only when read (engine/core/outputs.py, ListPrefix)."""

import copy
import dataclasses
import functools

from engine.core.outputs import CompletionOutput, ListPrefix, merge_outputs
from engine.core.sampling_params import SamplingParams


def test_every_step_output_is_a_snapshot_of_its_own(make_engine, run_engine):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, logprobs=2,
                            n=2)
    _, history = run_engine(make_engine(), {"a": ({"prompt_token_ids": list(range(3, 40))},
                                                  params)})
    outs = history["a"]
    assert len(outs) == 12
    for index in range(2):
        steps = [o.outputs[index] for o in outs]  # read only now, after the request finished
        ids, lps = [], []
        for k, c in enumerate(steps):
            ids += c.delta_token_ids
            lps += c.delta_logprobs
            assert c.token_ids == ids and len(ids) == k + 1
            assert c.logprobs == lps
            assert all(t in d for d, t in zip(c.logprobs, c.token_ids, strict=True))
            assert c.token_ids is c.token_ids  # one list per output, kept once made
        assert steps[-1].finish_reason == "length"
        steps[0].token_ids.append(-1)  # a caller's edit touches that output only
        assert len(steps[1].token_ids) == 2 and -1 not in steps[-1].token_ids


def test_completion_output_stays_a_dataclass():
    items = [5, 6, 7, 8]
    lazy = CompletionOutput(0, "x", ListPrefix(items, 1, 3), -1.5, None, None)
    eager = CompletionOutput(index=0, text="x", token_ids=[6, 7], cumulative_logprob=-1.5,
                             logprobs=None, finish_reason=None)
    items.append(9)  # the list grows after the output was made; the output does not
    assert lazy == eager and repr(lazy) == repr(eager)
    assert dataclasses.asdict(lazy)["token_ids"] == [6, 7]
    assert dataclasses.replace(lazy, text="y").token_ids == [6, 7]
    assert eager.delta_token_ids == [] and eager.delta_token_ids is not lazy.delta_token_ids
    lazy.token_ids = [1]
    assert lazy.token_ids == [1]


def test_merged_outputs_read_as_every_step_they_merge(make_engine, run_engine):
    """What a stalled stream's reader takes for the steps it missed (server/async_engine.py):
    their deltas joined, and the last step's whole state."""
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=24, ignore_eos=True, logprobs=2,
                            n=2, stop=[" a", "the"])
    _, history = run_engine(make_engine(text=True),
                            {"a": ({"prompt_token_ids": list(range(300, 340))}, params)})
    outs = history["a"]
    # What this seed makes, and the test needs: the choices end at different steps (the one a
    # stop string ended is listed on, with empty deltas), and some step's text is held back (it
    # may start a stop string) while its token goes out.
    assert [c.finish_reason for c in outs[-1].outputs] == ["stop", "length"]
    assert len(outs[-1].outputs[0].token_ids) < len(outs) == 24
    assert any(c.delta_token_ids and not c.delta_text for o in outs for c in o.outputs)
    for start, end in ((0, 24), (3, 20), (10, 11)):
        steps = copy.deepcopy(outs[start:end])  # merging uses up the earlier outputs
        expected = [("".join(o.outputs[i].delta_text for o in steps),
                     [t for o in steps for t in o.outputs[i].delta_token_ids],
                     [lp for o in steps for lp in o.outputs[i].delta_logprobs]) for i in range(2)]
        merged = functools.reduce(merge_outputs, steps)
        last = outs[end - 1]
        assert merged.finished is last.finished and merged.request_id == "a"
        for i, c in enumerate(merged.outputs):
            assert c.index == i
            assert (c.delta_text, c.delta_token_ids, c.delta_logprobs) == expected[i]
            ended = last.outputs[i]
            assert (c.text, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason,
                    c.stop_reason) == (ended.text, ended.token_ids, ended.logprobs,
                                       ended.cumulative_logprob, ended.finish_reason,
                                       ended.stop_reason)
            if start == 0:  # every step merged: the deltas are the whole output
                assert (c.delta_text, c.delta_token_ids, c.delta_logprobs) == (
                    c.text, c.token_ids, c.logprobs)
