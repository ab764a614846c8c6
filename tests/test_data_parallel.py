"""Data parallel: several engine cores behind one API process (engine/dp_client.py), their load
balancer (engine/core/dp_router.py), and a DP=2 server on the tiny model against DP=1."""

import collections
import random
import re
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from conftest import _tiny_loaded, tiny_server_core  # noqa: E402
from test_server import MODEL, Server  # noqa: E402

from engine.core.dp_router import LoadBalancer, affinity_slack  # noqa: E402
from engine.core.outputs import (  # noqa: E402
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    SeqOutput,
)
from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.core_client import MPClient  # noqa: E402
from engine.dp_client import DPClient, core_client_for, core_devices, sum_stats  # noqa: E402
from engine.engine_core import EngineCore  # noqa: E402
from engine.executor.ops import DeviceError  # noqa: E402
from engine.model.config import ConfigError, EngineConfig  # noqa: E402
from server.app import create_app  # noqa: E402

# ---------------------------------------------------------------- the load balancer


def test_least_outstanding_sequences_win_and_finishes_free_them():
    lb = LoadBalancer(3, block_size=4, prefix_aware=False)
    assert [lb.route(f"r{i}", [i], 1) for i in range(3)] == [0, 1, 2]
    assert lb.route("wide", [9], 4) == 0  # ties: the core given fewest requests so far, then 0
    assert lb.loads == [5, 1, 1]
    assert [lb.route(f"s{i}", [i], 1) for i in range(4)] == [1, 2, 1, 2]
    for index in (0, 1, 2, 2):  # a sequence reported twice counts once
        lb.finish("wide", index)
    assert lb.loads == [2, 3, 3] and lb.owner("wide") == 0
    lb.finish("wide", 3)
    assert lb.owner("wide") is None and lb.loads == [1, 3, 3]
    assert lb.route("t", [1], 2) == 0
    assert lb.forget("s1") == 2 and lb.forget("s1") is None  # aborted; then unknown
    assert lb.loads == [3, 3, 2] and lb.num_routed == [3, 3, 3]
    with pytest.raises(ValueError, match="request_id 't'"):
        lb.route("t", [1], 1)


def test_same_prefix_same_core_until_it_is_too_busy():
    lb = LoadBalancer(2, block_size=4)
    system = list(range(100, 112))  # 3 full blocks
    assert lb.route("a0", system + [1], 1) == 0
    assert lb.route("b0", [7] * 12, 1) == 1
    assert lb.route("x", [8] * 12, 1) == 0
    # A prompt sharing the first blocks goes where they were, though core 1 is less loaded.
    assert lb.route("a1", system + [2, 3], 1) == 0
    assert lb.route("a2", system[:8] + [5] * 8, 1) == 0  # 2 blocks shared: still a match
    assert lb.route("short", system[:3], 1) == 1  # not one full block: least loaded
    assert lb.num_prefix_routed == 2
    # The escape hatch: core 0 may hold affinity_slack(min) = 8 more sequences than core 1.
    assert lb.loads == [4, 2] and affinity_slack(2) == 8
    assert lb.route("wide", system + [4], 6) == 0 and lb.loads == [10, 2]
    assert lb.route("a3", system + [5], 1) == 0  # 10 <= 2 + 8
    assert lb.route("a4", system + [6], 1) == 1  # 11 > 2 + 8: the least loaded, the new home
    assert lb.route("a5", system + [7], 1) == 1 and lb.num_prefix_routed == 4


def test_a_salted_prefix_has_a_home_of_its_own():
    """cache_salt: a salted request shares no blocks with the unsalted prefix or another salt's,
    so it is placed by load, and its own salt's later requests follow it."""
    lb = LoadBalancer(2, block_size=4)
    system = list(range(100, 112))
    assert lb.route("plain", system + [1], 1) == 0
    assert lb.route("salted", system + [2], 1, cache_salt="s") == 1  # not core 0's prefix
    assert lb.route("big", [7] * 12, 3) == 0 and lb.route("big2", [8] * 12, 4) == 1
    assert lb.loads == [4, 5]
    # core 0 is the least loaded; the salt's own prefix is on core 1, the unsalted one on core 0
    assert lb.route("salted2", system + [4], 1, cache_salt="s") == 1
    assert lb.route("other", system + [3], 1, cache_salt="t") == 0  # a third salt: by load
    assert lb.num_prefix_routed == 1


