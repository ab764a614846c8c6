"""The dashboard's server side: its routes and key, the SSE feed, `pagedserve trace` and the
example traces shipped with the page (the browser itself: tests/test_dashboard_browser.py)."""

import asyncio
import json
import time

import pytest

httpx = pytest.importorskip("httpx")

from conftest import _tiny_loaded, gone_client_asgi  # noqa: E402
from test_server import Server  # noqa: E402

from engine.core.introspect import DashboardState  # noqa: E402
from engine.model.config import EngineConfig  # noqa: E402
from server.app import create_app  # noqa: E402
from server.cli import build_parser, main  # noqa: E402
from server.dashboard import TRACES, DashboardFeed  # noqa: E402
from server.trace import WORKLOADS, record  # noqa: E402


def _make_core():
    """Runs in the engine-core process."""
    from engine.engine_core import EngineCore

    config = EngineConfig(device="numpy", max_num_seqs=16, max_model_len=128, num_kv_blocks=64,
                          block_size=4)
    return EngineCore(config, loaded_model=_tiny_loaded(512, False))


def _replay(trace: dict) -> list[tuple[DashboardState, list[int], dict]]:
    """Apply every frame; yield the state, its ref counts and the frame."""
    state, out = DashboardState(), []
    for frame in trace["frames"]:
        state.apply(frame["snapshot"])
        out.append((state, state.ref_counts(), frame))
    return out


def _check_trace(trace: dict, workload: str):
    assert trace["format"] == "pagedserve-trace" and trace["workload"] == workload
    frames = _replay(trace)
    for state, refs, frame in frames:  # what the page draws agrees with the engine's counters
        assert sum(1 for r in refs if r) == frame["snapshot"]["stats"]["kv_blocks_used"]
        assert all(isinstance(x, int) for row in state.rows for x in row)
    assert frames[-1][2]["snapshot"]["stats"]["kv_blocks_used"] == 0
    assert all(f["batch"] for _, _, f in frames[1:]), "every recorded step ran something"
    if workload == "shared-prefix":
        assert max(max(refs) for _, refs, _ in frames) == 3  # the 4 prefix blocks, held 3 times
        assert frames[-1][2]["snapshot"]["stats"]["prefix_cache_hits"] == 8
    else:
        assert sum(f["num_preempted"] for _, _, f in frames) >= 1
        assert any(r[1] == 1 for _, _, f in frames for r in f["snapshot"]["rows"])  # PREEMPTED


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_shipped_example_traces_replay_consistently(workload):
    _check_trace(json.loads((TRACES / f"{workload}.json").read_text()), workload)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_trace_records_every_step_on_a_tiny_model(make_engine, workload):
    w = WORKLOADS[workload]
    engine = make_engine(**w.engine)
    trace = record(engine, w, workload)
    _check_trace(json.loads(json.dumps(trace)), workload)
    assert trace["num_blocks"] == w.engine["num_kv_blocks"]


def test_trace_command_is_parsed():
    args = build_parser().parse_args(["trace", "preemption", "--out", "x.json"])
    assert (args.command, args.workload, args.out) == ("trace", "preemption", "x.json")
    assert build_parser().parse_args(["serve", "--no-dashboard"]).dashboard is False
    assert build_parser().parse_args(["serve"]).dashboard is True
    with pytest.raises(SystemExit):
        main(["trace", "no-such-workload"])


