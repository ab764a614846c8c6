"""A hung engine core is failed as a dead one is (engine/core/liveness.py): the API side's
Watchdog on a fake clock, then a served core whose loop sticks in a step and one whose step is
merely long. The stopped process (SIGSTOP) is tests/test_two_process.py's."""

import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from conftest import tiny_server_core  # noqa: E402
from test_server import Server  # noqa: E402

from engine.core.liveness import CHECK_EVERY_S, Liveness, Watchdog  # noqa: E402
from server.app import create_app  # noqa: E402

# ---------------------------------------------------------------- the Watchdog, on a fake clock


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(watchdog: Watchdog, clock: Clock, seconds: float, busy: bool, beat=None) -> list:
    """Advance `seconds` in checks CHECK_EVERY_S apart, hearing `beat()` (a heartbeat's turn
    count, or None: a step's message) before each when given; the verdicts that came."""
    verdicts = []
    for _ in range(round(seconds / CHECK_EVERY_S)):
        clock.now += CHECK_EVERY_S
        if beat is not None:
            watchdog.heard(beat())
        verdict = watchdog.verdict(busy)
        if verdict is not None:
            verdicts.append((clock.now, verdict))
    return verdicts


def test_silence_past_the_heartbeat_limit_is_a_verdict():
    clock = Clock()
    watchdog = Watchdog(Liveness(engine_heartbeat_timeout=3, engine_step_timeout=0), clock)
    assert run(watchdog, clock, 3.0, busy=False) == []
    ((when, why),) = run(watchdog, clock, 0.5, busy=False)
    assert when == 3.5
    assert why == ("engine core unresponsive for 3.5 s: nothing heard from its process, not even "
                   "a heartbeat (--engine-heartbeat-timeout 3)")
    watchdog.heard(7)  # a heartbeat clears it
    assert run(watchdog, clock, 3.0, busy=True) == []


def test_heartbeats_with_a_still_turn_count_are_a_verdict_only_with_requests_in_flight():
    clock = Clock()
    watchdog = Watchdog(Liveness(engine_heartbeat_timeout=3, engine_step_timeout=5), clock)
    turns = iter(range(1000))
    # A turning loop: idle or busy, never a verdict.
    assert run(watchdog, clock, 20.0, busy=True, beat=lambda: next(turns)) == []
    # Stuck (the same count in every heartbeat), with nothing in flight: no one waits.
    assert run(watchdog, clock, 20.0, busy=False, beat=lambda: 5) == []
    # Requests come (first seen at 40.5): the clock runs from then, not from the last turn.
    assert run(watchdog, clock, 5.0, busy=True, beat=lambda: 5) == []
    ((when, why),) = run(watchdog, clock, 1.0, busy=True, beat=lambda: 5)
    assert when == 46.0
    assert why == ("engine core unresponsive for 5.5 s: its loop made no progress with requests "
                   "in flight (--engine-step-timeout 5)")
    # A step's message is progress too.
    assert run(watchdog, clock, 5.0, busy=True, beat=lambda: None) == []


def test_a_check_that_comes_late_waits_for_what_came_meanwhile():
    """The API process itself was held up (its event loop blocked, or it was stopped): the core's
    messages of that time wait unread, so silence then is no verdict."""
    clock = Clock()
    watchdog = Watchdog(Liveness(engine_heartbeat_timeout=3, engine_step_timeout=3), clock)
    clock.now += 60.0
    assert watchdog.verdict(busy=True) is None
    watchdog.heard(1)  # read right after
    assert run(watchdog, clock, 3.0, busy=True, beat=lambda: None) == []


def test_zero_turns_a_limit_off_and_small_limits_are_refused():
    clock = Clock()
    watchdog = Watchdog(Liveness(engine_heartbeat_timeout=0, engine_step_timeout=0), clock)
    assert run(watchdog, clock, 100.0, busy=True) == []
    with pytest.raises(ValueError, match="engine_heartbeat_timeout must be 0 .* at least 2 s"):
        Liveness(engine_heartbeat_timeout=1)
    with pytest.raises(ValueError, match="engine_heartbeat_timeout"):
        Liveness(engine_heartbeat_timeout=float("nan"))
    with pytest.raises(ValueError, match="engine_step_timeout must be 0 .* at least 1 s"):
        Liveness(engine_step_timeout=-1)


