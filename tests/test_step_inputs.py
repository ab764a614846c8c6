"""build_step_inputs (vectorized, persistent block-table rows) against a per-token reference."""

from __future__ import annotations

import numpy as np

from engine.core.block_manager import BlockManager
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.executor.step_inputs import HostBlockTables, build_step_inputs


def reference(batch, bs: int):
    """The runner's original loop: one sequence, then one token, at a time."""
    ids, pos, slots, ctx, qsl, last, samples = [], [], [], [], [0], [], []
    width = max(-(-(s.num_computed_tokens + n) // bs)
                for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True))
    tables = np.full((len(batch.seqs), width), -1, np.int32)
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
        c = seq.num_computed_tokens
        tables[i, : min(width, len(seq.block_table))] = seq.block_table[:width]
        for p in range(c, c + n):
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
        ctx.append(c + n)
        qsl.append(qsl[-1] + n)
        samples.append(c + n == len(seq))
        if samples[-1]:
            last.append(qsl[-1] - 1)
    return ids, pos, slots, ctx, qsl, last, tables, samples


def test_matches_reference_through_a_run():
    """Prefill chunks, decodes, preemptions (tables replaced) and row eviction, step by step."""
    bs, rng = 4, np.random.default_rng(0)
    bm = BlockManager(num_blocks=16, block_size=bs)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=16, max_model_len=64)
    tables = HostBlockTables(num_rows=6, max_blocks=4)  # few rows and columns: both must grow
    for i in range(10):
        prompt = rng.integers(0, 50, int(rng.integers(1, 30))).tolist()
        sched.add(Sequence(f"r{i}", prompt, len(prompt),
                           SamplingParams(max_tokens=int(rng.integers(1, 20)))))
    num_steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        got = build_step_inputs(batch, bs, tables)
        ids, pos, slots, ctx, qsl, last, want_tables, samples = reference(batch, bs)
        m = got.meta
        np.testing.assert_array_equal(got.input_ids, ids)
        np.testing.assert_array_equal(got.positions, pos)
        np.testing.assert_array_equal(m.slot_mapping, slots)
        np.testing.assert_array_equal(m.context_lens, ctx)
        np.testing.assert_array_equal(m.query_start_loc, qsl)
        np.testing.assert_array_equal(got.logits_indices, last)
        np.testing.assert_array_equal(m.block_tables, want_tables)
        np.testing.assert_array_equal(got.samples, samples)
        assert m.max_query_len == max(batch.num_new_tokens) and m.max_context_len == max(ctx)
        flat, where = got.pack()
        np.testing.assert_array_equal(flat[where["block_tables"]], want_tables.reshape(-1))
        assert all(s.start % 8 == 0 for s in where.values())
        sched.finish_step(batch)
        for seq, s in zip(batch.seqs, samples, strict=True):
            if s:
                seq.token_ids.append(int(rng.integers(0, 50)))
                if seq.num_output_tokens >= seq.sampling_params.max_tokens:
                    sched.finish_seq(seq, "length")
        num_steps += 1
    assert num_steps > 20 and sched.num_preemptions > 0
