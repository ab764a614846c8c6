"""Issue 12's kernels on the GPU: each one against its numpy twin (or the path it replaces), timed
by CUDA-graph replay (GPU time, no Python launch cost), with its bandwidth / FLOP rate and % of the
H200's ceiling. Ends with the tables: GEMV vs cuBLAS crossover, flash-decoding split settings,
sampler old vs new, decode steps.

    PYTHONPATH=. python tools/kernel_check.py [--quick] [--only gemv,splits] [--check-each]
    PYTHONPATH=. python tools/gpu_check.py --only new      # the same, from gpu_check

--quick skips the gemv section's Llama-3-8B shapes and the decode steps; --only runs the named
sections (launches, fused, gemv, gemv1 (M = 1 only), splits, sampling, prefill, prefill90 (wgmma),
gguf, decode, step (decode-step variants at batch 1, ctx 512: PDL, early trigger, fusions), fp8:
tools/kernel_check_fp8.py, fp8w1: FP8 vs bf16 linear ops of a W1 step,
tools/kernel_check_fp8w1.py, attn: decode attention v1 vs mma, tools/kernel_check_attn.py, w1: one
W1 step's ops at Llama-3-8B shapes and the tuned GEMMs, tools/kernel_check_w1.py; gemm-m: cuBLAS
at every decode graph size 64..256, skinny: the sm90 skinny GEMM against it (the same file);
norms: the
16-byte RMSNorm and row gather against the old kernels, tools/kernel_check_norms.py; overlap:
W1's decode attention beside the MLP's GEMMs on two streams, tools/kernel_check_overlap.py).
--check-each synchronizes after every row and every section and stops at the first CUDA error,
naming where it surfaced (a kernel fault is sticky: without this it is reported by whichever
later call syncs first). --small shrinks every section (few rows, one weight
copy, 2-layer decode models with a 4096-token vocabulary, 2 timed calls) for compute-sanitizer:

    for s in launches fused gemv splits sampling prefill gguf decode; do
      compute-sanitizer --error-exitcode 9 python tools/kernel_check.py --small --only $s; done

decode1 (tools/kernel_check_decode1.py): a batch-1 decode step's ops each graph-timed alone
against the real step graph, per shape and weight format; `--decode1 qwen3-0.6b,llama3-8b:fp8`
picks which.

--set module.ATTR=value[,...] runs everything with settings of engine.executor.ops modules
changed (b1_gap.py's --variant syntax), e.g. `--only fp8w1 --set cuda_fp8.CLUSTER_MAX_ROWS=64`:
run it again without to compare.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402
from tools import module_settings  # noqa: E402
from tools.kernel_check_decode1 import VARIANTS as DECODE1_VARIANTS  # noqa: E402
from tools.kernel_check_decode1 import check_decode1  # noqa: E402
from tools.workloads import add_only_flag, require_gpu  # noqa: E402

try:  # CuPy and the kernels: without them main() still parses its command line, then says so
    import cupy

    from engine.executor.ops import (
        AttentionMetadata,
        SamplingTensors,
        cuda_gemv,
        cuda_kernels,
        cuda_norm,
        cuda_prefill,
        cuda_sampling,
    )
    from engine.executor.ops import cuda_attention as ca
    from tools import kernel_check_fp8
    from tools.kernel_check_attn import check_attn
    from tools.kernel_check_fp8w1 import check_fp8w1
    from tools.kernel_check_gguf import check_gguf
    from tools.kernel_check_norms import check_norms
    from tools.kernel_check_overlap import check_overlap
    from tools.kernel_check_w1 import check_gemm_sweep, check_skinny, check_w1
except ImportError as e:
    GPU_IMPORT_ERROR: ImportError | None = e  # raised once check_cuda has found CuPy and a GPU
else:
    GPU_IMPORT_ERROR = None

BW, FLOPS = 4.27e12, 800e12  # the H200's measured ceilings (tools/workloads.py)
L2_BYTES = 60 << 20
REF = NumpyOps()
tables: dict[str, list[str]] = {}
OPTS = {"small": False, "check_each": False, "decode1": None, "experiments": False}
# run_all's sections, in the order they run (--only names them)
SECTIONS = ("launches", "fused", "gemv", "splits", "attn", "decode1", "sampling", "prefill",
            "prefill90", "gguf", "decode", "gemv1", "step", "fp8", "fp8w1", "w1", "gemm-m",
            "skinny", "norms", "overlap")


class SectionError(RuntimeError):
    """A CUDA error surfaced by --check-each's sync; the context is unusable after it."""


def check_device(where: str):
    """--check-each: wait for the GPU and raise SectionError naming `where` on a CUDA error."""
    if not OPTS["check_each"]:
        return
    try:
        cupy.cuda.Device().synchronize()
    except (cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.driver.CUDADriverError) as e:
        raise SectionError(f"CUDA error surfaced after {where}: {e}") from e


def graph_time(fn, calls: int = 20, reps: int = 10, pdl: bool = False) -> float:
    """Seconds per fn() on the GPU: `calls` calls captured in one CUDA graph, replayed `reps`
    times between events, median. fn launches kernels only (no host sync, no host copy).
    pdl: captured as programmatic dependent launches, as decode graphs are (each call's kernel
    overlaps the previous one's tail, as in a chain of different kernels)."""
    if OPTS["small"]:
        calls, reps = 2, 1
    # NOTE: the stream below does not wait for the default stream, where the inputs were made
    # (and a pageable upload's DMA may still be running): wait for them here.
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    scope = cuda_kernels.programmatic_launches() if pdl else contextlib.nullcontext()
    saved, cuda_kernels.PDL = cuda_kernels.PDL, pdl or cuda_kernels.PDL  # PDL is opt-in
    with stream, scope:
        for _ in range(calls):  # warm-up: compiles, and fills the memory pool for the capture
            fn()
        stream.synchronize()
        stream.begin_capture()
        for _ in range(calls):
            fn()
        graph = stream.end_capture()
        sec = replay_time(graph, stream, calls, reps)
    cuda_kernels.PDL = saved
    return sec


