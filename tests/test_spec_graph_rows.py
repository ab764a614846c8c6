"""Verify steps as decode rows (StepInputs.as_decode_rows), what lets a speculative step replay a
decode CUDA graph: the rows' metadata, the steps it refuses, and on numpy, with a stand-in for
the graphs that runs the rows eagerly, outputs identical to plain decoding."""

import numpy as np
import pytest
from test_spec_decode import OracleProposer, assert_same, copy_heavy, drive, ids, spec

from engine.core.sampling_params import SamplingParams
from engine.executor.ops import AttentionMetadata
from engine.executor.step_inputs import StepInputs


def _inputs(num_new, computed, samples_all=True, prompt=None):
    """A step of sequences with these new-token counts after `computed` tokens, block size 4."""
    num_new, computed = np.array(num_new, np.int32), np.array(computed, np.int32)
    qsl = np.concatenate([[0], np.cumsum(num_new)]).astype(np.int32)
    t = int(qsl[-1])
    seq = np.repeat(np.arange(len(num_new)), num_new)
    positions = (np.arange(t) - (qsl[:-1] - computed)[seq]).astype(np.int32)
    tables = np.arange(len(num_new) * 8, dtype=np.int32).reshape(-1, 8) + 100
    meta = AttentionMetadata(slot_mapping=np.arange(t, dtype=np.int32) + 7, query_start_loc=qsl,
                             context_lens=computed + num_new, block_tables=tables,
                             max_query_len=int(num_new.max()),
                             max_context_len=int((computed + num_new).max()))
    rows = np.arange(t) if samples_all else qsl[1:] - 1
    return StepInputs(np.arange(t, dtype=np.int32) + 50, positions, rows.astype(np.int32), meta,
                      np.ones(len(num_new), bool), prompt=prompt)


def test_decode_rows_of_a_verify_step():
    inputs = _inputs([3, 1, 5], [9, 4, 12])
    rows = inputs.as_decode_rows()
    m = rows.meta
    assert rows.input_ids is inputs.input_ids and rows.positions is inputs.positions
    assert m.query_start_loc.tolist() == list(range(10))
    # each token attends to its sequence's keys up to and including its own position
    assert m.context_lens.tolist() == [10, 11, 12, 5, 13, 14, 15, 16, 17]
    assert (m.block_tables == inputs.meta.block_tables[[0, 0, 0, 1, 2, 2, 2, 2, 2]]).all()
    assert m.slot_mapping is inputs.meta.slot_mapping
    assert m.max_query_len == 1 and m.max_context_len == 17
    assert rows.is_decode_only and rows.logits_indices.tolist() == list(range(9))


def test_steps_that_are_not_all_sampled_decodes_run_as_they_are():
    assert _inputs([3, 1], [9, 4], samples_all=False).as_decode_rows() is None  # a prefill chunk
    assert _inputs([3, 1], [9, 4], prompt=object()).as_decode_rows() is None  # prompt logprobs
    placeholder = _inputs([1, 1], [9, 4])
    placeholder.num_placeholders = 1
    assert placeholder.as_decode_rows() is None


def test_decode_rows_compute_the_same_logits_as_the_verify_step(make_engine):
    """One forward over a verify step's tokens, as written and as decode rows: same logits."""
    engine = make_engine()
    runner, ops = engine.core.runner, engine.core.ops
    rng = np.random.default_rng(1)
    num_new, computed = [3, 1, 5], [9, 4, 12]
    inputs = _inputs(num_new, computed)
    inputs.input_ids = rng.integers(3, 512, len(inputs.input_ids)).astype(np.int32)
    inputs.meta.block_tables = np.arange(24, dtype=np.int32).reshape(3, 8)
    m = inputs.meta
    seq = np.repeat(np.arange(3), num_new)
    m.slot_mapping = (m.block_tables[seq, inputs.positions // engine.core.config.block_size]
                      * engine.core.config.block_size
                      + inputs.positions % engine.core.config.block_size).astype(np.int32)
    # the cached prefix: random k/v in every block the step reads
    runner.kv_cache[...] = rng.standard_normal(runner.kv_cache.shape).astype(np.float32)
    before = runner.kv_cache.copy()
    want = runner._forward_eager(inputs, None)
    after = runner.kv_cache.copy()
    runner.kv_cache[...] = before
    got = runner._forward_eager(inputs.as_decode_rows(), None)
    # the same k/v written: exactly in layer 0, up to the attention's rounding after it
    np.testing.assert_array_equal(runner.kv_cache[0], after[0])
    np.testing.assert_allclose(runner.kv_cache, after, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert ops.name == "numpy"


class EagerRows:
    """DecodeGraphs' interface on numpy: runs the rows a graph would replay, eagerly."""

    def __init__(self, runner, max_rows):
        self.runner, self.max_rows, self.rows = runner, max_rows, []

    def can_run(self, num_rows):
        return num_rows <= self.max_rows

    def run(self, input_ids, positions, meta, prev=None):
        self.rows.append(len(input_ids))
        rows = StepInputs(input_ids, positions, np.arange(len(input_ids), dtype=np.int32), meta,
                          np.ones(len(input_ids), bool))
        return self.runner._forward_eager(rows, prev)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_graph_rows_give_plain_decoding_outputs(make_engine, async_scheduling):
    rng = np.random.default_rng(3)
    prompts = copy_heavy(rng, 10)
    requests = {f"r{i}": (ids(p), SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i,
                                                 max_tokens=int(rng.integers(8, 30)),
                                                 ignore_eos=True, logprobs=2))
                for i, p in enumerate(prompts)}
    fields = dict(max_num_seqs=6, num_kv_blocks=60, block_size=8,
                  async_scheduling=async_scheduling)
    want = drive(make_engine(**fields), requests)
    engine = make_engine(speculative_config=spec(k=3, disable_by_batch_size=4), **fields)
    runner = engine.core.runner
    runner.graphs = EagerRows(runner, max_rows=16)
    engine.core.spec.proposer = OracleProposer(want, 3, seed=1)
    assert_same(drive(engine, requests), want)
    assert runner.num_graph_verify_steps > 0
    assert max(runner.graphs.rows) > 6  # steps of more rows than sequences: verify rows
    assert all(engine.core.spec.accepted_hist)
