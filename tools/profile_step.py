"""Per-step profile of the engine: where a decode step's time goes, at batch 1, 64 and 256.

Each batch size B runs B of W1's requests (tools/workloads.py) until every one is decoding, then
times `--steps` decode steps split into:

    schedule        scheduler.schedule()
    prepare         runner.prepare_inputs() + runner.prepare_sampling() (host arrays)
    launch          the rest of runner.launch(): upload, queue the forward and the sampling
    wait            StepHandle.result(): waiting for the device's sampled ids
    postprocess     the rest of engine.step(): append tokens, stop checks, outputs

With overlapped scheduling (on by default on cuda; `--no-async-scheduling` turns it off) the wait
is for the step launched one call earlier, so it shrinks to what the device runs longer than the
host works.

`--speculative-tokens K` profiles speculative decoding (batches up to the default
disable_by_batch_size, 32, speculate): every step
proposes K drafts and accepts as many as tools/results/spec_profile.json's histogram says (the
replay of tools/bench_spec.py), and two more phases come out of the others:

    propose         the n-gram proposer (part of postprocess above)
    forward         the model's forward and the sampling as the host sees them (part of launch):
                    on numpy the computation itself, on cuda eager launches (graphs: ~0)

so that on the CPU, total - forward is the host's work per step that the device would wait for
(speculative steps are synchronous: the next proposal needs the accepted tokens).

Usage:
    python tools/profile_step.py --device cuda --model qwen3-0.6b       # dummy weights
    python tools/profile_step.py --device cuda --sampled              # as chat traffic samples
    python tools/profile_step.py --device cpu                         # tiny model on the CPU

On numpy the model is a tiny random one (vocab 512, hidden 64, 2 layers) so that the forward is
cheap and the host's share shows; W1's prompts are scaled by `--scale` (0.25 by default there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.workloads import (  # noqa: E402
    count_arg,
    count_list_arg,
    nonnegative_arg,
    scale_arg,
    scale_requests,
    w1_requests,
)

PHASES = ("schedule", "prepare", "launch", "wait", "postprocess")


def tiny_engine(max_num_seqs: int, num_kv_blocks: int, block_size: int = 16,
                async_scheduling: bool | None = None, speculative_config: dict | None = None):
    """LLMEngine on numpy with a 2-layer random llama (vocab 512, hidden 64)."""
    from engine.engine import LLMEngine
    from engine.executor.ops.numpy_ops import NumpyOps
    from engine.model.config import EngineConfig, ModelConfig
    from engine.model.loader import dummy_weights

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64,
                         intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, max_position_embeddings=2048, eos_token_ids=[2],
                         tie_word_embeddings=True)
    loaded = types.SimpleNamespace(config=config, tokenizer=None,
                                   weights=dummy_weights(config, NumpyOps(), seed=0))
    return LLMEngine(EngineConfig(device="cpu", max_num_seqs=max_num_seqs,
                                  num_kv_blocks=num_kv_blocks, block_size=block_size,
                                  async_scheduling=async_scheduling,
                                  speculative_config=speculative_config),
                     loaded_model=loaded)


def gpu_engine(args):
    from engine.engine import LLMEngine
    from engine.model.config import EngineConfig

    return LLMEngine(EngineConfig(model=args.model, device=args.device, load_format="dummy",
                                  max_num_seqs=args.max_num_seqs, dtype=args.dtype,
                                  enforce_eager=args.enforce_eager,
                                  async_scheduling=args.async_scheduling,
                                  speculative_config=spec_config(args)))


def spec_config(args) -> dict | None:
    if not args.speculative_tokens:
        return None
    return {"method": "ngram", "num_speculative_tokens": args.speculative_tokens}


def install_spec_replay(engine, profile: tuple[list[int], int]) -> None:
    """Drafts and verdicts replayed from a measured acceptance profile (tools/bench_spec.py's
    spec_profile_arg: its histogram and no-draft steps)."""
    from tools.bench_spec import install_replay

    measured, no_draft_steps = profile
    k = engine.core.spec.config.num_speculative_tokens
    hist = (measured + [0] * k)[: k + 1]  # the profile's k may differ: truncated/padded
    install_replay(engine.core.spec, hist, no_draft_steps, engine.model_config.vocab_size)


class _Timers:
    """Wraps methods of live objects or classes to sum their time; restore() undoes it."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._patched: list[tuple[object, str, object]] = []

    def wrap(self, obj, name: str, key: str):
        # What obj itself holds under `name` (None: it came from obj's class).
        self._patched.append((obj, name, vars(obj).get(name)))
        fn = getattr(obj, name)
        totals = self.totals

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[key] = totals.get(key, 0.0) + time.perf_counter() - t

        setattr(obj, name, timed)

    def restore(self):
        for obj, name, original in reversed(self._patched):
            if original is None:
                delattr(obj, name)
            else:
                setattr(obj, name, original)
        self._patched = []


