"""W2 — online serving benchmark against a running pagedserve (or any OpenAI-compatible) server.

Requests follow W1's distribution (tools/workloads.py): prompt token ids and forced output lengths,
sent to /v1/completions with `stream: true`, `ignore_eos: true` and `max_tokens = O[i]`, arriving
as a Poisson process at `--request-rate` requests/s (`inf`: all at once). Figures, as in vLLM's
serving benchmark: TTFT, TPOT (excluding the first token), ITL and end-to-end latency as mean /
median / p99 in ms, request throughput, output tok/s and total tok/s.

Usage:
    pagedserve serve qwen3-0.6b --load-format dummy &            # in another shell
    python tools/bench_serving.py --base-url http://127.0.0.1:8000 --request-rate 16
    python tools/bench_serving.py --num-prompts 64 --request-rate inf --json

Definitions (per request): TTFT = first streamed token chunk - request sent; TPOT = (latency -
TTFT) / (output tokens - 1); ITL = every gap between consecutive token chunks (pooled over all
requests). Output tokens are the server's `usage.completion_tokens` when it sends usage, else the
number of token chunks. Greedy sampling (temperature 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.workloads import scale_requests, w1_requests  # noqa: E402


@dataclass
class RequestResult:
    prompt_len: int
    expected_output_len: int
    start: float  # perf_counter when the request was sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of each token chunk
    end: float = 0.0  # when the stream finished
    output_len: int = 0  # tokens the server reports it generated
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None and bool(self.chunk_times)


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
    latencies = [r.end - r.start for r in ok]
    tpots = [(r.end - r.chunk_times[0]) / (r.output_len - 1) for r in ok if r.output_len > 1]
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


async def send_request(client, url: str, model: str, prompt: list[int], max_tokens: int,
                       t0: float) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(len(prompt), max_tokens, time.perf_counter() - t0)
    num_chunks, usage_tokens = 0, None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                # A chunk with a choice carries newly generated tokens (text may be "" for a
                # token that ends mid-character); usage-only chunks carry none.
                if chunk.get("choices"):
                    result.chunk_times.append(time.perf_counter() - t0)
                    num_chunks += 1
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    result.end = time.perf_counter() - t0
    result.output_len = usage_tokens if usage_tokens is not None else num_chunks
    return result


async def run_benchmark(base_url: str, model: str | None, prompts: list[list[int]],
                        output_lens: list[int], request_rate: float, seed: int = 0,
                        timeout_s: float = 3600.0, transport=None) -> dict:
    """`transport`: an httpx transport to use instead of the network (tests)."""
    import httpx  # the test extra; only this tool needs it

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits,
                                 transport=transport) as client:
        if model is None:
            listing = (await client.get("/v1/models")).raise_for_status().json()
            model = listing["data"][0]["id"]
        offsets = arrival_offsets(len(prompts), request_rate, seed)
        t0 = time.perf_counter()

        async def delayed(i: int) -> RequestResult:
            await asyncio.sleep(max(0.0, offsets[i] - (time.perf_counter() - t0)))
            return await send_request(client, "/v1/completions", model, prompts[i],
                                      output_lens[i], t0)

        results = await asyncio.gather(*(delayed(i) for i in range(len(prompts))))
        duration = time.perf_counter() - t0
    metrics = compute_metrics(list(results), duration)
    metrics.update(model=model, base_url=base_url, request_rate=request_rate,
                   num_prompts=len(prompts))
    errors = [r.error for r in results if r.error]
    if errors:
        metrics["first_error"] = errors[0]
    return metrics


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
    if "first_error" in m:
        lines.append(f"first error: {m['first_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="req/s; inf: all at once")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink prompt/output lengths")
    ap.add_argument("--vocab-size", type=int, default=None, help="fold prompt ids below this")
    ap.add_argument("--seed", type=int, default=0, help="seed of W1 and of the arrival process")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout (s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    prompts, output_lens = w1_requests(args.num_prompts, args.seed)
    if args.scale != 1.0 or args.vocab_size:
        prompts, output_lens = scale_requests(prompts, output_lens, args.scale, args.vocab_size)
    metrics = asyncio.run(run_benchmark(args.base_url.rstrip("/"), args.model, prompts,
                                        output_lens, args.request_rate, args.seed, args.timeout))
    print(json.dumps(metrics) if args.json else format_report(metrics))
    return metrics


if __name__ == "__main__":
    main()
