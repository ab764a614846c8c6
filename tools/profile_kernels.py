"""Where W1's device time goes, kernel by kernel, as the run really executes on one GPU.

CUPTI traces every kernel and copy the GPU runs (the nodes of CUDA graphs included, with their
real start and end); the trace is cut into engine steps.

profile_ops.py brackets each op with events in eager mode, where Python's launches stretch the
small ops; this tool traces the run as it really executes (graphs, PDL, overlapped scheduling), so
small kernels, the gaps between kernels and the copies between steps show at their true size.

A step ends with its sampler's kernels (and the copy of the sampled ids back to the host); the
next kernel starts the next step. A step is "with prompt tokens" when it ran a prefill attention
kernel, else a decode step of as many sequences as its decode attention kernel's grid has rows
(CUDA graphs round the batch up to their captured size). Per kind of step the report gives the
mean span (one step's start to the next's), the time some kernel or copy ran (busy), the kernels'
time by category, the GEMMs by which projection they compute (a layer's calls in order: qkv,
then past attention o, gate_up, down; the last of a step is lm_head), the idle gaps by the
pair of kernels they lie between, and the longest kernels by name under their label (which cuBLAS
kernel a projection ran, and its time a call).

Needs NVIDIA's CUPTI bindings on the CUDA machine (`pip install cupti-python`: with
nvidia-cuda-cupti and cuda-bindings, about 20 MB; a tools-only extra, never a dependency of the
engine). The trace costs some speed: the report prints W1's figure under it.

    python tools/profile_kernels.py --model llama3-8b --load-format dummy --device cuda \
        --dtype bfloat16 --save trace.npz        # the trace kept for tools/profile_kernels.py
    python tools/profile_kernels.py --load trace.npz    # the report again, from a saved trace
    python tools/profile_kernels.py --load a.npz --against b.npz   # two traces side by side
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.workloads import count_arg, existing_file_arg  # noqa: E402

# A kernel's category: the first entry whose fragment its (lower-case, possibly mangled) name
# holds. Order matters: qk_norm_rope_kv_kernel is RoPE + KV write, prefill_sm90_kernel attention.
CATEGORIES = (
    ("prefill attention", ("prefill_",)),
    ("decode attention reduce", ("decode_reduce",)),
    ("decode attention", ("decode_mma", "decode_attention")),
    ("rope + kv write", ("rope", "write_kv")),
    ("norm", ("rms_norm", "qk_norm")),
    ("silu", ("silu",)),
    ("sampler", ("greedy", "sample", "logprob", "adjust_logits", "logit_bias", "bitmask",
                 "allow_only", "penalt")),
    ("gemv", ("gemv",)),
    ("gather", ("gather", "embed")),
    ("placeholders", ("resolve_placeholders",)),
    ("fp8 quantize", ("fp8",)),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "splitk", "cublas", "sm90_", "sm80_")),
)
ATTENTION = ("prefill attention", "decode attention", "decode attention reduce")
COPY_D2H = "copy d2h"
BATCH_BUCKETS = (1, 65, 129, 193)  # as bench_throughput's step kinds


@dataclass
class Record:
    """One kernel, copy or memset of the trace: times in ns on CUPTI's clock."""

    name: str  # kernel name, or "copy h2d" / "copy d2h" / "copy d2d" / "memset"
    start: int
    end: int
    grid: tuple[int, int, int] = (0, 0, 0)


def category(name: str) -> str:
    if name.startswith(("copy ", "memset")):
        return name
    low = name.lower()
    for cat, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return cat
    return "other"


def split_steps(records: list[Record]) -> list[list[Record]]:
    """The trace (sorted by start) cut after each step's sampler: a step closes at the first
    record that is neither a sampler kernel nor a device-to-host copy once it has sampled."""
    steps: list[list[Record]] = []
    current: list[Record] = []
    sampled = False
    for rec in records:
        cat = category(rec.name)
        if sampled and cat not in ("sampler", COPY_D2H):
            steps.append(current)
            current, sampled = [], False
        current.append(rec)
        sampled = sampled or cat == "sampler"
    if current:
        steps.append(current)
    return steps


