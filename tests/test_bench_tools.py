"""The benchmark tools: W1's draw, the roofline, and each tool end to end on a tiny numpy model."""

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not an installed package

from engine.model.config import ModelConfig  # noqa: E402
from tools import (  # noqa: E402
    b1_gap,
    bench_serving,
    bench_throughput,
    idle_report,
    module_settings,
    seed_table,
)
from tools.bench_serving import RequestResult, compute_metrics  # noqa: E402
from tools.workloads import (  # noqa: E402
    decode_steps,
    kv_bytes_per_token,
    roofline,
    scale_requests,
    w1_requests,
)

TINY_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
    "tie_word_embeddings": True, "eos_token_id": 1,
}
TINY_ARGS = ["--device", "cpu", "--load-format", "dummy", "--num-prompts", "6",
             "--scale", "0.05", "--no-warmup", "--json"]


@pytest.fixture
def tiny_model(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(tmp_path)


# ---- W1 and the roofline -----------------------------------------------------------------------


def test_w1_draw():
    prompts, output_lens = w1_requests()
    assert len(prompts) == len(output_lens) == 256
    assert sum(output_lens) == 148_756
    assert all(100 <= len(p) <= 1024 for p in prompts)
    assert all(100 <= o <= 1024 for o in output_lens)
    assert all(0 <= t < 10000 for p in prompts for t in p)
    # W1's draw order: P, then O, then the prompts one by one.
    rng = np.random.default_rng(0)
    lens = rng.integers(100, 1025, 256)
    rng.integers(100, 1025, 256)
    assert [len(p) for p in prompts] == lens.tolist()
    assert prompts[0] == rng.integers(0, 10000, int(lens[0])).tolist()


def test_scale_requests_folds_and_shrinks():
    prompts, outs = scale_requests([[600, 3, 4, 5]], [10], 0.5, vocab_size=512)
    assert prompts == [[88, 3]] and outs == [5]
    with pytest.raises(ValueError, match="scale"):
        scale_requests([[1]], [1], 0.0)


@pytest.mark.parametrize("preset,expected", [("qwen3-0.6b", 37_100), ("llama3-8b", 18_400)])
def test_roofline_matches_workloads_md(preset, expected):
    prompts, output_lens = w1_requests()
    r = roofline(ModelConfig.from_preset(preset), [len(p) for p in prompts], output_lens)
    assert r["output_tok_s"] == pytest.approx(expected, rel=0.02)
    assert r["bound"] == "memory"
    assert r["decode_steps"] == max(output_lens) == 1021


def test_roofline_by_hand():
    c = ModelConfig.from_dict(TINY_CONFIG)
    r = roofline(c, [2], [3], dtype_bytes=2, flops=1e6, bandwidth=1e6)
    n = c.num_linear_params()
    kv = 2 * 2 * 2 * 16 * 2  # K and V x layers x kv_heads x head_dim x bf16
    assert kv_bytes_per_token(c) == kv
    # Tokens at positions 0..4 attend to 1..5 tokens; outputs 0..2 read contexts 2, 3, 4.
    assert r["flops"] == 2 * n * 5 + 4 * 2 * 4 * 16 * 15
    weights = 2 * (n + 2 * 2 * 64 + 64 + 2 * 2 * 16)  # tied embedding; norms incl. q/k norms
    assert r["bytes"] == 3 * weights + (2 + 3 + 4) * kv + 5 * kv
    assert r["output_tok_s"] == pytest.approx(3 / max(r["flops"], r["bytes"]) * 1e6)


def test_decode_steps_fills_free_slots_in_order():
    assert decode_steps([5, 2, 4], 256) == 5
    assert decode_steps([3, 1, 1, 5], 2) == 7  # slots free at 3, 1 -> 2 -> 3; last starts at 2
    assert decode_steps([4, 4, 4], 1) == 12


# ---- the tools end to end on numpy -------------------------------------------------------------


def test_bench_throughput_end_to_end(tiny_model, capsys):
    result = bench_throughput.main(["--model", tiny_model, *TINY_ARGS])
    _, expected = scale_requests(*w1_requests(6), 0.05, vocab_size=512)
    assert result["output_tokens"] == result["requested_output_tokens"] == sum(expected)
    assert result["num_prompts"] == 6 and result["device"] == "numpy"
    # All requests fit at once, so the engine takes exactly the roofline's step count.
    assert result["num_steps"] == max(expected)
    assert result["output_tok_s"] == pytest.approx(result["output_tokens"] / result["wall_s"])
    assert 0 < result["gpu_busy_steady_fraction"] <= 1 and 0 < result["gpu_busy_fraction"] < 1
    assert result["async_scheduling"] is False  # numpy's default
    overlapped = bench_throughput.main(["--model", tiny_model, *TINY_ARGS, "--async-scheduling"])
    for r in (result, overlapped):  # every launched step once, every prompt token in one
        kinds = r["gpu_time_by_step_kind"]
        assert sum(k["steps"] for k in kinds) == r["num_steps"]
        assert sum(k["prompt_tokens"] for k in kinds) == r["prompt_tokens"]
        assert sum(k["gpu_s"] for k in kinds) == pytest.approx(r["gpu_busy_fraction"] * r["wall_s"])
    assert overlapped["async_scheduling"] is True
    assert overlapped["num_steps"] == result["num_steps"]
    assert overlapped["output_tokens"] == result["output_tokens"]
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == result


def test_bench_throughput_energy_is_the_counters_difference_over_the_run(tiny_model, monkeypatch,
                                                                        capsys):
    from tools import nvml

    class Counter:  # NVML's counter, 1.5 J a read: two reads bracket the run
        def __init__(self, index=0):
            self.mj = 10_000

        def energy_mj(self):
            self.mj += 1_500
            return self.mj

    monkeypatch.setattr(nvml, "Nvml", Counter)
    r = bench_throughput.main(["--model", tiny_model, *TINY_ARGS, "--energy"])
    assert r["energy_j"] == pytest.approx(1.5)
    assert r["mean_w"] == pytest.approx(1.5 / r["wall_s"])
    assert r["mj_per_output_token"] == pytest.approx(1500 / r["output_tokens"])
    assert "GPU energy 2 J (NVML)" in bench_throughput.format_report(r)
    capsys.readouterr()


def test_nvml_missing_is_named(monkeypatch):
    from tools import nvml

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(nvml.ctypes, "CDLL", no_library)
    with pytest.raises(RuntimeError, match="NVML is not available here"):
        nvml.Nvml()


def test_step_kinds_groups_device_time():
    kinds = bench_throughput.step_kinds([1.0, 0.5, 0.25, 0.25, 2.0, 9.0],
                                        [300, 0, 0, 0, 0, 7], [256, 256, 64, 1, 193, 3])
    assert kinds == [
        {"kind": "with prompt tokens", "steps": 2, "gpu_s": 10.0, "prompt_tokens": 307},
        {"kind": "decode 193+ seqs", "steps": 2, "gpu_s": 2.5, "prompt_tokens": 0},
        {"kind": "decode 1-64 seqs", "steps": 2, "gpu_s": 0.5, "prompt_tokens": 0},
    ]


def test_idle_gaps_and_what_the_host_did_in_them():
    # Device spans (seconds after the origin): idle 1 ms first, 2 ms before step 2, none before
    # step 3 (it overlaps step 2), 0.05 ms before step 4.
    spans = [(0.001, 0.010), (0.012, 0.020), (0.019, 0.030), (0.03005, 0.031)]
    assert idle_report.idle_gaps(spans) == [(0, 0.0, 0.001), (1, 0.010, 0.012),
                                            (3, 0.030, 0.03005)]
    origin = 100.0  # the host's clock when the origin event ran
    ev = idle_report.HostEvent
    events = [ev("phase", "launch 2", 100.0095, 100.0125), ev("gc", "generation 2", 100.0101,
                                                              100.0111),
              ev("device alloc", "64.0 MiB", 100.020, 100.021)]  # inside no gap
    r = idle_report.idle_report(spans, events, origin, top=2,
                                step_labels=["a", "b", "c", "d"])
    assert r["idle_before_first_s"] == pytest.approx(0.001)
    assert r["idle_between_s"] == pytest.approx(0.00205)
    assert r["gaps_by_size"]["1-10 ms"] == {"count": 1, "s": pytest.approx(0.002)}
    assert r["gaps_by_size"]["5-100 us"] == {"count": 1, "s": pytest.approx(5e-5)}
    # The two longest gaps, in step order, with the host records that overlap each (clipped).
    assert [(g["step"], g["what"]) for g in r["longest"]] == [(0, "a"), (1, "b")]
    assert r["longest"][0]["host"] == []
    host = {h["label"]: h for h in r["longest"][1]["host"]}
    assert set(host) == {"launch 2", "generation 2"}
    assert host["launch 2"]["ms"] == pytest.approx(2.0) and host["launch 2"]["whole_ms"] == (
        pytest.approx(3.0))
    assert host["generation 2"]["ms"] == pytest.approx(1.0)
    assert r["host_totals"] == {"gc": {"count": 1, "s": pytest.approx(0.001)},
                                "device alloc": {"count": 1, "s": pytest.approx(0.001)}}
    lines = idle_report.format_idle(r)
    assert lines[0].startswith("device idle: 1.0 ms before the first step, 2.1 ms between")
    assert "before step 2 (b): 2.00 ms idle; host: launch 2 2.00 of 3.00 ms; gc generation 2" \
        in lines[-1]


def test_bench_throughput_idle_finds_a_collection_between_steps(tiny_model, monkeypatch):
    # A full collection forced at the start of every 5th launch (before the step's device work
    # begins) must appear inside the gap before that step, and the spans cover every step.
    import gc

    from engine.executor.runner import ModelRunner

    launch, calls = ModelRunner.launch, []

    def slow_launch(self, batch, *a, **kw):
        calls.append(1)
        if len(calls) % 5 == 0:
            gc.collect()
        return launch(self, batch, *a, **kw)

    monkeypatch.setattr(ModelRunner, "launch", slow_launch)
    result = bench_throughput.main(["--model", tiny_model, *TINY_ARGS, "--idle", "100"])
    idle = result["idle"]
    gaps = {g["step"]: g for g in idle["longest"]}
    collected = [k for k, g in gaps.items() if any(h["kind"] == "gc" for h in g["host"])]
    assert collected and all((k + 1) % 5 == 0 for k in collected)
    assert idle["host_totals"]["gc"]["count"] >= len(collected)
    assert sum(v["count"] for v in idle["gaps_by_size"].values()) == result["num_steps"] - 1
    assert 0 < idle["idle_between_s"] < result["wall_s"]
    assert idle["device_s"] <= result["wall_s"]


def test_idle_trace_records_cupys_allocations_and_first_kernels(monkeypatch):
    # The cuda part of HostTrace against a stand-in for the CuPy calls it makes (the names are
    # CuPy 14's: memory_hook.MemoryHook, the pinned allocator, the default pinned pool).
    import functools
    import time
    import types

    from engine.executor.ops import cuda_kernels

    hooks, allocator = {}, []

    class MemoryHook:
        name = "base"

        def __enter__(self):
            hooks[self.name] = self

        def __exit__(self, *_):
            del hooks[self.name]

    class Pool:
        def malloc(self, size):
            if size > 4096:
                time.sleep(0.002)  # a new block: cudaHostAlloc
            return size

    pool = Pool()
    cupy = types.ModuleType("cupy")
    cupy.get_default_pinned_memory_pool = lambda: pool
    cupy.cuda = types.SimpleNamespace(memory_hook=types.SimpleNamespace(MemoryHook=MemoryHook),
                                      set_pinned_memory_allocator=allocator.append)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy.cuda)
    monkeypatch.setattr(cupy.cuda, "memory_hook", cupy.cuda.memory_hook)
    monkeypatch.setitem(sys.modules, "cupy.cuda.memory_hook", cupy.cuda.memory_hook)
    monkeypatch.setattr(cuda_kernels, "kernel", functools.cache(lambda file, name: name))

    class Runner:
        def launch(self, batch):
            cuda_kernels.kernel("a.cu", batch.name)
            return batch.name

    core = types.SimpleNamespace(runner=Runner(), ops=types.SimpleNamespace(name="cuda"))
    trace = idle_report.HostTrace(types.SimpleNamespace(core=core))
    trace._trace_cuda()
    (hook,) = hooks.values()
    hook.alloc_preprocess(device_id=0, mem_size=3 << 20)
    hook.alloc_postprocess(device_id=0, mem_size=3 << 20, mem_ptr=1)
    pinned = allocator[-1]
    assert pinned(512) == 512 and pinned(1 << 20) == 1 << 20  # answers as the pool does
    for name in ("k1", "k1", "k2"):
        assert core.runner.launch(types.SimpleNamespace(name=name, seqs=[1])) == name
    kinds = [(e.kind, e.label) for e in trace.events]
    assert kinds == [("device alloc", "3.0 MiB"), ("pinned alloc", "1024.0 KiB"),
                     ("kernel", "1 first used in launch 0"), ("kernel", "1 first used in launch 0")]
    assert trace.events[1].end - trace.events[1].start >= 0.002
    trace.stop()
    assert not hooks and allocator[-1] == pool.malloc and "launch" not in vars(core.runner)


