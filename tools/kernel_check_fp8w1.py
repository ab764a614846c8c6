"""kernel_check.py's `fp8w1` section (--only fp8w1): where FP8 W8A8 gains and loses against bf16 in
one W1 step at Llama-3-8B shapes. Each layer's four products at decode batches M = 16..256 and an
8192-token prefill chunk, graph-replayed with the weights read cold, bf16 as the decode graphs run
it (cublasGemmEx) beside FP8 cuBLASLt in each configuration (CONFIGS):
- "heuristic": today's default, cuBLASLt's first algorithm with outer-vector scales;
- "tuned": PAGEDSERVE_FP8_TUNE=1, the fastest of the timed candidates (cuda_fp8_tune.py), with
  the time its tuning took and the plan it chose;
- "fast", "fast+tuned": the same with PAGEDSERVE_FP8_FAST_ACCUM=1;
- "fp32+scale": no scale vectors in cuBLASLt, fp32 out + fp8_scale_kernel (for comparison).
Errors: against the numpy twin (engine/model/fp8.py) on a 64 x 2048 corner (min..max over the
configurations), and "d": against the heuristic plan's output (all of it, on the device). Then per
M the activation launches (bf16: add+RMSNorm x2, SiLU-mul; FP8: add+RMSNorm+quantize x2, quantize
(o), SiLU-mul+quantize) and a layer's linear ops in bf16 vs each FP8 configuration: the speed-up
W1 needs is ~1.45x.
"""

from __future__ import annotations

import time

import cupy
import numpy as np

from engine.executor.ops import cuda_fp8, cuda_fp8_tune
from engine.model import fp8
from tools.kernel_check_fp8 import SHAPES
from tools.kernel_check_w1 import HIDDEN, INTER, _device_rel

CONFIGS = ("heuristic", "tuned", "fast", "fast+tuned", "fp32+scale")
MS = (16, 64, 128, 144, 256, 8192)
TWIN_ROWS, TWIN_COLS = 64, 2048
SHORT_NAMES = {"tile": "t", "splitk": "k", "cluster": "cl", "custom": "cu", "waves": "w"}


def check_fp8w1(ops, kc):
    """kc: the kernel_check module (row, graph_time, OPTS, L2_BYTES)."""
    rng = np.random.default_rng(16)
    ms = (64,) if kc.OPTS["small"] else MS
    weights = {name: make_weights(ops, kc, rng, n, k) for name, (n, k) in SHAPES.items()}
    lt = cuda_fp8.fp8_gemm(ops._gemm)
    tuner = cuda_fp8_tune.Fp8Tuner(lt)  # one for the section: it keeps what cuBLASLt accepted
    saved = lt.tuner, lt.fast_accum, lt.modes, lt.plans, cuda_fp8_tune.TUNE_MAX_M
    cuda_fp8_tune.TUNE_MAX_M = 1 << 30  # the prefill chunk is measured tuned too
    try:  # M outermost: each M's sum row prints as soon as its products are timed
        for m in ms:
            times = [check_product(ops, kc, lt, tuner, rng, name, m, weights[name])
                     for name in SHAPES]
            sums = {c: sum(t[c] for t in times) for c in ("bf16",) + CONFIGS}
            _sum_row(kc, m, sums, *check_launches(ops, kc, rng, m))
    finally:
        lt.tuner, lt.fast_accum, lt.modes, lt.plans, cuda_fp8_tune.TUNE_MAX_M = saved


def _sum_row(kc, m, sums, t_bf, t_f8) -> None:
    layer_bf = sums["bf16"] + t_bf
    layers = {c: sums[c] + t_f8 for c in CONFIGS}
    best = min(CONFIGS, key=layers.__getitem__)
    kc.row("fp8w1", f"sum: a layer's linear ops M={m}, FP8 {best}", "-", layers[best],
           extra=f"us: bf16 {layer_bf * 1e6:.0f}; " + ", ".join(
               f"{c} {layers[c] * 1e6:.0f} ({layer_bf / layers[c]:.2f}x)" for c in CONFIGS)
           + f"; products: bf16 {sums['bf16'] * 1e6:.0f}, heuristic "
             f"{sums['heuristic'] * 1e6:.0f}, {best} {sums[best] * 1e6:.0f}")


def _set_config(lt, tuner, config: str) -> None:
    lt.fast_accum = config.startswith("fast")
    lt.modes = ("fp32+scale",) if config == "fp32+scale" else ("outer", "fp32+scale")
    lt.plans = {}  # heuristic plans are per descriptor
    lt.tuner = tuner if config.endswith("tuned") else None