def test_prefix_routing_measured_on_a_simulated_prefix_cache():
    """A workload from 8 system prompts (4 blocks each), 16 requests in flight on 2 cores whose
    prefix caches hold 24 blocks each (LRU): prefix-aware routing keeps each system prompt on
    one core, so both caches hold what their requests share; least-loaded alone makes each
    core cache all 8 and evict them."""

    def simulate(prefix_aware: bool) -> tuple[float, int]:
        rng = random.Random(0)
        lb = LoadBalancer(2, block_size=16, prefix_aware=prefix_aware)
        caches = [collections.OrderedDict(), collections.OrderedDict()]
        systems = [[rng.randrange(50000) for _ in range(64)] for _ in range(8)]
        hits = total = worst = 0
        in_flight = []
        for i in range(2000):
            prompt = rng.choice(systems) + [rng.randrange(50000) for _ in range(20)]
            core = lb.route(f"r{i}", prompt, 1)
            cache = caches[core]
            for k in range(len(prompt) // 16):
                block = tuple(prompt[: 16 * (k + 1)])
                hits += block in cache
                total += 1
                cache[block] = True
                cache.move_to_end(block)
                if len(cache) > 24:
                    cache.popitem(last=False)
            in_flight.append(f"r{i}")
            if len(in_flight) > 16:
                lb.finish(in_flight.pop(rng.randrange(len(in_flight))), 0)
            worst = max(worst, abs(lb.loads[0] - lb.loads[1]))
        return hits / total, worst

    plain_rate, plain_worst = simulate(False)
    aware_rate, aware_worst = simulate(True)
    print(f"full-block hit rate: least-loaded {plain_rate:.2f} (worst imbalance {plain_worst} "
          f"sequences), prefix-aware {aware_rate:.2f} (worst {aware_worst})")
    assert aware_rate > plain_rate + 0.2
    assert plain_worst <= 2 and aware_worst <= affinity_slack(16) + 2


# ---------------------------------------------------------------- the client, with fake cores


class FakeCore:
    def __init__(self):
        self.added, self.aborted, self.finished = [], [], []

    def add_request(self, req):
        self.added.append(req.request_id)

    def abort_requests(self, ids):
        self.aborted.append(ids)

    def finish_sequences(self, items):
        self.finished.append(items)


def _stats(**fields) -> EngineStats:
    return EngineStats(**{**dict.fromkeys(EngineStats.__dataclass_fields__, 0), **fields})


def test_commands_go_to_the_core_that_owns_the_request():
    assert type(core_client_for(EngineConfig())) is MPClient  # DP=1: no extra hop
    dp = DPClient(EngineConfig(device="numpy", data_parallel_size=2))
    assert [c.config.data_parallel_rank for c in dp.clients] == [0, 1]
    assert dp.devices == [None, None]  # the cpu backend ignores GPUs
    dp.clients = fakes = [FakeCore(), FakeCore()]
    for i in range(4):
        dp.add_request(EngineCoreRequest(f"r{i}", [i + 1], SamplingParams(n=2), 0.0))
    assert fakes[0].added == ["r0", "r2"] and fakes[1].added == ["r1", "r3"]
    dp.abort_requests(["r1", "r2", "gone"])
    assert fakes[0].aborted == [["r2"]] and fakes[1].aborted == [["r1"]]
    dp.finish_sequences([("r3", 0, "stop"), ("r0", 1, "stop"), ("r1", 0, "late")])
    assert fakes[0].finished == [[("r0", 1, "stop")]]
    assert fakes[1].finished == [[("r3", 0, "stop")]]
    out = SeqOutput("r3", 1, [5], None, 0.0, "length", None)
    dp._merged(0, EngineCoreOutputs(accepted=["r0", "r2"]))  # (each before its outputs)
    dp._merged(1, EngineCoreOutputs(accepted=["r3"]))
    merged = dp._merged(1, EngineCoreOutputs(outputs=[out], stats=_stats(num_running=2)))
    assert dp.balancer.owner("r3") is None and dp.balancer.loads == [1, 0]
    merged = dp._merged(0, EngineCoreOutputs(stats=_stats(num_running=3, kv_blocks_total=8)))
    assert merged.stats.num_running == 5 and merged.stats.kv_blocks_total == 8
    assert [s.num_running for s in dp.core_stats] == [3, 2]
    fatal = dp._merged(1, EngineCoreOutputs(fatal="the engine core process was killed by X"))
    assert fatal.fatal == "engine core 1 of 2: the engine core process was killed by X"
    assert sum_stats([_stats(num_steps=2), _stats(num_steps=3)]).num_steps == 5


def test_a_beam_search_request_counts_its_beams_until_its_n_outputs_end():
    """A beam search runs best_of beams but hands back only n outputs (at its end): it loads
    its core with best_of sequences, and its n finished outputs free them all."""
    dp = DPClient(EngineConfig(device="numpy", data_parallel_size=2))
    dp.clients = [FakeCore(), FakeCore()]
    beams = SamplingParams(n=2, best_of=6, use_beam_search=True, max_tokens=4)
    dp.add_request(EngineCoreRequest("beam", [1], beams, 0.0))
    assert dp.balancer.loads == [6, 0]
    for i in range(3):  # 6 beams on core 0: three plain requests all go to core 1
        dp.add_request(EngineCoreRequest(f"r{i}", [i + 2], SamplingParams(), 0.0))
    assert dp.clients[1].added == ["r0", "r1", "r2"] and dp.balancer.loads == [6, 3]
    outs = [SeqOutput("beam", i, [5], None, 0.0, "length", None) for i in range(2)]
    dp._merged(0, EngineCoreOutputs(accepted=["beam"]))
    dp._merged(0, EngineCoreOutputs(outputs=outs))
    assert dp.balancer.owner("beam") is None and dp.balancer.loads == [0, 3]
    dp.add_request(EngineCoreRequest("beam2", [1], beams, 0.0))
    assert dp.balancer.forget("beam2") == 0 and dp.balancer.loads == [0, 3]  # aborted


def test_an_id_used_again_after_an_abort_gets_none_of_the_aborted_ones_outputs():
    """AsyncEngine's callers pick request ids: one aborted and added again at once may run on
    the other core, or on the same one not accepted yet, while the aborted request's last
    outputs still come. They ended (and counted off) the new request; they are dropped."""
    dp = DPClient(EngineConfig(device="numpy", data_parallel_size=2))
    dp.clients = [FakeCore(), FakeCore()]
    dp.add_request(EngineCoreRequest("x", [1], SamplingParams(), 0.0))
    dp._merged(0, EngineCoreOutputs(accepted=["x"]))
    dp.abort_requests(["x"])
    dp.add_request(EngineCoreRequest("x", [1], SamplingParams(), 0.0))  # now on core 1
    assert dp.clients[1].added == ["x"]
    late = SeqOutput("x", 0, [5], None, 0.0, "length", None)
    assert dp._merged(0, EngineCoreOutputs(outputs=[late])).outputs == []
    assert dp.balancer.owner("x") == 1 and dp.balancer.loads == [0, 1]
    dp.abort_requests(["x"])
    dp.add_request(EngineCoreRequest("x", [1], SamplingParams(), 0.0))  # back on core 0
    assert dp._merged(0, EngineCoreOutputs(outputs=[late])).outputs == []  # not accepted yet
    assert dp.balancer.owner("x") == 0 and dp.balancer.loads == [1, 0]
    dp._merged(0, EngineCoreOutputs(accepted=["x"]))
    assert dp._merged(0, EngineCoreOutputs(outputs=[late])).outputs == [late]  # its own
    assert dp.balancer.owner("x") is None and dp.balancer.loads == [0, 0]


def test_each_core_gets_its_own_gpus(monkeypatch):
    import engine.dp_client as dp_client

    monkeypatch.setattr(dp_client, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(dp_client, "visible_gpus", lambda: ["4", "5", "6"])
    assert core_devices(EngineConfig(device="cuda", data_parallel_size=3)) == ["4", "5", "6"]
    with pytest.raises(DeviceError, match="data_parallel_size 4 x tensor_parallel_size 1 needs "
                                          "4 GPUs, but 3 visible: 4, 5, 6"):
        core_devices(EngineConfig(device="cuda", data_parallel_size=4))


def test_a_core_whose_ranks_are_partly_on_other_hosts_takes_only_its_local_gpus(monkeypatch):
    """tp_local_ranks of a core's tensor-parallel ranks run here (the others join from their
    hosts): each core needs that many of this host's GPUs, not tensor_parallel_size."""
    import engine.dp_client as dp_client

    monkeypatch.setattr(dp_client, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(dp_client, "visible_gpus", lambda: ["4", "5", "6", "7"])
    config = EngineConfig(device="cuda", data_parallel_size=2, tensor_parallel_size=4,
                          tp_local_ranks=2)
    assert core_devices(config) == ["4,5", "6,7"]
    config.data_parallel_size = 3
    with pytest.raises(DeviceError, match="data_parallel_size 3 x tp_local_ranks 2 needs 6 GPUs"):
        core_devices(config)


def test_too_few_gpus_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path):
    import engine.dp_client as dp_client
    from server.cli import main

    monkeypatch.setattr(dp_client, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(dp_client, "visible_gpus", lambda: ["0"])
    code = main(["serve", "llama3-8b", "--load-format", "dummy", "--device", "cuda",
                 "--port", "0", "--data-parallel-size", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == ["pagedserve: error: data_parallel_size 2 x tensor_parallel_size "
                                 "1 needs 2 GPUs, but 1 visible: 0"]


def test_offline_llm_says_data_parallel_needs_the_server():
    from engine.llm import LLM

    with pytest.raises(ConfigError, match="pagedserve serve --data-parallel-size"):
        LLM(device="numpy", data_parallel_size=2)
    with pytest.raises(ConfigError, match="data_parallel_rank"):
        EngineConfig(data_parallel_size=2, data_parallel_rank=2).validate()


def test_unseeded_sampling_differs_across_ranks_and_seeded_does_not():
    def tokens(rank: int, seed: int | None) -> list[int]:
        config = EngineConfig(device="numpy", data_parallel_size=2, data_parallel_rank=rank)
        core = EngineCore(config, loaded_model=_tiny_loaded(512, False))
        params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=seed)
        core.add_request(EngineCoreRequest("r", [3, 4, 5], params, 0.0))
        out = []
        while core.has_unfinished_requests():
            out += [t for o in core.step() for t in o.new_token_ids]
        return out

    assert tokens(0, None) != tokens(1, None)
    assert tokens(0, 7) == tokens(1, 7)


# ---------------------------------------------------------------- a DP=2 server


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    from test_two_process import tiny_model_folder

    # Token ids only, no tokenizer on either side: the cores and the API process load at once.
    folder = tiny_model_folder(tmp_path_factory.mktemp("dp") / "tiny", with_tokenizer=False)
    make_core = tiny_server_core(text=False, max_num_seqs=64, max_model_len=256,
                                 num_kv_blocks=1024)
    config = EngineConfig(model=str(folder), device="numpy", data_parallel_size=2)
    with Server(create_app(config, served_model_name=MODEL, make_core=make_core)) as s:
        yield s


def _token_ids(server, prompt: list[int], **params) -> list[list[int]]:
    body = {"model": MODEL, "prompt": [prompt], "max_tokens": 10, "ignore_eos": True,
            "return_token_ids": True, **params}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [c["token_ids"] for c in r.json()["choices"]]


def test_dp2_serves_concurrent_requests_as_dp1_does(dp_server, run_engine):
    import concurrent.futures

    from engine.engine import LLMEngine

    cases = [([10 + i, 20 + i, 30 + i], dict(temperature=0)) for i in range(6)]
    cases += [([40 + i, 50 + i], dict(temperature=0.9, seed=i, n=2)) for i in range(6)]
    client = dp_server.app.state.engine.client
    routed = list(client.balancer.num_routed)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda c: _token_ids(dp_server, c[0], **c[1]), cases))
    assert all(a > b for a, b in zip(client.balancer.num_routed, routed, strict=True))
    assert all(s.generation_tokens_total > 0 for s in client.core_stats)
    # DP=1: one core, in this process, on the same model.
    engine = LLMEngine(EngineConfig(device="numpy", max_num_seqs=64, max_model_len=256,
                                    num_kv_blocks=1024), loaded_model=_tiny_loaded(49152, False))
    final, _ = run_engine(engine, {
        i: ({"prompt_token_ids": p}, SamplingParams(max_tokens=10, ignore_eos=True, **kw))
        for i, (p, kw) in enumerate(cases)})
    want = [[c.token_ids for c in final[i].outputs] for i in range(len(cases))]
    assert got == want


def test_dp2_metrics_sum_the_cores_and_label_each(dp_server):
    _token_ids(dp_server, [5, 6, 7], max_tokens=3)
    dp_server.wait_idle()
    per_core = [dp_server.metric("pagedserve_core_kv_blocks_total", f'{{core="{i}"}}')
                for i in (0, 1)]
    assert per_core == [1024, 1024]
    assert dp_server.metric("pagedserve_kv_blocks_total") == 2048
    assert dp_server.metric("pagedserve_core_num_requests_running", '{core="1"}') == 0
    assert httpx.get(dp_server.url + "/health").json() == {"status": "ok"}


def test_dp2_same_prefix_goes_to_the_same_core_and_hits_its_cache(dp_server):
    client = dp_server.app.state.engine.client
    before = [(s.prefix_cache_hits, s.generation_tokens_total) for s in client.core_stats]
    prefix = list(range(300, 300 + 64))  # 4 blocks of 16
    for suffix in ([1, 2], [3, 4]):  # one after the other: both cores idle each time
        _token_ids(dp_server, prefix + suffix, max_tokens=2)
    dp_server.wait_idle()
    after = [(s.prefix_cache_hits, s.generation_tokens_total) for s in client.core_stats]
    hits = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    tokens = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    assert sorted(tokens) == [0, 4]  # both on one core
    assert sum(hits) == 4  # the second found the 4 prefix blocks there


def test_dp2_abort_reaches_the_core_that_runs_the_request(dp_server, monkeypatch):
    import contextlib
    import json

    client = dp_server.app.state.engine.client
    sent = {0: [], 1: []}
    for i, core in enumerate(client.clients):
        original = core.abort_requests
        monkeypatch.setattr(core, "abort_requests",
                            lambda ids, i=i, original=original: (sent[i].extend(ids),
                                                                 original(ids)))
    body = {"model": MODEL, "prompt": [[7, 8, 9]], "max_tokens": 240, "ignore_eos": True,
            "stream": True}
    with contextlib.ExitStack() as stack:
        streams = {}
        for _ in range(2):
            r = stack.enter_context(httpx.stream("POST", dp_server.url + "/v1/completions",
                                                 json=body, timeout=30))
            lines = r.iter_lines()
            request_id = json.loads(next(lines).removeprefix("data: "))["id"] + "-0"
            # (the line iterator kept: dropping it would close its response)
            streams[client.balancer.owner(request_id)] = (r, request_id, lines)
        assert set(streams) == {0, 1}
        response, request_id, _ = streams[1]
        response.close()  # the client goes away: the server aborts its request
        deadline = time.time() + 10
        while not sent[1]:
            assert time.time() < deadline, "no abort reached core 1"
            time.sleep(0.01)
        assert sent == {0: [], 1: [request_id]}
        assert client.balancer.owner(request_id) is None
    dp_server.wait_idle()


def test_the_cores_left_when_one_dies_are_not_failed_as_silent(tmp_path):
    """One core dies: the engine is dead and nobody reads the others' messages any more, so their
    heartbeats go unread. That is no silence of theirs: they are not failed as unresponsive and
    killed (an app without on_fatal stays up to say why, until it is shut down)."""
    import os
    import signal

    from test_two_process import tiny_model_folder

    from engine.core.liveness import CHECK_EVERY_S, Liveness

    folder = tiny_model_folder(tmp_path / "tiny", with_tokenizer=False)
    config = EngineConfig(model=str(folder), device="numpy", data_parallel_size=2)
    make_core = tiny_server_core(text=False, max_num_seqs=8, max_model_len=256, num_kv_blocks=128)
    app = create_app(config, served_model_name=MODEL, make_core=make_core,
                     liveness=Liveness(engine_heartbeat_timeout=2, engine_step_timeout=0))
    with Server(app) as s:
        engine = app.state.engine
        first, second = engine.client.clients
        os.kill(first.process.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while engine.dead is None:
            assert time.time() < deadline, "the core's death went unseen"
            time.sleep(0.02)
        time.sleep(2 + 4 * CHECK_EVERY_S)  # past the heartbeat limit, and a few checks
        assert second.process.is_alive() and not second._fatal_sent
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "engine core 0 of 2" in health.json()["error"]


# ---------------------------------------------------------------- a DP=2 `pagedserve serve`


def test_killing_one_core_ends_the_server_naming_it(tmp_path):
    import os
    import signal

    from test_two_process import Served, _is_running

    served = Served(tmp_path, extra=("--data-parallel-size", "2"))
    try:
        model = httpx.get(served.url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": [[5, 6, 7]], "max_tokens": 1000, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            os.kill(served.core_pids[1], signal.SIGKILL)
            killed = time.monotonic()
            events = [line for line in lines if line]
        # Whichever core ran it, the request fails: the server is going down.
        assert re.search(r"engine core [01] of 2: .* SIGKILL", events[-2])
        assert served.proc.wait(timeout=10) != 0
        assert time.monotonic() - killed < 5.0
        assert re.search(r"the engine core died: engine core [01] of 2", served.output())
        assert not _is_running(served.core_pids[0])  # the other core went with it
    finally:
        served.close()


def test_stopping_one_idle_core_ends_the_server_naming_it(tmp_path):
    """Each core is watched on its own, and silence needs no request in flight: one idle core
    stopped (SIGSTOP) is failed within --engine-heartbeat-timeout, and both go with the server."""
    import os
    import signal

    from test_two_process import Served, _is_running

    served = Served(tmp_path, extra=("--data-parallel-size", "2",
                                     "--engine-heartbeat-timeout", "2"))
    try:
        os.kill(served.core_pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        assert served.proc.wait(timeout=10) != 0
        assert time.monotonic() - stopped < 2 + 5.0
        assert re.search(r"the engine core died: engine core [01] of 2: engine core unresponsive "
                         r"for 2\.\d s: nothing heard", served.output()), served.output()
        deadline = time.monotonic() + 5
        while any(_is_running(p) for p in served.core_pids):
            assert time.monotonic() < deadline, "a core outlived the server"
            time.sleep(0.05)
    finally:
        for pid in served.core_pids:
            if _is_running(pid):
                os.kill(pid, signal.SIGKILL)  # a stopped process takes SIGKILL too
        served.close()


def test_dp2_tp2_with_a_master_port_gives_each_core_its_own(tmp_path):
    """Each core is a tensor-parallel rank 0 of its own: with --master-port they must not all
    bind that one port (core i listens on it + i)."""
    from conftest import free_port
    from test_two_process import Served

    port = free_port()
    served = Served(tmp_path, extra=("--data-parallel-size", "2", "--tensor-parallel-size", "2",
                                     "--master-port", str(port)))
    try:
        model = httpx.get(served.url + "/v1/models").json()["data"][0]["id"]
        r = httpx.post(served.url + "/v1/completions", timeout=60,
                       json={"model": model, "prompt": [[5, 6, 7]], "max_tokens": 3})
        assert r.status_code == 200, r.text
    finally:
        served.close()
