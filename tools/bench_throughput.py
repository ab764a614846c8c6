"""W1 — offline throughput: all of W1's requests submitted at once to one engine.

Each request is W1's prompt (token ids) with `max_tokens = O[i]` and `ignore_eos=True`, greedy
unless `--temperature` is given (with `--top-p`, `--top-k`, `--min-p`, `--repetition-penalty`: issue
12's sampled W1 is `--temperature 0.8 --top-p 0.95 --top-k 50 --repetition-penalty 1.1`). The clock
runs from the first `add_request` to the step that returns the last token. Printed beside the
figure: the roofline bound of the same work on the H200 test GPU (tools/workloads.py) and the ratio
measured / bound, the wall time, the number of engine steps and of preemptions, and the GPU busy
fraction: the device time of every step (events around it: from its input upload to its sampled ids'
copy; on numpy the CPU time of the forward and sampling) over the wall time, overall and over the
steady state (the middle 80% of the steps), and that device time by kind of step (with prompt
tokens; decode-only by the sequences they ran). With async scheduling (the default on cuda) the host
prepares step N+1 while the GPU runs step N, so busy approaches 100%; `--no-async-scheduling`
measures the synchronous loop.

Usage:
    python tools/bench_throughput.py --model qwen3-0.6b --load-format dummy --device cuda \
        --dtype bfloat16                                   # the W1 figure
    python tools/bench_throughput.py --model qwen3-0.6b --load-format dummy --device cuda \
        --dtype bfloat16 --no-async-scheduling             # the same, host and GPU serialized
    python tools/bench_throughput.py --model llama3-8b --load-format dummy --device cuda --json
    python tools/bench_throughput.py --model smollm2-135m --load-format dummy --device cpu \
        --num-prompts 4 --scale 0.02                       # a tiny CPU run (slow: numpy)

`--structured` runs W1 twice, unconstrained and then every request constrained by a JSON schema
(tools/structured_workload.py: it never completes before max_tokens, so both runs generate the
same tokens), and prints both figures and their ratio (issue 13's target: >= 85%). Dummy weights
have no tokenizer: the grammar is compiled against a synthetic vocabulary of the model's size.

    python tools/bench_throughput.py --model qwen3-0.6b --load-format dummy --device cuda \
        --dtype bfloat16 --structured

`--idle N` also reports the device's idle time between steps (events at every step's start
and end) and, for its N longest gaps, what the host was doing: the engine core's phases, garbage
collections, CuPy's device and slow pinned allocations, kernels used for the first time
(tools/idle_report.py).

`--scale` shrinks every prompt and output length (at least 1 token each); `--num-prompts` draws
fewer requests (the first ones are not W1's first ones: the draw depends on the count). A warm-up
of two short requests runs first (kernels compile, graphs capture) unless `--no-warmup`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.workloads import (  # noqa: E402
    count_arg,
    nonnegative_arg,
    roofline,
    scale_arg,
    scale_requests,
    w1_requests,
)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def add_device_flags(ap: argparse.ArgumentParser) -> None:
    """--device and --dtype, as the engine reads them."""
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "numpy"),
                    help="auto: cuda where CuPy sees a GPU, else cpu (the numpy backend)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                    help="weights and activations (auto: float32 on cpu; on cuda the "
                         "checkpoint's fp16, else bf16)")


def add_engine_args(ap: argparse.ArgumentParser, workload: bool = True,
                    json_flag: bool = True) -> None:
    """The engine flags shared by the bench tools (names follow vLLM); `workload`: also the W1
    workload's (--num-prompts, --scale, sampling, --no-warmup, --structured), for the tools that
    run it; `json_flag`: --json."""
    ap.add_argument("--model", default="qwen3-0.6b", help="HF folder, .gguf file or preset name")
    ap.add_argument("--load-format", default="dummy", choices=("auto", "dummy"),
                    help="dummy: random weights of the model's shapes (the default: timings "
                         "need no checkpoint); auto: the model's own weights")
    ap.add_argument("--quantization", default=None,
                    help="fp8 (linear layers in FP8 E4M3 W8A8, quantized at load), or dummy "
                         "weights as random blocks of a GGUF format: q4_k, q8_0, ...")
    ap.add_argument("--gguf-dequantize", action=argparse.BooleanOptionalAction, default=None,
                    help="a .gguf file's block formats dequantized at load (default: on cpu)")
    add_device_flags(ap)
    ap.add_argument("--max-num-seqs", type=int, default=256,
                    help="sequences in one step at most (default 256)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192,
                    help="tokens in one step at most (default 8192)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="prompt + output tokens a sequence may hold (default: the model's)")
    ap.add_argument("--block-size", type=int, default=16, help="tokens a KV block holds")
    ap.add_argument("--num-kv-blocks", type=int, default=None,
                    help="KV blocks (default: on cuda what --gpu-memory-utilization leaves)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="share of the GPU's memory the engine may take (default 0.9)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="no CUDA graphs: every step launched kernel by kernel")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="schedule step N+1 while step N runs (default: on for cuda)")
    ap.add_argument("--speculative-config", type=json.loads, default=None, metavar="JSON",
                    help='e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="GPUs (ranks) each layer is split over")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of W1 and of the engine" if workload else "seed of the engine")
    if json_flag:
        ap.add_argument("--json", action="store_true", help="print one JSON object")
    if not workload:
        return
    ap.add_argument("--num-prompts", type=count_arg, default=256,
                    help="requests drawn (default 256: W1)")
    ap.add_argument("--scale", type=scale_arg, default=1.0,
                    help="shrink prompt/output lengths, in (0, 1]")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="1: off")
    ap.add_argument("--top-k", type=int, default=0, help="0: off")
    ap.add_argument("--min-p", type=float, default=0.0, help="0: off")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    ap.add_argument("--no-warmup", action="store_true",
                    help="no warm-up requests before the clock starts")
    ap.add_argument("--structured", action="store_true",
                    help="also run every request constrained by a JSON schema; print the ratio")


@contextlib.contextmanager
def engine_errors_in_one_line(args: argparse.Namespace):
    """What the engine refuses inside (an unknown preset, a path that is not there, a setting out
    of range, --device cuda without a GPU) ends the command with one line in the flags' names
    (`args`' dests as --flags), exit status 2, as argparse's errors do, not a traceback."""
    from engine.core.sampling_params import ParamError
    from engine.executor.ops import DeviceError
    from engine.model.config import ConfigError
    from engine.model.loader import LoadError

    try:
        yield
    except (ConfigError, LoadError, ParamError, DeviceError) as e:
        from server.cli import in_flag_names

        # "model path ... does not exist" stays as it is
        flags = {dest: "--" + dest.replace("_", "-") for dest in vars(args) if dest != "model"}
        print(f"{Path(sys.argv[0]).name}: error: {in_flag_names(str(e), flags)}",
              file=sys.stderr)
        raise SystemExit(2) from None


def build_llm(args: argparse.Namespace, enable_prefix_caching: bool = True):
    """The engine the flags describe. A value the engine refuses (an unknown preset, a path that
    is not there, --max-num-seqs 0, --device cuda without a GPU; with the W1 flags, a sampling
    value out of its range, checked before the model loads) ends the command with one line in
    the flags' names, as argparse's errors do, not a traceback (engine_errors_in_one_line)."""
    from engine import LLM, SamplingParams

    with engine_errors_in_one_line(args):
        if hasattr(args, "temperature"):  # add_engine_args' workload flags
            SamplingParams(**sampling_settings(args))
        return LLM(model=args.model, device=args.device, dtype=args.dtype,
                   max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                   num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=enable_prefix_caching,
                   seed=args.seed, load_format=args.load_format, quantization=args.quantization,
                   gguf_dequantize=args.gguf_dequantize,
                   gpu_memory_utilization=args.gpu_memory_utilization,
                   enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
                   speculative_config=args.speculative_config,
                   tensor_parallel_size=args.tensor_parallel_size)


def workload(args: argparse.Namespace, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """W1 (or its scaled-down draw), with token ids folded into the model's vocabulary."""
    prompts, output_lens = w1_requests(args.num_prompts, args.seed)
    if args.scale != 1.0 or vocab_size < 10000:
        prompts, output_lens = scale_requests(prompts, output_lens, args.scale, vocab_size)
    return prompts, output_lens


def resolved_dtype(engine) -> str:
    """The dtype the engine computes in (numpy always fp32; cuda bf16 unless told otherwise)."""
    dtype = getattr(engine.ops, "dtype", None)
    if isinstance(dtype, str) and dtype in DTYPE_BYTES:
        return dtype
    if engine.config.dtype != "auto":
        return engine.config.dtype
    return "float32" if engine.ops.name == "numpy" else "bfloat16"


def sampling_settings(args: argparse.Namespace) -> dict:
    """The SamplingParams fields the command line sets (greedy: temperature 0 and nothing else)."""
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "min_p": args.min_p, "repetition_penalty": args.repetition_penalty}