def replay_time(graph, stream, calls: int, reps: int, launches: int = 1) -> float:
    """Seconds per call of a graph holding `calls` calls: one launch to warm, then `reps` times
    `launches` replays back to back between events on `stream`, median."""
    graph.launch(stream)
    times = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        for _ in range(launches):
            graph.launch(stream)
        end.record(stream)
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3 / (calls * launches))
    return statistics.median(times)


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.isfinite(got).all():
        return float("nan")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def row(table: str, name: str, err, sec: float, nbytes: float = 0, flops: float = 0,
        extra: str = ""):
    frac = max(nbytes / sec / BW, flops / sec / FLOPS)
    line = (f"| {name} | {err} | {sec * 1e6:.1f} | {nbytes / sec / 1e9:.0f} | "
            f"{flops / sec / 1e12:.1f} | {frac * 100:.1f} | {extra} |")
    tables.setdefault(table, []).append(line)
    print(table, line, flush=True)
    check_device(f"{table} row '{name}'")


def up(ops, x):
    d = ops.from_host(np.asarray(x, np.float32))
    return d, ops.to_host(d)


# ----------------------------------------------------------------------------- fused qk/rope/kv


def check_fused(ops):
    from engine.executor.transformer import rope_cos_sin
    from engine.model.config import ModelConfig

    rng = np.random.default_rng(0)
    nh, nkv, hd, bs = 16, 8, 128, 16
    width = (nh + 2 * nkv) * hd
    cfg = ModelConfig("Qwen3ForCausalLM", 10, 1024, 3072, 1, nh, nkv, hd, rope_theta=1e6)
    cs_h = rope_cos_sin(cfg, 8192)
    cs = ops.from_host(cs_h)
    for t in (1, 64, 256):
        qkv, qkv_h = up(ops, rng.standard_normal((t, width)))
        qn, qn_h = up(ops, rng.standard_normal(hd))
        kn, kn_h = up(ops, rng.standard_normal(hd))
        pos = rng.integers(0, 8192, t).astype(np.int32)
        slots = rng.permutation(64 * bs)[:t].astype(np.int32)
        cache, cache_h = up(ops, np.zeros((2, 64, nkv, bs, hd)))
        pos_d, slots_d = cupy.asarray(pos), cupy.asarray(slots)
        want, k_h, v_h = qkv_h.copy(), cache_h[0].copy(), cache_h[1].copy()
        REF.qk_norm_rope_kv_write(want, pos, cs_h, qn_h, kn_h, 1e-6, k_h, v_h, slots, nh, nkv)
        got = qkv.copy()
        ops.qk_norm_rope_kv_write(got, pos_d, cs, qn, kn, 1e-6, cache[0], cache[1], slots_d, nh,
                                  nkv)
        err = max(rel(ops.to_host(got)[:, : (nh + nkv) * hd], want[:, : (nh + nkv) * hd]),
                  rel(ops.to_host(cache[0]), k_h), rel(ops.to_host(cache[1]), v_h))
        nbytes = t * (width + (nh + nkv) * hd + 2 * nkv * hd) * 2

        def fused(got=got, cache=cache, pos_d=pos_d, slots_d=slots_d, qn=qn, kn=kn):
            ops.qk_norm_rope_kv_write(got, pos_d, cs, qn, kn, 1e-6, cache[0], cache[1],
                                      slots_d, nh, nkv)

        def unfused(got=got, cache=cache, pos_d=pos_d, slots_d=slots_d, qn=qn, kn=kn):
            ops.qk_norm(got, qn, kn, 1e-6, nh, nkv)
            ops.rope(got, pos_d, cs, nh, nkv)
            ops.write_kv_cache(got, cache[0], cache[1], slots_d, nh, nkv)

        t_f, t_u = graph_time(fused), graph_time(unfused)
        row("fused", f"qk_norm_rope_kv T={t} (Qwen3 16/8/128)", f"{err:.1e}", t_f, nbytes,
            extra=f"unfused 3 kernels {t_u * 1e6:.1f} us ({t_u / t_f:.2f}x)")


# ----------------------------------------------------------------------------- GEMV vs cuBLAS

SHAPES = {  # name -> (N, K) of the weight
    "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024),
                   "down": (1024, 3072), "lm_head": (151936, 1024)},
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                  "down": (4096, 14336), "lm_head": (128256, 4096)},
}


