"""W2 — online serving benchmark against a running pagedserve (or any OpenAI-compatible) server.

Requests follow W1's distribution (tools/workloads.py): prompt token ids and forced output lengths,
sent to /v1/completions with `stream: true`, `ignore_eos: true` and `max_tokens = O[i]`, arriving
as a Poisson process at `--request-rate` requests/s (`inf`: all at once), after a warm-up of
`--num-warmups` (2) short requests, salted apart in the prefix cache and not counted. Figures,
as in vLLM's serving benchmark: TTFT, TPOT (excluding the first token), ITL and end-to-end
latency as mean / median / p99 in ms, request throughput, output tok/s and total tok/s.

Usage:
    pagedserve serve qwen3-0.6b --load-format dummy &            # in another shell
    python tools/bench_serving.py --base-url http://127.0.0.1:8000 --request-rate 16
    python tools/bench_serving.py --num-prompts 64 --request-rate inf --json

With the dashboard open (issue 15: the engine must lose <= 1% of W1 with it): `--dashboard-clients
N` keeps N SSE connections to /dashboard/events open for the whole run, reading and counting the
snapshots (a feed ends every 15 s and is reopened, as the page does); `--dashboard-compare` runs W1
in alternating passes with the dashboard closed and open (`--passes` of each, on the same server,
after a short warm-up) and prints open / closed output tok/s. Each pass changes the first token
of every prompt, so no pass reuses another's prefix-cache blocks and all do the same work.

    python tools/bench_serving.py --dashboard-clients 4 --dashboard-compare --json

Definitions (per request): TTFT = first streamed token chunk - request sent; latency = last token
chunk - request sent (as vLLM's: the usage chunk and [DONE] after it do not count); TPOT =
(latency - TTFT) / (output tokens - 1); ITL = every gap between consecutive token chunks
(pooled over all requests). Output tokens are the server's `usage.completion_tokens` when it
sends usage, else the number of token chunks. Greedy sampling (temperature 0). The streams go
through tools/sse_client.py (its docstring says why not httpx); httpx reads the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.sse_client import SSEClient  # noqa: E402
from tools.ttft_stages import format_stages, stage_breakdown  # noqa: E402
from tools.workloads import (  # noqa: E402
    count_arg,
    nonnegative_arg,
    positive_arg,
    rate_arg,
    scale_arg,
    scale_requests,
    w1_requests,
)


@dataclass
class RequestResult:
    prompt_len: int
    expected_output_len: int
    start: float  # perf_counter when the request was sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of each token chunk
    end: float = 0.0  # when the stream finished (after its usage chunk and [DONE])
    output_len: int = 0  # tokens the server reports it generated
    error: str | None = None
    call_id: str | None = None  # the server's id of the call (`id` of its chunks)
    sent_at: float = 0.0  # time.monotonic() when sent, and when its first token chunk came
    first_at: float = 0.0  # (--stages lines them up with the server's stamps on one host)

    @property
    def success(self) -> bool:
        return self.error is None and bool(self.chunk_times)


_decode = msgspec.json.decode  # ~4x json.loads on a chunk: the client reads thousands a second


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    ms = np.asarray(values, dtype=np.float64) * 1000.0
    return {"mean": float(ms.mean()), "median": float(np.median(ms)),
            "p99": float(np.percentile(ms, 99))}


def compute_metrics(results: list[RequestResult], duration_s: float) -> dict:
    """Serving figures from per-request timestamps (seconds); latencies come back in ms."""
    ok = [r for r in results if r.success]
    ttfts = [r.chunk_times[0] - r.start for r in ok]
    # vLLM's latency ends at the last token chunk, not at the stream's end (its usage chunk and
    # [DONE] come after): TPOT = (latency - TTFT) / (output tokens - 1)
    latencies = [r.chunk_times[-1] - r.start for r in ok]
    tpots = [(r.chunk_times[-1] - r.chunk_times[0]) / (r.output_len - 1)
             for r in ok if r.output_len > 1]
    itls = [b - a for r in ok for a, b in zip(r.chunk_times[:-1], r.chunk_times[1:], strict=True)]
    output_tokens = sum(r.output_len for r in ok)
    prompt_tokens = sum(r.prompt_len for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "expected_output_tokens": sum(r.expected_output_len for r in ok),
        "request_throughput": len(ok) / duration_s,
        "output_tok_s": output_tokens / duration_s,
        "total_tok_s": (prompt_tokens + output_tokens) / duration_s,
        "ttft_ms": _stats_ms(ttfts),
        "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms(itls),
        "e2e_latency_ms": _stats_ms(latencies),
    }


def arrival_offsets(num: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times (s after start) of a Poisson process at `request_rate`; all zero for inf."""
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {request_rate}")
    if np.isinf(request_rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, num)  # (num,)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()


