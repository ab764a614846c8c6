"""W3 — the seed's table: static batching with contiguous KV vs continuous batching with paged KV.

One engine, the same W1 requests (tools/workloads.py), run twice:
(a) traditional: static batches of `--static-batch-size` requests in submission order; a batch
    runs until its longest request finishes before the next one starts. Its KV memory is what a
    contiguous cache reserves: B slots x L tokens, L = `--max-model-len` when given, else the
    longest prompt + the longest output of the workload.
(b) continuous batching with paged KV: every request submitted at once, the engine schedules.
    Its KV memory is the blocks allocated (x block size), sampled after every step.
Both runs sample, after every step, the tokens actually held in the cache (sum of the running
sequences' computed tokens). Figures side by side: output tok/s, wall time, steps, mean sequences
per step, busy fraction and KV memory reserved vs used.

Busy fraction = device time of the steps (CUDA events from each step's input upload to its
sampled ids' copy; on numpy the CPU time of the forward and sampling) / wall time.
KV waste % = 1 - sum over steps of tokens held / sum over steps of tokens reserved.
Prefix caching is off for both runs (`--enable-prefix-caching` turns it on): the second run would
otherwise find the first run's prompts in the cache.

Usage:
    python tools/seed_table.py --model qwen3-0.6b --load-format dummy --device cuda \
        --static-batch-size 32 --chart seed_table.png
    python tools/seed_table.py --model smollm2-135m --load-format dummy --device cpu \
        --num-prompts 4 --scale 0.02 --static-batch-size 2 --json   # tiny CPU run (slow: numpy)
`--chart` needs matplotlib (`pip install pagedserve[chart]`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_throughput import (  # noqa: E402
    DTYPE_BYTES,
    add_engine_args,
    llm_and_workload,
    resolved_dtype,
    run_requests,
    sampling_settings,
)
from tools.workloads import count_arg, kv_bytes_per_token  # noqa: E402

MIB = 1 << 20


def run_static(engine, prompts, output_lens, batch_size: int, temperature: float,
               sampling: dict | None = None) -> dict:
    """Static batches, one after another; the traces of all batches joined. `sampling`: more
    SamplingParams fields (top_p, top_k, min_p, repetition_penalty)."""
    if batch_size < 1:
        raise ValueError(f"static_batch_size must be >= 1, got {batch_size}")
    joined: dict = {}
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        trace = run_requests(engine, prompts[start:end], output_lens[start:end], temperature,
                             tag=f"static{start}", sampling=sampling)
        for key, value in trace.items():
            joined[key] = joined.get(key, 0 if not isinstance(value, list) else []) + value
    joined["wall_s"] = time.perf_counter() - t0  # includes the few microseconds between batches
    return joined


def summarize(trace: dict, reserved_per_step: list[int], kv_bytes: int) -> dict:
    """The table's figures for one run; `reserved_per_step` in tokens."""
    held = trace["kv_tokens_held_per_step"]
    steps = max(1, trace["num_steps"])
    output_tokens = sum(trace["output_tokens_per_request"])
    peak = max(range(len(reserved_per_step)), key=reserved_per_step.__getitem__, default=0)
    return {
        "output_tokens": output_tokens,
        "wall_s": trace["wall_s"],
        "output_tok_s": output_tokens / trace["wall_s"],
        "num_steps": trace["num_steps"],
        "num_preemptions": trace["num_preemptions"],
        "mean_seqs_per_step": sum(trace["seqs_per_step"]) / steps,
        "busy_fraction": trace["gpu_time_s"] / trace["wall_s"],
        "kv_reserved_peak_mib": (reserved_per_step[peak] if held else 0) * kv_bytes / MIB,
        "kv_used_peak_mib": max(held, default=0) * kv_bytes / MIB,
        "kv_reserved_mean_mib": sum(reserved_per_step) / steps * kv_bytes / MIB,
        "kv_used_mean_mib": sum(held) / steps * kv_bytes / MIB,
        "kv_waste_pct": 100.0 * (1 - sum(held) / max(1, sum(reserved_per_step))),
        "output_tokens_per_request": trace["output_tokens_per_request"],
    }


