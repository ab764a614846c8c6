"""tools/energy_parts.py's arithmetic: W1's schedule model and the sum of the parts (the GPU
measurements themselves need a GPU and NVML)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not an installed package

from tools import energy_parts  # noqa: E402
from tools.workloads import w1_requests  # noqa: E402


def test_the_schedule_model_emits_w1s_tokens_and_reads_their_contexts():
    prompts, rows, context = energy_parts.w1_schedule()
    _, outputs = w1_requests()
    assert int(prompts.sum()) == 148_894
    assert int(rows.sum()) + len(outputs) == sum(outputs) == 148_756  # first tokens at prefill
    assert rows[0] == 256 and rows[-1] == 1 and (np.diff(rows) <= 0).all()
    assert len(rows) == max(outputs) - 1
    # the longest output's last decode step reads its whole context but the newest token
    longest = int(np.argmax(outputs))
    assert context[-1] == prompts[longest] + len(rows)


def test_graph_rows_round_up_to_eights():
    assert [energy_parts.graph_rows(r) for r in (1, 8, 9, 256)] == [8, 8, 16, 256]


def test_interpolate_is_linear_between_points_and_flat_outside():
    points = {8: 1.0, 64: 8.0}
    assert energy_parts.interpolate(points, 36) == pytest.approx(4.5)
    assert energy_parts.interpolate(points, 1) == 1.0
    assert energy_parts.interpolate(points, 256) == 8.0


def test_w1_joules_scales_each_part_by_its_count():
    prompts = np.array([10, 20])
    rows = np.array([70, 3])  # one step of the batch mix, one of the tail
    context = np.array([100, 5])
    parts = {"prefill": 2.0, "layer": {8: 1.0, 72: 3.0}, "lm_head": {8: 0.5, 72: 0.25},
             "attn_batch": 1e-6, "attn_tail": 1e-3}
    got = energy_parts.w1_joules(prompts, rows, context, parts)
    kv = energy_parts.KV_BYTES_PER_TOKEN
    assert got["prefill GEMMs"] == pytest.approx(2.0 * 30 * energy_parts.LAYERS)
    assert got["decode GEMMs"] == pytest.approx(energy_parts.LAYERS * (3.0 + 1.0))
    assert got["lm_head"] == pytest.approx(0.25 + 0.5)
    assert got["decode attention"] == pytest.approx(1e-6 * 100 * kv + 1e-3 * 5 * kv)
