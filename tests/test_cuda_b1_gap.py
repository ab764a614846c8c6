"""tools/b1_gap.py on the GPU, shrunk (the smallest preset, 16 output tokens): every section
prints, the decode steps replayed graphs, and each timing is a positive number."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not an installed package

from tools import b1_gap  # noqa: E402


def test_b1_gap_small(capsys):
    """... and the graph without attention and RoPE replays faster than the default one."""
    b1_gap.main(["--model", "smollm2-135m", "--load-format", "dummy", "--device", "cuda",
                 "--max-num-seqs", "4", "--prompt-len", "16", "--output-len", "16",
                 "--without", "attention+rope"])
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("b1gap")]
    steps = next(line for line in out if line.startswith("b1gap steps:") and "launches" in line)
    launches, replays = map(int, re.findall(r"(\d+) launches, (\d+) graph replays", steps)[0])
    assert launches >= 16 and replays >= 14  # every decode step replayed the batch-1 graph
    verdict = next(line for line in out if line.startswith("b1gap verdict"))
    figures = [float(v) for v in re.findall(r"(\d+\.\d+)", verdict)]
    assert len(figures) == 5 and all(f > 0 for f in figures), verdict
    assert any(line.startswith("b1gap burst") for line in out)
    without = next(line for line in out if line.startswith("b1gap variant without:"))
    ratio = float(re.findall(r"\(x(\d+\.\d+)\)", without)[0])
    assert ratio < 0.95 and "not compared" in without, without

