"""`pagedserve trace`: run a small teaching workload and record every engine step to JSON, for
the dashboard to replay with play / pause / step / scrub.

Each frame holds what the scheduler gave that step (sequence, tokens, prefill or decode), how
long it took, and the dashboard snapshot delta after it (engine/core/introspect.py: block-table
changes, keyed blocks, queues, counters). Frame 0 is a keyframe taken before the first step.
Prompts are made of token ids, never text, so any model works, random weights included.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.sampling_params import SamplingParams
from engine.model.config import EngineConfig


@dataclass
class Arrival:
    step: int  # queued just before this step runs (1 = the first)
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    note: str = ""


@dataclass
class Workload:
    description: str
    engine: dict  # EngineConfig fields: a small KV pool makes blocks big enough to see
    arrivals: list[Arrival] = field(default_factory=list)


def _ids(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


PREFIX = _ids(1000, 16)  # four blocks of 4 tokens that every request of "shared-prefix" opens with

WORKLOADS = {
    "shared-prefix": Workload(
        "three requests open with the same 16 tokens: the first computes those 4 blocks, the "
        "next two find them in the prefix cache and share them (ref count 3)",
        dict(block_size=4, num_kv_blocks=40, max_num_seqs=8, max_num_batched_tokens=16,
             max_model_len=64),
        [Arrival(1, "req-a", PREFIX + _ids(2000, 6), 8,
                 "req-a arrives: 22 prompt tokens, more than the 16-token step budget, so its "
                 "prefill is chunked"),
         Arrival(3, "req-b", PREFIX + _ids(3000, 3), 8,
                 "req-b arrives: its first 4 blocks are req-a's, found by hash"),
         Arrival(4, "req-c", PREFIX + _ids(4000, 5), 6, "req-c arrives: the same prefix again")]),
    "preemption": Workload(
        "three requests grow in a pool of 12 blocks until it runs out: the newest is preempted, "
        "its blocks are freed, and it waits at the head of the queue until the others finish, "
        "then recomputes its prompt and the tokens it had generated",
        dict(block_size=4, num_kv_blocks=12, max_num_seqs=8, max_num_batched_tokens=32,
             max_model_len=48),
        [Arrival(1, "req-a", _ids(100, 8), 14, "req-a and req-b arrive: 2 blocks each"),
         Arrival(1, "req-b", _ids(200, 8), 14),
         Arrival(2, "req-c", _ids(300, 7), 14,
                 "req-c arrives; each request may grow to 22 tokens (6 blocks), 18 > 12")]),
}


def _record_batches(engine) -> list:
    """Wrap the engine's scheduler so each step's batch is noted before the model runs it."""
    scheduler, schedule, batches = engine.scheduler, engine.scheduler.schedule, []

    def recording_schedule():
        batch = schedule()
        batches.append(([[seq.seq_id, n, "decode" if seq.num_uncomputed_tokens == 1 else
                          "prefill"] for seq, n in zip(batch.seqs, batch.num_new_tokens,
                                                       strict=True)], batch.num_preempted))
        return batch

    scheduler.schedule = recording_schedule
    return batches


def record(engine, workload: Workload, name: str, max_steps: int = 500) -> dict:
    """Run `workload` on `engine` (built with workload.engine) and return the trace."""
    batches = _record_batches(engine)
    arrivals = sorted(workload.arrivals, key=lambda a: a.step)
    vocab = engine.model_config.vocab_size

    def arrive(step: int) -> str:
        notes = []
        while arrivals and arrivals[0].step <= step:
            a = arrivals.pop(0)
            ids = [t % vocab for t in a.prompt_token_ids]
            params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
            engine.add_request(a.request_id, {"prompt_token_ids": ids}, params)
            notes += [a.note] if a.note else []
        return "\n".join(notes)

    note = arrive(1)
    first = engine.snapshot(None)
    frames = [{"step": 0, "step_ms": 0, "batch": [], "num_preempted": 0, "num_sampled": 0,
               "note": note, "snapshot": first}]
    version, generated = first["v"], first["stats"]["generation_tokens_total"]
    step = 1
    while (engine.has_unfinished_requests() or arrivals) and step <= max_steps:
        note = arrive(step) if step > 1 else ""
        start = time.perf_counter()
        engine.step()
        step_ms = 1000 * (time.perf_counter() - start)
        snap = engine.snapshot(version)
        batch, num_preempted = batches[-1] if batches else ([], 0)
        batches.clear()
        sampled = snap["stats"]["generation_tokens_total"] - generated
        frames.append({"step": step, "step_ms": round(step_ms, 2), "batch": batch,
                       "num_preempted": num_preempted, "num_sampled": sampled, "note": note,
                       "snapshot": snap})
        version, generated = snap["v"], snap["stats"]["generation_tokens_total"]
        step += 1
    return {"format": "pagedserve-trace", "version": 1, "workload": name,
            "description": workload.description,
            "model": engine.config.model or "SmolLM2-135M-Instruct (the default)",
            "num_blocks": engine.num_kv_blocks, "block_size": engine.config.block_size,
            "frames": frames}


def trace(args, config: EngineConfig, given_dests: set[str] = frozenset()) -> int:
    """The `pagedserve trace` command: record `args.workload` into `args.out`; `given_dests`:
    the flags the command line gave (cli._given_dests)."""
    from engine.engine import LLMEngine

    workload = WORKLOADS[args.workload]
    # The workload sets these engine flags itself: given other values (its default's too),
    # they would be ignored; its own value given again is no conflict.
    given = [f"{name} {getattr(args, name)}" for name, value in workload.engine.items()
             if name in given_dests and getattr(args, name) != value]
    if given:
        fixed = ", ".join(f"{name} {value}" for name, value in workload.engine.items())
        raise ValueError(f"the {args.workload!r} workload sets its own engine ({fixed}); leave "
                         f"out {', '.join(given)}")
    out = Path(args.out or f"{args.workload}.trace.json")
    # before the model loads and the workload runs, and naming the flag (it was an OSError's
    # line once all that was done)
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: " + ("is a folder; give a file's path"
                         if out.is_dir() else f"the folder {str(out.parent)!r} does not exist"))
    engine = LLMEngine(dataclasses.replace(config, **workload.engine))
    try:
        result = record(engine, workload, args.workload)
    finally:
        engine.shutdown()
    out.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    print(f"{len(result['frames']) - 1} steps of {args.workload!r} written to {out} "
          f"({out.stat().st_size // 1024} KB); replay it at /dashboard with 'replay a trace'")
    return 0