def describe_sampling(settings: dict) -> str:
    """'greedy', or the settings that differ from their defaults: 'temperature 0.8, top_p 0.95'."""
    defaults = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
    if settings.get("temperature", 0.0) == 0 and all(
            settings.get(k, v) == v for k, v in defaults.items()):
        return "greedy"
    return ", ".join(f"{k} {v}" for k, v in settings.items()
                     if k == "temperature" or v != defaults[k])


def run_requests(engine, prompts: list[list[int]], output_lens: list[int],
                 temperature: float = 0.0, tag: str = "w1", structured=None,
                 sampling: dict | None = None, idle: int = 0, energy: bool = False) -> dict:
    """Submit every request at once, step until all finish; a trace of what happened.

    `sampling`: more SamplingParams fields (top_p, top_k, min_p, repetition_penalty).
    `idle`: also trace the host and report the device's idle time, with its `idle` longest gaps
    (tools/idle_report.py). `energy`: also read the GPU's energy counter (NVML) at both ends of
    the run: its joules.

    Per step it samples the KV blocks allocated and the tokens actually held in the cache (sum of
    the running sequences' computed tokens), and the number of sequences in the batch.
    """
    from engine import SamplingParams

    stats0 = engine.get_stats()
    runner = engine.runner
    runner.time_gpu, gpu_times = True, runner.gpu_step_times
    del gpu_times[:]
    step_times, step_starts, blocks, held, batch_seqs = [], [], [], [], []
    # per launched step, in launch order (as runner.gpu_step_times): its prompt tokens and the
    # sequences its batch ran (not all that were running: overlapped, those whose last token is
    # in flight sit out; a preemption takes some out), counted as the scheduler forms it
    prompt_tokens, launched_seqs, batch_sizes = [], [], []
    scheduler = engine.scheduler
    schedule = scheduler.schedule

    def counted_schedule():
        batch = schedule()
        if batch.seqs:
            batch_sizes.append(len(batch.seqs))
        return batch

    scheduler.schedule = counted_schedule
    last = stats0
    token_counts: dict[str, int] = {}
    trace, extra = None, {}
    if idle:
        from tools.idle_report import HostTrace

        del runner.gpu_step_spans[:]
        trace = HostTrace(engine)
        trace.start()
        engine.ops.synchronize()
        # The clock starts at the origin, taken just before its event, which the idle device
        # runs at once: device time after the event never exceeds the wall clock.
        origin = time.perf_counter()
        runner.time_origin = engine.ops.record_event()
    nvml = None
    if energy:
        from tools.nvml import Nvml

        nvml = Nvml()
        engine.ops.synchronize()
        e0 = nvml.energy_mj()
    try:
        t0 = origin if trace is not None else time.perf_counter()
        for i, (p, o) in enumerate(zip(prompts, output_lens, strict=True)):
            params = SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=o,
                                    seed=i if temperature > 0 else None,
                                    structured_outputs=structured, **(sampling or {}))
            engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params)
        while engine.has_unfinished_requests():
            ts = time.perf_counter()
            step_starts.append(ts)
            outputs = engine.step()
            step_times.append(time.perf_counter() - ts)
            running = engine.scheduler.running
            batch_seqs.append(len(running))
            held.append(sum(s.num_computed_tokens for s in running))
            stats = engine.get_stats()
            blocks.append(stats.kv_blocks_used)
            if stats.num_steps > last.num_steps:  # this call scheduled (and launched) a step
                prompt_tokens.append(stats.prompt_tokens_total - last.prompt_tokens_total)
                launched_seqs.append(batch_sizes[-1])
            last = stats
            for out in outputs:
                if out.finished:
                    token_counts[out.request_id] = len(out.outputs[0].token_ids)
        wall = time.perf_counter() - t0
        if nvml is not None:
            engine.ops.synchronize()
            extra["energy_j"] = (nvml.energy_mj() - e0) / 1e3
    finally:
        scheduler.schedule = schedule
        runner.time_gpu = False
        if trace is not None:
            trace.stop()
            runner.time_origin = None
    stats1 = engine.get_stats()
    # Steady state: the middle 80% of the step() calls, beside the device time of the steps
    # launched in them (the overlapped loop reads each one a call later: one step's skew), over
    # the wall time those calls span (this loop's own work between them included, as in wall).
    lo, hi = len(step_times) // 10, len(step_times) - len(step_times) // 10
    steady_wall = step_starts[hi - 1] + step_times[hi - 1] - step_starts[lo] if hi > lo else 0.0
    if trace is not None:
        from tools.idle_report import idle_report

        labels = [f"{p} prompt tokens, {n} seqs" if p else f"decode, {n} seqs"
                  for p, n in zip(prompt_tokens, launched_seqs, strict=True)]
        extra["idle"] = idle_report(runner.gpu_step_spans, trace.events, origin, idle, labels)
    return extra | {
        "wall_s": wall,
        "num_steps": stats1.num_steps - stats0.num_steps,
        "num_preemptions": stats1.num_preemptions - stats0.num_preemptions,
        "step_time_s": sum(step_times),
        "gpu_time_s": sum(gpu_times),
        "gpu_busy_steady_fraction": sum(gpu_times[lo:hi]) / max(1e-12, steady_wall),
        "gpu_time_by_step_kind": step_kinds(gpu_times, prompt_tokens, launched_seqs),
        "output_tokens_per_request": [token_counts.get(f"{tag}-{i}", 0)
                                      for i in range(len(prompts))],
        "kv_blocks_per_step": blocks,
        "kv_tokens_held_per_step": held,
        "seqs_per_step": batch_seqs,
    }


