"""The dashboard in a real browser: headless Debian chromium, driven over the DevTools protocol,
against a running server while requests flow (.ci/run installs chromium where it is missing).

Checks that the used-block count on screen equals /metrics at the same engine step (and both 0
once idle), that requests with a common prefix show shared blocks, saves a screenshot, and
measures frames per second with 100k blocks and 256 running sequences from a synthetic feed.
"""

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
ws_client = pytest.importorskip("websockets.sync.client")

from conftest import _tiny_loaded  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from test_server import Server  # noqa: E402

from engine.core.block_manager import BlockManager  # noqa: E402
from engine.core.introspect import Introspector  # noqa: E402
from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.core.sequence import Sequence, SequenceStatus  # noqa: E402
from engine.model.config import EngineConfig  # noqa: E402
from server.app import create_app  # noqa: E402
from server.dashboard import TRACES, DashboardFeed, dashboard_routes  # noqa: E402

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium (.ci/run installs it)")


class Browser:
    """One headless chromium page, driven over the DevTools protocol's websocket."""

    def __init__(self, tmp: Path):
        # chromium's own scratch folders (sockets among them, whose paths must stay short), removed
        # by close() instead of piling up in /tmp
        self.scratch = tempfile.mkdtemp(prefix="cr-")
        self.proc = subprocess.Popen(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={tmp}", "--window-size=1400,1000",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "TMPDIR": self.scratch})
        port_file, deadline = tmp / "DevToolsActivePort", time.time() + 20
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert time.time() < deadline, "chromium did not start"
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(p for p in pages if p["type"] == "page")
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(ws_client.connect(page["webSocketDebuggerUrl"],
                                                             max_size=None))
        self.ids = itertools.count(1)
        self.prompt_answer = None  # what a user types into the page's prompt() dialogs
        self.prompts = []  # the messages of the dialogs answered
        self.call("Page.enable")

    def _send(self, method: str, params: dict) -> int:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        return msg_id

    def call(self, method: str, **params):
        msg_id = self._send(method, params)
        while True:
            reply = json.loads(self.ws.recv(timeout=20))
            if reply.get("method") == "Page.javascriptDialogOpening":  # it blocks the page
                self.prompts.append(reply["params"]["message"])
                self._send("Page.handleJavaScriptDialog", {
                    "accept": self.prompt_answer is not None,
                    "promptText": self.prompt_answer or ""})
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply
                return reply["result"]

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def open(self, url: str, ready: str, timeout: float = 10.0):
        self.call("Page.navigate", url=url)
        deadline = time.time() + timeout
        while not self.eval(f"typeof window.dashboard === 'function' && ({ready})"):
            assert time.time() < deadline, f"the page never got to: {ready}"
            time.sleep(0.05)

    def dashboard(self) -> dict:
        return self.eval("window.dashboard()")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self):
        if self.proc.poll() is None:
            self.stack.close()
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.scratch, ignore_errors=True)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def _slow_core():
    """The tiny model, slowed to ~15 steps/s so requests are still running when looked at (runs
    in the engine-core process)."""
    from engine.engine_core import EngineCore

    config = EngineConfig(device="numpy", max_num_seqs=5, max_model_len=256,
                          num_kv_blocks=384, block_size=4)
    engine = EngineCore(config, loaded_model=_tiny_loaded(512, False))
    step = engine.step

    def slow_step():
        time.sleep(0.05)
        return step()

    engine.step = slow_step
    return engine


def _send_requests(url: str, stop: threading.Event, worker: int):
    """Requests opening with one of two 32-token prefixes (8 full blocks), until `stop`."""
    for i in itertools.count():
        if stop.is_set():
            return
        prefix = list(range(10, 42)) if (i + worker) % 3 else list(range(300, 332))
        body = {"model": "tiny", "prompt": prefix + [100 + (7 * i + worker) % 50] * (5 + i % 9),
                "max_tokens": 10 + 3 * worker, "ignore_eos": True, "temperature": 0}
        httpx.post(url + "/v1/completions", json=body, timeout=60)


def _watch_metrics(url: str, seen: dict, stop: threading.Event):
    """Note the KV blocks used after each engine step, from /metrics (one scrape reads both
    numbers from the same engine stats)."""
    while not stop.is_set():
        text = httpx.get(url + "/metrics").text
        values = dict(re.findall(r"^(pagedserve_engine_steps_total|pagedserve_kv_blocks_used) "
                                 r"(\S+)$", text, re.M))
        seen[int(float(values["pagedserve_engine_steps_total"]))] = \
            int(float(values["pagedserve_kv_blocks_used"]))
        time.sleep(0.01)