def step_kind(step: list[Record]) -> str:
    cats = [category(r.name) for r in step]
    if "prefill attention" in cats:
        return "with prompt tokens"
    rows = max((r.grid[1] for r, c in zip(step, cats, strict=True) if c == "decode attention"),
               default=0)
    if not rows:
        return "no attention"
    lo = max(b for b in BATCH_BUCKETS if b <= rows)
    hi = next((b - 1 for b in BATCH_BUCKETS if b > lo), None)
    return f"decode {lo}-{hi} seqs" if hi else f"decode {lo}+ seqs"


AFTER_ATTENTION = ("gemm o", "gemm gate_up", "gemm down")  # a layer's GEMM calls past attention


def labels(step: list[Record]) -> list[str]:
    """Each record's label: its category, the GEMMs named by the projection they compute. A
    layer's GEMM calls run qkv, then (past attention) o, gate_up, down; a call's second kernel
    (a split-K reduction: "reduce" in its name) takes its first one's label, and the step's last
    call is lm_head. cuBLAS's nvjet kernels that split K inside ("_splitK_" in the name) are
    whole calls. Counting calls holds where kernels between them are fused away
    (the SiLU-mul in gate_up's epilogue)."""
    out: list[str] = []
    past_attention, calls, label = False, 0, None
    for rec in step:
        cat = category(rec.name)
        if cat in ATTENTION:
            past_attention, calls = True, 0
        if cat != "gemm":
            out.append(cat)
            continue
        low = rec.name.lower()
        if label is None or "reduce" not in low:  # a new call
            if past_attention and calls < len(AFTER_ATTENTION):
                label, calls = AFTER_ATTENTION[calls], calls + 1
                past_attention = calls < len(AFTER_ATTENTION)
            else:
                label = "gemm qkv"
        out.append(label)
    gemms = [i for i, lab in enumerate(out) if lab.startswith("gemm")]
    if gemms:  # the step's last GEMM call (a split-K one: its kernels in a row) is lm_head
        i, lab = gemms[-1], out[gemms[-1]]
        while i >= 0 and out[i] == lab and category(step[i].name) == "gemm":
            out[i] = "gemm lm_head"
            i -= 1
    return out


def union_ns(step: list[Record]) -> int:
    """Nanoseconds in which at least one record of the step ran."""
    busy, cur_start, cur_end = 0, None, None
    for rec in sorted(step, key=lambda r: r.start):
        if cur_end is None or rec.start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = rec.start, rec.end
        else:
            cur_end = max(cur_end, rec.end)
    if cur_end is not None:
        busy += cur_end - cur_start
    return busy


def analyze(records: list[Record]) -> dict:
    """Per kind of step: steps, mean span / busy (ms), mean ms by category and by label, and the
    mean idle time by the pair of labels it lies between."""
    records = sorted(records, key=lambda r: r.start)
    steps = split_steps(records)
    kinds: dict[str, dict] = {}
    for i, step in enumerate(steps):
        span = (steps[i + 1][0].start if i + 1 < len(steps) else max(r.end for r in step)) \
            - step[0].start
        k = kinds.setdefault(step_kind(step), {
            "steps": 0, "span_ns": 0, "busy_ns": 0, "spans": [], "by_category": defaultdict(int),
            "by_label": defaultdict(int), "calls": defaultdict(int), "gaps": defaultdict(int),
            "by_kernel": defaultdict(int), "kernel_calls": defaultdict(int)})
        k["steps"] += 1
        k["span_ns"] += span
        k["spans"].append(span)
        k["busy_ns"] += union_ns(step)
        labs = labels(step)
        end_so_far, prev_label = None, "previous step"
        for rec, lab in zip(step, labs, strict=True):
            k["by_category"][category(rec.name)] += rec.end - rec.start
            k["by_label"][lab] += rec.end - rec.start
            k["calls"][lab] += 1
            kernel = f"{lab}: {short_name(rec.name)}"
            k["by_kernel"][kernel] += rec.end - rec.start
            k["kernel_calls"][kernel] += 1
            if end_so_far is not None and rec.start > end_so_far:
                k["gaps"][f"{prev_label} -> {lab}"] += rec.start - end_so_far
            end_so_far = rec.end if end_so_far is None else max(end_so_far, rec.end)
            prev_label = lab
        if i + 1 < len(steps) and steps[i + 1][0].start > end_so_far:
            k["gaps"][f"{prev_label} -> next step"] += steps[i + 1][0].start - end_so_far
    out = {}
    for name, k in kinds.items():
        n = k["steps"]
        out[name] = {
            "steps": n, "span_ms": k["span_ns"] / n / 1e6, "busy_ms": k["busy_ns"] / n / 1e6,
            "total_s": k["span_ns"] / 1e9,
            "span_min_median_max_ms": [float(np.min(k["spans"])) / 1e6,
                                       float(np.median(k["spans"])) / 1e6,
                                       float(np.max(k["spans"])) / 1e6],
            "by_category_ms": {c: t / n / 1e6 for c, t in _desc(k["by_category"])},
            "by_label_ms": {c: t / n / 1e6 for c, t in _desc(k["by_label"])},
            "calls_per_step": {c: v / n for c, v in k["calls"].items()},
            "gaps_ms": {c: t / n / 1e6 for c, t in _desc(k["gaps"])},
            # label: kernel -> (ms a step, calls a step): which kernel each projection ran
            "by_kernel": {c: (t / n / 1e6, k["kernel_calls"][c] / n)
                          for c, t in _desc(k["by_kernel"])},
        }
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["total_s"]))