BATCH_BUCKETS = (1, 65, 129, 193)  # decode-only steps grouped by running sequences, from these


def step_kinds(gpu_times: list[float], prompt_tokens: list[int], seqs: list[int]) -> list[dict]:
    """Device time by kind of step: the steps that ran prompt tokens (prefill, alone or mixed
    with decodes), then decode-only steps by how many sequences ran (BATCH_BUCKETS). The three
    lists hold one entry per launched step, in launch order."""
    kinds: dict[str, dict] = {}
    for sec, prompt, n in zip(gpu_times, prompt_tokens, seqs, strict=False):
        if prompt:
            name = "with prompt tokens"
        else:
            lo = max(b for b in BATCH_BUCKETS if b <= max(n, 1))
            hi = next((b - 1 for b in BATCH_BUCKETS if b > lo), None)
            name = f"decode {lo}-{hi} seqs" if hi else f"decode {lo}+ seqs"
        k = kinds.setdefault(name, {"kind": name, "steps": 0, "gpu_s": 0.0, "prompt_tokens": 0})
        k["steps"] += 1
        k["gpu_s"] += sec
        k["prompt_tokens"] += prompt
    return sorted(kinds.values(), key=lambda k: -k["gpu_s"])


def warmup(engine, vocab_size: int, args: argparse.Namespace | None = None) -> None:
    """A few short requests first, sampled as the run will be (its kernels and buffers are then
    ready before the clock starts)."""
    prompts = [[(7 * j + k) % vocab_size for j in range(16)] for k in range(2)]
    settings = {} if args is None else sampling_settings(args)
    run_requests(engine, prompts, [4, 4], settings.pop("temperature", 0.0), tag="warmup",
                 sampling=settings)