def test_trace_checks_out_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """--out in a folder that does not exist (or a folder itself) failed with an OSError's line
    that did not name the flag, once the model had loaded and the workload had run."""
    import engine.engine

    def no_load(config):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(engine.engine, "LLMEngine", no_load)
    missing = tmp_path / "no-such-folder" / "x.json"
    for out, words in ((missing, f"the folder '{missing.parent}' does not exist"),
                       (tmp_path, "is a folder")):
        assert main(["trace", "preemption", "--device", "numpy", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pagedserve: error: --out '{out}': ") and words in err, err


def _events(url: str, n: int, headers=None) -> list[dict]:
    out = []
    with httpx.stream("GET", url + "/dashboard/events", headers=headers or {}, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
                if len(out) == n:
                    break
    return out


@pytest.fixture
def serve():
    servers = []

    def start(**kwargs):
        servers.append(Server(create_app(served_model_name="tiny", make_core=_make_core,
                                         **kwargs)))
        return servers[-1].url

    yield start
    for s in servers:
        s.stop()


def test_page_is_open_but_the_feed_and_traces_need_the_key(serve):
    url = serve(api_key="sesame")
    page = httpx.get(url + "/dashboard")
    script = page.text.split("<script>")[1]
    assert page.status_code == 200 and "<canvas" in page.text
    assert "http://" not in script and "https://" not in script  # nothing from elsewhere
    assert httpx.get(url + "/dashboard/events").status_code == 401
    assert httpx.get(url + "/dashboard/traces").status_code == 401
    key = {"Authorization": "Bearer sesame"}
    assert httpx.get(url + "/dashboard/traces", headers=key).json() == ["preemption",
                                                                        "shared-prefix"]
    assert httpx.get(url + "/dashboard/traces/nope", headers=key).status_code == 404
    first, second = _events(url, 2, key)
    assert first["kind"] == "key" and second["kind"] == "delta"
    assert second["v"] == first["v"] + 1
    assert first["num_blocks"] == 64 and first["stats"]["kv_blocks_used"] == 0


def test_a_feed_response_ends_so_the_server_can_stop(serve, monkeypatch):
    import server.dashboard

    monkeypatch.setattr(server.dashboard, "MAX_STREAM_S", 0.3)
    url = serve()
    start = time.time()
    with httpx.stream("GET", url + "/dashboard/events", timeout=10) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert time.time() - start < 3 and 1 <= len(lines) <= 10
    assert json.loads(lines[0][6:])["kind"] == "key"


def test_a_viewer_gone_before_the_response_starts_is_unsubscribed():
    """An ASGI 2.4 server whose send raises OSError at the response's start (the client left):
    the feed's generator never starts, and the viewer must not stay subscribed (the feed would
    poll the engine for it until the server stops)."""
    scope, receive, send, sent = gone_client_asgi("GET", "/dashboard/events", [])
    with Server(create_app(served_model_name="tiny", make_core=_make_core)) as s:
        feed = s.app.state.dashboard

        async def call():
            with pytest.raises(Exception):  # noqa: B017 (Starlette's ClientDisconnect)
                await s.app(scope, receive, send)
            await asyncio.sleep(0.3)

        asyncio.run_coroutine_threadsafe(call(), s.app.state.engine.loop).result(timeout=30)
        assert sent == ["http.response.start"]
        assert not feed._viewers
        assert feed._task is None or feed._task.done()


def test_no_dashboard_flag_removes_the_routes(serve):
    url = serve(dashboard=False)
    assert [httpx.get(url + p).status_code for p in ("/dashboard", "/dashboard/events")] == \
        [404, 404]


def test_feed_fans_out_and_a_late_viewer_starts_from_a_keyframe():
    from engine.core.block_manager import BlockManager
    from engine.core.introspect import Introspector
    from engine.core.sampling_params import SamplingParams
    from engine.core.sequence import Sequence

    bm = BlockManager(32, 4)
    intro = Introspector(bm)
    seqs = []

    async def snapshot(since):
        seq = Sequence(f"r{len(seqs)}", [1, 2, 3, 4, 5], 5, SamplingParams())
        bm.allocate(seq)
        seqs.append(seq)
        return intro.snapshot(seqs, [], {"n": len(seqs)}, since)

    async def main():
        feed = DashboardFeed(snapshot, updates_per_s=100)
        early = feed.subscribe()
        got = [json.loads(await early.get()) for _ in range(3)]
        late = feed.subscribe()
        first_late = json.loads(await late.get())
        feed.unsubscribe(early)
        feed.unsubscribe(late)
        return got, first_late

    got, first_late = asyncio.run(main())
    assert [s["kind"] for s in got] == ["key", "delta", "delta"]
    assert first_late["kind"] == "key" and first_late["v"] >= got[-1]["v"]
    state = DashboardState()
    state.apply(first_late)
    assert state.num_used_blocks == 2 * len(state.tables)


def test_a_feed_ends_when_the_server_stops_or_the_engine_goes_quiet(monkeypatch):
    """A viewer's stream ends at close() (the server stopping; it had run until the drain cut it
    with a traceback) and when no snapshot comes (a dead engine posts none; it had waited
    forever, since the time limit was checked only after a message)."""
    import server.dashboard as dashboard

    async def never(since):  # a dead engine: no snapshot
        raise LookupError

    async def body(feed, stop_after=None):
        class Req:
            app = type("A", (), {"state": type("S", (), {"dashboard": feed})()})()

        response = await dashboard.events(Req())
        if stop_after is not None:
            asyncio.get_running_loop().call_later(stop_after, feed.close)
        start = time.monotonic()
        chunks = [c async for c in response.body_iterator]
        return chunks, time.monotonic() - start

    monkeypatch.setattr(dashboard, "MAX_STREAM_S", 30.0)
    chunks, took = asyncio.run(body(DashboardFeed(never), stop_after=0.2))
    assert chunks == [] and took < 2
    monkeypatch.setattr(dashboard, "MAX_STREAM_S", 0.3)
    chunks, took = asyncio.run(body(DashboardFeed(never)))
    assert chunks == [] and took < 2
    closed = DashboardFeed(never)
    closed.close()
    assert asyncio.run(body(closed))[0] == []  # a viewer arriving after close ends at once


def test_trace_refuses_engine_flags_its_workload_sets(tmp_path, capsys, monkeypatch):
    """`pagedserve trace` takes the engine flags, but a workload sets its block size, pool,
    batch and length itself: --block-size 8 (say) was accepted and silently ignored, the trace
    made with blocks of 4. Now it is refused before any model loads, naming the flag."""
    import engine.engine

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(engine.engine, "LLMEngine", no_load)
    out = tmp_path / "t.json"
    assert main(["trace", "shared-prefix", "--device", "cpu", "--block-size", "8",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--block-size 8" in err and "--block-size 4" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("flag, refused", [("16", True), ("4", False)])
def test_trace_refuses_an_explicit_default_and_takes_its_own_value(tmp_path, capsys,
                                                                    monkeypatch, flag, refused):
    """--block-size 16 (the flag's default, given) would be ignored just the same: refused;
    --block-size 4, the workload's own, is no conflict: the model loads."""
    import engine.engine

    def no_load(*args, **kwargs):
        raise RuntimeError("the model loaded")

    monkeypatch.setattr(engine.engine, "LLMEngine", no_load)
    status = main(["trace", "shared-prefix", "--device", "cpu", "--block-size", flag,
                   "--out", str(tmp_path / "t.json")])
    err = capsys.readouterr().err
    if refused:
        assert status == 2 and "--block-size 16" in err, err
    else:
        assert status == 1 and "the model loaded" in err, err


def test_a_viewer_behind_still_gets_the_end_when_the_server_stops():
    """A viewer MAX_BACKLOG updates behind has its queue emptied for a keyframe: the end marker
    close() put there went with it, and the stream ran on until MAX_STREAM_S (uvicorn's drain
    waited on it) instead of ending when the server stops."""
    import server.dashboard as dashboard

    async def snapshot(since):
        return {"v": (since or 0) + 1, "kind": "delta" if since else "key", "t": 0.0,
                "num_blocks": 0, "block_size": 4, "tables": [], "drop": [], "keyed": [],
                "unkeyed": [], "names": [], "rows": [], "num_waiting": 0, "done": [],
                "stats": {}}

    async def main():
        feed = DashboardFeed(snapshot, updates_per_s=1000)
        behind = feed.subscribe()
        while behind.qsize() < dashboard.MAX_BACKLOG:  # a viewer that reads nothing
            await asyncio.sleep(0.001)
        feed.close()
        await asyncio.sleep(0.05)  # the feed polls on
        got = [behind.get_nowait() for _ in range(behind.qsize())]
        feed.unsubscribe(behind)
        return got

    assert None in asyncio.run(main())


@pytest.mark.parametrize("name, status, param", [
    ("preemption", 200, None), ("%2e%2e", 404, "name"), ("..%2Fdashboard", 404, None),
    ("%2Fetc%2Fpasswd", 404, None), ("preemption.json", 404, "name"),
    ("pre%00emption", 404, "name"), ("%C3%A9", 404, "name"), ("a" * 300, 404, "name")])
def test_a_trace_is_named_only_among_the_shipped_ones(name, status, param):
    """A name is looked up among the listed traces, never turned into a path first: a name past
    the file system's 255-byte limit made is_file() raise (a 500); traversal stays a 404 (the
    route's own, or "no route" for a name holding a '/')."""
    from starlette.testclient import TestClient

    app = create_app(served_model_name="tiny", make_core=_make_core)  # no lifespan: no core
    r = TestClient(app, base_url="http://127.0.0.1").get("/dashboard/traces/" + name)
    assert r.status_code == status, r.text[:200]
    if status == 200:
        assert r.json()["workload"] == "preemption"
    else:
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("not_found", param), error