ROWS = [  # (key, label, format)
    ("output_tok_s", "output tok/s", "{:.1f}"),
    ("wall_s", "wall time (s)", "{:.2f}"),
    ("num_steps", "engine steps", "{:d}"),
    ("mean_seqs_per_step", "mean seqs per step", "{:.1f}"),
    ("num_preemptions", "preemptions", "{:d}"),
    ("busy_fraction", "busy fraction (runner/wall)", "{:.1%}"),
    ("kv_reserved_peak_mib", "KV reserved, peak (MiB)", "{:.1f}"),
    ("kv_used_peak_mib", "KV used, peak (MiB)", "{:.1f}"),
    ("kv_reserved_mean_mib", "KV reserved, mean (MiB)", "{:.1f}"),
    ("kv_used_mean_mib", "KV used, mean (MiB)", "{:.1f}"),
    ("kv_waste_pct", "KV waste (%)", "{:.1f}"),
]


def format_table(result: dict) -> str:
    static, paged = result["static"], result["paged"]
    head = f"static B={result['static_batch_size']}"
    lines = [
        f"W3 on {result['model']} ({result['device']}, {result['dtype']}): "
        f"{result['num_prompts']} requests, {result['requested_output_tokens']} output tokens",
        f"{'':<30}{head:>16}{'continuous+paged':>18}",
    ]
    for key, label, fmt in ROWS:
        lines.append(f"{label:<30}{fmt.format(static[key]):>16}{fmt.format(paged[key]):>18}")
    return "\n".join(lines)


def draw_chart(result: dict, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install pagedserve[chart]); no chart drawn"
    names = [f"static B={result['static_batch_size']}", "continuous + paged"]
    runs = [result["static"], result["paged"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].bar(names, [r["output_tok_s"] for r in runs], color=["grey", "tab:blue"])
    axes[0].set_title("output tok/s")
    axes[1].bar(names, [100 * r["busy_fraction"] for r in runs], color=["grey", "tab:blue"])
    axes[1].set_title("busy fraction (%)")
    x = range(len(names))
    axes[2].bar([i - 0.2 for i in x], [r["kv_reserved_mean_mib"] for r in runs], 0.4,
                label="reserved", color="lightgrey")
    axes[2].bar([i + 0.2 for i in x], [r["kv_used_mean_mib"] for r in runs], 0.4,
                label="used", color="tab:green")
    axes[2].set_xticks(list(x), names)
    axes[2].set_title("KV cache, mean over steps (MiB)")
    axes[2].legend()
    fig.suptitle(f"W3 on {result['model']} ({result['device']}, {result['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart written to {path}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap)
    ap.add_argument("--static-batch-size", type=count_arg, default=32,
                    help="requests per batch of the static-batching run (default 32)")
    ap.add_argument("--enable-prefix-caching", action="store_true",
                    help="prefix caching on (off by default: the second run would find the "
                         "first run's prompts in the cache)")
    ap.add_argument("--chart", default=None, help="write a PNG chart here (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.structured:
        ap.error("--structured is bench_throughput.py's (W1 constrained by a JSON schema)")
    llm, prompts, output_lens = llm_and_workload(args, args.enable_prefix_caching)
    engine = llm.engine
    mc = engine.model_config
    dtype = resolved_dtype(engine)
    kv_bytes = kv_bytes_per_token(mc, DTYPE_BYTES.get(dtype, 2))

    settings = sampling_settings(args)
    temperature = settings.pop("temperature")
    static_trace = run_static(engine, prompts, output_lens, args.static_batch_size, temperature,
                              settings)
    max_len = args.max_model_len or max(len(p) for p in prompts) + max(output_lens)
    static_reserved = [args.static_batch_size * max_len] * static_trace["num_steps"]
    paged_trace = run_requests(engine, prompts, output_lens, temperature, tag="paged",
                               sampling=settings)
    block_size = engine.config.block_size
    paged_reserved = [b * block_size for b in paged_trace["kv_blocks_per_step"]]

    result = {
        "workload": "W3", "model": args.model, "device": engine.ops.name, "dtype": dtype,
        "num_prompts": len(prompts), "scale": args.scale,
        "requested_output_tokens": sum(output_lens),
        "static_batch_size": args.static_batch_size,
        "static_reserved_tokens_per_request": max_len,
        "busy_fraction_source": "device time of the steps (CUDA events; CPU time on numpy) / wall",
        "static": summarize(static_trace, static_reserved, kv_bytes),
        "paged": summarize(paged_trace, paged_reserved, kv_bytes),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    if args.chart:
        print(draw_chart(result, args.chart), file=sys.stderr if args.json else sys.stdout)
    return result


if __name__ == "__main__":
    main()