def test_bench_throughput_can_undo_the_engines_gc_freeze(tiny_model, monkeypatch):
    import gc

    counts, run = [], bench_throughput.run_requests

    def counted(*a, **kw):
        counts.append(gc.get_freeze_count())
        return run(*a, **kw)

    monkeypatch.setattr(bench_throughput, "run_requests", counted)
    bench_throughput.main(["--model", tiny_model, *TINY_ARGS])
    assert counts[-1] > 1000  # the engine core froze its start-up objects
    bench_throughput.main(["--model", tiny_model, *TINY_ARGS, "--unfreeze-gc"])
    assert counts[-1] == 0


def test_bench_throughput_sampled(tiny_model, capsys):
    """The sampling flags reach every request and the JSON line (w1-sampled in h200_bench.sh)."""
    flags = ["--temperature", "0.8", "--top-p", "0.95", "--top-k", "50", "--min-p", "0.01",
             "--repetition-penalty", "1.1"]
    result = bench_throughput.main(["--model", tiny_model, *TINY_ARGS, *flags])
    assert result["output_tokens"] == result["requested_output_tokens"]
    assert (result["temperature"], result["top_p"], result["top_k"], result["min_p"],
            result["repetition_penalty"]) == (0.8, 0.95, 50, 0.01, 1.1)
    assert result["sampling"] == ("temperature 0.8, top_p 0.95, top_k 50, min_p 0.01, "
                                  "repetition_penalty 1.1")
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == result
    assert bench_throughput.describe_sampling({"temperature": 0.0, "top_k": 0}) == "greedy"