# --sampled: the settings chat traffic samples with (issue 12's W1 sampled workload)
CHAT_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}


def profile_batch(engine, prompts, num_steps: int, sync=None, sampling: dict | None = None) -> dict:
    """Milliseconds per decode step for each phase, with len(prompts) sequences decoding,
    greedy or with `sampling`'s SamplingParams fields."""
    from engine import SamplingParams
    from engine.executor.runner import StepHandle

    spec = engine.core.spec
    per_step = 1 + (spec.config.num_speculative_tokens if spec is not None else 0)
    params = SamplingParams(**(sampling or {"temperature": 0.0}), ignore_eos=True, seed=0,
                            max_tokens=(num_steps + 8) * per_step)
    ids = [f"p{len(prompts)}-{i}" for i in range(len(prompts))]
    for request_id, p in zip(ids, prompts, strict=True):
        engine.add_request(request_id, {"prompt_token_ids": p}, params)
    sched = engine.scheduler
    while sched.waiting or any(s.num_uncomputed_tokens > 1 for s in sched.running):
        engine.step()  # prefill (and the first decode of the early ones)
    for _ in range(2):
        engine.step()  # warm: graphs replayed once, buffers grown
    if sync:
        sync()
    timers = _Timers()
    timers.wrap(sched, "schedule", "schedule")
    timers.wrap(engine.runner, "prepare_inputs", "prepare_inputs")
    timers.wrap(engine.runner, "prepare_sampling", "prepare_sampling")
    timers.wrap(engine.runner, "launch", "launch")
    timers.wrap(StepHandle, "result", "wait")
    if spec is not None:
        timers.wrap(spec, "propose", "propose")
        timers.wrap(engine.core.model, "forward", "forward")
        timers.wrap(engine.core.ops, "sample_start", "forward")
    tokens_before = engine.core.get_stats().generation_tokens_total
    batch_sizes = []
    t0 = time.perf_counter()
    try:
        for _ in range(num_steps):
            engine.step()
            batch_sizes.append(sched.num_running)
        if sync:
            sync()
        total = time.perf_counter() - t0
    finally:
        timers.restore()
    for request_id in ids:
        engine.abort(request_id)
    engine.step()
    t = timers.totals
    prepare = t.get("prepare_inputs", 0.0) + t.get("prepare_sampling", 0.0)
    forward, propose = t.get("forward", 0.0), t.get("propose", 0.0)
    phases = {
        "schedule": t.get("schedule", 0.0),
        "prepare": prepare,
        "launch": t.get("launch", 0.0) - prepare - forward,
        "wait": t.get("wait", 0.0),
        "postprocess": total - t.get("schedule", 0.0) - t.get("launch", 0.0) - t.get("wait", 0.0)
        - propose,
    }
    if spec is not None:
        phases |= {"propose": propose, "forward": forward}
    ms = {k: 1e3 * v / num_steps for k, v in phases.items()}
    ms["total"] = 1e3 * total / num_steps
    ms["batch"] = max(batch_sizes)
    num_tokens = engine.core.get_stats().generation_tokens_total - tokens_before
    ms["tok_s"] = num_tokens / total
    ms["tokens_per_step"] = num_tokens / num_steps
    return ms


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "numpy", "cuda"),
                    help="cpu/numpy: a tiny random model on numpy; cuda: --model, dummy weights")
    ap.add_argument("--model", default="qwen3-0.6b", help="preset (cuda, dummy weights)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                    help="cuda: weights and activations (default: auto)")
    ap.add_argument("--batch-sizes", type=count_list_arg, default=[1, 64, 256],
                    help="sequences decoding together, one profile each (default 1,64,256)")
    ap.add_argument("--steps", type=count_arg, default=50,
                    help="decode steps timed per batch size")
    ap.add_argument("--scale", type=scale_arg, default=None,
                    help="shrink W1's prompts, in (0, 1] (default 0.25 on numpy, 1 on cuda)")
    ap.add_argument("--max-num-seqs", type=count_arg, default=256,
                    help="sequences in one step at most, >= the largest batch size (default 256)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="cuda: no CUDA graphs, every step launched kernel by kernel")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="overlap host and device (default: on for cuda)")
    ap.add_argument("--speculative-tokens", type=nonnegative_arg, default=0,
                    help="K > 0: speculative decoding with K drafts, acceptance replayed")
    ap.add_argument("--spec-profile", default=str(Path(__file__).parent / "results" /
                                                  "spec_profile.json"),
                    help="the acceptance histogram that --speculative-tokens replays")
    ap.add_argument("--sampled", action="store_true",
                    help="sample as chat traffic does (temperature 0.8, top_p 0.95, top_k 50, "
                         "repetition_penalty 1.1) instead of greedily")
    ap.add_argument("--json", action="store_true", help="print one JSON list of the rows")
    args = ap.parse_args(argv)
    sizes = args.batch_sizes
    if max(sizes) > args.max_num_seqs:
        ap.error(f"argument --batch-sizes: {max(sizes)} is more than --max-num-seqs "
                 f"({args.max_num_seqs}) lets decode together")
    profile = None
    if args.speculative_tokens:
        from tools.bench_spec import spec_profile_arg

        try:
            profile = spec_profile_arg(args.spec_profile)
        except argparse.ArgumentTypeError as e:
            ap.error(f"argument --spec-profile: {e}")
    on_cpu = args.device != "cuda"
    scale = args.scale or (0.25 if on_cpu else 1.0)
    prompts, outputs = w1_requests(max(sizes))
    prompts, _ = scale_requests(prompts, outputs, scale, 512 if on_cpu else None)
    sync = None
    if on_cpu:
        longest = max(len(p) for p in prompts) + args.steps + 16
        engine = tiny_engine(args.max_num_seqs, max(sizes) * (-(-longest // 16)) + 16,
                             async_scheduling=args.async_scheduling,
                             speculative_config=spec_config(args))
    else:
        engine = gpu_engine(args)
        sync = engine.ops.synchronize
    if args.speculative_tokens:
        install_spec_replay(engine, profile)
    phases = PHASES + (("propose", "forward") if args.speculative_tokens else ())
    rows = []
    for b in sizes:
        row = profile_batch(engine, prompts[:b], args.steps, sync,
                            CHAT_SAMPLING if args.sampled else None)
        rows.append(row)
        if not args.json:
            cells = "  ".join(f"{k} {row[k]:7.3f}" for k in phases)
            print(f"batch {row['batch']:4d}: {cells}  total {row['total']:7.3f} ms/step  "
                  f"({row['tok_s']:.0f} tok/s, {row['tokens_per_step']:.2f} tokens/step)",
                  flush=True)
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
