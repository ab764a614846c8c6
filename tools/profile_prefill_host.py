"""Host time of an eager mixed step (W2's time to first token): 8 decodes + one new prompt of
64 / 256 / 512 tokens on Qwen3-0.6B dummy weights (28 layers), cublasGemmEx against the
per-shape cuBLASLt plans of PAGEDSERVE_LEAN_GEMM (ops/cuda_gemm_plan.py) and against the mixed
steps' CUDA graphs (engine/executor/mixed_graphs.py), alone and together.

    PYTHONPATH=. python tools/profile_prefill_host.py [--only micro,forward,engine]

Sections:
  micro    host microseconds per call of the pieces an eager forward repeats (GEMM calls,
           a RawKernel launch, an allocation, an argument check), and whether a small
           cupy.asarray upload waits for the device (a pageable copy would)
  forward  the step as runner._forward_packed runs it (one upload, device metadata, the
           forward): host ms (perf_counter around the call, the device synced before and after),
           total ms (synced), logits bit-equal to the cublasGemmEx path; "new M" rows change the
           prompt length every call (W2: every prompt step has a new token count, so a plan per
           shape is made inside the timed call); then cProfile's top entries (full listing in
           ${OUT:-/tmp}/ttft2_profile.txt)
  engine   runner.launch of the step that holds the new prompt, in an LLMEngine with 8
           requests decoding (what GET /debug/first_token calls `launch`)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tools.workloads import add_only_flag, require_gpu  # noqa: E402

try:  # without CuPy main() still parses its command line, then says what is missing
    import cupy
except ImportError:
    pass  # check_cuda says so

PRESET, BLOCK, NUM_DECODES, DECODE_CTX = "qwen3-0.6b", 16, 8, 300
PROMPTS = (64, 256, 512)
OUT = Path(os.environ.get("OUT", "/tmp")) / "ttft2_profile.txt"


def per_call_us(fn, calls: int = 200) -> float:
    """Host microseconds per fn() (device synced before and after the loop, not inside)."""
    fn()
    cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    cupy.cuda.Device().synchronize()
    return host / calls * 1e6


def set_lean(ops, on: bool) -> None:
    from engine.executor.ops.cuda_gemm_plan import PlannedGemm

    ops._gemm.tuned = PlannedGemm(ops._gemm) if on else None


# ----------------------------------------------------------------------------- micro


def check_micro(ops):
    from engine.executor.ops.cuda_kernels import kernel

    rng = np.random.default_rng(0)
    x = ops.from_host(rng.standard_normal((72, 1024)))
    w = ops.from_host(rng.standard_normal((4096, 1024)) * 0.03)
    norm_w = ops.ones((1024,))
    out = cupy.empty((72, 4096), ops.storage)
    gemm = ops._gemm
    rows = [("cublasGemmEx call (Gemm.gemm_ex), 72 x 4096 x 1024",
             lambda: gemm.gemm_ex(x, w, out, ops.dtype))]
    set_lean(ops, True)
    planned = gemm.tuned
    rows.append(("cuBLASLt planned call (PlannedGemm), same shape",
                 lambda: planned(x, w, out, ops.dtype)))
    k = kernel("rms_norm.cu", f"rms_norm_kernel<{ops.ctype}>", ops.ctype)
    y = cupy.empty_like(x)
    args = (y, np.uint64(0), x, norm_w, np.float32(1e-6), np.int32(1024), np.int32(0))
    rows += [("RawKernel launch, 7 arguments (rms_norm)", lambda: k((72,), (256,), args)),
             ("ops.rms_norm (checks + empty + kernel lookup + launch)",
              lambda: ops.rms_norm(x, norm_w, 1e-6)),
             ("cupy.empty((72, 1024))", lambda: cupy.empty((72, 1024), ops.storage)),
             ("ops._check(x, 'x', 2)", lambda: ops._check(x, "x", 2)),
             ("x.flags.c_contiguous", lambda: x.flags.c_contiguous),
             ("x._c_contiguous", lambda: x._c_contiguous),
             ("cupy.cuda.get_current_stream().ptr", lambda: cupy.cuda.get_current_stream().ptr),
             ("kernel(file, name, ctype) lookup",
              lambda: kernel("rms_norm.cu", f"rms_norm_kernel<{ops.ctype}>", ops.ctype))]
    for label, fn in rows:
        print(f"micro | {label} | {per_call_us(fn):.2f} us/call |", flush=True)
    ref = cupy.empty_like(out)
    gemm.gemm_ex(x, w, ref, ops.dtype)
    planned(x, w, out, ops.dtype)
    same = bool(cupy.array_equal(ref, out))
    print(f"micro | planned GEMM output bit-equal to cublasGemmEx: {same} |", flush=True)
    set_lean(ops, False)
    # Does a small upload wait for queued device work? ~20 ms of GEMMs queued first.
    big = cupy.zeros((4096, 4096), ops.storage)
    big_w = cupy.zeros((4096, 4096), ops.storage)
    big_out = cupy.empty_like(big)
    small = np.arange(64, dtype=np.int32)
    for label, up in (("cupy.asarray(64 int32)", lambda: cupy.asarray(small)),
                      ("ops.from_host(64 int32)", lambda: ops.from_host(small))):
        cupy.cuda.Device().synchronize()
        for _ in range(100):
            gemm.gemm_ex(big, big_w, big_out, ops.dtype)
        t = time.perf_counter()
        up()
        host = time.perf_counter() - t
        t2 = time.perf_counter()
        cupy.cuda.Device().synchronize()
        left = time.perf_counter() - t2
        print(f"micro | {label} behind ~100 queued 4096^3 GEMMs | {host * 1e3:.3f} ms host, "
              f"device busy {left * 1e3:.1f} ms more after it (small: the upload waited) |",
              flush=True)


# ----------------------------------------------------------------------------- forward


def build_model(ops):
    from engine.executor.transformer import Transformer
    from engine.model.config import ModelConfig
    from engine.model.loader import dummy_weights

    config = ModelConfig.from_preset(PRESET)
    model = Transformer(config, dummy_weights(config, ops, seed=0), ops, 4096)
    return config, model


def host_step(prompt: int, max_blocks: int):
    """(flat int32 inputs, where each array sits, AttentionMetadata) of 8 decodes at context
    DECODE_CTX + one fresh prompt of `prompt` tokens, as step_inputs packs them."""
    from engine.executor.ops import AttentionMetadata

    blocks_per = -(-DECODE_CTX // BLOCK)
    lens = [1] * NUM_DECODES + [prompt]
    ctx = [DECODE_CTX] * NUM_DECODES + [prompt]
    tables = np.full((NUM_DECODES + 1, max_blocks), -1, np.int32)
    ids, pos, slots = [], [], []
    next_block = 0
    for s, (n, c) in enumerate(zip(lens, ctx, strict=True)):
        nb = -(-c // BLOCK) if s == NUM_DECODES else blocks_per
        tables[s, :nb] = np.arange(next_block, next_block + nb)
        next_block += nb
        p = np.arange(c - n, c)
        pos.append(p)
        ids.append((p * 31 + s) % 1000 + 5)
        slots.append(tables[s, p // BLOCK] * BLOCK + p % BLOCK)
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    logits_idx = (qsl[1:] - 1).astype(np.int32)
    parts = {"input_ids": np.concatenate(ids), "positions": np.concatenate(pos),
             "slot_mapping": np.concatenate(slots), "query_start_loc": qsl,
             "context_lens": np.array(ctx, np.int32), "block_tables": tables.ravel(),
             "logits_indices": logits_idx}
    where, flat, at = {}, [], 0
    for name, a in parts.items():
        where[name] = slice(at, at + len(a))
        flat.append(a.astype(np.int32))
        at += len(a)
    meta = AttentionMetadata(parts["slot_mapping"], qsl, parts["context_lens"], tables,
                             int(max(lens)), int(max(ctx)))
    return np.concatenate(flat), where, meta


def run_step(ops, model, cache, flat, where, host, mixed=None):
    """runner._forward_packed's cuda path: one upload, device metadata, the forward (through
    `mixed`, a captured MixedGraphs, when given)."""
    from engine.executor.ops.cuda_attention import DeviceAttentionMetadata

    dev = ops.from_host(flat)
    view = {name: dev[s] for name, s in where.items()}
    meta = DeviceAttentionMetadata(
        slot_mapping=view["slot_mapping"], query_start_loc=view["query_start_loc"],
        context_lens=view["context_lens"],
        block_tables=view["block_tables"].reshape(host.block_tables.shape),
        max_query_len=host.max_query_len, max_context_len=host.max_context_len, host=host)
    if mixed is not None:
        return mixed.run(view["input_ids"], view["positions"], view["slot_mapping"], meta,
                         view["logits_indices"])
    return model.forward(view["input_ids"], view["positions"], cache, meta,
                         view["logits_indices"])


def time_steps(ops, model, cache, steps, mixed=None) -> tuple[float, float, cupy.ndarray]:
    """Median host ms and total ms over `steps` (list of host_step tuples), last logits."""
    hosts, totals, logits = [], [], None
    for flat, where, meta in steps:
        ops.synchronize()
        t = time.perf_counter()
        logits = run_step(ops, model, cache, flat, where, meta, mixed)
        hosts.append(time.perf_counter() - t)
        ops.synchronize()
        totals.append(time.perf_counter() - t)
    return statistics.median(hosts) * 1e3, statistics.median(totals) * 1e3, logits


# (label, lean GEMM, mixed graphs): the old path first (the reference) and last again
VARIANTS = (("cublasGemmEx, eager", False, False), ("lean GEMM only", True, False),
            ("mixed graphs only", False, True), ("both (the default)", True, True),
            ("cublasGemmEx, eager, again", False, False))


def check_forward(ops):
    from engine.executor.mixed_graphs import MixedGraphs

    config, model = build_model(ops)
    max_blocks = 4096 // BLOCK
    cache = ops.alloc_kv_cache(config.num_layers, 1024, config.num_kv_heads, BLOCK,
                               config.head_dim)
    t = time.perf_counter()
    # the buckets the default list gives these steps (8 + 64..527 tokens)
    graphs = MixedGraphs(model, cache, max_tokens=640, buckets=(128, 384, 640))
    graphs.capture()
    print(f"forward | mixed graphs: 3 buckets x {config.num_layers + 1} pieces captured in "
          f"{time.perf_counter() - t:.2f} s |", flush=True)
    report = io.StringIO()
    for prompt in PROMPTS:
        same = [host_step(prompt, max_blocks)] * 15
        new_m = [host_step(prompt + i, max_blocks) for i in range(1, 16)]
        ref = None
        for label, lean, use_graphs in VARIANTS:
            set_lean(ops, lean)
            mixed = graphs if use_graphs else None
            run_step(ops, model, cache, *same[0], mixed=mixed)  # warm: plans for this M made
            host, total, logits = time_steps(ops, model, cache, same, mixed)
            got = ops.to_host(logits)
            ref = got if ref is None else ref
            equal = "same" if np.array_equal(got, ref) else (
                f"DIFFER: max |d| {np.max(np.abs(got - ref)):.3g}, rel "
                f"{np.linalg.norm(got - ref) / np.linalg.norm(ref):.2g}, argmax agree "
                f"{(got.argmax(1) == ref.argmax(1)).sum()}/{len(got)}")
            host_new, total_new, _ = time_steps(ops, model, cache, new_m, mixed)
            print(f"forward | 8 decodes + {prompt}-token prompt | {label} | host {host:.2f} ms "
                  f"| total {total:.2f} ms | logits {equal} | new M each call: host "
                  f"{host_new:.2f} ms, total {total_new:.2f} ms |", flush=True)
            if prompt == 256 and label != "cublasGemmEx, eager, again":
                _profile(ops, model, cache, same[0], label, report, mixed)
    set_lean(ops, False)
    OUT.write_text(report.getvalue())
    print(f"(full cProfile listings in {OUT})", flush=True)


def _profile(ops, model, cache, step, label: str, report: io.StringIO, mixed) -> None:
    ops.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    run_step(ops, model, cache, *step, mixed=mixed)
    prof.disable()
    ops.synchronize()
    for top, dest in ((6, None), (60, report)):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(top)
        text = f"--- cProfile, 8 decodes + 256-token prompt, {label}\n{buf.getvalue()}"
        if dest is None:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            print("\n".join(lines[:3] + lines[-(top + 1):]), flush=True)
        else:
            dest.write(text)


# ----------------------------------------------------------------------------- engine


def check_engine(ops_unused):
    from engine import SamplingParams
    from engine.engine import LLMEngine
    from engine.model.config import EngineConfig

    engine = LLMEngine(EngineConfig(model=PRESET, device="cuda", load_format="dummy",
                                    max_num_seqs=16, dtype="bfloat16"))
    runner, ops = engine.runner, engine.ops
    rng = np.random.default_rng(0)
    decode = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4000)
    for i in range(NUM_DECODES):
        engine.add_request(f"d{i}", {"prompt_token_ids": rng.integers(5, 1000, 200).tolist()},
                           decode)
    for _ in range(4):
        engine.step()
    # host seconds of each call during one engine.step(), per wrapped method
    spent: dict[str, list[float]] = {}
    wrapped = [(runner, "launch"), (runner, "prepare_inputs"), (runner, "_forward_eager"),
               (runner, "prepare_sampling"), (ops, "sample_start")]
    originals = [(obj, name, getattr(obj, name)) for obj, name in wrapped]

    def timed(fn, name):
        def call(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent.setdefault(name, []).append(time.perf_counter() - t)
        return call

    for obj, name, fn in originals:
        setattr(obj, name, timed(fn, name))
    one = SamplingParams(temperature=0.0, max_tokens=1)
    n = 0
    t = time.perf_counter()
    runner.capture_mixed_graphs()
    graphs = runner.mixed_graphs
    print(f"engine | mixed graphs: {len(graphs.sizes)} buckets captured in "
          f"{time.perf_counter() - t:.2f} s |", flush=True)
    try:
        for prompt in PROMPTS:
            for label, lean, use_graphs in VARIANTS[:4]:
                set_lean(ops, lean)
                runner.mixed_graphs = graphs if use_graphs else None
                rows: dict[str, list[float]] = {}
                for rep in range(9):
                    n += 1
                    spent.clear()
                    ids = rng.integers(5, 30000, prompt).tolist()  # no prefix-cache hit
                    engine.add_request(f"p{n}", {"prompt_token_ids": ids}, one)
                    engine.step()
                    if rep:  # the first of each meets new shapes
                        # the launch holding the prompt: the longest; its parts: the longest too
                        for name, values in spent.items():
                            rows.setdefault(name, []).append(max(values))
                    engine.step()
                    engine.abort(f"p{n}")
                ms = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
                parts = ", ".join(f"{k} {ms.get(k, 0.0):.2f}" for _, k in wrapped[1:])
                print(f"engine | launch of the step with a {prompt}-token prompt + 8 decodes | "
                      f"{label} | median {ms['launch']:.2f} ms (min "
                      f"{min(rows['launch']) * 1e3:.2f}) | of which ms: {parts} |", flush=True)
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
        set_lean(ops, False)
        engine.shutdown()


SECTIONS = ("micro", "forward", "engine")  # main's, in order (--only picks from them)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_only_flag(ap, SECTIONS)
    args = ap.parse_args(argv)
    require_gpu("profile_prefill_host")
    from engine.executor.ops.cuda_ops import CudaOps

    only = args.only
    t0 = time.perf_counter()
    ops = CudaOps("bfloat16")
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}; CudaOps up in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    for name, run in zip(SECTIONS, (check_micro, check_forward, check_engine), strict=True):
        if only is not None and name not in only:
            continue
        t = time.perf_counter()
        try:
            run(ops)
        except Exception:
            traceback.print_exc()
            print(f"{name} | FAILED (traceback above) |", flush=True)
        print(f"({name} took {time.perf_counter() - t:.1f} s)", flush=True)
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
