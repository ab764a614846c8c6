"""How long /health waits while the server takes a 4 MB input (issue 11: within 50 ms).

For each case, one big request goes to a running server while a separate process (its own
interpreter, so this one's work never delays it) asks /health every 10 ms; the table gives the
request's status and time and the slowest /health answers. Every size-dependent step must run off
the API process's event loop: tokenizing, the chat template's ids, parsing a body of a million
token ids, writing /tokenize's million ids.

    pagedserve serve --device cpu --port 8000 &
    python tools/health_stall.py --url http://127.0.0.1:8000
    python tools/health_stall.py --url http://127.0.0.1:8000 --cases chat tokenize --mb 1
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.workloads import positive_arg  # noqa: E402


def cases(mb: float) -> dict[str, tuple[str, dict]]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "the", "of", "x1", "y22"]
    chars = int(mb * 1_000_000)
    text = " ".join(rng.choice(words) for _ in range(chars // 4))[:chars]
    ids = [rng.randrange(100, 40_000) for _ in range(chars // 7)]  # ~mb of JSON
    return {
        "completions": ("/v1/completions", {"prompt": text, "max_tokens": 1}),
        "chat": ("/v1/chat/completions",
                 {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
        "tokenize": ("/tokenize", {"prompt": text}),
        "token-ids": ("/v1/completions", {"prompt": ids, "max_tokens": 1}),
        "detokenize": ("/detokenize", {"tokens": ids}),
    }


def poll(url: str, seconds: float) -> None:
    """The poller process: /health every 10 ms for `seconds`; prints its latencies (JSON)."""
    latencies = []
    with httpx.Client() as client:
        client.get(url + "/health")  # connected before the clock starts
        end = time.time() + seconds
        while time.time() < end:
            start = time.perf_counter()
            client.get(url + "/health")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
    print(json.dumps(latencies))


def measure(url: str, path: str, body: dict, seconds: float) -> dict:
    raw = json.dumps(body).encode()
    poller = subprocess.Popen([sys.executable, __file__, "--poll", url, "--seconds", str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(min(1.0, seconds / 4))  # the poller is up and asking
    start = time.perf_counter()
    r = httpx.post(url + path, content=raw, timeout=120,
                   headers={"Content-Type": "application/json"})
    took = time.perf_counter() - start
    latencies = sorted(json.loads(poller.communicate()[0]))
    return {"status": r.status_code, "request_s": took, "answers": len(latencies),
            "max_ms": 1e3 * latencies[-1], "p99_ms": 1e3 * latencies[int(0.99 * len(latencies))],
            "over_50ms": sum(t > 0.05 for t in latencies)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="the server (default http://127.0.0.1:8000)")
    parser.add_argument("--cases", nargs="+", choices=list(cases(0.001)), default=None,
                        help="the kinds of large request measured (default: all)")
    parser.add_argument("--mb", type=positive_arg, default=4.0, help="the input's size (default 4)")
    parser.add_argument("--seconds", type=positive_arg, default=4.0,
                        help="how long /health is asked, per case: longer than a request takes")
    parser.add_argument("--poll", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.poll:
        poll(args.poll, args.seconds)
        return []
    try:  # a server to measure, or one line saying there is none
        httpx.get(args.url + "/health", timeout=10)
    except httpx.TransportError as e:
        parser.error(f"--url {args.url}: no server answers ({type(e).__name__}: {e})")
    rows = []
    print(f"{'case':<12} {'status':>6} {'request s':>9} {'/health':>7} {'max ms':>7} "
          f"{'p99 ms':>7} {'> 50 ms':>7}")
    for name, (path, body) in cases(args.mb).items():
        if args.cases and name not in args.cases:
            continue
        row = {"case": name, **measure(args.url, path, body, args.seconds)}
        rows.append(row)
        print(f"{name:<12} {row['status']:>6} {row['request_s']:>9.2f} {row['answers']:>7} "
              f"{row['max_ms']:>7.1f} {row['p99_ms']:>7.1f} {row['over_50ms']:>7}", flush=True)
    return rows


if __name__ == "__main__":
    main()