def short_name(name: str, width: int = 90) -> str:
    """A kernel's name cut to `width` characters (cuBLAS's names carry their tile shapes early:
    enough to tell two GEMM kernels apart)."""
    return name if len(name) <= width else name[:width - 3] + "..."


def _desc(d: dict):
    return sorted(d.items(), key=lambda kv: -kv[1])


def format_report(result: dict, top: int = 8) -> str:
    lines = []
    for name, k in result.items():
        lo, mid, hi = k["span_min_median_max_ms"]
        lines += [f"\n{name}: {k['steps']} steps, {k['total_s']:.2f} s; a step spans "
                  f"{k['span_ms']:.3f} ms (min {lo:.3f}, median {mid:.3f}, max {hi:.3f}), busy "
                  f"{k['busy_ms']:.3f} ms ({k['busy_ms'] / max(k['span_ms'], 1e-12):.1%})",
                  "| kernels | ms a step | calls a step |", "|---|---|---|"]
        lines += [f"| {lab} | {ms:.3f} | {k['calls_per_step'].get(lab, 0):.1f} |"
                  for lab, ms in k["by_label_ms"].items()]
        gaps = list(k["gaps_ms"].items())
        if gaps:
            lines += [f"idle, {sum(ms for _, ms in gaps):.3f} ms a step; largest: " + "; ".join(
                f"{pair} {ms * 1e3:.1f} us" for pair, ms in gaps[:top])]
        kernels = list(k.get("by_kernel", {}).items())[:top]
        if kernels:
            lines += ["| label: kernel (the longest) | ms a step | calls a step | us a call |",
                      "|---|---|---|---|"]
            lines += [f"| {name} | {ms:.3f} | {calls:.1f} | {ms * 1e3 / calls:.1f} |"
                      for name, (ms, calls) in kernels]
    return "\n".join(lines)