async def send_request(client: SSEClient, path: str, model: str, prompt: list[int],
                       max_tokens: int, t0: float, timeout_s: float = 3600.0,
                       cache_salt: str | None = None) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if cache_salt:  # vLLM's field: no prefix-cache hit on an earlier run's blocks
        body["cache_salt"] = cache_salt
    result = RequestResult(len(prompt), max_tokens, time.perf_counter() - t0,
                           sent_at=time.monotonic())
    try:
        await asyncio.wait_for(_stream(client, path, json.dumps(body).encode(), result, t0),
                               timeout_s)
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    result.end = time.perf_counter() - t0
    return result


async def _stream(client: SSEClient, path: str, body: bytes, result: RequestResult,
                  t0: float) -> None:
    response = await client.post(path, body)
    if response.status_code != 200:
        text = (await response.read()).decode(errors="replace")
        result.error = f"HTTP {response.status_code}: {text[:200]}"
        return
    usage_tokens = None
    async for line in response.lines():  # read to the end: the connection is reused
        data = line[5:].strip()
        if not line.startswith("data:") or data == "[DONE]":
            continue
        chunk = _decode(data)
        if chunk.get("error") and result.error is None:  # the server failed it mid-stream
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            result.error = f"stream error: {message}"[:300]
        if chunk.get("usage"):
            usage_tokens = chunk["usage"].get("completion_tokens")
        # A chunk with a choice carries newly generated tokens (text may be "" for a token
        # that ends mid-character); usage-only chunks carry none.
        if chunk.get("choices"):
            if not result.chunk_times:
                result.first_at, result.call_id = time.monotonic(), chunk.get("id")
            result.chunk_times.append(time.perf_counter() - t0)
    # a server that sends no usage: one token a chunk
    result.output_len = len(result.chunk_times) if usage_tokens is None else usage_tokens


async def watch_dashboard(client, counts: list[int], i: int, errors: list[str]) -> None:
    """One dashboard viewer: read /dashboard/events and count its snapshots into counts[i],
    reopening the feed whenever the server ends it, until cancelled."""
    while True:
        try:
            async with client.stream("GET", "/dashboard/events") as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    errors.append(f"dashboard: HTTP {response.status_code}: {text[:200]}")
                    return
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        counts[i] += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a dropped feed is reopened, as the page does
            errors.append(f"dashboard: {type(e).__name__}: {e}")
            await asyncio.sleep(0.2)