def test_seed_table_passes_every_sampling_flag(tiny_model, monkeypatch):
    """Both runs (static and continuous) sample as the command line says, not only with its
    temperature."""
    seen = []

    def recording(engine, prompts, output_lens, temperature=0.0, tag="w1", sampling=None,
                  **kw):
        seen.append((tag.rstrip("0123456789"), temperature, sampling))
        return real(engine, prompts, output_lens, temperature, tag=tag, sampling=sampling, **kw)

    real = seed_table.run_requests
    monkeypatch.setattr(seed_table, "run_requests", recording)
    seed_table.main(["--model", tiny_model, *TINY_ARGS, "--static-batch-size", "3",
                     "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--min-p", "0.02",
                     "--repetition-penalty", "1.2"])
    settings = {"top_p": 0.9, "top_k": 5, "min_p": 0.02, "repetition_penalty": 1.2}
    assert seen == [("static", 0.7, settings)] * 2 + [("paged", 0.7, settings)]
    with pytest.raises(SystemExit):
        seed_table.main(["--model", tiny_model, *TINY_ARGS, "--structured"])


def test_seed_table_end_to_end(tiny_model, tmp_path, capsys):
    chart = tmp_path / "table.png"
    result = seed_table.main(["--model", tiny_model, *TINY_ARGS, "--static-batch-size", "4",
                              "--chart", str(chart)])
    prompts, expected = scale_requests(*w1_requests(6), 0.05, vocab_size=512)
    static, paged = result["static"], result["paged"]
    assert static["output_tokens_per_request"] == expected
    assert paged["output_tokens_per_request"] == expected
    # Static: each batch runs for its longest request; continuous: for the longest overall.
    assert static["num_steps"] == max(expected[:4]) + max(expected[4:])
    assert paged["num_steps"] == max(expected)
    max_len = max(len(p) for p in prompts) + max(expected)
    kv = kv_bytes_per_token(ModelConfig.from_dict(TINY_CONFIG), 4)
    assert static["kv_reserved_peak_mib"] == pytest.approx(4 * max_len * kv / 2**20)
    assert 0 <= paged["kv_waste_pct"] < static["kv_waste_pct"] < 100
    assert paged["kv_used_peak_mib"] <= paged["kv_reserved_peak_mib"]
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in captured.err
    else:
        assert chart.stat().st_size > 0


# ---- bench_serving -----------------------------------------------------------------------------