def check_gemv(ops, models, ms=(1, 2, 4, 8)):
    rng = np.random.default_rng(1)
    ms = (1, 8) if OPTS["small"] else ms
    for model in models:
        for name, (n, k) in SHAPES[model].items():
            nbytes = n * k * 2
            copies = 1 if OPTS["small"] else max(1, -(-3 * L2_BYTES // nbytes))  # > L2: cold
            ws = [ops.random_weight((n, k), k**-0.5, rng) for _ in range(copies)]
            calls = max(20, copies)
            for m in ms:
                x, x_h = up(ops, rng.standard_normal((m, k)))
                out = cupy.empty((m, n), ws[0].dtype)
                blas = cupy.empty((m, n), ws[0].dtype)
                ops._gemm(x, ws[0], blas, ops.dtype)
                cuda_gemv.gemv(x, ws[0], out, ops.ctype)
                err = rel(ops.to_host(out), ops.to_host(blas))
                it = iter(range(10**9))
                t_g = graph_time(lambda x=x, out=out, it=it, ws=ws: cuda_gemv.gemv(
                    x, ws[next(it) % len(ws)], out, ops.ctype), calls)
                it = iter(range(10**9))
                t_b = graph_time(lambda x=x, blas=blas, it=it, ws=ws: ops._gemm(
                    x, ws[next(it) % len(ws)], blas, ops.dtype), calls)
                win = "GEMV" if t_g < t_b else "cuBLAS"
                chained = ""
                if m <= 2:  # as in a decode graph: PDL, the weights stream during the previous
                    it = iter(range(10**9))
                    t_p = graph_time(lambda x=x, out=out, it=it, ws=ws: cuda_gemv.gemv(
                        x, ws[next(it) % len(ws)], out, ops.ctype), calls, pdl=True)
                    chained = (f"; PDL chain {t_p * 1e6:.1f} us = "
                               f"{nbytes / t_p / BW * 100:.0f}% of the copy ceiling")
                    saved = cuda_gemv.GEMV_THREADS, cuda_gemv.GEMV_THREADS_M1
                    # twice the threads per block at M = 1 and K < 2048, half elsewhere
                    cuda_gemv.GEMV_THREADS, cuda_gemv.GEMV_THREADS_M1 = (64, 128), 128
                    it = iter(range(10**9))
                    try:
                        t_h = graph_time(lambda x=x, out=out, it=it, ws=ws: cuda_gemv.gemv(
                            x, ws[next(it) % len(ws)], out, ops.ctype), calls, pdl=True)
                    finally:
                        cuda_gemv.GEMV_THREADS, cuda_gemv.GEMV_THREADS_M1 = saved
                    chained += (f"; {cuda_gemv.gemv_threads(m, k)} threads per block, with "
                                f"{128 if m == 1 and k < 2048 else 'half as many'}: "
                                f"{t_h * 1e6:.1f} us")
                row("gemv", f"{model} {name} {n}x{k} M={m}", f"{err:.1e}", t_g,
                    nbytes + m * k * 2, 2 * m * n * k,
                    extra=f"cuBLAS {t_b * 1e6:.1f} us ({t_b / t_g:.2f}x) -> {win}{chained}")
            if name == "gate_up":
                check_glu_gemv(ops, model, ws, rng, ms)
            if name in ("qkv", "gate_up"):
                check_norm_gemv(ops, f"{model} {name}", ws, rng, ms)


def check_glu_gemv(ops, model, ws, rng, ms):
    """The gate_up GEMV with the SiLU-and-mul on its output, against GEMV + silu_and_mul."""
    n, k = ws[0].shape
    copies = len(ws)
    for m in [m for m in ms if m <= 2]:
        x, x_h = up(ops, rng.standard_normal((m, k)))
        act = cuda_gemv.glu_gemv(x, ws[0], ops.ctype)
        err = rel(ops.to_host(act), REF.silu_and_mul(REF.linear(x_h, ops.to_host(ws[0]))))
        it = iter(range(10**9))
        t_f = graph_time(lambda x=x, it=it: cuda_gemv.glu_gemv(
            x, ws[next(it) % copies], ops.ctype), max(20, copies), pdl=True)
        it = iter(range(10**9))
        out = cupy.empty((m, n), x.dtype)
        t_u = graph_time(lambda x=x, it=it, out=out: ops.silu_and_mul(cuda_gemv.gemv(
            x, ws[next(it) % copies], out, ops.ctype)), max(20, copies), pdl=True)
        row("gemv", f"{model} gate_up+SiLU (GLU) M={m}, PDL", f"{err:.1e}", t_f, n * k * 2,
            2 * m * n * k, extra=f"GEMV + silu_and_mul {t_u * 1e6:.1f} us ({t_u / t_f:.2f}x)")


def check_norm_gemv(ops, label, ws, rng, ms):
    """The one-pass add + RMSNorm GEMV (with GLU for gate_up) against add_rms_norm + GEMV."""
    n, k = ws[0].shape
    copies = len(ws)
    glu = "gate_up" in label
    for m in [m for m in ms if m <= 4]:
        x, x_h = up(ops, rng.standard_normal((m, k)))
        res, res_h = up(ops, rng.standard_normal((m, k)))
        nw, nw_h = up(ops, rng.standard_normal(k))
        y, new_res = cuda_gemv.norm_gemv(x, res, nw, ws[0], 1e-6, ops.ctype, glu=glu)
        want_y, want_res = REF.add_rms_norm_linear(x_h, res_h, nw_h, 1e-6, ops.to_host(ws[0]))
        want_y = REF.silu_and_mul(want_y) if glu else want_y
        err = max(rel(ops.to_host(y), want_y), rel(ops.to_host(new_res), want_res))
        it = iter(range(10**9))
        t_f = graph_time(lambda x=x, res=res, nw=nw, it=it: cuda_gemv.norm_gemv(
            x, res, nw, ws[next(it) % copies], 1e-6, ops.ctype, glu=glu), max(20, copies),
            pdl=True)
        it = iter(range(10**9))
        out = cupy.empty((m, n), x.dtype)

        def unfused(x=x, res=res, nw=nw, it=it, out=out):
            h, _ = ops.add_rms_norm(x, res, nw, 1e-6)
            w = ws[next(it) % copies]
            return cuda_gemv.glu_gemv(h, w, ops.ctype) if glu else cuda_gemv.gemv(
                h, w, out, ops.ctype)

        t_u = graph_time(unfused, max(20, copies), pdl=True)
        what = "add+norm+SiLU" if glu else "add+norm"
        row("gemv", f"{label} {what} fused M={m}, PDL", f"{err:.1e}", t_f, n * k * 2,
            2 * m * n * k, extra=f"add_rms_norm + GEMV {t_u * 1e6:.1f} us ({t_u / t_f:.2f}x)")


# ----------------------------------------------------------------------------- flash-decoding


def _decode_batch(ops, ctx, nkv=8, hd=128, bs=16):
    rng = np.random.default_rng(2)
    nb = [-(-c // bs) for c in ctx]
    tables_ = np.full((len(ctx), max(nb)), -1, np.int32)
    used = 0
    for s, k in enumerate(nb):
        tables_[s, :k] = np.arange(used, used + k)
        used += k
    meta = AttentionMetadata(np.full(len(ctx), -1, np.int32),
                             np.arange(len(ctx) + 1, dtype=np.int32), np.array(ctx, np.int32),
                             tables_, 1, max(ctx))
    cache = ops.random_weight((2, used, nkv, bs, hd), 1.0, rng)
    return meta, cache


def check_splits(ops):
    nh, nkv, hd = 16, 8, 128
    scale = hd**-0.5
    settings = {  # name -> (NUM_BLOCKS_TARGET, MIN_KEYS_PER_SPLIT, MAX_SPLITS)
        "old (32 splits, all used)": (1024, 1, 32),
        "new default": (ca.NUM_BLOCKS_TARGET, ca.MIN_KEYS_PER_SPLIT, ca.MAX_SPLITS),
        "target 2048": (2048, ca.MIN_KEYS_PER_SPLIT, 256),
        "min keys 32": (ca.NUM_BLOCKS_TARGET, 32, ca.MAX_SPLITS),
        "min keys 128": (ca.NUM_BLOCKS_TARGET, 128, ca.MAX_SPLITS),
        # one wave: the decode kernel's 72 registers (Qwen3's G = 2) leave 7 blocks per SM, 924
        # on an H200; 128 splits x 8 kv heads = 1024 blocks run a second, partial wave
        "max splits 112": (ca.NUM_BLOCKS_TARGET, ca.MIN_KEYS_PER_SPLIT, 112),
        "max splits 96": (ca.NUM_BLOCKS_TARGET, ca.MIN_KEYS_PER_SPLIT, 96),
    }
    default = (ca.NUM_BLOCKS_TARGET, ca.MIN_KEYS_PER_SPLIT, ca.MAX_SPLITS)
    rng = np.random.default_rng(3)
    w1_mix = rng.integers(100, 1101, 256).tolist()  # W1's decode steps: 256 x 100..1100
    cases = [[512], [4096], [16384], [32532], [1024] * 8, [4096] * 8, [1024] * 64, w1_mix]
    if OPTS["small"]:  # still one long context: the 256-split sweep row
        cases = [[512], [32532], [1024] * 8, [1024] * 64]
    for ctx in cases:
        meta, cache = _decode_batch(ops, ctx)
        qkv, qkv_h = up(ops, rng.standard_normal((len(ctx), (nh + 2 * nkv) * hd)))
        kv_bytes = sum(ctx) * nkv * hd * 2 * 2
        want = None
        if sum(ctx) <= 40000:
            want = REF.attention(qkv_h, ops.to_host(cache[0]), ops.to_host(cache[1]), meta, nh,
                                 nkv, scale)
        for name, (target, min_keys, max_splits) in settings.items():
            ca.NUM_BLOCKS_TARGET, ca.MIN_KEYS_PER_SPLIT, ca.MAX_SPLITS = target, min_keys, \
                max_splits
            try:
                # a CUDA graph's grid: sized for a 32k max_model_len, whatever the step's contexts
                dmeta = ops.prepare_metadata(meta)
                dmeta.num_splits = ca.choose_splits(len(ctx), nkv, 32768)

                def attn(dmeta=dmeta, qkv=qkv, cache=cache):
                    return ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, scale)

                err = "-" if want is None else f"{rel(ops.to_host(attn()), want):.1e}"
                label = f"B={len(ctx)} ctx={ctx[0] if ctx is not w1_mix else '100..1100'} {name}"
                row("splits", label, err, graph_time(attn), kv_bytes,
                    extra=f"grid splits {dmeta.num_splits}")
            finally:
                ca.NUM_BLOCKS_TARGET, ca.MIN_KEYS_PER_SPLIT, ca.MAX_SPLITS = default


# ----------------------------------------------------------------------------- prefill attention

H200_DENSE = 780e12  # cuBLAS dense bf16 on the lent H200: the figure prefill is held to
PREFILL_HEADS = {"llama3-8b": (32, 8, 128), "qwen3-0.6b": (16, 8, 128)}  # (nh, nkv, hd)


def prefill_kernels():
    """(label, PREFILL_KERNEL, PREFILL_CONFIG): v1 (the timing baseline), v2 with
    the variant prefill_plan picks (what the engine runs), then every compiled v2 variant, and
    the wgmma kernel on Hopper."""
    out = [("v1", "v1", None), ("v2 auto", "v2", None)]
    for c in cuda_kernels.PREFILL_CONFIGS:
        out.append((f"v2 MI={c[0]} NW={c[1]} BN={c[2]}", "v2", c))
    return out + sm90_kernels()[1:]


def sm90_kernels(experiments: bool = False):
    """v2 auto (the baseline), then the wgmma kernel's variants where the GPU has wgmma (Hopper);
    with `experiments`, also runs with its SM90_FLAGS bits: no K/V copies (the consumers alone),
    no ping-pong."""
    out = [("v2 auto", "v2", None)]
    if cupy.cuda.Device().compute_capability != "90":
        return out
    for bn, st in cuda_kernels.SM90_CONFIGS:
        out.append((f"sm90 BN={bn} ST={st}", "sm90", (bn, st)))
        if experiments:
            out += [(f"sm90 BN={bn} ST={st} no copies", "sm90", (bn, st), 1),
                    (f"sm90 BN={bn} ST={st} no ping-pong", "sm90", (bn, st), 2)]
    return out


def check_prefill90(ops):
    """The wgmma kernel's variants and experiments against v2, in a table of their own."""
    if cupy.cuda.Device().compute_capability != "90":
        print("prefill90: skipped, wgmma needs an sm_90 GPU", flush=True)
        return
    check_prefill(ops, "prefill90", sm90_kernels(experiments=OPTS["experiments"]))


def _prefill_batch(ops, num_new, ctx, nkv, hd, bs, rng):
    """Metadata and a random (2, blocks, nkv, bs, hd) cache for sequences with num_new[s] new
    tokens ending at ctx[s]; blocks are permuted so that the gather follows the table."""
    nb = [-(-c // bs) for c in ctx]
    perm = rng.permutation(sum(nb) + 1).astype(np.int32)
    tables_ = np.full((len(ctx), max(nb)), -1, np.int32)
    used = 0
    for s, k in enumerate(nb):
        tables_[s, :k] = perm[used : used + k]
        used += k
    qsl = np.concatenate([[0], np.cumsum(num_new)]).astype(np.int32)
    meta = AttentionMetadata(np.full(int(qsl[-1]), -1, np.int32), qsl, np.array(ctx, np.int32),
                             tables_, max(num_new), max(ctx))
    cache = ops.random_weight((2, sum(nb) + 1, nkv, bs, hd), 1.0, rng)
    return meta, cache


def _run_prefill(ops, kernel_choice, qkv, cache, meta, nh, nkv):
    """(attention call, the v2 variant its plan picked or None). kernel_choice: (PREFILL_KERNEL,
    PREFILL_CONFIG[, SM90_FLAGS])."""
    cuda_prefill.PREFILL_KERNEL, cuda_prefill.PREFILL_CONFIG = kernel_choice[:2]
    cuda_prefill.SM90_FLAGS = kernel_choice[2] if len(kernel_choice) > 2 else 0
    dmeta = ops.prepare_metadata(meta)  # a fresh plan, cut for this kernel
    hd = cache.shape[-1]

    def attn():
        return ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5)
    attn()  # makes the plan (an upload: not inside a graph capture)
    return attn, dmeta.work[nh // nkv].prefill_config


def check_prefill(ops, table: str = "prefill", kernels=None):
    """Each prefill kernel against the numpy twin on small mixed batches (max relative and
    absolute error), then timed on long prompts: TFLOP/s of causal work, % of H200_DENSE, and
    speed-up over the first kernel (v1; for prefill90, v2 auto)."""
    default = (cuda_prefill.PREFILL_KERNEL, cuda_prefill.PREFILL_CONFIG,
               cuda_prefill.SM90_FLAGS)
    rng = np.random.default_rng(5)
    kernels = kernels or prefill_kernels()
    try:
        checks = [  # (label, nh, nkv, hd, bs, num_new, ctx)
            ("4:1 hd128 bs16 3 seqs, chunked", 32, 8, 128, 16, [300, 1, 77], [300, 40, 500]),
            ("1:1 hd128 bs32 chunked", 8, 8, 128, 32, [129, 64], [1000, 64]),
            ("8:1 hd64 bs16", 16, 2, 64, 16, [200, 33], [200, 90]),
            ("3:1 hd128 bs16", 6, 2, 128, 16, [150], [170]),
        ]
        for label, nh, nkv, hd, bs, num_new, ctx in checks:
            meta, cache = _prefill_batch(ops, num_new, ctx, nkv, hd, bs, rng)
            qkv, qkv_h = up(ops, rng.standard_normal((sum(num_new), (nh + 2 * nkv) * hd)))
            want = REF.attention(qkv_h, ops.to_host(cache[0]), ops.to_host(cache[1]), meta, nh,
                                 nkv, hd**-0.5)
            for name, *choice in kernels:
                got = ops.to_host(_run_prefill(ops, choice, qkv, cache, meta, nh, nkv)[0]())
                err = f"{rel(got, want):.1e} max {np.max(np.abs(got - want)):.1e}"
                print(table, "check", label, name, err, flush=True)
                tables.setdefault(table, []).append(f"| check {label}: {name} | {err} |"
                                                    " | | | | |")
                check_device(f"{table} check {label} {name}")
        cases = [("1 x 2k", [2048], [2048]), ("1 x 8k", [8192], [8192]),
                 ("1 x 32k", [32768], [32768]), ("2k new on 8k ctx", [2048], [8192])]
        if OPTS["small"]:
            cases = cases[:1] + cases[3:]
        for preset, (nh, nkv, hd) in PREFILL_HEADS.items():
            for label, num_new, ctx in cases:
                meta, cache = _prefill_batch(ops, num_new, ctx, nkv, hd, 16, rng)
                qkv = ops.random_weight((sum(num_new), (nh + 2 * nkv) * hd), 1.0, rng)
                positions = np.concatenate(
                    [np.arange(c - n, c) for n, c in zip(num_new, ctx, strict=True)])
                flops = 4 * nh * hd * float(np.sum(positions + 1))
                calls = 3 if max(ctx) > 8192 else 10
                base = got_first = None
                for name, *choice in kernels:
                    fn, picked = _run_prefill(ops, choice, qkv, cache, meta, nh, nkv)
                    got = ops.to_host(fn())
                    got_first = got if got_first is None else got_first
                    sec = graph_time(fn, calls, 5)
                    base = base or sec
                    name += f" -> {picked}" if name == "v2 auto" else ""
                    row(table, f"{preset} {label} {name}",
                        f"vs {kernels[0][0]} {rel(got, got_first):.1e}", sec, flops=flops,
                        extra=f"{flops / sec / H200_DENSE * 100:.1f}% of 780; "
                              f"{base / sec:.2f}x {kernels[0][0]}")
    finally:
        (cuda_prefill.PREFILL_KERNEL, cuda_prefill.PREFILL_CONFIG,
         cuda_prefill.SM90_FLAGS) = default


# ----------------------------------------------------------------------------- sampling


def _tensors(rows, rng, **kw) -> SamplingTensors:
    t = SamplingTensors(np.zeros(rows, np.float32), np.zeros(rows, np.int32),
                        np.ones(rows, np.float32), np.zeros(rows, np.float32),
                        rng.integers(1, 2**63, rows).astype(np.uint64),
                        np.arange(rows, dtype=np.uint32), np.zeros(rows, np.float32),
                        np.zeros(rows, np.float32), np.ones(rows, np.float32))
    for key, value in kw.items():
        getattr(t, key)[:] = value
    return t


def check_sampling(ops):
    rng = np.random.default_rng(4)
    rows, vocab = (8 if OPTS["small"] else 256), 151936
    logits_h = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    logits = ops.from_host(logits_h)  # the compute dtype, as the lm_head GEMM leaves it
    logits_h = ops.to_host(logits)
    configs = {
        "greedy": {},
        "T=0.8": {"temperature": 0.8},
        "T=0.8 top_k=50 top_p=0.95": {"temperature": 0.8, "top_k": 50, "top_p": 0.95},
        "T=0.8 top_p=0.95": {"temperature": 0.8, "top_p": 0.95},
        "T=0.8 min_p=0.05": {"temperature": 0.8, "min_p": 0.05},
        "T=0.8 min_p=0.05 top_p=0.95": {"temperature": 0.8, "min_p": 0.05, "top_p": 0.95},
        "W1 + repetition 1.1": {"temperature": 0.8, "top_k": 50, "top_p": 0.95,
                                "repetition_penalty": 1.1},
    }
    check = min(rows, 32)  # rows held to numpy (numpy sorts every row: slow)
    for name, kw in configs.items():
        t = _tensors(rows, rng, **kw)
        if "repetition_penalty" in kw:
            t.prompt_ids = rng.integers(0, vocab, (rows, 512)).astype(np.int32)
            t.output_ids = rng.integers(0, vocab, (rows, 128)).astype(np.int32)
        sub = _tensors(check, rng)
        for f in ("temperature", "top_k", "top_p", "min_p", "seeds", "steps", "presence_penalty",
                  "frequency_penalty", "repetition_penalty"):
            setattr(sub, f, getattr(t, f)[:check])
        if t.prompt_ids is not None:
            sub.prompt_ids, sub.output_ids = t.prompt_ids[:check], t.output_ids[:check]
        want = REF.sample(logits_h[:check], sub).token_ids
        times = {}
        saved = cuda_sampling.SAMPLER
        try:
            for sampler in ("bisect", "select", "twopass"):
                cuda_sampling.SAMPLER = sampler
                got = ops.sample(logits[:check], sub).token_ids
                dev = cuda_sampling.upload(t)
                times[sampler] = (np.mean(got == want), graph_time(
                    lambda t=t, dev=dev: cuda_sampling.launch(logits, t, dev, ops.ctype), 5, 5))
        finally:
            cuda_sampling.SAMPLER = saved
        (agree, sec), (old_agree, old) = times["twopass"], times["select"]
        bisect_agree, bisect = times["bisect"]
        row("sampling", f"{name} ({rows}x{vocab}), twopass", f"agree {agree:.2f}", sec,
            logits.nbytes, extra=f"select {old * 1e6:.1f} us, agree {old_agree:.2f} "
            f"({old / sec:.2f}x); bisect {bisect * 1e6:.0f} us, agree {bisect_agree:.2f}")
        if t.prompt_ids is not None:
            for sampler in ("select", "twopass"):
                check_kept_counts(ops, name, logits, t, sub, want, sampler)


def check_kept_counts(ops, name, logits, t, sub, want, sampler):
    """Penalties from counts kept on the device (steady decoding: no row rebuilt) against the
    same step sending every row's ids, with `sampler`."""
    rows, vocab = logits.shape
    saved, cuda_sampling.SAMPLER = cuda_sampling.SAMPLER, sampler
    try:
        dev = cuda_sampling.upload(t)
        ids_sec = graph_time(lambda: cuda_sampling.launch(logits, t, dev, ops.ctype), 5, 5)
        _kept_counts_row(ops, name, logits, t, sub, want, sampler, ids_sec)
    finally:
        cuda_sampling.SAMPLER = saved


def _kept_counts_row(ops, name, logits, t, sub, want, sampler, ids_sec):
    rows, vocab = logits.shape

    def kept(tensors, rebuild):
        n = len(tensors.temperature)
        return dataclasses.replace(tensors, count_slots=np.arange(n, dtype=np.int32),
                                   rebuild=np.full(n, rebuild),
                                   count_table=ops.alloc_token_counts(n, vocab))

    got = ops.sample(logits[: len(sub.temperature)], kept(sub, True)).token_ids
    steady = kept(t, True)
    ops.sample(logits, steady)  # fills the table
    steady.rebuild[:] = False
    steady.prompt_ids = np.full((rows, 1), -1, np.int32)
    steady.output_ids = np.full((rows, 1), -1, np.int32)
    dev = cuda_sampling.upload(steady)
    sec = graph_time(lambda: cuda_sampling.launch(logits, steady, dev, ops.ctype), 5, 5)
    row("sampling", f"{name}, kept counts ({rows}x{vocab}), {sampler}",
        f"agree {np.mean(got == want):.2f}",
        sec, logits.nbytes, extra=f"ids sent every step {ids_sec * 1e6:.0f} us "
        f"({ids_sec / sec:.1f}x)")


# ----------------------------------------------------------------------------- decode steps


def decode_step(ops, preset, ctx, gemv_on=True, tag=""):
    from engine.executor.cuda_graph import DecodeGraphs
    from engine.executor.transformer import Transformer
    from engine.model.config import ModelConfig
    from engine.model.loader import dummy_weights

    config = ModelConfig.from_preset(preset)
    if OPTS["small"]:  # the layers' kernels at full width; a small vocabulary makes it quick
        config = config.cut(2, 4096)
    model = Transformer(config, dummy_weights(config, ops, seed=0), ops, ctx + 16)
    bs = 16
    nb = -(-(ctx + 1) // bs)
    cache = ops.alloc_kv_cache(config.num_layers, nb, config.num_kv_heads, bs, config.head_dim)
    tables_ = np.arange(nb, dtype=np.int32).reshape(1, -1)
    meta = AttentionMetadata(np.array([ctx], np.int32), np.arange(2, dtype=np.int32),
                             np.array([ctx + 1], np.int32), tables_, 1, ctx + 1)
    ids, pos = np.array([7], np.int32), np.array([ctx], np.int32)
    weight_bytes = config.num_linear_params() * 2
    kv = (ctx + 1) * config.num_layers * config.num_kv_heads * config.head_dim * 4
    knobs = ("GEMV_MAX_M", "NORM_GEMV_MAX_M", "NORM_GEMV_MAX_N", "GLU_GEMV_MAX_M", "GEMV_THREADS",
             "GEMV_THREADS_M1")
    saved = {name: getattr(cuda_gemv, name) for name in knobs}
    pdl, early, reference = cuda_kernels.PDL, cuda_kernels.PDL_EARLY, None
    # (label, PDL, PDL_EARLY, cuda_gemv knobs, same kernels as the first?): the default first;
    # its logits are the reference that the runs of the same kernels must equal bit for bit
    variants = [("default", pdl, early, {}, True),
                ("PDL off", False, False, {}, True),
                ("PDL on, early trigger", True, True, {}, True),
                ("GEMV 128 threads at K < 2048", pdl, early, {"GEMV_THREADS_M1": 128}, False),
                ("GEMV 128 threads at K >= 2048", pdl, early, {"GEMV_THREADS": (128, 128)},
                 False),
                ("early trigger, GEMV 128 threads at K < 2048", True, True,
                 {"GEMV_THREADS_M1": 128}, False),
                ("SiLU unfused", pdl, early, {"GLU_GEMV_MAX_M": 0}, True),
                ("norm unfused over N > 8192", pdl, early, {"NORM_GEMV_MAX_N": 8192}, False),
                ("norm unfused", pdl, early, {"NORM_GEMV_MAX_M": 0}, False),
                ("GEMV off", pdl, early, {name: 0 for name in knobs if name.endswith("_M")},
                 False)]
    for label, use_pdl, use_early, caps, same in variants if gemv_on else variants[:1]:
        for name, value in caps.items():
            setattr(cuda_gemv, name, value)
        cuda_kernels.PDL, cuda_kernels.PDL_EARLY = use_pdl, use_early
        try:
            g = DecodeGraphs(model, cache, max_num_seqs=1, max_blocks_per_seq=nb,
                             max_context_len=max(ctx + 1, 32768))
            g.capture()
            times = []
            for _ in range(3 if OPTS["small"] else 30):
                t0 = time.perf_counter()
                logits = g.run(ids, pos, meta)
                cupy.cuda.get_current_stream().synchronize()
                times.append(time.perf_counter() - t0)
            got = cupy.asnumpy(logits).view(np.uint16)
            err = "-" if reference is None or not same else (
                "same" if np.array_equal(got, reference) else "DIFFER")
            reference = got if reference is None else reference
            sample = time_greedy_sample(ops, logits) if reference is got else None
            row("decode", f"{preset} B=1 ctx={ctx} graph, {label}{tag} (PDL "
                f"{'on' if cuda_kernels.PDL else 'off'})", err, statistics.median(times),
                weight_bytes + kv, extra="" if sample is None else
                f"+ greedy sample {sample * 1e6:.1f} us (graph replay, host sync excluded)")
            del g
        finally:
            for name, value in saved.items():
                setattr(cuda_gemv, name, value)
            cuda_kernels.PDL, cuda_kernels.PDL_EARLY = pdl, early
    del model, cache


def time_greedy_sample(ops, logits) -> float:
    """GPU time of the greedy sampler on one decode step's logits (what follows the graph)."""
    t = _tensors(len(logits), np.random.default_rng(0))
    dev = cuda_sampling.upload(t)
    return graph_time(lambda: cuda_sampling.launch(logits, t, dev, ops.ctype), 20, 5)


# ----------------------------------------------------------------------------- launches


class _Counted:
    """A compiled kernel whose launches add to `counts` under its name."""

    def __init__(self, fn, name: str, counts: collections.Counter):
        self.fn, self.name, self.counts = fn, name, counts

    def __getattr__(self, attr):  # max_dynamic_shared_size_bytes and the like
        return getattr(self.fn, attr)

    def __setattr__(self, attr, value):
        if attr in ("fn", "name", "counts"):
            object.__setattr__(self, attr, value)
        else:
            setattr(self.fn, attr, value)

    def __call__(self, *args, **kwargs):
        self.counts[self.name.split("<")[0]] += 1
        return self.fn(*args, **kwargs)


def count_launches(ops, fn) -> collections.Counter:
    """Kernel launches by name (cuBLAS GEMMs as "cublas") while fn() runs: every module that
    launches through cuda_kernels.kernel, and ops' GEMM, wrapped for the call."""
    from engine.executor.ops import cuda_ops

    counts: collections.Counter = collections.Counter()
    modules = [cuda_ops, cuda_gemv, cuda_norm, ca, cuda_sampling]
    original = cuda_kernels.kernel

    def counting(file, name, ctype="float"):
        return _Counted(original(file, name, ctype), name, counts)

    gemm = ops._gemm

    def counting_gemm(*args):
        counts["cublas"] += 1
        return gemm(*args)

    launch = cuda_kernels.launch

    def counting_launch(fn, *args, **kwargs):  # (libcuda's launches never call the kernel)
        if isinstance(fn, _Counted):
            counts[fn.name.split("<")[0]] += 1
            fn = fn.fn
        return launch(fn, *args, **kwargs)

    for m in modules:
        m.kernel = counting
        if getattr(m, "launch", None) is launch:
            m.launch = counting_launch
    ops._gemm = counting_gemm
    try:
        fn()
    finally:
        for m in modules:
            m.kernel = original
            if getattr(m, "launch", None) is counting_launch:
                m.launch = launch
        ops._gemm = gemm
    return counts


def launches_per_step(ops, preset: str, num_layers: int, batch: int = 1) -> collections.Counter:
    """Launches of one eager decode forward shaped like a CUDA-graph step (fixed split grid, no
    logits gather) of `preset` cut to num_layers layers."""
    from engine.executor.transformer import Transformer
    from engine.model.config import ModelConfig
    from engine.model.loader import dummy_weights

    config = ModelConfig.from_preset(preset).cut(num_layers, 1024)
    model = Transformer(config, dummy_weights(config, ops, seed=0), ops, 64)
    cache = ops.alloc_kv_cache(num_layers, 4 * batch, config.num_kv_heads, 16, config.head_dim)
    meta = AttentionMetadata(np.arange(batch, dtype=np.int32) * 64 + 40,
                             np.arange(batch + 1, dtype=np.int32), np.full(batch, 41, np.int32),
                             np.arange(4 * batch, dtype=np.int32).reshape(batch, 4), 1, 41)
    dmeta = ops.prepare_metadata(meta)
    dmeta.num_splits = ca.choose_splits(batch, config.num_kv_heads, 32768)
    ids, pos = cupy.zeros(batch, cupy.int32), cupy.full(batch, 40, cupy.int32)
    return count_launches(ops, lambda: model.forward(ids, pos, cache, dmeta, None))


def check_launches(ops):
    for preset in ("qwen3-0.6b", "llama3-8b"):
        one, two = (launches_per_step(ops, preset, n) for n in (1, 2))
        per_layer = two - one
        fixed = one - per_layer
        line = (f"| {preset} B=1 decode step | {sum(per_layer.values())} per layer + "
                f"{sum(fixed.values())} | | | | | layer {dict(per_layer)}; outside {dict(fixed)} |")
        tables.setdefault("launches", []).append(line)
        print("launches", line, flush=True)
        check_device(f"launches {preset}")


def run_all(ops, quick: bool = False, only: list[str] | None = None):
    """Every section, or those named in `only` (names of SECTIONS)."""
    sections = {
        "launches": lambda: check_launches(ops),
        "fused": lambda: check_fused(ops),
        "gemv": lambda: check_gemv(ops, ["qwen3-0.6b"] if quick else ["qwen3-0.6b", "llama3-8b"]),
        "splits": lambda: check_splits(ops),
        "attn": lambda: check_attn(ops, sys.modules[__name__]),
        # a batch-1 step's ops alone against the real step graph, tools/kernel_check_decode1.py
        "decode1": lambda: check_decode1(ops, sys.modules[__name__]),
        "sampling": lambda: check_sampling(ops),
        "prefill": lambda: check_prefill(ops),
        "prefill90": lambda: check_prefill90(ops),
        "gguf": lambda: check_gguf(ops, graph_time, OPTS["small"]),
        "decode": lambda: None if quick else [decode_step(ops, p, c) for p, c in (
            ("qwen3-0.6b", 512), ("qwen3-0.6b", 32532), ("llama3-8b", 512))],
        # batch 1 only: the M = 1 GEMV rows, and the decode-step variants at a short context
        "gemv1": lambda: check_gemv(ops, ["qwen3-0.6b", "llama3-8b"], ms=(1,)),
        "step": lambda: [decode_step(ops, p, 512) for p in ("qwen3-0.6b", "llama3-8b")],
        "fp8": lambda: kernel_check_fp8.check_fp8(ops, sys.modules[__name__]),
        # FP8 vs bf16 linear ops of a W1 step (M = 16..256, 8192), tools/kernel_check_fp8w1.py
        "fp8w1": lambda: check_fp8w1(ops, sys.modules[__name__]),
        "w1": lambda: check_w1(ops, sys.modules[__name__]),
        # cublasGemmEx at every decode graph size 64..256, Llama-3-8B shapes
        "gemm-m": lambda: check_gemm_sweep(ops, sys.modules[__name__]),
        # the sm90 skinny GEMM (cuda/gemm_sm90.cu) against cuBLAS, Llama-3-8B shapes
        "skinny": lambda: check_skinny(ops, sys.modules[__name__]),
        "norms": lambda: check_norms(ops, sys.modules[__name__]),
        # attention beside the MLP's GEMMs on two streams (W1, Llama-3-8B shapes)
        "overlap": lambda: check_overlap(ops, sys.modules[__name__]),
    }
    assert tuple(sections) == SECTIONS, "SECTIONS lists run_all's sections, for --only"
    for name, run in sections.items():
        if only is not None and name not in only:
            continue
        try:  # one section failing still leaves the others' tables
            run()
            check_device(f"section {name}")
        except SectionError as e:  # the context is dead: later sections would only fail
            print(f"\n{e}", flush=True)
            tables.setdefault(name, []).append(f"| FAILED: {e} | | | | | | |")
            break
        except Exception:
            traceback.print_exc()
            tables.setdefault(name, []).append("| FAILED: see the traceback above | | | | | | |")
        cupy.get_default_memory_pool().free_all_blocks()
    for name, lines in tables.items():
        print(f"\n### {name}\n| case | err / agreement | us | GB/s | TFLOP/s | % of ceiling | "
              "notes |\n|---|---|---|---|---|---|---|")
        print("\n".join(lines))


def decode1_arg(text: str) -> str:
    """argparse type of --decode1: preset[:format],... naming rows of DECODE1_VARIANTS."""
    known = [p if q is None else f"{p}:{q}" for p, q, _ in DECODE1_VARIANTS]
    for item in text.split(","):
        if item not in known:
            raise argparse.ArgumentTypeError(
                f"unknown {item!r} in {text!r}; choose from {', '.join(known)}")
    return text


def settings_arg(text: str) -> str:
    """argparse type of --set: module.ATTR=value[,...] (module_settings.parse_variant's syntax;
    the module and attribute are looked up when the run starts)."""
    try:
        module_settings.parse_variant(text)
    except SystemExit as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_only_flag(ap, SECTIONS)
    ap.add_argument("--quick", action="store_true",
                    help="skip the gemv section's Llama-3-8B shapes and the decode section")
    ap.add_argument("--check-each", action="store_true",
                    help="synchronize after every row and section and stop at the first CUDA "
                         "error, naming where it surfaced")
    ap.add_argument("--small", action="store_true",
                    help="shrink every section (few rows, one weight copy, 2-layer models, 2 "
                         "timed calls), e.g. for compute-sanitizer")
    ap.add_argument("--decode1", type=decode1_arg, default=None, metavar="PRESET[:FORMAT],...",
                    help="the decode1 section's models, of: " + ", ".join(
                        p if q is None else f"{p}:{q}" for p, q, _ in DECODE1_VARIANTS)
                    + " (default: all)")
    ap.add_argument("--set", type=settings_arg, default=None, metavar="module.ATTR=value[,...]",
                    help="run everything with these settings of engine.executor.ops modules "
                         "(b1_gap.py's --variant syntax)")
    ap.add_argument("--experiments", action="store_true",
                    help="prefill90: also the wgmma kernel's experiments (no K/V copies, no "
                         "ping-pong)")
    args = ap.parse_args(argv)
    require_gpu("kernel_check")
    if GPU_IMPORT_ERROR is not None:
        raise GPU_IMPORT_ERROR
    from engine.executor.ops.cuda_ops import CudaOps

    ops = CudaOps("bfloat16")
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}", flush=True)
    t0 = time.perf_counter()
    OPTS.update(small=args.small, check_each=args.check_each, decode1=args.decode1,
                experiments=args.experiments)
    if args.set:
        print(f"settings: {args.set}", flush=True)
    with module_settings.settings(args.set) if args.set else contextlib.nullcontext():
        run_all(ops, quick=args.quick, only=args.only)
    print(f"\nkernel_check took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
