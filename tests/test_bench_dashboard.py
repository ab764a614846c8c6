"""tools/bench_serving.py with the dashboard open, against a real server on a tiny numpy model:
the viewers receive snapshots while the requests run, and the closed/open comparison does the
same work in every pass."""

import asyncio
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not an installed package

from conftest import tiny_server_core  # noqa: E402
from test_server import Server  # noqa: E402

from server.app import create_app  # noqa: E402
from tools import bench_serving  # noqa: E402
from tools.workloads import scale_requests, w1_requests  # noqa: E402


@pytest.fixture(scope="module")
def server():
    make_core = tiny_server_core(text=False, max_num_seqs=16, max_model_len=128,
                                 num_kv_blocks=512)
    with Server(create_app(served_model_name="tiny", make_core=make_core)) as s:
        yield s


def _workload(num: int):
    prompts, outs = w1_requests(num, seed=3)
    return scale_requests(prompts, outs, 0.06, 49152)


def test_dashboard_clients_receive_snapshots_during_the_run(server):
    prompts, outs = _workload(12)
    m = asyncio.run(bench_serving.run_benchmark(server.url, None, prompts, outs, float("inf"),
                                                dashboard_clients=3))
    assert m["completed"] == 12 and m["failed"] == 0
    assert m["output_tokens"] == sum(outs)
    assert m["dashboard_clients"] == 3 and "dashboard_first_error" not in m
    # every viewer got the feed: a keyframe, then deltas about 10 times a second
    assert all(n >= 1 for n in m["dashboard_snapshots_per_client"])
    assert m["dashboard_snapshots"] == sum(m["dashboard_snapshots_per_client"])
    server.wait_idle()


def test_dashboard_compare_alternates_closed_and_open_passes(server):
    prompts, outs = _workload(8)
    m = asyncio.run(bench_serving.compare_dashboard(server.url, None, prompts, outs,
                                                    float("inf"), clients=2, passes=2))
    assert [r.get("dashboard_clients", 0) for r in m["closed"]] == [0, 0]
    assert [r["dashboard_clients"] for r in m["dashboard"]] == [2, 2]
    for r in m["closed"] + m["dashboard"]:
        assert r["completed"] == 8 and r["output_tokens"] == sum(outs)
        assert r["prompt_tokens"] == sum(len(p) for p in prompts)
    assert m["dashboard_snapshots"] > 0
    assert m["dashboard_over_closed"] == pytest.approx(
        m["dashboard_output_tok_s"] / m["closed_output_tok_s"])
    text = bench_serving.format_comparison(m)
    assert "dashboard open / closed output tok/s" in text
    server.wait_idle()


def test_dashboard_compare_needs_clients(capsys):
    with pytest.raises(SystemExit):
        bench_serving.main(["--dashboard-compare"])
    assert "--dashboard-clients" in capsys.readouterr().err