def test_serving_metrics_by_hand():
    a = RequestResult(prompt_len=10, expected_output_len=3, start=0.0,
                      chunk_times=[0.5, 0.7, 1.0], end=1.0, output_len=3)
    b = RequestResult(prompt_len=20, expected_output_len=2, start=1.0,
                      chunk_times=[1.2, 1.6], end=1.7, output_len=2)
    failed = RequestResult(prompt_len=5, expected_output_len=4, start=0.0, error="HTTP 500")
    m = compute_metrics([a, b, failed], duration_s=2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["output_tokens"] == 5 and m["prompt_tokens"] == 30
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_tok_s"] == pytest.approx(2.5)
    assert m["total_tok_s"] == pytest.approx(17.5)
    # TTFT 500 and 200 ms; ITL 200, 300, 400 ms. As vLLM's benchmark, a request's latency ends
    # at its last token chunk (b's stream ended 100 ms later, with its usage and [DONE]): e2e
    # 1000 and 600 ms, TPOT (1.0-0.5)/2 = 250 and (1.6-1.2)/1 = 400 ms.
    assert m["ttft_ms"]["mean"] == pytest.approx(350)
    assert m["ttft_ms"]["median"] == pytest.approx(350)
    assert m["ttft_ms"]["p99"] == pytest.approx(200 + 0.99 * 300)
    assert m["tpot_ms"]["mean"] == pytest.approx(325)
    assert m["tpot_ms"]["p99"] == pytest.approx(250 + 0.99 * 150)
    assert m["itl_ms"]["mean"] == pytest.approx(300)
    assert m["itl_ms"]["median"] == pytest.approx(300)
    assert m["itl_ms"]["p99"] == pytest.approx(300 + 0.98 * 100)
    assert m["e2e_latency_ms"]["mean"] == pytest.approx(800)


def test_arrival_offsets():
    assert bench_serving.arrival_offsets(3, float("inf")) == [0.0, 0.0, 0.0]
    offsets = bench_serving.arrival_offsets(4000, 10.0, seed=1)
    assert offsets[0] == 0 and all(np.diff(offsets) >= 0)
    assert offsets[-1] / 3999 == pytest.approx(0.1, rel=0.05)
    with pytest.raises(ValueError, match="request_rate"):
        bench_serving.arrival_offsets(1, 0.0)


async def _canned_sse_server(seen: list, connections: list):
    """A loopback HTTP/1.1 server answering each POST (keep-alive) with max_tokens chunks of
    SSE, its chunked framing cutting events apart and joining them; 400 when max_tokens is 0."""

    async def serve(reader, writer):
        connections.append(writer)
        while request_line := await reader.readline():
            headers = {}
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            body = json.loads(await reader.readexactly(int(headers["content-length"])))
            seen.append((request_line.split()[1].decode(), headers, body))
            n = body["max_tokens"]
            if n == 0:
                error = b'{"error": "max_tokens"}'
                writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(error), error))
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            events = [{"id": "cmpl-1", "choices": [{"index": 0, "text": f"t{i}"}]}
                      for i in range(n)] + [{"id": "cmpl-1", "choices": [],
                                             "usage": {"completion_tokens": n}}]
            if n == 7:  # the engine fails it after two tokens: an error event, no usage
                events = events[:2] + [{"error": {"message": "the engine core died"}}]
            sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            data = sse.encode()
            for piece in (data[i:i + 37] for i in range(0, len(data), 37)):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def _bench_canned(prompts, max_tokens, after=None, **kwargs):
    """run_benchmark against _canned_sse_server, then `after(url)` while it still serves:
    (metrics, after's answer, the requests it saw, its connections)."""
    seen, connections = [], []

    async def main():
        server = await _canned_sse_server(seen, connections)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            m = await bench_serving.run_benchmark(url, "tiny", prompts, max_tokens,
                                                  float("inf"), **kwargs)
            return m, (await after(url) if after is not None else None)

    m, answer = asyncio.run(main())
    return m, answer, seen, connections


def test_bench_serving_parses_a_stream():
    pytest.importorskip("httpx")
    from tools.sse_client import SSEClient

    async def one_after_the_other(url):
        # the second on the connection the first left open
        client, lines = SSEClient(url), []
        for n in (2, 1):
            response = await client.post("/v1/completions", json.dumps(
                {"prompt": [1], "max_tokens": n}).encode())
            lines.append([line async for line in response.lines() if line])
        await client.close()
        return lines

    m, lines, seen, connections = _bench_canned([[1, 2, 3], [4, 5], [6]], [3, 2, 0],
                                                one_after_the_other, api_key="k")
    assert m["model"] == "tiny" and m["completed"] == 2 and m["failed"] == 1
    assert m["first_error"] == 'HTTP 400: {"error": "max_tokens"}'
    assert m["output_tokens"] == m["expected_output_tokens"] == 5
    assert sorted(b["prompt"] for _, _, b in seen[:3]) == [[1, 2, 3], [4, 5], [6]]
    assert all(path == "/v1/completions" and b["stream"] and b["ignore_eos"]
               for path, _, b in seen[:3])
    assert seen[0][1]["authorization"] == "Bearer k"
    assert len(connections) == 3 + 1
    assert [len(x) for x in lines] == [4, 3] and lines[0][0].startswith('data: {"id"')
    assert lines[0][-1] == lines[1][-1] == "data: [DONE]"


def test_bench_serving_counts_a_stream_that_fails_midway_as_failed():
    pytest.importorskip("httpx")
    m, _, _, _ = _bench_canned([[1], [2]], [7, 3])
    assert (m["completed"], m["failed"]) == (1, 1)
    assert m["first_error"] == "stream error: the engine core died"
    assert m["output_tokens"] == 3


def test_bench_serving_warms_up_first_and_salts_the_warm_up_apart():
    """As bench_throughput (W1 offline) and vLLM's benchmark (its test prompt), the command runs
    a warm-up before the clock: W1-HTTP's share of W1 compares two warmed runs. The warm-up is
    not counted, and its blocks are salted apart from the measured prompts'."""
    pytest.importorskip("httpx")
    seen, connections = [], []

    async def main():  # the command in a thread of its own (it runs its own event loop)
        server = await _canned_sse_server(seen, connections)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            return await asyncio.to_thread(bench_serving.main, [
                "--base-url", url, "--model", "tiny", "--num-prompts", "3", "--scale", "0.03",
                "--json"])

    m = asyncio.run(main())
    prompts, outs = scale_requests(*w1_requests(3), 0.03)
    assert m["completed"] == 3 and m["output_tokens"] == sum(outs)
    bodies = [b for _, _, b in seen]
    warm, measured = bodies[:-3], bodies[-3:]
    assert warm, "no warm-up before the measured requests"
    assert sorted(b["prompt"] for b in measured) == sorted(prompts)
    assert all(b.get("cache_salt") for b in warm)
    assert all(b.get("cache_salt") != warm[0]["cache_salt"] for b in measured)


def test_bench_latency_counts_tokens_not_steps(monkeypatch):
    """A step that brings several tokens (verified drafts) counts each: TPOT per token."""
    from types import SimpleNamespace

    from tools import bench_latency

    clock = [0.0]  # each step takes 10 ms
    monkeypatch.setattr(bench_latency.time, "perf_counter", lambda: clock[0])

    class FourAStep:
        def __init__(self):
            self.left = {}

        def add_request(self, request_id, prompt, params):
            self.left[request_id] = params.max_tokens

        def has_unfinished_requests(self):
            return any(self.left.values())

        def step(self):
            clock[0] += 0.01
            outs = []
            for request_id, left in self.left.items():
                n = min(4, left)
                self.left[request_id] -= n
                outs.append(SimpleNamespace(request_id=request_id, outputs=[
                    SimpleNamespace(delta_token_ids=list(range(n)))]))
            return outs

    r = bench_latency.time_requests(FourAStep(), [[1, 2, 3]], 64)
    assert r["output_tokens"] == 64  # it had counted 16 steps, and 10 ms a token
    assert r["tpot_s"] == pytest.approx(0.15 / 63)  # tokens 2..64 over 15 steps


