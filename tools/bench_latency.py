"""Batch-1 decode latency and cold start: one request alone (or --batch-size N together), and the
time to a ready engine.

Prints the time from process start to a ready engine (model built, KV cache allocated, CUDA graphs
captured), then runs one request of `--prompt-len` tokens and `--output-len` forced output tokens
and reports the time to first token and the mean time per output token after it (TPOT) with its
roofline: at batch 1 every decode step must read all the weights once (and its KV cache), so
(weight bytes + KV bytes at the mean context) / 4.27 TB/s is the floor per token (the bytes the
engine holds: --quantization fp8 halves the linear layers'). It also prints the weights' size in
memory.

Usage:
    python tools/bench_latency.py --model llama3-8b --load-format dummy --device cuda
    python tools/bench_latency.py --model qwen3-0.6b --load-format dummy --device cuda --json
    python tools/bench_latency.py --model smollm2-135m --load-format dummy --device cpu \
        --prompt-len 8 --output-len 4                        # a tiny CPU run
    python tools/bench_latency.py --model qwen3-0.6b --load-format dummy --device cuda \
        --context-len 32532 --output-len 64                  # decode at a long context
    python tools/bench_latency.py --model llama3-8b --load-format dummy --device cuda \
        --quantization q4_k                                  # weights kept in GGUF blocks
--batch-size N decodes N requests of distinct prompts together (TPOT averaged over them; the
floor reads each one's KV cache). --context-len N decodes at an N-token context (the prompt is
N - output_len tokens, at least 16), so the floor's KV term is that long context's.
Process start is read from the OS (/proc/self/stat), so "cold start" includes interpreter start
and imports; kernels compiled by an earlier run come from CuPy's on-disk cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.logs import weights_nbytes  # noqa: E402
from tools.bench_throughput import DTYPE_BYTES, add_engine_args, build_llm  # noqa: E402
from tools.workloads import count_arg  # noqa: E402

BANDWIDTH = 4.27e12  # bytes/s, the H200 test GPU's measured copy ceiling (tools/workloads.py)


def seconds_since_process_start() -> float:
    """Wall time since this process was created (Linux), else since this module was imported."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT


_IMPORTED_AT = time.perf_counter()


def time_requests(engine, prompts: list[list[int]], output_len: int,
                  token_times: dict | None = None, cache_salt: str | None = None) -> dict:
    """Greedy requests added at once, each forced to `output_len` tokens: the first token's time
    (TTFT, the slowest request's) and the mean time per output token after it (TPOT, averaged
    over the requests). `token_times` (a dict) receives each request's token arrival times, one
    per token (a step that verified drafts brings several at once). `cache_salt`: the
    requests' (a warm-up's own, so that the timed prompts find none of its blocks)."""
    from engine import SamplingParams

    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=output_len,
                            cache_salt=cache_salt)
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"latency-{i}", {"prompt_token_ids": prompt}, params)
    token_times = {} if token_times is None else token_times
    token_times.update({f"latency-{i}": [] for i in range(len(prompts))})
    while engine.has_unfinished_requests():
        for out in engine.step():
            new = len(out.outputs[0].delta_token_ids)
            if new:
                token_times[out.request_id] += [time.perf_counter()] * new
    ttft = max(t[0] for t in token_times.values()) - t0
    tpot = sum((t[-1] - t[0]) / max(1, len(t) - 1) for t in token_times.values()) / len(prompts)
    return {"ttft_s": ttft, "tpot_s": tpot,
            "output_tokens": min(len(t) for t in token_times.values())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap, workload=False)  # one request of --prompt-len tokens, greedy
    ap.add_argument("--prompt-len", type=count_arg, default=128,
                    help="prompt tokens of each request")
    ap.add_argument("--output-len", type=count_arg, default=256,
                    help="tokens each request decodes")
    ap.add_argument("--context-len", type=count_arg, default=None,
                    help="context at the end of the request (sets the prompt length)")
    ap.add_argument("--batch-size", type=count_arg, default=1,
                    help="requests decoded together (distinct prompts of the same length)")
    args = ap.parse_args(argv)
    if args.context_len is not None:
        args.prompt_len = max(16, args.context_len - args.output_len)
        if args.max_model_len is None:
            args.max_model_len = args.prompt_len + args.output_len + 16
    llm = build_llm(args)
    ready_s = seconds_since_process_start()
    engine = llm.engine
    mc = engine.model_config
    prompts = [[(31 * i + 7 + 101 * b) % mc.vocab_size for i in range(args.prompt_len)]
               for b in range(args.batch_size)]
    # warm-up: first launches, allocator (salted: its first block is the timed prompts')
    time_requests(engine, [p[:16] for p in prompts], 8, cache_salt="warmup")
    r = time_requests(engine, prompts, args.output_len)
    dtype = getattr(engine.ops, "dtype", "float32")
    elem = DTYPE_BYTES.get(dtype, 2)
    # the KV cache read at the mean context of the decode steps
    mean_ctx = args.prompt_len + args.output_len / 2
    kv = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * elem * mean_ctx * args.batch_size
    weights = engine.model.weights
    held = weights_nbytes(weights)
    # Read per token: everything but the embedding table, of which a step reads a row or two.
    per_token = held - (0 if weights.embed is weights.lm_head else int(weights.embed.nbytes))
    floor = (per_token + kv) / BANDWIDTH
    result = {
        "model": args.model, "device": engine.ops.name, "dtype": dtype,
        "quantization": args.quantization, "weights_mb": held / 1e6,
        "weights_read_per_token_mb": per_token / 1e6,
        "cold_start_s": ready_s, "prompt_len": args.prompt_len, "batch_size": args.batch_size,
        **r,
        "tpot_floor_s": floor, "tpot_over_floor": r["tpot_s"] / floor,
    }
    if args.json:
        print(json.dumps(result))
    else:
        quant = f", {args.quantization}" if args.quantization else ""
        print(f"{args.model} ({engine.ops.name}, {dtype}{quant}): cold start {ready_s:.2f} s "
              f"(process start -> engine ready); weights {held / 1e6:.0f} MB")
        print(f"batch {args.batch_size}, prompt {args.prompt_len}: TTFT "
              f"{r['ttft_s'] * 1e3:.1f} ms, TPOT {r['tpot_s'] * 1e3:.2f} ms over "
              f"{r['output_tokens']} tokens; weight + KV read floor {floor * 1e3:.2f} ms "
              f"({r['tpot_s'] / floor:.2f}x)")
    return result


if __name__ == "__main__":
    main()