def llm_and_workload(args: argparse.Namespace, enable_prefix_caching: bool = True):
    """build_llm's LLM, the workload in its vocabulary and, unless --no-warmup, a warm-up run:
    (llm, prompts, output_lens)."""
    llm = build_llm(args, enable_prefix_caching)
    vocab_size = llm.engine.model_config.vocab_size
    prompts, output_lens = workload(args, vocab_size)
    if not args.no_warmup:
        warmup(llm.engine, vocab_size, args)
    return llm, prompts, output_lens


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap)
    ap.add_argument("--idle", type=nonnegative_arg, default=0, metavar="N",
                    help="also report the device's idle time between steps and what the host "
                         "did during its N longest gaps (tools/idle_report.py)")
    ap.add_argument("--unfreeze-gc", action="store_true",
                    help="gc.unfreeze() once the engine is up: the run as before the engine core "
                         "froze its start-up objects, to measure what the freeze gains")
    ap.add_argument("--energy", action="store_true",
                    help="also read the GPU's energy counter (NVML) around the run: joules, mean "
                         "watts, mJ an output token")
    args = ap.parse_args(argv)
    llm, prompts, output_lens = llm_and_workload(args)
    if args.unfreeze_gc:
        import gc

        gc.unfreeze()
    engine = llm.engine
    settings = sampling_settings(args)
    trace = run_requests(engine, prompts, output_lens, settings.pop("temperature"),
                         sampling=settings, idle=args.idle, energy=args.energy)
    result = summarize(args, engine, prompts, output_lens, trace)
    if args.structured:
        from tools.structured_workload import BOUNDED_SCHEMA, SCHEMA

        result = {"unconstrained": result,
                  "structured": run_structured(args, engine, prompts, output_lens, SCHEMA),
                  "structured_bounded": run_structured(args, engine, prompts, output_lens,
                                                       BOUNDED_SCHEMA, " (maxLength strings)")}
        base = result["unconstrained"]["output_tok_s"]
        result["structured_over_unconstrained"] = result["structured"]["output_tok_s"] / base
        result["bounded_over_unconstrained"] = result["structured_bounded"]["output_tok_s"] / base
        print(json.dumps(result) if args.json else "\n".join([
            format_report(result["unconstrained"]), "-- constrained by a JSON schema:",
            format_report(result["structured"]),
            "-- constrained by the same schema with maxLength strings:",
            format_report(result["structured_bounded"]),
            f"structured / unconstrained output tok/s = "
            f"{result['structured_over_unconstrained']:.1%} (free strings), "
            f"{result['bounded_over_unconstrained']:.1%} (maxLength strings)"]))
        return result
    print(json.dumps(result) if args.json else format_report(result))
    return result


