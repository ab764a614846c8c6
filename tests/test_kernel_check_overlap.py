"""tools/kernel_check_overlap.py on the CPU: the share of the shorter op that running two ops at
once hid (its GPU timing runs on the device: kernel_check.py --only overlap)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not an installed package

from tools.kernel_check_overlap import hidden_share  # noqa: E402


@pytest.mark.parametrize("t_a, t_b, t_both, want", [
    (10.0, 4.0, 14.0, 0.0),   # back to back: nothing hidden
    (10.0, 4.0, 10.0, 1.0),   # the shorter entirely under the longer
    (10.0, 4.0, 12.0, 0.5),   # half of the shorter hidden
    (4.0, 10.0, 11.0, 0.75),  # order of the two does not matter
    (10.0, 4.0, 16.0, 0.0),   # slower than back to back: no negative share
])
def test_hidden_share(t_a, t_b, t_both, want):
    assert hidden_share(t_a, t_b, t_both) == pytest.approx(want)