def test_page_matches_metrics_while_requests_flow(browser, tmp_path):
    server = Server(create_app(served_model_name="tiny", make_core=_slow_core))
    stop = threading.Event()
    senders = [threading.Thread(target=_send_requests, args=(server.url, stop, w), daemon=True)
               for w in range(6)]  # 6 clients, 5 batch slots: one usually waits
    by_step: dict[int, int] = {}  # engine step -> KV blocks used after it, from /metrics
    watcher = threading.Thread(target=_watch_metrics, args=(server.url, by_step, stop),
                               daemon=True)
    try:
        browser.open(server.url + "/dashboard", "window.dashboard().version > 0")
        for sender in senders:
            sender.start()
        watcher.start()
        shown: dict[int, int] = {}  # engine step -> used blocks the page displayed for it
        max_shared, deadline = 0, time.time() + 12
        while time.time() < deadline:
            page = browser.dashboard()
            max_shared = max(max_shared, page["shared"])
            if page["displayedUsed"]:
                shown[page["displayedStep"]] = page["displayedUsed"]
            if page["shared"] and page["cached"] and len(shown) >= 8 and \
                    not (tmp_path / "dashboard.png").exists():
                browser.screenshot(tmp_path / "dashboard.png")
            both = shown.keys() & by_step.keys()
            if len(both) >= 5 and (tmp_path / "dashboard.png").exists():
                break
            time.sleep(0.03)
        # The page and /metrics at the same engine step: the same number of used blocks.
        both = sorted(shown.keys() & by_step.keys())
        assert len(both) >= 5, (shown, by_step)
        assert [shown[k] for k in both] == [by_step[k] for k in both]
        assert max_shared > 0, "requests with a common prefix showed no shared block"
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000, "no shared and cached blocks"
        if os.environ.get("DASHBOARD_SCREENSHOT"):  # how README's picture is made
            shutil.copy(tmp_path / "dashboard.png", os.environ["DASHBOARD_SCREENSHOT"])
        stop.set()
        for thread in (*senders, watcher):
            thread.join(30)
        server.wait_idle()
        deadline = time.time() + 5
        while browser.dashboard()["displayedUsed"] != 0:
            assert time.time() < deadline, "the page still shows used blocks on an idle engine"
            time.sleep(0.05)
        assert server.metric("pagedserve_kv_blocks_used") == 0
    finally:
        stop.set()
        browser.close()  # ends the feed's connection, which uvicorn would wait for
        server.stop()


class SyntheticEngine:
    """100k blocks and 256 decoding sequences, a real BlockManager and Introspector: every
    snapshot advances each sequence by a few tokens and restarts the ones that ended."""

    def __init__(self, num_blocks=100_000, num_seqs=256, block_size=16):
        self.bm = BlockManager(num_blocks, block_size)
        self.intro = Introspector(self.bm)
        self.running = [self._start(i) for i in range(num_seqs)]
        self.count = num_seqs

    def _start(self, i):
        prompt = [1 + i % 7] * 64 + [i] * (16 * 300)  # a shared 4-block prefix, then its own
        seq = Sequence(f"cmpl-{i:06d}", prompt, len(prompt), SamplingParams(max_tokens=200))
        self.bm.allocate(seq)
        seq.num_computed_tokens = 64
        self.bm.mark_computed(seq)  # keys the prefix only: hashing every block takes seconds
        seq.num_computed_tokens = len(prompt) - 1
        seq.status = SequenceStatus.RUNNING
        return seq

    async def snapshot(self, since):
        for k, seq in enumerate(self.running):
            if seq.num_output_tokens >= 60 + k % 40:  # ended: free it, start another
                self.bm.free(seq)
                self.running[k] = self._start(self.count)
                self.count += 1
                continue
            for _ in range(4):
                seq.token_ids.append(5)
                self.bm.append(seq, 1)
                seq.num_computed_tokens += 1
        stats = {"num_steps": self.count, "kv_blocks_used": self.bm.num_used_blocks}
        return self.intro.snapshot(self.running, [], stats, since)


def _serve_feed(feed):
    """(url, server, thread): the dashboard routes over `feed`, served by uvicorn on a thread."""
    app = Starlette(routes=dashboard_routes())
    app.state.dashboard = feed
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server, thread