def test_bench_latency_end_to_end(tiny_model, capsys):
    from tools import bench_latency

    result = bench_latency.main(["--model", tiny_model, "--load-format", "dummy", "--device",
                                 "numpy", "--num-kv-blocks", "32", "--prompt-len", "12",
                                 "--output-len", "5"])
    assert result["output_tokens"] == 5
    assert 0 < result["ttft_s"] and 0 < result["tpot_s"]
    assert 0 < result["cold_start_s"] < 600
    # Floor = every weight read once per token at 4.27 TB/s.
    assert result["tpot_floor_s"] > 0
    assert "TPOT" in capsys.readouterr().out


def test_bench_throughput_structured_runs_the_same_tokens_constrained(tiny_model, capsys):
    pytest.importorskip("llguidance")
    result = bench_throughput.main(["--model", tiny_model, *TINY_ARGS, "--structured"])
    free, constrained = result["unconstrained"], result["structured"]
    bounded = result["structured_bounded"]
    # The schemas never complete early: every constrained request runs to its max_tokens.
    assert (constrained["output_tokens"] == bounded["output_tokens"] == free["output_tokens"]
            == free["requested_output_tokens"])
    assert "JSON schema" in constrained["sampling"] and "maxLength" in bounded["sampling"]
    assert result["structured_over_unconstrained"] == pytest.approx(
        constrained["output_tok_s"] / free["output_tok_s"])
    assert result["bounded_over_unconstrained"] == pytest.approx(
        bounded["output_tok_s"] / free["output_tok_s"])
    assert json.loads(capsys.readouterr().out) == result


def test_synthetic_vocabulary_keeps_the_bytes_and_the_eos_ids():
    from tools.structured_workload import synthetic_tokens

    tokens = synthetic_tokens(600, [5, 599])
    assert len(tokens) == len(set(tokens)) == 600
    assert tokens[5].startswith(b"<|eos") and tokens[599].startswith(b"<|eos")
    assert {bytes([b]) for b in range(256)} <= set(tokens)