async def run_benchmark(base_url: str, model: str | None, prompts: list[list[int]],
                        output_lens: list[int], request_rate: float, seed: int = 0,
                        timeout_s: float = 3600.0, transport=None, dashboard_clients: int = 0,
                        api_key: str | None = None, stages: bool = False,
                        cache_salt: str | None = None, warmup: int = 0) -> dict:
    """`transport`: an httpx transport to use instead of the network for everything but the
    generation requests, which go through tools/sse_client.py (tests).
    `dashboard_clients`: dashboard feeds held open (and read) while the requests run.
    `stages`: add where the first tokens waited (tools/ttft_stages.py) as "stages".
    `cache_salt`: sent with every request, so that none hits blocks an earlier run on the same
    server left in its prefix cache (W2 after W1-HTTP sends the same prompts).
    `warmup`: requests sent (and awaited) before the clock starts, not counted: the first
    `warmup` prompts cut to 16 tokens, 4 output tokens each, under a cache_salt of their own
    (so that the measured requests find none of their blocks)."""
    import httpx  # the test extra; only this tool needs it

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    streams = SSEClient(base_url, headers)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits,
                                 transport=transport, headers=headers) as client:
        if model is None:
            listing = (await client.get("/v1/models")).raise_for_status().json()
            model = listing["data"][0]["id"]
        if warmup:
            salt = f"warmup-{cache_salt}" if cache_salt else "warmup"
            await asyncio.gather(*(
                send_request(streams, "/v1/completions", model, prompt[:16], 4,
                             time.perf_counter(), timeout_s, salt)
                for prompt in prompts[:warmup]))
        snapshots, dash_errors = [0] * dashboard_clients, []
        viewers = [asyncio.create_task(watch_dashboard(client, snapshots, i, dash_errors))
                   for i in range(dashboard_clients)]
        offsets = arrival_offsets(len(prompts), request_rate, seed)
        t0 = time.perf_counter()

        async def delayed(i: int) -> RequestResult:
            await asyncio.sleep(max(0.0, offsets[i] - (time.perf_counter() - t0)))
            return await send_request(streams, "/v1/completions", model, prompts[i],
                                      output_lens[i], t0, timeout_s, cache_salt)

        try:
            results = await asyncio.gather(*(delayed(i) for i in range(len(prompts))))
            duration = time.perf_counter() - t0
        finally:
            for task in viewers:
                task.cancel()
            await asyncio.gather(*viewers, return_exceptions=True)
            await streams.close()
        if stages:
            server = (await client.get("/debug/first_token")).raise_for_status().json()
    metrics = compute_metrics(list(results), duration)
    if stages:
        metrics["stages"] = stage_breakdown(results, server)
    metrics.update(model=model, base_url=base_url, request_rate=request_rate,
                   num_prompts=len(prompts))
    if dashboard_clients:
        metrics.update(dashboard_clients=dashboard_clients,
                       dashboard_snapshots=sum(snapshots),
                       dashboard_snapshots_per_client=snapshots)
        if dash_errors:
            metrics["dashboard_first_error"] = dash_errors[0]
    errors = [r.error for r in results if r.error]
    if errors:
        metrics["first_error"] = errors[0]
    return metrics


async def compare_dashboard(base_url: str, model: str | None, prompts: list[list[int]],
                            output_lens: list[int], request_rate: float, clients: int,
                            passes: int, seed: int = 0, timeout_s: float = 3600.0,
                            api_key: str | None = None) -> dict:
    """W1 with the dashboard closed and open, in alternating passes on the same server: each
    pass's figures, and the ratio of the open passes' mean output tok/s to the closed ones'."""
    kw = dict(seed=seed, timeout_s=timeout_s, api_key=api_key)

    def fresh(first: int) -> list[list[int]]:
        # A first token of its own per pass: no pass hits another's prefix-cache blocks.
        return [[first] + prompt[1:] for prompt in prompts]

    # warm-up: kernels compiled, connections open
    await run_benchmark(base_url, model, fresh(99)[:8], [8] * min(8, len(prompts)),
                        float("inf"), **kw)
    runs: dict[int, list[dict]] = {0: [], clients: []}
    for p in range(passes):
        for n in (0, clients):
            runs[n].append(await run_benchmark(base_url, model, fresh(100 + 2 * p + bool(n)),
                                               output_lens, request_rate,
                                               dashboard_clients=n, **kw))
    closed = [r["output_tok_s"] for r in runs[0]]
    opened = [r["output_tok_s"] for r in runs[clients]]
    return {"closed": runs[0], "dashboard": runs[clients], "passes": passes,
            "dashboard_clients": clients,
            "dashboard_snapshots": sum(r["dashboard_snapshots"] for r in runs[clients]),
            "closed_output_tok_s": float(np.mean(closed)),
            "dashboard_output_tok_s": float(np.mean(opened)),
            "dashboard_over_closed": float(np.mean(opened) / np.mean(closed))}


def format_report(m: dict) -> str:
    lines = [
        f"model {m['model']} at {m['base_url']}, {m['num_prompts']} requests, "
        f"rate {m['request_rate']} req/s",
        f"completed {m['completed']}  failed {m['failed']}  duration {m['duration_s']:.2f} s",
        f"output tokens {m['output_tokens']} (expected {m['expected_output_tokens']})",
        f"request throughput {m['request_throughput']:.2f} req/s   "
        f"output {m['output_tok_s']:.1f} tok/s   total {m['total_tok_s']:.1f} tok/s",
        f"{'ms':<14}{'mean':>10}{'median':>10}{'p99':>10}",
    ]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        s = m[key]
        lines.append(f"{key[:-3]:<14}{s['mean']:>10.2f}{s['median']:>10.2f}{s['p99']:>10.2f}")
    if "dashboard_clients" in m:
        lines.append(f"dashboard open: {m['dashboard_clients']} SSE clients read "
                     f"{m['dashboard_snapshots']} snapshots")
    if "first_error" in m:
        lines.append(f"first error: {m['first_error']}")
    if "stages" in m:
        lines.append(format_stages(m["stages"]))
    return "\n".join(lines)


