"""Where the first token waits: `tools/bench_serving.py --stages` joins each request's client-side
stamps (sent, first token chunk received) with the server's (GET /debug/first_token, see
server/timeline.py) and reports every stage between them as mean / p50 / p99 in ms.

The client and server stamps share time.monotonic(), so the two HTTP legs are right only when
the benchmark runs on the server's host (tools/h200_bench.sh does); the stages inside the
server are right wherever it runs.
"""

from __future__ import annotations

import math

import numpy as np

# (name, from stamp, to stamp, what it holds); "client_*" are the benchmark's own stamps.
INTERVALS = (
    ("http_in", "client_sent", "arrived", "request over HTTP, uvicorn, routing"),
    ("parse", "arrived", "tokenized", "body read, checks, tokenize"),
    ("submit", "tokenized", "sent", "output processor, encode, ADD sent"),
    ("to_core", "sent", "received", "ZeroMQ, core busy until it drains"),
    ("queued", "received", "scheduled", "until a step takes its prompt"),
    ("launch", "scheduled", "launched", "input building, launch (a step ahead, overlapped)"),
    ("step", "launched", "sampled", "device time until read, incl. the step before it"),
    ("core_out", "sampled", "core_sent", "postprocess, stats, encode"),
    ("to_api", "core_sent", "api_received", "ZeroMQ, API event loop busy"),
    ("to_chunk", "api_received", "first_chunk", "detokenize, queue, SSE chunk written"),
    ("http_out", "first_chunk", "client_first", "to the client, its parsing"),
)
TOTALS = (
    ("server", "arrived", "first_chunk", "arrived -> first chunk written"),
    ("ttft", "client_sent", "client_first", "the client's TTFT"),
    ("accept", "sent", "accepted", "ADD sent -> the handler's submission returned"),
)


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": math.nan, "median": math.nan, "p99": math.nan, "count": 0}
    ms = np.asarray(values, dtype=np.float64) * 1000.0
    return {"mean": float(ms.mean()), "median": float(np.median(ms)),
            "p99": float(np.percentile(ms, 99)), "count": len(values)}


def stage_breakdown(results, server: dict) -> dict:
    """{interval name: stats in ms} over the requests found on both sides. `results`: the
    benchmark's RequestResults; `server`: the body of GET /debug/first_token."""
    names = server["stages"]
    stamps = []
    for r in results:
        if not r.success or r.call_id is None:
            continue
        record = server["requests"].get(f"{r.call_id}-0")  # a call's first (only) prompt
        if record is None:
            continue
        s = {name: (math.nan if t is None else t) for name, t in zip(names, record, strict=True)}
        s["client_sent"], s["client_first"] = r.sent_at, r.first_at
        stamps.append(s)
    out = {"num_requests": len(stamps), "stages": {}}
    for name, start, end, _ in INTERVALS + TOTALS:
        deltas = [s[end] - s[start] for s in stamps]
        out["stages"][name] = _stats([d for d in deltas if not math.isnan(d)])
    return out


def format_stages(b: dict) -> str:
    lines = [f"first-token stages over {b['num_requests']} requests (ms)",
             f"{'stage':<10}{'mean':>9}{'p50':>9}{'p99':>9}  what"]
    for name, _, _, what in INTERVALS + TOTALS:
        if name == TOTALS[0][0]:
            lines.append("-" * 40)
        s = b["stages"][name]
        lines.append(f"{name:<10}{s['mean']:>9.2f}{s['median']:>9.2f}{s['p99']:>9.2f}  {what}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python tools/ttft_stages.py BENCH.jsonl [NAME]`: the stage tables of the runs recorded
    there by tools/h200_bench.sh (the last one named NAME, or every one with stages)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("jsonl", help="the bench.jsonl that tools/h200_bench.sh writes")
    ap.add_argument("name", nargs="?", help="the run's name (default: every run with stages)")
    args = ap.parse_args(argv)
    found = {}
    try:
        with open(args.jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:  # a missing file, a line that is no JSON: one line
        ap.error(f"{args.jsonl}: {e}")
    for row in rows:
        stages = row.get("result", {}).get("stages")
        if stages is not None and args.name in (None, row["bench"]):
            found[row["bench"]] = stages
    for name, stages in found.items():
        print(f"== {name}\n{format_stages(stages)}")


if __name__ == "__main__":
    main()