def test_bench_wire_round_trips_a_step_message(capsys):
    from tools import bench_wire

    bench_wire.main(["--num-seqs", "4", "--repeat", "2", "--logprobs"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["msgspec", "pickle5"]


def test_bench_spec_replays_the_accepted_lengths(tiny_model, capsys):
    from tools import bench_spec
    from tools.spec_workload import spec_conversations

    kinds = [kind for kind, _ in spec_conversations()]
    assert sorted(set(kinds)) == ["json", "passage", "rename"] and len(kinds) == 9
    assert bench_spec.spec_summary([1, 0, 3], 2) == {
        "k": 2, "verify_steps": 4, "no_draft_steps": 2, "acceptance_rate": 0.75,
        "mean_accepted_length": 2.5, "tokens_per_decode_step": 2.0, "hist": [1, 0, 3]}
    # Steps that drafted fewer than k tokens: the rate is over the tokens drafted.
    assert bench_spec.spec_summary([1, 0, 3], 2, draft_tokens=7)["acceptance_rate"] == 6 / 7
    result = bench_spec.main(["--model", tiny_model, "--load-format", "dummy", "--device",
                              "numpy", "--accepted-hist", "1,1,1,4", "--no-draft-steps", "2",
                              "--prompt-len", "12", "--output-len", "60"])
    achieved = result["achieved"]
    assert achieved["k"] == 3 and sum(achieved["hist"]) > 10
    # Drawn from the histogram: most steps take all three drafts.
    assert achieved["hist"][3] > achieved["hist"][0]
    assert 2.0 < achieved["mean_accepted_length"] <= 4.0
    assert achieved["no_draft_steps"] > 0
    assert result["speedup"] > 0
    assert "replayed" in capsys.readouterr().out


def test_bench_spec_sweeps_batch_sizes(tiny_model, capsys):
    from tools import bench_spec

    result = bench_spec.main(["--model", tiny_model, "--load-format", "dummy", "--device",
                              "numpy", "--accepted-hist", "0,0,0,1", "--prompt-len", "12",
                              "--output-len", "24", "--batch-sizes", "1,3"])
    rows = result["by_batch"]
    assert [row["batch"] for row in rows] == [1, 3]
    for row in rows:
        assert row["speedup"] == pytest.approx(row["spec_tok_s"] / row["plain_tok_s"])
    gains = [row["speedup"] >= bench_spec.MIN_GAIN for row in rows]
    assert result["suggested_disable_by_batch_size"] == (
        0 if not gains[0] else 1 if not gains[1] else 3)
    assert "suggested disable_by_batch_size" in capsys.readouterr().out


def test_bench_latency_context_len_sets_the_prompt_and_the_floor(tiny_model):
    from tools import bench_latency

    args = ["--model", tiny_model, "--load-format", "dummy", "--device", "numpy",
            "--num-kv-blocks", "64", "--output-len", "4"]
    short = bench_latency.main(args + ["--prompt-len", "12"])
    long = bench_latency.main(args + ["--context-len", "100"])
    assert long["prompt_len"] == 96 and long["output_tokens"] == 4
    assert long["tpot_floor_s"] > short["tpot_floor_s"]  # more KV cache to read per token


def test_bench_latency_batch_decodes_the_requests_together(tiny_model):
    from tools import bench_latency

    args = ["--model", tiny_model, "--load-format", "dummy", "--device", "numpy",
            "--num-kv-blocks", "64", "--prompt-len", "12", "--output-len", "4"]
    one = bench_latency.main(args)
    three = bench_latency.main(args + ["--batch-size", "3"])
    assert three["batch_size"] == 3 and three["output_tokens"] == 4
    assert three["tpot_floor_s"] > one["tpot_floor_s"]  # three KV caches to read per step
    with pytest.raises(SystemExit):
        bench_latency.main(args + ["--batch-size", "0"])


def test_profile_step_splits_a_speculative_step(capsys):
    from tools import profile_step

    rows = profile_step.main(["--device", "cpu", "--batch-sizes", "1", "--steps", "12",
                              "--speculative-tokens", "3", "--max-num-seqs", "4", "--json"])
    (row,) = rows
    assert set(profile_step.PHASES + ("propose", "forward")) <= set(row)
    assert row["forward"] > 0 and row["propose"] > 0
    # the replayed profile accepts drafts: more than one token per step at batch 1
    assert row["batch"] == 1 and row["tokens_per_step"] > 1.2
    host = sum(row[k] for k in profile_step.PHASES if k != "wait") + row["propose"]
    assert host + row["forward"] + row["wait"] == pytest.approx(row["total"], rel=1e-6)
    assert json.loads(capsys.readouterr().out) == rows


def test_b1_gap_without_kinds():
    """--without's names (tools/b1_gap.py): known kinds joined by +, anything else refused."""
    assert b1_gap.without_kinds("without:attention+fp8-norm") == ["attention", "fp8-norm"]
    with pytest.raises(SystemExit, match="unknown"):
        b1_gap.without_kinds("without:attention+softmax")
    with pytest.raises(SystemExit, match="unknown"):
        b1_gap.main(["--model", "smollm2-135m", "--without", "rope+"])


def test_module_settings_spec():
    """The A/B tools' module.ATTR=value lists (tools/module_settings.py): literals parsed, commas
    inside brackets kept with their value, anything else a string, a malformed item refused."""
    assert module_settings.parse_variant(
        "cuda_attention.SPLITS=(16, 2),cuda_kernels.PDL=False , cuda_quant_gguf.GEMV3_GRID=fill"
    ) == [("cuda_attention", "SPLITS", (16, 2)), ("cuda_kernels", "PDL", False),
          ("cuda_quant_gguf", "GEMV3_GRID", "fill")]
    for bad in ("PDL=1", "cuda_kernels.PDL", "cuda_kernels.PDL="):
        with pytest.raises(SystemExit, match="module.ATTR=value"):
            module_settings.parse_variant(bad)


@pytest.mark.parametrize("tool,argv,message", [
    (bench_throughput, ["--num-prompts", "0"], "argument --num-prompts: must be >= 1, got 0"),
    (bench_throughput, ["--scale", "0"], "argument --scale: must be in (0, 1], got 0.0"),
    (seed_table, ["--num-prompts", "-3"], "argument --num-prompts: must be >= 1, got -3"),
    (bench_serving, ["--request-rate", "0"], "argument --request-rate: must be > 0 (or inf)"),
    (bench_serving, ["--num-prompts", "0"], "argument --num-prompts: must be >= 1, got 0"),
    (bench_serving, ["--scale", "1.5"], "argument --scale: must be in (0, 1], got 1.5"),
    ("bench_latency", ["--output-len", "0"], "argument --output-len: must be >= 1, got 0"),
    ("bench_latency", ["--prompt-len", "-1"], "argument --prompt-len: must be >= 1, got -1"),
])
def test_bad_counts_are_refused_at_parse(tool, argv, message, capsys, monkeypatch):
    """A zero or negative count, scale or rate is an argparse error naming the flag, before any
    model loads or server is asked (it was a ValueError traceback after the load)."""
    if isinstance(tool, str):
        tool = __import__(f"tools.{tool}", fromlist=["main"])
    monkeypatch.setattr("engine.LLM", None)  # nothing may load
    with pytest.raises(SystemExit) as e:
        tool.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_engine_and_sampling_values_end_in_one_line(tiny_model, capsys, monkeypatch):
    """What the engine refuses is one argparse-like line in the flags' names, exit status 2, not
    a traceback; the sampling flags are checked before the model loads."""
    from tools import bench_latency, bench_spec

    def load(*a, **kw):
        raise AssertionError("the model loaded before the sampling flags were checked")

    cases = [(bench_throughput, ["--model", tiny_model, *TINY_ARGS, "--max-num-seqs", "0"],
              "error: --max-num-seqs must be >= 1, got 0"),
             (bench_latency, ["--model", "no-such-preset", "--device", "cpu"],
              "error: unknown preset 'no-such-preset'; known presets:"),
             (bench_spec, ["--model", "no-such-preset", "--load-format", "dummy", "--device",
                           "cpu"], "error: unknown preset 'no-such-preset'; known presets:"),
             (seed_table, ["--model", tiny_model, *TINY_ARGS, "--temperature", "-1"],
              "error: --temperature must be >= 0, got -1.0"),
             (bench_throughput, ["--model", tiny_model, *TINY_ARGS, "--top-p", "0"],
              "error: --top-p must be in (0, 1], got 0.0")]
    for tool, argv, message in cases:
        if "--temperature" in argv or "--top-p" in argv:
            monkeypatch.setattr("engine.LLM", load)
        with pytest.raises(SystemExit) as e:
            tool.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("tool", ["gpu_check", "kernel_check", "profile_prefill_host",
                                  "energy_parts", "bench_allreduce", "tp_parity"])
def test_gpu_tools_say_so_in_one_line_without_a_gpu(tool):
    """Run where CuPy sees no GPU (or is not installed), a GPU-only tool says what is missing in
    one line (exit status 1) instead of a CuPy import traceback."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, f"tools/{tool}.py"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith(f"{tool} runs on a GPU: device 'cuda'")
    assert len(done.stderr.strip().splitlines()) == 1


def test_bench_serving_exits_1_when_its_requests_failed():
    """A run whose every request failed (no server at the URL) printed a table of NaN and ended
    with status 0, so a script running it took it for a result."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "tools/bench_serving.py", "--base-url", f"http://127.0.0.1:{port}",
         "--model", "x", "--num-prompts", "2", "--scale", "0.01", "--num-warmups", "0"],
        cwd=root, env=os.environ | {"PYTHONPATH": str(root)}, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 1
    assert "completed 0  failed 2" in done.stdout and "first error: Connect" in done.stdout


@pytest.mark.parametrize("tool, argv, message", [
    ("profile_step", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("bench_wire", ["--repeat", "0"], "argument --repeat: must be >= 1, got 0"),
    ("seed_table", ["--static-batch-size", "0"],
     "argument --static-batch-size: must be >= 1, got 0"),
    ("bench_spec", ["--num-speculative-tokens", "0"],
     "argument --num-speculative-tokens: must be >= 1, got 0"),
])
def test_more_counts_are_refused_at_parse(tool, argv, message):
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, f"tools/{tool}.py", *argv], cwd=root,
                          env=os.environ | {"PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-300:]


@pytest.mark.parametrize("tool, argv, message", [
    ("bench_spec", ["--replay", "{tmp}/nope.json"],
     "argument --replay: {tmp}/nope.json: No such file or directory"),
    ("bench_spec", ["--replay", "{tmp}/broken.json"],
     "argument --replay: {tmp}/broken.json: not JSON"),
    ("bench_spec", ["--replay", "{tmp}/other.json"],
     "argument --replay: {tmp}/other.json: not a --save-profile file"),
    ("bench_spec", ["--accepted-hist", "1,x"],
     "argument --accepted-hist: expected comma-separated integers N0,N1,..,Nk, got '1,x'"),
    ("bench_spec", ["--accepted-hist", "0,0"], "argument --accepted-hist: expected N0,N1,..,Nk"),
    ("bench_spec", ["--accepted-hist", "1,2", "--batch-sizes", "0"],
     "argument --batch-sizes: must all be >= 1, got 0 in '0'"),
    ("bench_spec", ["--accepted-hist", "1,2", "--batch-sizes", "1,x"],
     "argument --batch-sizes: expected comma-separated integers, got '1,x'"),
    ("bench_spec", ["--batch-sizes", "1,2"],
     "argument --batch-sizes: only with --replay or --accepted-hist"),
    ("bench_spec", ["--prompt-lookup-max", "0"],
     "argument --prompt-lookup-max: must be >= 1, got 0"),
    ("bench_spec", ["--prompt-lookup-min", "3", "--prompt-lookup-max", "2"],
     "argument --prompt-lookup-min: must be <= --prompt-lookup-max (2), got 3"),
    ("bench_spec", ["--no-draft-steps", "-1"], "argument --no-draft-steps: must be >= 0, got -1"),
    ("bench_spec", ["--replay", "{tmp}/profile.json", "--no-draft-steps", "3"],
     "argument --no-draft-steps: only with --accepted-hist (--replay takes the file's no-draft "
     "steps)"),
    ("bench_spec", ["--no-draft-steps", "3"],
     "argument --no-draft-steps: only with --accepted-hist"),
    ("profile_step", ["--batch-sizes", "0"],
     "argument --batch-sizes: must all be >= 1, got 0 in '0'"),
    ("profile_step", ["--batch-sizes", "1,-4"],
     "argument --batch-sizes: must all be >= 1, got -4 in '1,-4'"),
    ("profile_step", ["--batch-sizes", "1,,2"],
     "argument --batch-sizes: expected comma-separated integers, got '1,,2'"),
    ("profile_step", ["--batch-sizes", "8", "--max-num-seqs", "4"],
     "argument --batch-sizes: 8 is more than --max-num-seqs (4)"),
    ("profile_step", ["--scale", "0"], "argument --scale: must be in (0, 1], got 0.0"),
    ("profile_step", ["--speculative-tokens", "-1"],
     "argument --speculative-tokens: must be >= 0, got -1"),
    ("profile_step", ["--speculative-tokens", "2", "--spec-profile", "{tmp}/nope.json"],
     "argument --spec-profile: {tmp}/nope.json: No such file or directory"),
])
def test_spec_and_step_lists_and_files_are_refused_at_parse(tool, argv, message, tmp_path, capsys,
                                                           monkeypatch):
    """bench_spec's and profile_step's lists (--batch-sizes, --accepted-hist) and profile files
    (--replay, --spec-profile) are checked at parse: one line naming the flag, exit status 2,
    before any model loads (they were ValueError, FileNotFoundError or KeyError tracebacks)."""
    import importlib

    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"bench": "w1"}')
    (tmp_path / "profile.json").write_text('{"overall": {"hist": [1, 2], "no_draft_steps": 1}}')
    module = importlib.import_module(f"tools.{tool}")
    monkeypatch.setattr("engine.LLM", None)  # nothing may load
    monkeypatch.setattr("engine.engine.LLMEngine", None)
    with pytest.raises(SystemExit) as e:
        module.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err
    assert f"error: {message.format(tmp=tmp_path)}" in err.strip().splitlines()[-1]


def test_bench_spec_replays_a_saved_profile(tiny_model, tmp_path):
    """--replay takes the histogram and no-draft steps of a --save-profile file."""
    from tools import bench_spec

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"overall": {"hist": [1, 1, 4], "no_draft_steps": 1}}))
    assert bench_spec.spec_profile_arg(str(profile)) == ([1, 1, 4], 1)
    result = bench_spec.main(["--model", tiny_model, "--load-format", "dummy", "--device",
                              "numpy", "--replay", str(profile), "--prompt-len", "12",
                              "--output-len", "16"])
    assert result["replayed"]["hist"] == [1, 1, 4] and result["achieved"]["k"] == 2


