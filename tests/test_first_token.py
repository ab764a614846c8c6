"""Where a first token waits (server/timeline.py, tools/ttft_stages.py): every stage of a streamed
request is stamped, in order, on one clock across the client, the API and the engine-core
processes; the core answers a request before the step that runs it; an idle core wakes on a
request at once rather than on its next poll timeout."""

import asyncio
import math
import time
import types

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from conftest import tiny_server_core  # noqa: E402
from test_server import Server  # noqa: E402

from engine.core.outputs import EngineCoreRequest  # noqa: E402
from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.core_client import MPClient  # noqa: E402
from engine.core_process import IDLE_POLL_MS  # noqa: E402
from engine.model.config import EngineConfig  # noqa: E402
from server.app import create_app  # noqa: E402
from tools.bench_serving import run_benchmark  # noqa: E402
from tools.ttft_stages import INTERVALS, TOTALS  # noqa: E402

TINY = dict(max_model_len=256, max_num_seqs=8, num_kv_blocks=128)


def test_every_stage_of_a_first_token_is_stamped_in_order():
    make_core = tiny_server_core(text=False, **TINY)
    prompts = [[5 + i] * (20 + 7 * i) for i in range(6)]
    with Server(create_app(served_model_name="tiny", make_core=make_core)) as server:
        metrics = asyncio.run(run_benchmark(server.url, "tiny", prompts, [4] * 6,
                                            request_rate=50.0, stages=True))
        timeline = httpx.get(server.url + "/debug/first_token").json()
    assert metrics["completed"] == 6
    records = [dict(zip(timeline["stages"], stamps, strict=True))
               for stamps in timeline["requests"].values()]
    assert len(records) == 6
    way = ("arrived", "tokenized", "sent", "received", "scheduled", "launched", "sampled",
           "core_sent", "api_received", "first_chunk")
    for t in records:
        assert None not in t.values(), t
        # NOTE: `scheduled` is the core's time.time() moved to time.monotonic(); a few
        # microseconds of slack cover the two clock reads that move it.
        for a, b in zip(way, way[1:], strict=False):
            assert t[a] <= t[b] + (1e-5 if "scheduled" in (a, b) else 0.0), (a, b, t)
        assert t["sent"] <= t["accepted"] <= t["first_chunk"]
    # The tool joined every request with its server stamps; no interval is negative or missing.
    stages = metrics["stages"]
    assert stages["num_requests"] == 6
    for name, *_ in INTERVALS + TOTALS:
        s = stages["stages"][name]
        assert s["count"] == 6 and s["median"] >= -0.01, (name, s)
    # The legs add up to the client's TTFT (medians do not add; means do).
    legs = sum(stages["stages"][name]["mean"] for name, *_ in INTERVALS)
    assert math.isclose(legs, stages["stages"]["ttft"]["mean"], rel_tol=1e-6)


def _read_until(client: MPClient, request_id: str, timeout: float = 30.0) -> list:
    """The core's messages up to the one that finishes `request_id`."""
    messages, deadline = [], time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"{request_id} did not finish"
        message = client.get_output_nowait()
        if message is None:
            client._outputs.poll(50)
            continue
        messages.append(message)
        if any(o.request_id == request_id and o.finish_reason for o in message.outputs):
            return messages


def test_the_core_answers_before_its_step_and_wakes_at_once_when_idle():
    client = MPClient(EngineConfig(device="numpy"), make_core=tiny_server_core(text=False, **TINY))
    client.start()
    try:
        client.wait_ready()
        for i in range(4):
            time.sleep(0.3)  # the core idles, waiting on its socket
            request_id = f"r{i}"
            sent = time.monotonic()
            client.add_request(EngineCoreRequest(request_id, [3, 4, 5, 6 + i],
                                                 SamplingParams(max_tokens=2, ignore_eos=True),
                                                 time.time()))
            messages = _read_until(client, request_id)
            accepted = next(k for k, m in enumerate(messages) if request_id in m.accepted)
            first = next(k for k, m in enumerate(messages)
                         if any(o.request_id == request_id for o in m.outputs))
            assert accepted < first, "the accept waited for the step"
            (stamps,) = [s for s in messages[first].first_token_times if s[0] == request_id]
            received = stamps[1]
            # Woken by the socket, not by the poll timeout (IDLE_POLL_MS): a timer would take
            # 250 ms on average; four wakes all under 200 ms by chance: 0.4 ** 4 = 2.6%.
            assert IDLE_POLL_MS >= 500
            assert received - sent < 0.2, f"the idle core took {received - sent:.3f} s to wake"
    finally:
        client.shutdown()


def test_first_tokens_are_handed_out_ahead_of_the_other_outputs():
    from engine.core.outputs import EngineCoreOutputs, SeqOutput
    from engine.output_processor import OutputProcessor
    from server.async_engine import AsyncEngine

    engine = AsyncEngine(EngineConfig())
    engine.processor = OutputProcessor(None)
    engine.client = types.SimpleNamespace(add_request=lambda r: None)
    handed = []

    async def main():
        groups = {}
        for request_id in ("old-a", "old-b", "new"):
            groups[request_id] = group = engine.group()
            group.put = lambda out: handed.append(out.request_id)
            task = asyncio.create_task(group.add(request_id, {"prompt_token_ids": [1, 2]},
                                                 SamplingParams(max_tokens=8)))
            await asyncio.sleep(0)
            engine._handle(EngineCoreOutputs(accepted=[request_id]))
            await task
        engine._handle(EngineCoreOutputs([SeqOutput(r, 0, [5], None, 0.0, None, None)
                                          for r in ("old-a", "old-b")]))
        handed.clear()
        # One step's outputs, the new request's first token last among them.
        engine._handle(EngineCoreOutputs(
            [SeqOutput(r, 0, [6], None, 0.0, None, None) for r in ("old-a", "old-b", "new")],
            first_token_times=[("new", 0.0, 0.0, 0.0, 0.0)]))

    asyncio.run(main())
    assert handed == ["new", "old-a", "old-b"]


def test_the_api_reader_sleeps_while_idle_and_wakes_at_once_on_a_message():
    """get_output_async watches the socket's descriptor while nothing is queued: no CPU spent
    waiting, and a message wakes it at once."""
    client = MPClient(EngineConfig(device="numpy"), make_core=tiny_server_core(text=False, **TINY))
    client.start()

    async def main():
        client.attach()
        first = await asyncio.wait_for(client.get_output_async(), 5)
        assert first.stats.num_running == 0  # the core's stats as it starts idling
        reader = asyncio.create_task(client.get_output_async())
        cpu = time.process_time()
        await asyncio.sleep(0.3)  # the core idles; so must the reader
        idle_cpu = time.process_time() - cpu
        assert not reader.done()
        sent = time.monotonic()
        client.add_request(EngineCoreRequest("r", [3, 4, 5], SamplingParams(max_tokens=2),
                                             time.time()))
        message = await asyncio.wait_for(reader, 5)
        return idle_cpu, time.monotonic() - sent, message

    try:
        client.wait_ready()
        idle_cpu, woke_after, message = asyncio.run(main())
    finally:
        client.shutdown()
    assert message.accepted == ["r"]
    assert idle_cpu < 0.1, f"the waiting reader spent {idle_cpu:.3f} s of CPU in 0.3 s"
    assert woke_after < 0.2, f"the reader took {woke_after:.3f} s to wake"
