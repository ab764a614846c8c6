"""Where a W1 step's GPU time goes: device time per op of the transformer and the sampler.

Runs W1 (or a scaled draw) eagerly with every call on the op interface bracketed by CUDA events on
the current stream, and prints, per op, the calls, the device time and its share, split into
decode-only steps and steps with prefill rows. Eager launches from Python are slower than the
GPU for small ops, so an op's time there includes the GPU waiting for its launch: read the big
batches (the Llama-3-8B shapes at batch 256) as exact, small ones as upper bounds.
Of the shared engine flags, the sampling ones, --structured, --json, --no-warmup, --enforce-eager
and --async-scheduling have no effect: it runs greedy, eager and synchronous after a warm-up, and
prints the table.

    python tools/profile_ops.py --model llama3-8b --load-format dummy --device cuda \
        --dtype bfloat16 --num-prompts 256 --max-steps 300
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_throughput import add_engine_args, build_llm, warmup, workload  # noqa: E402
from tools.workloads import count_arg  # noqa: E402


class TimedOps:
    """The backend's ops, each call bracketed by two events; times are read at the end."""

    def __init__(self, ops, events):
        self._ops, self._events = ops, events
        self.phase = "decode"

    def __getattr__(self, name):
        attr = getattr(self._ops, name)
        if not callable(attr) or name.startswith("_") or name in ("from_host", "to_host"):
            return attr
        import cupy

        def timed(*args, **kwargs):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            out = attr(*args, **kwargs)
            end.record()
            self._events.append((self.phase, name, start, end))
            return out

        return timed


def profile(engine, prompts, output_lens, max_steps: int) -> dict:
    """{(phase, op): [calls, seconds]} over the first max_steps steps after the warm-up."""
    import cupy

    from engine import SamplingParams

    runner = engine.runner
    events: list = []
    timed = TimedOps(runner.ops, events)
    runner.ops = runner.model.ops = timed
    for i, (p, o) in enumerate(zip(prompts, output_lens, strict=True)):
        engine.add_request(f"p{i}", {"prompt_token_ids": p},
                           SamplingParams(temperature=0, ignore_eos=True, max_tokens=o))
    steps, t0 = 0, time.perf_counter()
    while engine.has_unfinished_requests() and steps < max_steps:
        timed.phase = ("decode" if all(s.num_uncomputed_tokens <= 1
                                       for s in engine.scheduler.running)
                       and not engine.scheduler.waiting else "mixed")
        engine.step()
        steps += 1
    cupy.cuda.Device().synchronize()
    wall = time.perf_counter() - t0
    table: dict = defaultdict(lambda: [0, 0.0])
    for phase, name, start, end in events:
        row = table[(phase, name)]
        row[0] += 1
        row[1] += cupy.cuda.get_elapsed_time(start, end) / 1e3
    for request_id in [f"p{i}" for i in range(len(prompts))]:
        engine.abort(request_id)
    return {"steps": steps, "wall_s": wall, "table": dict(table)}


def format_table(result: dict) -> str:
    table = result["table"]
    lines = [f"{result['steps']} steps, wall {result['wall_s']:.2f} s (eager, events per op)"]
    for phase in ("decode", "mixed"):
        rows = sorted(((k[1], v) for k, v in table.items() if k[0] == phase),
                      key=lambda r: -r[1][1])
        total = sum(v[1] for _, v in rows)
        if not rows:
            continue
        lines += [f"\n{phase} steps: device time {total * 1e3:.1f} ms",
                  "| op | calls | ms | us/call | share |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {calls} | {t * 1e3:.1f} | {t / calls * 1e6:.1f} | "
                  f"{t / total:.1%} |" for name, (calls, t) in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap)
    ap.add_argument("--max-steps", type=count_arg, default=300, help="steps profiled")
    args = ap.parse_args(argv)
    args.enforce_eager, args.async_scheduling = True, False
    llm = build_llm(args)
    engine = llm.engine
    if engine.ops.name != "cuda":
        raise SystemExit("profile_ops times CUDA events: run it with --device cuda")
    prompts, output_lens = workload(args, engine.model_config.vocab_size)
    warmup(engine, engine.model_config.vocab_size)  # kernels compile outside the profile
    result = profile(engine, prompts, output_lens, args.max_steps)
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