def run_structured(args, engine, prompts, output_lens, schema: dict, label: str = "") -> dict:
    """The same requests, each constrained by `schema` (tools/structured_workload.py)."""
    from engine import StructuredOutputsParams
    from tools.structured_workload import synthetic_grammar_compiler

    if engine.grammars is None:  # dummy weights: no tokenizer, so a synthetic vocabulary
        mc = engine.model_config
        engine.core.grammars = synthetic_grammar_compiler(mc.vocab_size, list(mc.eos_token_ids))
    so = StructuredOutputsParams(json=schema)
    engine.check_structured_outputs(so)  # compiled (and the vocabulary built) before the clock
    if not args.no_warmup:
        run_requests(engine, prompts[:2], [4, 4], tag="warmup-structured", structured=so)
    settings = sampling_settings(args)
    # A salt of its own: the unconstrained run (and the warm-up) left these prompts' blocks in
    # the prefix cache, and a hit would skip most of this run's prefill.
    trace = run_requests(engine, prompts, output_lens, settings.pop("temperature"),
                         tag="structured", structured=so,
                         sampling=settings | {"cache_salt": f"structured{label}"})
    result = summarize(args, engine, prompts, output_lens, trace)
    result["sampling"] += ", JSON schema" + label
    return result


def summarize(args, engine, prompts, output_lens, trace) -> dict:
    mc = engine.model_config
    dtype = resolved_dtype(engine)
    prompt_lens = [len(p) for p in prompts]
    bound = roofline(mc, prompt_lens, output_lens, dtype_bytes=DTYPE_BYTES.get(dtype, 2),
                     max_num_seqs=args.max_num_seqs)
    output_tokens = sum(trace["output_tokens_per_request"])
    wall = trace["wall_s"]
    result = {
        "workload": "W1", "model": args.model, "device": engine.ops.name, "dtype": dtype,
        "quantization": args.quantization,
        "num_prompts": len(prompts), "scale": args.scale,
        "sampling": describe_sampling(sampling_settings(args)),
        **sampling_settings(args),
        "prompt_tokens": sum(prompt_lens),
        "requested_output_tokens": sum(output_lens),
        "output_tokens": output_tokens,
        "wall_s": wall,
        "output_tok_s": output_tokens / wall,
        "total_tok_s": (output_tokens + sum(prompt_lens)) / wall,
        "num_steps": trace["num_steps"],
        "num_preemptions": trace["num_preemptions"],
        "async_scheduling": engine.async_scheduling,
        "gpu_busy_fraction": trace["gpu_time_s"] / wall,
        "gpu_busy_steady_fraction": trace["gpu_busy_steady_fraction"],
        "gpu_time_by_step_kind": trace["gpu_time_by_step_kind"],
        "roofline_output_tok_s": bound["output_tok_s"],
        "roofline_bound_s": bound["bound_time_s"],
        "roofline_bound_by": bound["bound"],
        "fraction_of_roofline": (output_tokens / wall) / bound["output_tok_s"],
    }
    if "idle" in trace:
        result["idle"] = trace["idle"]
    if "energy_j" in trace:
        result["energy_j"] = trace["energy_j"]
        result["mean_w"] = trace["energy_j"] / wall
        result["mj_per_output_token"] = trace["energy_j"] * 1e3 / max(1, output_tokens)
    if args.speculative_config:
        stats = engine.get_stats()
        result["spec_num_draft_tokens"] = stats.spec_num_draft_tokens
        result["spec_num_accepted_tokens"] = stats.spec_num_accepted_tokens
    return result