ARGPARSE_TOOLS = ["b1_gap", "bench_allreduce", "bench_latency", "bench_serving", "bench_spec",
                  "bench_throughput", "bench_wire", "energy_parts", "gpu_check", "hammer",
                  "health_stall", "kernel_check", "make_golden", "make_tokenizer_golden",
                  "profile_kernels", "profile_ops", "profile_prefill_host", "profile_step",
                  "seed_table", "tp_parity", "ttft_stages", "vllm_compat"]


@pytest.mark.parametrize("tool", ARGPARSE_TOOLS)
def test_every_tool_flag_says_what_it_is(tool, monkeypatch):
    """Every argument of every argparse tool has a help text (argparse.SUPPRESS: hidden on
    purpose), so that --help explains the whole command line."""
    import argparse
    import importlib
    import inspect

    if tool == "make_golden":
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    module = importlib.import_module(f"tools.{tool}")

    class Parsed(Exception):
        pass

    def capture(self, args=None, namespace=None):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py"])
    with pytest.raises(Parsed) as e:
        module.main([]) if inspect.signature(module.main).parameters else module.main()
    parser = e.value.args[0]
    silent = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
              if not a.help]
    assert not silent, f"{tool}: no help= for {silent}"


@pytest.mark.parametrize("tool, argv, message", [
    ("bench_allreduce", ["--batch", "1", "0"], "argument --batch: must be >= 1, got 0"),
    ("bench_allreduce", ["--tensor-parallel-size", "0"],
     "argument --tensor-parallel-size: must be >= 1, got 0"),
    ("tp_parity", ["--num-prompts", "0"], "argument --num-prompts: must be >= 1, got 0"),
    ("tp_parity", ["--max-tokens", "-2"], "argument --max-tokens: must be >= 1, got -2"),
    ("b1_gap", ["--output-len", "0"], "argument --output-len: must be >= 1, got 0"),
    ("b1_gap", ["--repeat", "-1"], "argument --repeat: must be >= 0, got -1"),
    ("bench_latency", ["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    ("bench_latency", ["--context-len", "0"], "argument --context-len: must be >= 1, got 0"),
    ("bench_serving", ["--timeout", "0"], "argument --timeout: must be a number > 0, got 0.0"),
    ("bench_serving", ["--num-warmups", "-1"], "argument --num-warmups: must be >= 0, got -1"),
    ("bench_serving", ["--passes", "0"], "argument --passes: must be >= 1, got 0"),
    ("bench_serving", ["--vocab-size", "0"], "argument --vocab-size: must be >= 1, got 0"),
    ("bench_throughput", ["--idle", "-1"], "argument --idle: must be >= 0, got -1"),
    ("energy_parts", ["--measure", "0"], "argument --measure: must be a number > 0, got 0.0"),
    ("energy_parts", ["--warm", "-1"], "argument --warm: must be a number > 0, got -1.0"),
    ("energy_parts", ["--warm", "inf"], "argument --warm: must be a number > 0, got inf"),
    ("hammer", ["--streams", "0"], "argument --streams: must be >= 1, got 0"),
    ("hammer", ["--fuzz", "-5"], "argument --fuzz: must be >= 0, got -5"),
    ("hammer", ["--timeout", "-1"], "argument --timeout: must be a number > 0, got -1.0"),
    ("health_stall", ["--seconds", "0"], "argument --seconds: must be a number > 0, got 0.0"),
    ("health_stall", ["--mb", "nan"], "argument --mb: must be a number > 0, got nan"),
    ("profile_kernels", ["--load", "{tmp}/nope.npz"],
     "argument --load: {tmp}/nope.npz: no such file"),
    ("profile_kernels", ["--top", "0"], "argument --top: must be >= 1, got 0"),
    ("profile_ops", ["--max-steps", "0"], "argument --max-steps: must be >= 1, got 0"),
    ("gpu_check", ["--only"], "argument --only: expected one argument"),
    ("gpu_check", ["--only", "nope"], "argument --only: 'nope' is in no section's name; the "
     "sections: layers, attn, sampling, decode-step; or new"),
    ("gpu_check", ["--graphs", "--bogus"], "unrecognized arguments: --bogus"),
    ("gpu_check", ["--baseline", "{tmp}/nope.cu"],
     "argument --baseline: {tmp}/nope.cu: no such file"),
    ("kernel_check", ["--only"], "argument --only: expected one argument"),
    ("kernel_check", ["--only", "gemv,nope"],
     "argument --only: unknown 'nope' in 'gemv,nope'; choose from launches, fused, gemv,"),
    ("kernel_check", ["--small", "--bogus"], "unrecognized arguments: --bogus"),
    ("kernel_check", ["--decode1", "llama3-8b:q5"],
     "argument --decode1: unknown 'llama3-8b:q5' in 'llama3-8b:q5'; choose from qwen3-0.6b,"),
    ("kernel_check", ["--set", "PDL=1"], "argument --set: 'PDL=1': expected module.ATTR=value"),
    ("profile_prefill_host", ["--only"], "argument --only: expected one argument"),
    ("profile_prefill_host", ["--only", "micro,fwd"],
     "argument --only: unknown 'fwd' in 'micro,fwd'; choose from micro, forward, engine"),
    ("profile_prefill_host", ["--bogus"], "unrecognized arguments: --bogus"),
    ("make_tokenizer_golden", ["{tmp}/nope.gguf"], "argument gguf: {tmp}/nope.gguf: no such file"),
    ("make_tokenizer_golden", ["--bogus"], "unrecognized arguments: --bogus"),
])
def test_tool_numbers_and_files_are_refused_at_parse(tool, argv, message, tmp_path, capsys,
                                                     monkeypatch):
    """Across the tools, a count or time that must be positive, and a file that must be there,
    are argparse errors naming the flag (exit status 2) before a model loads, a GPU is looked
    for or a server is asked; they were tracebacks or runs that measured nothing."""
    import importlib

    module = importlib.import_module(f"tools.{tool}")
    monkeypatch.setattr("engine.LLM", None)  # nothing may load
    monkeypatch.setattr("engine.executor.ops.check_cuda", None)  # nor a GPU be looked for
    with pytest.raises(SystemExit) as e:
        module.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"error: {message.format(tmp=tmp_path)}" in err.strip().splitlines()[-1], err


def test_the_table_tools_name_a_missing_or_broken_file_in_one_line(tmp_path, capsys):
    from tools import bench_table, ttft_stages

    broken = tmp_path / "bench.jsonl"
    broken.write_text('{"bench": "w1"}\nnot json\n')
    for path in (tmp_path / "nope.jsonl", broken):
        with pytest.raises(SystemExit) as e:
            bench_table.main([str(path)])
        assert str(e.value).startswith(f"bench_table.py: {path}: ")
        with pytest.raises(SystemExit) as e:
            ttft_stages.main([str(path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"error: {path}: " in err and "Traceback" not in err


@pytest.mark.parametrize("tool", ["hammer", "health_stall"])
def test_the_server_tools_say_so_when_no_server_answers(tool, capsys):
    import importlib
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    module = importlib.import_module(f"tools.{tool}")
    with pytest.raises(SystemExit) as e:
        module.main(["--url", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--url http://127.0.0.1:{port}: no server answers" in err
