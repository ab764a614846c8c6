"""Where a batch-1 engine step spends time its decode graph does not (issue 16).

Session 7 measured Llama-3-8B Q8_0 at 2.95 ms/token in tools/bench_latency.py but its step graph
at 2.66 ms of GPU time (`kernel_check.py --only decode1`); FP8 and Q4_K agreed within 1%. This
builds one engine as bench_latency does and, on the GPU, prints lines starting "b1gap":
- setup: PDL still on after start-up, the decode graph sizes and their attention splits, every
  warning the engine logged (a capture or a launch that fell back);
- request: bench_latency's TPOT for one request, and per decode step the GPU time from the step's
  first upload to its sampled ids (events around runner.launch), the GPU idle time before it, the
  host time of launch() and of waiting for the result, graph replays and sampler fallbacks;
- replay: the engine's own batch-1 graph replayed back to back (CUDA events), then the same in a
  long burst in chunks (clock or power drift), nvidia-smi's clocks, power and throttle reasons read
  while the burst runs;
- alone: a batch-1 graph captured alone on the same model (DecodeGraphs(max_num_seqs=1), as
  decode1 does), with the engine's attention plan and with decode1's 32k one.
Then the one figure that decides: engine TPOT - engine graph replay (host / between-steps cost)
and engine graph replay - graph alone (what the engine's capture changed). --variant captures one
more graph alone with module settings changed; --without one with work left out (LEAVE_OUT), to
see what each part costs in the step (session 13: the FP8 step's four quantize kernels a layer
were 402 of its 2,634 us).

    PYTHONPATH=. python tools/b1_gap.py --model llama3-8b --quantization q8_0
    PYTHONPATH=. python tools/b1_gap.py --model llama3-8b --quantization fp8 --no-alone \
        --without fp8-silu --without fp8-norm --without attention+rope --repeat 2
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_latency import time_requests  # noqa: E402
from tools.bench_throughput import add_engine_args, build_llm  # noqa: E402
from tools.module_settings import settings  # noqa: E402
from tools.workloads import count_arg, nonnegative_arg  # noqa: E402

SMI = ("nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,"
       "clocks_throttle_reasons.active", "--format=csv,noheader")


def say(*parts) -> None:
    print("b1gap", *parts, flush=True)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def watch_pdl_launches(cuda_kernels) -> list[str]:
    """Every failed cuLaunchKernelEx (after which launch() turns PDL off for good), by grid,
    block and shared memory: the list it fills."""
    failures: list[str] = []
    real = cuda_kernels._launch_ex

    def patched():
        fn = real()
        if fn is None:
            return None

        def wrapped(config, ptr, params, extra):
            status = fn(config, ptr, params, extra)
            if status != 0:
                c = config._obj
                failures.append(f"CUresult {status}: grid {tuple(c.grid)}, block "
                                f"{tuple(c.block)}, shared {c.shared_mem} B")
            return status

        return wrapped

    cuda_kernels._launch_ex = patched
    return failures


def instrument(runner):
    """Wraps runner.launch and StepHandle.result: per step (GPU events before / after the launch,
    host seconds of launch, host seconds waiting in result); returns the list they fill."""
    import cupy

    from engine.executor import runner as runner_mod

    steps: list[dict] = []
    launch, result = runner.launch, runner_mod.StepHandle.result

    def timed_launch(*a, **k):
        before = cupy.cuda.Event()
        before.record()
        t0 = time.perf_counter()
        graph_steps = runner.num_graph_steps
        handle = launch(*a, **k)
        host = time.perf_counter() - t0
        after = cupy.cuda.Event()
        after.record()
        steps.append({"before": before, "after": after, "launch_s": host,
                      "graph": runner.num_graph_steps > graph_steps, "wait_s": 0.0})
        return handle

    def timed_result(self):
        t0 = time.perf_counter()
        out = result(self)
        if steps:
            steps[-1]["wait_s"] += time.perf_counter() - t0
        return out

    fallbacks = [0]
    alone = runner._sample_rows_alone

    def counted(*a, **k):
        fallbacks[0] += 1
        return alone(*a, **k)

    runner.launch = timed_launch
    runner._sample_rows_alone = counted
    runner_mod.StepHandle.result = timed_result
    return steps, fallbacks


def step_report(steps: list[dict], tpot: float) -> float:
    """Per decode step (the prompt's step and the first decode left out): GPU busy, GPU idle
    before it, host launch / wait; returns the median GPU time per step."""
    import cupy

    for s in steps:
        s["after"].synchronize()
    t0 = steps[0]["before"]
    at = [(cupy.cuda.get_elapsed_time(t0, s["before"]), cupy.cuda.get_elapsed_time(t0, s["after"]))
          for s in steps]
    # decode steps: graph replays after the last eager one (a long prompt takes several
    # chunks), the first of them left out
    last_eager = max((i for i, s in enumerate(steps) if not s["graph"]), default=-1)
    decode = list(range(max(2, last_eager + 2), len(steps)))
    busy = [(at[i + 1][0] - at[i][0]) if i + 1 < len(at) else None for i in decode]
    busy = [b for b in busy if b is not None]  # ms from one step's first op to the next one's
    if not busy:  # --output-len 2 and less: no decode step has a next one to time
        say(f"steps: {len(steps)} launches, too few decode steps to time; TPOT "
            f"{tpot * 1e3:.3f} ms")
        return 0.0
    span = [at[i][1] - at[i][0] for i in decode]  # ms the GPU took to reach the launch's end
    first = decode[0] - 1  # the first decode step, and the one before it (the prompt's last)
    say(f"steps: the first decode step starts {at[first][0] - at[first - 1][1]:.3f} ms after the "
        f"prompt's last step ends, and runs {at[first + 1][0] - at[first][0]:.3f} ms start to start"
        f"; the prompt's last step took {at[first - 1][1] - at[first - 1][0]:.3f} ms")
    idle = [max(0.0, at[i][0] - at[i - 1][1]) for i in decode]
    med = statistics.median
    say(f"steps: {len(steps)} launches, {sum(s['graph'] for s in steps)} graph replays; per "
        f"decode step GPU start-to-start {med(busy):.3f} ms (mean {statistics.fmean(busy):.3f}, "
        f"max {max(busy):.3f}; slowest {', '.join(f'{b:.3f}' for b in sorted(busy)[-4:])}), "
        f"GPU launch span {med(span):.3f} ms, GPU idle before a step "
        f"median {med(idle) * 1e3:.1f} us, total {sum(idle):.2f} ms over {len(idle)} steps; host "
        f"launch() {med([steps[i]['launch_s'] for i in decode]) * 1e3:.3f} ms, host waiting in "
        f"result() {med([steps[i]['wait_s'] for i in decode]) * 1e3:.3f} ms; TPOT "
        f"{tpot * 1e3:.3f} ms")
    return med(busy) / 1e3


def replay_time(graph) -> float:
    """Median GPU seconds per replay of `graph`: 20 replays back to back, 5 times."""
    import cupy

    from tools.kernel_check import replay_time as timed

    return timed(graph, cupy.cuda.get_current_stream(), 1, 5, launches=20)


def burst(graph, chunks: int = 16, per_chunk: int = 25) -> None:
    """chunks x per_chunk replays queued at once; ms per replay of each chunk, and nvidia-smi
    read while they run."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    events = [cupy.cuda.Event() for _ in range(chunks + 1)]
    events[0].record(stream)
    for c in range(chunks):
        for _ in range(per_chunk):
            graph.launch(stream)
        events[c + 1].record(stream)
    try:
        smi = subprocess.run(SMI, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        smi = f"nvidia-smi failed: {e}"
    events[-1].synchronize()
    ms = [cupy.cuda.get_elapsed_time(events[c], events[c + 1]) / per_chunk for c in range(chunks)]
    say(f"burst of {chunks} x {per_chunk} replays, ms per replay by chunk: "
        + " ".join(f"{m:.3f}" for m in ms))
    say(f"nvidia-smi during the burst (sm MHz, mem MHz, W, C, throttle): {smi}")


def decode_meta(ctx: int, block_size: int):
    """One sequence decoding its token at position ctx, on blocks 0.. of the cache."""
    from engine.executor.ops import AttentionMetadata

    nb = -(-(ctx + 1) // block_size)
    return AttentionMetadata(np.array([ctx], np.int32), np.arange(2, dtype=np.int32),
                             np.array([ctx + 1], np.int32),
                             np.arange(nb, dtype=np.int32).reshape(1, -1), 1, ctx + 1)


def graph_alone(engine, ctx: int, max_context_len: int) -> tuple[float, int, np.ndarray]:
    """(GPU seconds per replay, attention splits, logits) of a batch-1 decode graph captured
    alone, for token 7 at position ctx."""
    from engine.executor.cuda_graph import DecodeGraphs

    runner = engine.runner
    graphs = DecodeGraphs(engine.model, engine.kv_cache, 1, runner.max_blocks_per_seq,
                          max_context_len=max_context_len)
    graphs.capture()
    graphs.run(np.array([7], np.int32), np.array([ctx], np.int32),
               decode_meta(ctx, runner.block_size))
    graph, logits, meta = graphs.pick(np.array([ctx + 1]))[1]  # the graph run() replayed
    sec = replay_time(graph)
    host = logits.get()
    del graphs
    return sec, meta.num_splits, host


# What --without leaves out of a batch-1 graph captured alone: the step's time without that work
# is what it costs in the PDL chain, its launch boundary included (timing only: the logits are
# garbage). fp8-*: the FP8 quantize kernels before o (plain), before down (SiLU-mul) and before
# qkv / gate_up (add + RMSNorm), and the FP8 GEMVs.
LEAVE_OUT = ("attention", "rope", "lm-head", "fp8-plain", "fp8-silu", "fp8-norm", "fp8-gemv")
WITHOUT = "without:"  # a variant spec naming what to leave out, e.g. without:attention+rope


def without_kinds(spec: str) -> list[str]:
    """'without:attention+rope' -> ['attention', 'rope'] (an unknown kind ends the run)."""
    kinds = spec[len(WITHOUT):].split("+")
    unknown = [k for k in kinds if k not in LEAVE_OUT]
    if unknown:
        raise SystemExit(f"b1_gap: --without {'+'.join(kinds)}: unknown {unknown}; one or more "
                         f"of {', '.join(LEAVE_OUT)} joined by +")
    return kinds


@contextlib.contextmanager
def leaving_out(engine, kinds: list[str]):
    """The model's ops without `kinds` (LEAVE_OUT) inside: each returns an unfilled output."""
    import cupy

    from engine.executor.ops import cuda_fp8

    model = engine.model
    ops, lm_head = model.ops, model.weights.lm_head
    linear = ops.linear
    nothing = cupy.empty  # an output left unfilled
    patches = {
        # (with the RoPE fold, Llama-type decode steps do RoPE and the KV write in attention:
        # "rope" alone then leaves them as they are)
        "attention": [(ops, "attention", lambda qkv, k_cache, v_cache, meta, num_heads, *rest,
                       out=None, rope=None: out if out is not None else
                       nothing((len(qkv), num_heads * k_cache.shape[-1]), ops.storage))],
        "rope": [(ops, "qk_norm_rope_kv_write", lambda *args, **kwargs: None)],
        "lm-head": [(ops, "linear", lambda x, w, bias=None, **kw: nothing(
            (x.shape[0], lm_head.shape[0]), ops.storage) if w is lm_head else
            linear(x, w, bias, **kw))],
        "fp8-plain": [(cuda_fp8, "quantize_rows", lambda x, ctype: (
            nothing(x.shape, np.uint8), nothing(len(x), np.float32)))],
        "fp8-silu": [(cuda_fp8, "silu_quantize", lambda gu, ctype: (
            nothing((len(gu), gu.shape[1] // 2), np.uint8), nothing(len(gu), np.float32)))],
        "fp8-norm": [(cuda_fp8, "norm_quantize", lambda x, residual, norm_w, eps, ctype,
                      h_out=None: (nothing(x.shape, np.uint8), nothing(len(x), np.float32),
                                   x if residual is None else residual))],
        "fp8-gemv": [(cuda_fp8, "gemv", lambda q, s, w, out, ctype: out)],
    }
    saved = []
    try:
        for kind in kinds:
            for obj, name, fn in patches[kind]:
                saved.append((obj, name, obj.__dict__.get(name, _UNSET)))
                setattr(obj, name, fn)
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _UNSET:
                delattr(obj, name)  # the class's method shows again
            else:
                setattr(obj, name, value)


_UNSET = object()


def run_variant(engine, ctx: int, spec: str, base: tuple) -> str:
    """A batch-1 graph captured alone with `spec`'s settings (restored after), or without what
    a WITHOUT spec names: its time and logits against `base` (graph_alone's answer with the
    defaults)."""
    without = spec.startswith(WITHOUT)
    with leaving_out(engine, without_kinds(spec)) if without else settings(spec):
        sec, _, logits = graph_alone(engine, ctx, engine.runner.graphs.max_context_len)
    if base is None:
        return sec
    a, b = (np.asarray(v, np.float32) if v.dtype != np.uint16 else
            (v.astype(np.uint32) << 16).view(np.float32) for v in (logits, base[2]))
    same = ("logits not compared (work left out)" if without else
            "bit-identical logits" if np.array_equal(logits, base[2]) else
            f"logits max |diff| {float(np.max(np.abs(a - b))):.3g} (max |logit| "
            f"{float(np.max(np.abs(b))):.3g}), same argmax {int(a.argmax()) == int(b.argmax())}")
    return (f"variant {spec}: {sec * 1e3:.3f} ms per replay, default {base[0] * 1e3:.3f} "
            f"(x{sec / base[0]:.3f}); {same}")


def repeat_variants(engine, ctx: int, specs: list[str], times: int, engine_graph) -> None:
    """The default and every variant captured `times` times, interleaved (a capture can land in
    a slow mode; clocks can drift): each capture's ms per replay, then min and median per
    setting, with the engine's own graph replayed between rounds as the drift's witness."""
    runs: dict[str, list[float]] = {s: [] for s in ["default", *specs]}
    witness = []
    for _ in range(times):
        for spec in runs:
            sec = guarded(f"repeat {spec}", lambda spec=spec: run_variant(
                engine, ctx, spec, None) if spec != "default" else graph_alone(
                engine, ctx, engine.runner.graphs.max_context_len)[0])
            if sec is not None:
                runs[spec].append(sec)
        witness.append(replay_time(engine_graph))
    say("repeat: engine graph between rounds, ms: " + " ".join(f"{w * 1e3:.3f}" for w in witness))
    base = statistics.median(runs["default"])
    for spec, secs in runs.items():
        if not secs:
            continue
        med = statistics.median(secs)
        say(f"repeat {spec}: ms " + " ".join(f"{s * 1e3:.3f}" for s in secs)
            + f"; min {min(secs) * 1e3:.3f}, median {med * 1e3:.3f} (x{med / base:.3f})")


def guarded(name: str, fn, default=None):
    """fn()'s answer; a section that raises prints why and lets the next ones run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a probe reports, it does not stop
        say(f"section {name} failed: {type(e).__name__}: {str(e)[:300]}")
        return default


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap, workload=False, json_flag=False)  # it prints `b1gap` lines
    ap.add_argument("--prompt-len", type=count_arg, default=128,
                    help="prompt tokens of the batch-1 request (default 128)")
    ap.add_argument("--output-len", type=count_arg, default=256,
                    help="tokens it decodes (default 256)")
    ap.add_argument("--no-alone", action="store_true", help="skip the graphs captured alone")
    ap.add_argument("--repeat", type=nonnegative_arg, default=0,
                    help="then capture the default and each variant this many times, "
                         "interleaved, and print every time with min and median")
    ap.add_argument("--variant", action="append", default=[],
                    help="module.ATTR=value[,...] of engine.executor.ops set for one more graph "
                         "captured alone (repeatable), e.g. cuda_quant_gguf.GEMV3_GRID=fill")
    ap.add_argument("--without", action="append", default=[],
                    help="KIND[+KIND...] left out of one more graph captured alone (repeatable; "
                         "timing only, the logits are garbage): what that work costs in the "
                         f"step. Kinds: {', '.join(LEAVE_OUT)}")
    args = ap.parse_args(argv)
    for kinds in args.without:
        without_kinds(WITHOUT + kinds)  # an unknown kind ends the run before the model loads
        args.variant.append(WITHOUT + kinds)
    warnings = _Warnings()
    logging.getLogger("pagedserve").addHandler(warnings)
    from engine.executor.ops import cuda_kernels

    pdl = cuda_kernels.PDL  # as configured, before anything could turn it off
    failures = watch_pdl_launches(cuda_kernels)
    t0 = time.perf_counter()
    llm = build_llm(args)
    engine = llm.engine
    runner = engine.runner
    if runner.graphs is None:
        raise SystemExit("b1_gap: the engine replays no decode graphs (it needs --device cuda, "
                         "without --enforce-eager)")
    sizes = runner.graphs.sizes
    splits = {s: runner.graphs.graphs[s][2].num_splits for s in sizes[:4]}
    short = sorted(runner.graphs.short_graphs)
    say(f"setup {args.model} {args.quantization or args.dtype}: built in "
        f"{time.perf_counter() - t0:.1f} s; PDL {cuda_kernels.PDL} (configured {pdl}); decode "
        f"graphs {sizes[:6]}..{sizes[-1:]} (max_context_len {runner.graphs.max_context_len}, "
        f"attention splits {splits}; short-context graphs for sizes {short}); mixed graphs "
        f"{runner.mixed_graphs is not None}; "
        f"max_model_len {engine.max_model_len}")
    mc = engine.model_config
    prompt = [(31 * i + 7) % mc.vocab_size for i in range(args.prompt_len)]
    time_requests(engine, [prompt[:16]], 8)  # warm-up, as bench_latency
    steps, fallbacks = instrument(runner)
    arrivals: dict = {}
    r = time_requests(engine, [prompt], args.output_len, arrivals)
    gaps = np.diff(arrivals["latency-0"]) * 1e3  # ms between the tokens TPOT averages
    if len(gaps):
        slow = np.flatnonzero(gaps > 1.2 * np.median(gaps))
        say(f"tokens: {len(gaps)} intervals, ms: first {', '.join(f'{g:.3f}' for g in gaps[:4])}; "
            f"median {np.median(gaps):.3f}, mean {gaps.mean():.3f}; slowest "
            f"{', '.join(f'{g:.3f}' for g in np.sort(gaps)[-4:])}; above 1.2 x median (index: "
            f"ms) {[(int(i), round(float(gaps[i]), 3)) for i in slow[:8]]}")
    step_s = guarded("steps", lambda: step_report(steps, r["tpot_s"]), 0.0)
    say(f"sampler fallbacks {fallbacks[0]}; PDL after the request {cuda_kernels.PDL}")
    for message in warnings.messages[:8]:
        say(f"warning logged: {message[:300]}")
    say(f"warnings logged: {len(warnings.messages)}; failed PDL launches {len(failures)}"
        + "".join(f"; {f}" for f in failures[:4]))

    ctx = args.prompt_len + args.output_len - 1
    graph = runner.graphs.pick(np.array([ctx + 1]))[1][0]  # the graph the step replays

    def engine_replay():
        runner.graphs.run(np.array([7], np.int32), np.array([ctx], np.int32),
                          decode_meta(ctx, runner.block_size))
        return replay_time(graph)

    engine_graph = guarded("replay", engine_replay, 0.0)
    say(f"replay: the engine's batch-1 graph at ctx {ctx + 1}: {engine_graph * 1e3:.3f} ms per "
        "replay (back to back)")
    guarded("burst", lambda: burst(graph))
    line = (f"verdict {args.quantization or args.dtype}: TPOT {r['tpot_s'] * 1e3:.3f} ms, GPU "
            f"start-to-start per step {step_s * 1e3:.3f}, engine graph replay "
            f"{engine_graph * 1e3:.3f}")
    base = None
    # the graphs captured alone take PDL as configured, as decode1's does, even where the
    # engine's start-up turned it off
    saved, cuda_kernels.PDL = cuda_kernels.PDL, pdl
    if not args.no_alone or args.variant:
        plans = (("engine's plan", runner.graphs.max_context_len),
                 ("decode1's 32k plan", max(32768, ctx + 1)))
        for label, max_len in plans[: 1 if args.no_alone else 2]:
            got = guarded(f"alone ({label})", lambda max_len=max_len: graph_alone(
                engine, ctx, max_len))
            if got is None:
                continue
            base = base or got
            say(f"alone: batch-1 graph captured alone, {label} ({got[1]} splits): "
                f"{got[0] * 1e3:.3f} ms per replay")
            line += f", alone ({got[1]} splits) {got[0] * 1e3:.3f}"
        say(f"PDL after the captures alone {cuda_kernels.PDL}")
    say(line)
    for spec in args.variant if base is not None else ():
        say(guarded(f"variant {spec}", lambda spec=spec: run_variant(engine, ctx, spec, base),
                    f"variant {spec}: failed"))
    if args.repeat and base is not None:
        guarded("repeat", lambda: repeat_variants(engine, ctx, args.variant, args.repeat, graph))
    cuda_kernels.PDL = saved


if __name__ == "__main__":
    main()