def format_report(r: dict) -> str:
    idle = []
    if "idle" in r:
        from tools.idle_report import format_idle

        idle = format_idle(r["idle"])
    return "\n".join([
        f"W1 on {r['model']} ({r['device']}, {r['dtype']}"
        f"{', ' + r['quantization'] if r.get('quantization') else ''}, {r['sampling']}): "
        f"{r['num_prompts']} "
        f"requests, {r['prompt_tokens']} prompt + {r['output_tokens']} output tokens "
        f"(requested {r['requested_output_tokens']})",
        f"output {r['output_tok_s']:.1f} tok/s   total {r['total_tok_s']:.1f} tok/s   "
        f"wall {r['wall_s']:.2f} s",
        f"roofline (H200, {r['roofline_bound_by']}-bound) {r['roofline_output_tok_s']:.0f} output "
        f"tok/s in {r['roofline_bound_s']:.3f} s   measured / bound = "
        f"{r['fraction_of_roofline']:.1%}",
        f"steps {r['num_steps']}   preemptions {r['num_preemptions']}   async scheduling "
        f"{'on' if r['async_scheduling'] else 'off'}",
        f"GPU busy {r['gpu_busy_fraction']:.1%} of wall   steady state "
        f"{r['gpu_busy_steady_fraction']:.1%}",
        "GPU time by step: " + "; ".join(
            f"{k['kind']} {k['gpu_s']:.2f} s over {k['steps']} steps "
            f"({k['gpu_s'] / k['steps'] * 1e3:.2f} ms each"
            + (f", {k['prompt_tokens']} prompt tokens" if k["prompt_tokens"] else "") + ")"
            for k in r["gpu_time_by_step_kind"]),
        *([f"GPU energy {r['energy_j']:,.0f} J (NVML): {r['mean_w']:.0f} W mean, "
           f"{r['mj_per_output_token']:.1f} mJ an output token"] if "energy_j" in r else []),
        *idle,
    ])


if __name__ == "__main__":
    main()