def format_comparison(m: dict) -> str:
    lines = []
    for name in ("closed", "dashboard"):
        for i, r in enumerate(m[name]):
            lines += [f"-- pass {i + 1}, dashboard {'open' if name == 'dashboard' else 'closed'}:",
                      format_report(r)]
    lines.append(f"dashboard open / closed output tok/s = {m['dashboard_output_tok_s']:.1f} / "
                 f"{m['closed_output_tok_s']:.1f} = {m['dashboard_over_closed']:.2%} "
                 f"({m['dashboard_clients']} clients read {m['dashboard_snapshots']} snapshots; "
                 f"issue 15: >= 99%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000",
                    help="the server (default http://127.0.0.1:8000)")
    ap.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    ap.add_argument("--num-prompts", type=count_arg, default=256,
                    help="requests drawn (default 256: W1)")
    ap.add_argument("--request-rate", type=rate_arg, default=float("inf"),
                    help="req/s; inf: all at once")
    ap.add_argument("--scale", type=scale_arg, default=1.0,
                    help="shrink prompt/output lengths, in (0, 1]")
    ap.add_argument("--vocab-size", type=count_arg, default=None, help="fold prompt ids below this")
    ap.add_argument("--seed", type=int, default=0, help="seed of W1 and of the arrival process")
    ap.add_argument("--timeout", type=positive_arg, default=3600.0, help="per-request timeout (s)")
    ap.add_argument("--api-key", default=None, help="sent as a Bearer token")
    ap.add_argument("--num-warmups", type=nonnegative_arg, default=2,
                    help="short requests sent before the clock starts (as bench_throughput's "
                         "warm-up and vLLM's test prompt), not counted; 0: none")
    ap.add_argument("--cache-salt", default=None,
                    help="cache_salt of every request: no prefix-cache hits on an earlier run's "
                         "prompts (the same W1 draw) on the same server")
    ap.add_argument("--dashboard-clients", type=nonnegative_arg, default=0,
                    help="hold N dashboard feeds (/dashboard/events) open during the run")
    ap.add_argument("--dashboard-compare", action="store_true",
                    help="alternate passes with the dashboard closed and open; print the ratio")
    ap.add_argument("--passes", type=count_arg, default=2, help="--dashboard-compare: of each")
    ap.add_argument("--stages", action="store_true",
                    help="also report where first tokens waited (stage by stage, from the "
                         "server's GET /debug/first_token)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    prompts, output_lens = w1_requests(args.num_prompts, args.seed)
    if args.scale != 1.0 or args.vocab_size:
        prompts, output_lens = scale_requests(prompts, output_lens, args.scale, args.vocab_size)
    base_url = args.base_url.rstrip("/")
    if args.dashboard_compare:
        if args.dashboard_clients < 1:
            ap.error("--dashboard-compare needs --dashboard-clients >= 1")
        metrics = asyncio.run(compare_dashboard(
            base_url, args.model, prompts, output_lens, args.request_rate,
            args.dashboard_clients, args.passes, args.seed, args.timeout, args.api_key))
        print(json.dumps(metrics) if args.json else format_comparison(metrics))
        return metrics
    metrics = asyncio.run(run_benchmark(base_url, args.model, prompts, output_lens,
                                        args.request_rate, args.seed, args.timeout,
                                        dashboard_clients=args.dashboard_clients,
                                        api_key=args.api_key, stages=args.stages,
                                        cache_salt=args.cache_salt,
                                        warmup=args.num_warmups))
    print(json.dumps(metrics) if args.json else format_report(metrics))
    return metrics


if __name__ == "__main__":
    # a run whose requests failed measured something else than W1: exit 1, for the scripts
    # that run it (the report above names the first error)
    raise SystemExit(1 if main().get("failed") else 0)