def make_weights(ops, kc, rng, n, k):
    """(bf16 copies, FP8 copies, the twin's first TWIN_COLS decoded rows and their scales): more
    copies than fit in L2, so that cycling them reads the weights cold."""
    small = kc.OPTS["small"]
    copies_f8 = 1 if small else max(1, -(-3 * kc.L2_BYTES // (n * k)))
    copies_bf = 1 if small else max(1, -(-3 * kc.L2_BYTES // (2 * n * k)))
    ws = [ops.random_weight((n, k), k**-0.5, rng) for _ in range(copies_f8)]
    qws = [ops.quantize_fp8(w) for w in ws]
    del ws[copies_bf:]
    cupy.get_default_memory_pool().free_all_blocks()
    dw = fp8.decode(cupy.asnumpy(qws[0].data[:TWIN_COLS])).astype(np.float64)
    return ws, qws, dw, cupy.asnumpy(qws[0].scale[:TWIN_COLS]).astype(np.float64)


def check_product(ops, kc, lt, tuner, rng, name, m, weights) -> dict:
    """One row: {"bf16" | config: seconds} of the product at m rows."""
    ws, qws, dw, sw = weights
    n, k = qws[0].data.shape
    copies_bf, copies_f8 = len(ws), len(qws)
    x = ops.random_weight((m, k), 1.0, rng)
    q, s = cuda_fp8.quantize_rows(x, ops.ctype)
    rows = min(m, TWIN_ROWS)
    twin = (fp8.decode(cupy.asnumpy(q[:rows])).astype(np.float64) @ dw.T) \
        * cupy.asnumpy(s[:rows]).astype(np.float64)[:, None] * sw[None, :]
    big = 2 * m * n * k > 2e11
    calls, reps = (4, 3) if big else (20, 10)

    def cycled(fn, copies, calls=calls, reps=reps):
        it = iter(range(10**9))
        return kc.graph_time(lambda: fn(next(it) % copies), max(calls, copies), reps)

    out = cupy.empty((m, n), ops.storage)
    times = {"bf16": cycled(lambda i, x=x, out=out: ops._gemm(x, ws[i], out, ops.dtype),
                            copies_bf)}
    notes, errs, first = [], [], None
    for config in CONFIGS:
        _set_config(lt, tuner, config)
        try:  # a configuration this cuBLASLt refuses is a finding, not the end of the section
            t0 = time.perf_counter()
            y = cuda_fp8.matmul(ops, q, s, qws[0], use_gemv=False)  # plans (and tunes) here
            cupy.cuda.Device().synchronize()
            t_plan = time.perf_counter() - t0
        except RuntimeError as e:
            times[config] = float("inf")
            notes.append(f"{config} FAILED: {str(e)[:60]}")
            continue
        first = y if first is None else first
        errs.append(kc.rel(ops.to_host(y[:rows, :TWIN_COLS]), twin))
        times[config] = cycled(lambda i, q=q, s=s: cuda_fp8.matmul(
            ops, q, s, qws[i], use_gemv=False), copies_f8)
        note = f"{config} {times[config] * 1e6:.1f} ({times['bf16'] / times[config]:.2f}x"
        mode = (lt.plans.get((m, n, k, ops.dtype)) or ("GEMV chunks",))[0]
        if mode != "outer" and config != "fp32+scale":  # cuBLASLt refused the outer plan
            note += f", {mode}"
        if y is not first:  # all of it, against the first configuration's product
            note += f", d {_device_rel(ops, y, first):.0e}"
        notes.append(note + ")" + (_tuned_note(lt, m, n, k, ops.dtype, t_plan)
                                   if lt.tuner is not None else ""))
    best = min(CONFIGS, key=times.__getitem__)
    kc.row("fp8w1", f"{name} M={m}: FP8 {best}", f"{min(errs, default=np.nan):.1e}.."
           f"{max(errs, default=np.nan):.1e}",
           times[best], n * k + m * k + 2 * m * n, 2 * m * n * k,
           extra=f"us: bf16 {times['bf16'] * 1e6:.1f}; " + "; ".join(notes))
    return times


def _tuned_note(lt, m, n, k, dtype, t_plan) -> str:
    """' [the chosen plan, tuning seconds / candidates timed]', the plan in short names."""
    key = (cuda_fp8_tune.bucket(m), n, k, dtype, lt.fast_accum)
    plan, timed = lt.tuner.plans.get(key), len(lt.tuner.timings.get(key, []))
    chose = "heuristic" if plan is None else " ".join(
        SHORT_NAMES[part.split("=")[0]] + part.split("=")[1] if "=" in part else part
        for part in lt.tuner.describe(plan).replace("batch split K ", "bsk").split()
        if "=" not in part or part.split("=")[0] in SHORT_NAMES)
    return f" [{chose}; {t_plan:.1f}s/{timed}]"


def check_launches(ops, kc, rng, m) -> tuple[float, float]:
    """A layer's activation launches at m rows: (bf16 seconds, FP8 seconds)."""
    x, res, attn = (ops.random_weight((m, HIDDEN), 1.0, rng) for _ in range(3))
    nw = ops.random_weight((HIDDEN,), 1.0, rng)
    gu = ops.random_weight((m, 2 * INTER), 1.0, rng)
    t_norm = kc.graph_time(lambda: ops.add_rms_norm(x, res, nw, 1e-5))
    t_silu = kc.graph_time(lambda: ops.silu_and_mul(gu))
    t_nq = kc.graph_time(lambda: cuda_fp8.norm_quantize(x, res, nw, 1e-5, ops.ctype))
    t_q = kc.graph_time(lambda: cuda_fp8.quantize_rows(attn, ops.ctype))
    t_sq = kc.graph_time(lambda: cuda_fp8.silu_quantize(gu, ops.ctype))
    t_bf, t_f8 = 2 * t_norm + t_silu, 2 * t_nq + t_q + t_sq
    threads, qc = cuda_fp8._quant_launch(m, HIDDEN)
    kc.row("fp8w1", f"activation launches M={m}: FP8", "-", t_f8,
           extra=f"us: bf16 {t_bf * 1e6:.1f} (norm {t_norm * 1e6:.1f} x2, SiLU-mul "
                 f"{t_silu * 1e6:.1f}); FP8 norm+q {t_nq * 1e6:.1f} x2, q(o) {t_q * 1e6:.1f}, "
                 f"SiLU+q {t_sq * 1e6:.1f}; {threads} threads, QC {qc} at K {HIDDEN}")
    return t_bf, t_f8
