"""Per-step outputs: the whole token_ids / logprobs of every step are that step's snapshot, even
though the engine copies them only when read (engine/core/outputs.py, ListPrefix)."""

import dataclasses

from engine.core.outputs import CompletionOutput, ListPrefix
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
