"""tools/kernel_check_decode1.py on the CPU: every op of the forward called as the forward calls
it (numpy backend, tiny configs in each weight format), and the table's arithmetic. The GPU half
(graph timings, the real step) runs in tests/test_cuda_decode1.py and on the device."""

import collections
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not an installed package

from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from tools import kernel_check_decode1 as d1  # noqa: E402

# Q4_K packs 256 values a block: hidden, intermediate and q_size are multiples of it
TINY = dict(architecture="Qwen3ForCausalLM", vocab_size=512, hidden_size=256,
            intermediate_size=512, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=128,
            qk_norm=True, tie_word_embeddings=True)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def fake_kc(calls_seen: list):
    """kernel_check's interface as check_decode1 uses it, timing nothing: every op runs `calls`
    times (so each of them really executes on numpy) and takes 2 us chained, 3 us plain."""
    def graph_time(fn, calls=20, reps=10, pdl=False):
        for _ in range(calls):
            fn()
        calls_seen.append(calls)
        return 2e-6 if pdl else 3e-6

    def count_launches(ops, fn):
        fn()
        return collections.Counter({"numpy": 1})

    return types.SimpleNamespace(
        graph_time=graph_time, count_launches=count_launches, check_device=lambda where: None,
        OPTS={"small": True, "decode1": None}, L2_BYTES=60 << 20, row=None)


@pytest.fixture
def tiny_variants(monkeypatch):
    monkeypatch.setattr(d1, "preset_config", lambda preset, small: ModelConfig(**TINY))
    monkeypatch.setattr(d1, "VARIANTS", (("tiny", None, (40, 100)), ("tiny", "fp8", (40,)),
                                         ("tiny", "q4_k", (40,))))


def test_every_op_runs_in_every_format(tiny_variants, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    calls: list = []
    lines = d1.check_decode1(NumpyOps(), fake_kc(calls))
    saved = (tmp_path / "b1.txt").read_text().splitlines()
    assert saved[: len(lines)] == lines and saved[-4].startswith("tiny float32 B=1 ctx=40: implied")
    titles = [line for line in lines if line.startswith("####")]
    assert titles == ["#### tiny float32 B=1 ctx=40", "#### tiny float32 B=1 ctx=100",
                      "#### tiny fp8 B=1 ctx=40", "#### tiny q4_k B=1 ctx=40"]
    ops_rows = [line for line in lines if line.startswith("| ") and "launches" not in line]
    assert len(ops_rows) == 4 * 10  # 9 ops and the implied step, per table
    assert sum("attention ctx 41" in line for line in ops_rows) == 3
    # per table: 6 layer ops x 3 layers + 3 once a step, chained and plain
    assert len(calls) == 4 * 9 * 2
    # implied step: 5 summed layer ops x 3 layers + embedding, final norm, lm_head; 2 us each
    implied = [line for line in lines if line.startswith("| implied step")]
    assert len(implied) == 4
    assert all(cells(line)[2:4] == [f"{18 * 2:.1f}", f"{18 * 3:.1f}"] for line in implied)


def test_table_shares_of_the_real_step():
    rows = [d1.OpTime("gemv", 4e-6, 5e-6, 8_000_000, 10), d1.OpTime("part", 1e-6, 1e-6, 0, 10,
                                                                     in_sum=False),
            d1.OpTime("lm_head", 60e-6, 70e-6, 240_000_000, 1)]
    assert d1.implied_step(rows) == pytest.approx(100e-6)
    lines = d1.table("t", rows, real_sec=200e-6)
    gemv = cells(lines[3])
    assert gemv[0] == "gemv" and gemv[5:7] == ["2000", "41.7"]  # 8 MB in 4 us
    assert gemv[7:] == ["40.0", "20.0%"]  # 10 calls of 4 us, of a 200 us step
    assert cells(lines[4])[0] == "(part, within the row above)"
    assert cells(lines[-1])[7:] == ["100.0", "50.0%"]


def test_variants_by_name():
    assert d1.variants(None) == d1.VARIANTS
    assert d1.variants("qwen3-0.6b,llama3-8b:fp8") == (
        ("qwen3-0.6b", None, (512, 32532)), ("llama3-8b", "fp8", (512,)))