def test_100k_blocks_and_256_sequences_keep_drawing(browser):
    """The page keeps drawing a feed of 100k blocks and 256 sequences. The frame rate is printed
    (a figure, not an assertion: on a shared CPU it measures the neighbours too); README has it."""
    engine = SyntheticEngine()
    url, server, thread = _serve_feed(DashboardFeed(engine.snapshot))
    try:
        browser.open(url + "/dashboard", "window.dashboard().numBlocks === 100000")
        start = browser.dashboard()["version"]
        time.sleep(2.2)  # the page's frame counter covers the last whole second
        page = browser.dashboard()
        print(f"\n100k blocks, 256 sequences: {page['fps']:.1f} frames/s, "
              f"{page['msPerUpdate']:.1f} ms to draw an update, "
              f"{page['version'] - start} updates in 2.2 s")
        assert page["rows"] == 256 and page["shared"] > 0
        assert page["version"] - start >= 2, "the feed did not keep flowing"
        assert page["fps"] > 0, page
    finally:
        browser.close()
        server.should_exit = True
        thread.join(10)


def test_key_asked_once_then_a_trace_replays_step_by_step(browser):
    server = Server(create_app(served_model_name="tiny", api_key="sesame",
                               make_core=_slow_core))
    try:
        # The page asks with a prompt() dialog on the feed's 401; a user types the key, once.
        browser.prompt_answer = "sesame"
        browser.open(server.url + "/dashboard", "window.dashboard().version > 0")
        assert len(browser.prompts) == 1 and "API key" in browser.prompts[0]
        assert browser.eval("localStorage.getItem('pagedserve-api-key')") == "sesame"
        # The stored key opens the example traces too; step through the shared prefix.
        browser.open(server.url + "/dashboard?trace=shared-prefix",
                     "window.dashboard().mode === 'replay'")
        trace = json.loads((TRACES / "shared-prefix.json").read_text())
        for k in range(1, 5):
            browser.eval("document.getElementById('fwd').click()")
            assert browser.dashboard()["frame"] == k
            browser.eval("new Promise((done) => requestAnimationFrame(() => done(1)))")  # drawn
            page = browser.dashboard()
            stats = trace["frames"][k]["snapshot"]["stats"]
            assert page["displayedUsed"] == stats["kv_blocks_used"] and page["displayedStep"] == k
        assert page["shared"] == 4  # the 4 prefix blocks, once req-b and req-c joined
        browser.eval("document.getElementById('scrub').value = 0; "
                     "document.getElementById('scrub').dispatchEvent(new Event('input'))")
        assert browser.dashboard()["frame"] == 0 and browser.dashboard()["used"] == 0
        assert len(browser.prompts) == 1
    finally:
        browser.close()
        server.stop()


class CountingEngine:
    """No blocks in use, but every snapshot comes after one more engine step that generated 8
    tokens, 0.1 s later than the one before: the page's tok/s is 80 at every update."""

    def __init__(self):
        self.bm = BlockManager(64, 4)
        self.intro = Introspector(self.bm)
        self.steps = 0

    async def snapshot(self, since):
        self.steps += 1
        stats = {"num_steps": self.steps, "generation_tokens_total": 8 * self.steps,
                 "prompt_tokens_total": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0,
                 "num_preemptions": 0, "num_running": 1, "busy_s": 0.01 * self.steps,
                 "kv_blocks_used": 0}
        snap = self.intro.snapshot([], [], stats, since)
        snap["t"] = 1000.0 + 0.1 * self.steps
        return snap


def test_the_feed_renewing_itself_puts_no_zero_in_the_rates(browser, monkeypatch):
    """Every MAX_STREAM_S the page reconnects and the feed first resends what the page already
    has, as a keyframe: no step and no time between it and the page's last update. It had made
    an update of 0 tok/s, no step time ("–") and 0 tokens per step every 15 s, in the tiles and
    as a dip in both charts."""
    import server.dashboard

    monkeypatch.setattr(server.dashboard, "MAX_STREAM_S", 0.4)
    engine = CountingEngine()
    url, server, thread = _serve_feed(DashboardFeed(engine.snapshot, updates_per_s=20))
    try:
        browser.open(url + "/dashboard", "window.dashboard().version > 0")
        time.sleep(2.5)  # several renewals
        rates = browser.eval("history.map((e) => [e.tokS, e.decode, e.stepMs])")
        assert len(rates) >= 10
        bad = [r for r in rates if r[2] is None or abs(r[0] - 80) > 1e-3 or r[1] != 8
               or abs(r[2] - 10) > 1e-3]
        assert not bad, (bad, len(rates))
    finally:
        browser.close()
        server.should_exit = True
        thread.join(10)