def test_the_flags_reach_the_app_and_a_bad_one_names_itself():
    from server.cli import _in_flag_names, app_from_args, build_parser, engine_config_from_args

    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert (args.engine_heartbeat_timeout, args.engine_step_timeout) == (10, 300) == (
        Liveness().engine_heartbeat_timeout, Liveness().engine_step_timeout)
    args = parser.parse_args(["serve", "--engine-heartbeat-timeout", "0",
                              "--engine-step-timeout", "4"])
    app = app_from_args(args, engine_config_from_args(args), make_core=lambda: None)
    assert app.state.engine.liveness == Liveness(0, 4)
    args = parser.parse_args(["serve", "--engine-step-timeout", "0.5"])
    with pytest.raises(ValueError) as e:  # `serve` exits 2 with this line
        app_from_args(args, engine_config_from_args(args), make_core=lambda: None)
    assert _in_flag_names(parser, "serve", str(e.value)) == \
        "--engine-step-timeout must be 0 (off) or at least 1 s, got 0.5"


# ---------------------------------------------------------------- served cores

BODY = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True}
_make_core = tiny_server_core(text=False, max_model_len=256, max_num_seqs=8, num_kv_blocks=128)


def _stuck_core():
    """A core whose loop sticks in its 4th step, as in a hung kernel: its process (and so its
    heartbeat thread) runs on."""
    core = _make_core()
    step, calls = core.step, [0]

    def stuck_step():
        calls[0] += 1
        if calls[0] == 4:
            threading.Event().wait()
        return step()

    core.step = stuck_step
    return core


def _slow_core():
    """A core whose 4th step spins in Python for 3 s, holding the GIL as a long step does."""
    core = _make_core()
    step, calls = core.step, [0]

    def slow_step():
        calls[0] += 1
        if calls[0] == 4:
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                pass
        return step()

    core.step = slow_step
    return core


def test_a_loop_stuck_with_a_request_in_flight_is_failed_and_killed():
    causes = []
    app = create_app(served_model_name="tiny", make_core=_stuck_core, on_fatal=causes.append,
                     liveness=Liveness(engine_heartbeat_timeout=10, engine_step_timeout=2))
    server = Server(app)
    core = app.state.engine.client.process
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json={**BODY, "stream": True},
                          timeout=20) as r:
            events = [line for line in r.iter_lines() if line]
        assert "engine core unresponsive for 2." in events[-2], events[-3:]
        assert "no progress with requests in flight" in events[-2]
        assert '"server_error"' in events[-2] and events[-1] == "data: [DONE]"
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "unresponsive" in health.json()["error"]
        assert len(causes) == 1 and "--engine-step-timeout 2" in causes[0]
        r = httpx.post(server.url + "/v1/completions", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        core.join(5)
        assert core.exitcode == -9  # killed, not left hanging
    finally:
        server.stop()


def test_a_long_step_and_an_idle_core_are_not_mistaken_for_a_hang():
    """The heartbeat comes from a thread: a step that holds the GIL for 3 s, past a 2 s
    heartbeat limit, and an idle spell longer than it, both leave the core alone."""
    causes = []
    server = Server(create_app(served_model_name="tiny", make_core=_slow_core,
                               on_fatal=causes.append,
                               liveness=Liveness(engine_heartbeat_timeout=2,
                                                 engine_step_timeout=10)))
    try:
        time.sleep(2.5)
        r = httpx.post(server.url + "/v1/completions", json=BODY, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 200
        assert httpx.get(server.url + "/health").status_code == 200
        assert causes == []
    finally:
        server.stop()


def test_a_core_nobody_reads_any_more_is_not_judged():
    """Once the API process stops reading the core (here it failed on the core's output; the
    engine is dead and the server stays up to say why), the heartbeats that wait unread are no
    silence: the live core is not failed a second time as unresponsive, nor killed."""
    causes = []
    app = create_app(served_model_name="tiny", make_core=_make_core, on_fatal=causes.append,
                     liveness=Liveness(engine_heartbeat_timeout=2, engine_step_timeout=0))
    server = Server(app)
    engine = app.state.engine
    core = engine.client.process
    try:

        def broken(outputs):
            raise RuntimeError("a bug")

        engine.processor.process = broken
        r = httpx.post(server.url + "/v1/completions", json=BODY, timeout=20)
        assert r.status_code == 500 and "a bug" in r.json()["error"]["message"]
        assert causes == ["the API process failed on the core's output: RuntimeError: a bug"]
        time.sleep(2 + 4 * CHECK_EVERY_S)  # past the heartbeat limit, and a few checks
        assert core.is_alive() and not engine.client._fatal_sent
        assert "unresponsive" not in engine.dead
    finally:
        server.stop()