def format_comparison(base: dict, other: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Two analyses side by side (e.g. cuBLAS against PAGEDSERVE_SKINNY_GEMM=1): per kind of step
    both have, the span, the idle time and every label's ms a step, with B - A."""
    a_name, b_name = names
    lines = []
    for kind in (k for k in base if k in other):
        a, b = base[kind], other[kind]
        rows = [("step span", a["span_ms"], b["span_ms"]),
                ("idle", sum(a["gaps_ms"].values()), sum(b["gaps_ms"].values()))]
        labs = list(a["by_label_ms"]) + [k for k in b["by_label_ms"] if k not in a["by_label_ms"]]
        rows += [(lab, a["by_label_ms"].get(lab, 0.0), b["by_label_ms"].get(lab, 0.0))
                 for lab in labs]
        lines += [f"\n{kind}: {a['steps']} / {b['steps']} steps",
                  f"| ms a step | {a_name} | {b_name} | {b_name} - {a_name} |", "|---|---|---|---|"]
        lines += [f"| {lab} | {x:.3f} | {y:.3f} | {y - x:+.3f} |" for lab, x, y in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- the trace (CUDA machine only)

COPY_KINDS = {1: "copy h2d", 2: "copy d2h", 8: "copy d2d"}  # CUpti_ActivityMemcpyKind


class Trace:
    """CUPTI's activity records of every kernel, copy and memset, from construction on.

    Made before the engine: CUPTI reports the kernels of a CUDA graph node by node only for graphs
    made while it traces. `clear()` drops what ran so far (loading, warm-up); `stop()` flushes and
    returns the records."""

    def __init__(self):
        from cupti import cupti

        self._cupti = cupti
        self.records: list[Record] = []
        self._kinds = (cupti.ActivityKind.CONCURRENT_KERNEL, cupti.ActivityKind.MEMCPY,
                       cupti.ActivityKind.MEMSET)
        cupti.activity_register_callbacks(self._requested, self._completed)
        for kind in self._kinds:
            cupti.activity_enable(kind)

    @staticmethod
    def _requested():
        return 8 << 20, 0  # buffer bytes, records (0: as many as fit)

    def _completed(self, activities):
        kind = self._cupti.ActivityKind
        for a in activities:
            if a.kind == kind.CONCURRENT_KERNEL:
                self.records.append(Record(a.name or "(unnamed kernel)", a.start, a.end,
                                           (a.grid_x, a.grid_y, a.grid_z)))
            elif a.kind == kind.MEMCPY:
                self.records.append(Record(COPY_KINDS.get(int(a.copy_kind), "copy other"),
                                           a.start, a.end))
            elif a.kind == kind.MEMSET:
                self.records.append(Record("memset", a.start, a.end))

    def clear(self):
        import cupy

        cupy.cuda.Device().synchronize()
        self._cupti.activity_flush_all(1)
        self.records = []

    def stop(self) -> list[Record]:
        import cupy

        cupy.cuda.Device().synchronize()
        for kind in self._kinds:
            self._cupti.activity_disable(kind)
        self._cupti.activity_flush_all(1)
        return self.records


def save(path: str, records: list[Record]) -> None:
    names = sorted({r.name for r in records})
    index = {n: i for i, n in enumerate(names)}
    np.savez_compressed(
        path, names=np.array(names, dtype=object).astype(str),
        rows=np.array([(index[r.name], r.start, r.end, *r.grid) for r in records], np.int64))


def load(path: str) -> list[Record]:
    data = np.load(path)
    names = data["names"].tolist()
    return [Record(names[int(i)], int(s), int(e), (int(x), int(y), int(z)))
            for i, s, e, x, y, z in data["rows"]]


def main(argv: list[str] | None = None) -> dict:
    from tools.bench_throughput import (
        add_engine_args,
        llm_and_workload,
        run_requests,
        sampling_settings,
        summarize,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap)
    ap.add_argument("--save", help="keep the trace here (.npz) for --load")
    ap.add_argument("--load", type=existing_file_arg,
                    help="report on a trace saved by --save instead of running")
    ap.add_argument("--top", type=count_arg, default=8,
                    help="gaps and kernels listed per kind of step")
    ap.add_argument("--against", type=existing_file_arg,
                    help="with --load: a second saved trace, reported side by side")
    args = ap.parse_args(argv)
    if args.against and not args.load:
        ap.error("argument --against: compares two saved traces: give --load as well")
    if args.load and args.against:
        result = {"base": analyze(load(args.load)), "other": analyze(load(args.against))}
        print(json.dumps(result) if args.json else format_comparison(
            result["base"], result["other"], (Path(args.load).stem, Path(args.against).stem)))
        return result
    if args.load:
        result = analyze(load(args.load))
        print(json.dumps(result) if args.json else format_report(result, args.top))
        return result
    if args.device != "cuda":
        raise SystemExit("profile_kernels traces the GPU: run it with --device cuda")
    if args.structured or args.tensor_parallel_size != 1:
        raise SystemExit("profile_kernels traces plain W1 on one GPU: no --structured, "
                         "--tensor-parallel-size 1")
    tracer = Trace()
    llm, prompts, output_lens = llm_and_workload(args)
    engine = llm.engine
    settings = sampling_settings(args)
    temperature = settings.pop("temperature")
    tracer.clear()
    run = run_requests(engine, prompts, output_lens, temperature, sampling=settings)
    records = tracer.stop()
    figure = summarize(args, engine, prompts, output_lens, run)["output_tok_s"]
    if args.save:
        save(args.save, records)
    result = analyze(records)
    head = (f"W1 {args.model}, traced: {figure:.0f} output tok/s (bench_throughput.py gives it "
            f"untraced); {len(records)} records")
    print(json.dumps({"output_tok_s": figure, "kinds": result}) if args.json
          else head + format_report(result, args.top))
    return result


if __name__ == "__main__":
    main()
