"""Where the device waits: its idle time between a run's steps, and what the host did meanwhile.

With `runner.time_origin` set (and `time_gpu`), the runner keeps every step's (start, end) on the
device in `runner.gpu_step_spans`: seconds after the origin event of the events recorded once the
step's inputs are built and after its sampled ids' copy. Where a step starts later than the one
before it ended, the device idled: the host had not queued the step yet, or something made the
host wait (an implicit synchronization in an allocation, a garbage collection, a kernel compiled
on its first use).

HostTrace records on the host's clock what the engine core did: each step's phases (schedule,
prepare inputs, launch, wait for the sampled ids, postprocess), Python's garbage collections, and
on the cuda backend the device allocations CuPy's pool makes (cudaMalloc), pinned host
allocations that take longer than PINNED_SLOW_S (a pool hit takes ~1 us; cudaHostAlloc far
more), and kernels looked up (or compiled) for the first time. idle_report() lines the two clocks
up at the origin, which is recorded with the device idle right after a synchronize, and lists
the longest gaps with the host's records that overlap each.

    python tools/bench_throughput.py --model llama3-8b --load-format dummy --device cuda \\
        --dtype bfloat16 --idle 12

Tracing costs host time of its own (a Python call per phase, per allocation of CuPy's pool, per
collection), which the overlapped loop mostly hides; compare figures with and without it.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

PINNED_SLOW_S = 20e-6
# Gap sizes the report counts, in seconds: (label, lower bound)
GAP_CLASSES = (("< 5 us", 0.0), ("5-100 us", 5e-6), ("0.1-1 ms", 1e-4), ("1-10 ms", 1e-3),
               (">= 10 ms", 1e-2))


@dataclass
class HostEvent:
    kind: str  # "phase", "gc", "device alloc", "pinned alloc", "kernel"
    label: str
    start: float  # host perf_counter seconds
    end: float


class HostTrace:
    """Records HostEvents of an engine (LLMEngine) between start() and stop()."""

    PHASES = (("scheduler", "schedule", "schedule"), ("runner", "prepare_inputs", "prepare"),
              ("runner", "launch", "launch"), ("postprocessor", "run", "postprocess"))

    def __init__(self, engine):
        self.engine = engine
        self.events: list[HostEvent] = []
        self.num_launches = 0
        self._undo: list = []

    def start(self) -> None:
        from engine.executor.runner import StepHandle

        core = self.engine.core
        for owner, name, label in self.PHASES:
            self._wrap(getattr(core, owner), name, label)
        self._wrap(StepHandle, "result", "wait")
        gc.callbacks.append(self._on_gc)
        self._undo.append(lambda: gc.callbacks.remove(self._on_gc))
        if core.ops.name == "cuda":
            self._trace_cuda()

    def stop(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _record(self, kind: str, label: str, start: float) -> None:
        self.events.append(HostEvent(kind, label, start, time.perf_counter()))

    def _patch(self, obj, name: str, new) -> None:
        """obj.name = new until stop()."""
        own = vars(obj).get(name)  # None: the attribute comes from obj's class
        setattr(obj, name, new)
        self._undo.append(lambda: delattr(obj, name) if own is None else setattr(obj, name, own))

    def _wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)
        trace = self

        def timed(*a, **kw):
            if label == "launch" and a and getattr(a[0], "seqs", None):
                trace.num_launches += 1
            text = f"launch {trace.num_launches}" if label == "launch" else label
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                trace._record("phase", text, t)

        self._patch(obj, name, timed)

    def _on_gc(self, what: str, info: dict) -> None:
        if what == "start":
            self._gc_start = time.perf_counter()
        else:
            self._record("gc", f"generation {info['generation']}, {info['collected']} collected",
                         self._gc_start)

    def _trace_cuda(self) -> None:
        import cupy
        from cupy.cuda import memory_hook

        from engine.executor.ops import cuda_kernels

        trace = self

        class Allocations(memory_hook.MemoryHook):
            name = "pagedserve-idle-report"

            def alloc_preprocess(self, **kw):
                self.t = time.perf_counter()

            def alloc_postprocess(self, **kw):
                trace._record("device alloc", f"{kw['mem_size'] / 2**20:.1f} MiB", self.t)

        hook = Allocations()
        hook.__enter__()
        self._undo.append(lambda: hook.__exit__(None, None, None))

        pool = cupy.get_default_pinned_memory_pool()

        def pinned(size):
            t = time.perf_counter()
            mem = pool.malloc(size)
            if time.perf_counter() - t > PINNED_SLOW_S:
                trace._record("pinned alloc", f"{size / 2**10:.1f} KiB", t)
            return mem

        cupy.cuda.set_pinned_memory_allocator(pinned)
        self._undo.append(lambda: cupy.cuda.set_pinned_memory_allocator(pool.malloc))

        # kernel() is cached: a miss is a kernel looked up (its file compiled or loaded) the
        # first time; counted per launch.
        runner = self.engine.core.runner
        launch = runner.launch

        def counted(*a, **kw):
            before, t = cuda_kernels.kernel.cache_info().misses, time.perf_counter()
            try:
                return launch(*a, **kw)
            finally:
                new = cuda_kernels.kernel.cache_info().misses - before
                if new:
                    trace._record("kernel", f"{new} first used in launch {trace.num_launches}",
                                  t)

        self._patch(runner, "launch", counted)


def idle_gaps(spans: list[tuple[float, float]]) -> list[tuple[int, float, float]]:
    """(step index from 0, idle from, idle to) in device seconds after the origin: before the first
    step (from the origin) and between steps in launch order; steps that overlap leave none."""
    gaps, end = [], 0.0
    for k, (start, stop) in enumerate(spans):
        if start > end:
            gaps.append((k, end, start))
        end = max(end, stop)
    return gaps


def overlapping(events: list[HostEvent], start: float, end: float) -> list[HostEvent]:
    return [e for e in events if e.end > start and e.start < end]


def idle_report(spans: list[tuple[float, float]], events: list[HostEvent], origin: float,
                top: int = 10, step_labels: list[str] | None = None) -> dict:
    """The idle time of `spans` (runner.gpu_step_spans), and its `top` longest gaps with the
    host events (HostTrace.events) inside each; `origin`: the host's perf_counter when the
    origin event ran. step_labels[k]: what step k was (e.g. its prompt tokens)."""
    gaps = idle_gaps(spans)
    classes = {label: [0, 0.0] for label, _ in GAP_CLASSES}
    for _, a, b in gaps[1:]:  # between steps
        label = [name for name, low in GAP_CLASSES if b - a >= low][-1]
        classes[label][0] += 1
        classes[label][1] += b - a
    longest = sorted(gaps, key=lambda g: g[1] - g[2])[:top]
    listed = []
    for k, a, b in sorted(longest):
        inside = overlapping(events, origin + a, origin + b)
        listed.append({
            "step": k,
            "what": step_labels[k] if step_labels and k < len(step_labels) else "",
            "idle_ms": (b - a) * 1e3,
            "host": [{"kind": e.kind, "label": e.label,
                      "ms": (min(e.end, origin + b) - max(e.start, origin + a)) * 1e3,
                      "whole_ms": (e.end - e.start) * 1e3} for e in inside],
        })
    return {
        "device_s": spans[-1][1] if spans else 0.0,
        "idle_before_first_s": gaps[0][2] - gaps[0][1] if gaps and gaps[0][0] == 0 else 0.0,
        "idle_between_s": sum(b - a for _, a, b in gaps if _ > 0),
        "gaps_by_size": {label: {"count": n, "s": s} for label, (n, s) in classes.items()},
        "longest": listed,
        "host_totals": _totals(events),
    }


def _totals(events: list[HostEvent]) -> dict[str, dict]:
    """Count and seconds of the non-phase host events by kind (collections, allocations)."""
    out: dict[str, dict] = {}
    for e in events:
        if e.kind != "phase":
            t = out.setdefault(e.kind, {"count": 0, "s": 0.0})
            t["count"] += 1
            t["s"] += e.end - e.start
    return out


def format_idle(r: dict) -> list[str]:
    lines = [f"device idle: {r['idle_before_first_s'] * 1e3:.1f} ms before the first step, "
             f"{r['idle_between_s'] * 1e3:.1f} ms between steps (of {r['device_s']:.2f} s); "
             "gaps " + ", ".join(f"{label} {v['count']} ({v['s'] * 1e3:.1f} ms)"
                                 for label, v in r["gaps_by_size"].items() if v["count"])]
    if r["host_totals"]:
        lines.append("host: " + ", ".join(f"{kind} {v['count']} ({v['s'] * 1e3:.1f} ms)"
                                          for kind, v in r["host_totals"].items()))
    for g in r["longest"]:
        host = "; ".join(f"{h['kind'] + ' ' if h['kind'] != 'phase' else ''}{h['label']} "
                         f"{h['ms']:.2f} of {h['whole_ms']:.2f} ms" for h in g["host"])
        lines.append(f"  before step {g['step'] + 1}{' (' + g['what'] + ')' if g['what'] else ''}: "
                     f"{g['idle_ms']:.2f} ms idle; host: {host or 'nothing recorded'}")
    return lines
