"""tools/kernel_check.py's decode1 section on the GPU, shrunk (--small: 2 layers, a 4096-token
vocabulary, 2 timed calls): every op graph-times in a PDL chain and plainly, the real decode
graph replays, and the GEMV variants give the default step's logits bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not an installed package

from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from tools import kernel_check as kc  # noqa: E402
from tools import kernel_check_decode1 as d1  # noqa: E402


def test_decode1_small(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))  # not over a device run's own b1.txt
    monkeypatch.setitem(kc.OPTS, "small", True)
    monkeypatch.setitem(kc.OPTS, "decode1", "qwen3-0.6b")
    lines = d1.check_decode1(CudaOps("bfloat16"), kc)
    real = [line for line in lines if line.startswith("real step:")]
    assert len(real) == 2  # ctx 512 and 32532
    implied = [line for line in lines if line.startswith("| implied step")]
    assert len(implied) == 2 and all(float(line.split("|")[3]) > 0 for line in implied)
    # the GEMV variants compute the same bits (PRE: the same sums in the same order)
    compared = [line for line in lines if line.startswith("| real step graph (")]
    assert compared and all("bit-identical logits" in line for line in compared), compared
