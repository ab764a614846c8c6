"""kernel_check.py's `w1` section (--only w1): the ops of one W1 step at Llama-3-8B shapes (bf16),
each timed alone by CUDA-graph replay (no launch gaps, weights read cold), with its rate and % of
the H200's ceiling:
- every GEMM (qkv, o, gate_up, down, lm_head) at decode batches M = 16..256 and prefill chunks
  M = 2048 / 8192: cublasGemmEx, then the plan cuda_gemm_tune.TunedGemm measures (here at every
  M; the engine tunes up to PAGEDSERVE_GEMM_TUNE_MAX_M rows), captured in the graph as the engine
  would; errors against the numpy twin (8 rows) and against cublasGemmEx (all rows);
- add + RMSNorm, SiLU-mul (activation.cu's scalar and 8-wide kernels), RoPE + KV write at the
  same M;
- decode attention at W1's mix (contexts 600..1000) for 16..256 sequences;
- per M, one layer's sum and the decode step it implies (32 layers + lm_head).
"""

from __future__ import annotations

import cupy
import numpy as np

from engine.executor.ops import cuda_attention as ca
from engine.executor.ops import cuda_gemm_tune, cuda_ops

LAYERS, HIDDEN, INTER, HEADS = 32, 4096, 14336, (32, 8, 128)  # Llama-3-8B
DECODE_MS, PREFILL_MS = (16, 32, 64, 128, 192, 256), (2048, 8192)


def check_w1(ops, kc):
    """kc: the kernel_check module (row, graph_time, rel, up, REF, OPTS, L2_BYTES, SHAPES)."""
    rng = np.random.default_rng(11)
    small = kc.OPTS["small"]
    decode_ms, prefill_ms = ((64,), ()) if small else (DECODE_MS, PREFILL_MS)
    tuner = cuda_gemm_tune.TunedGemm(ops._gemm, max_m=1 << 30)
    saved = ops._gemm.tuned
    sums = {m: dict.fromkeys(("default", "tuned", "lm_default", "lm_tuned", "other",
                              "attention"), 0.0) for m in decode_ms + prefill_ms}
    try:
        for name, (n, k) in kc.SHAPES["llama3-8b"].items():
            ms = decode_ms if name == "lm_head" else decode_ms + prefill_ms
            for m, t_default, t_tuned in check_gemm(ops, kc, tuner, rng, name, n, k, ms):
                prefix = "lm_" if name == "lm_head" else ""  # once a step, not once a layer
                sums[m][prefix + "default"] += t_default
                sums[m][prefix + "tuned"] += t_tuned
    finally:
        ops._gemm.tuned = saved
    for m in decode_ms + prefill_ms:
        sums[m]["other"] = check_elementwise(ops, kc, rng, m)
    for b in decode_ms:
        sums[b]["attention"] = check_attention(ops, kc, rng, b)
    for m in decode_ms + prefill_ms:
        s = sums[m]
        layer_d = s["default"] + s["other"] + s["attention"]
        layer_t = s["tuned"] + s["other"] + s["attention"]
        step_d = LAYERS * layer_d + s["lm_default"]
        step_t = LAYERS * layer_t + s["lm_tuned"]
        what = "decode step" if m in decode_ms else "prefill chunk (no attention)"
        kc.row("w1", f"sum: {what} M={m}, tuned GEMMs", "-", step_t,
               extra=f"cublasGemmEx {step_d * 1e3:.2f} ms -> tuned {step_t * 1e3:.2f} ms "
                     f"({step_d / step_t:.3f}x); per layer: GEMMs {s['default'] * 1e6:.0f} -> "
                     f"{s['tuned'] * 1e6:.0f} us, norms/SiLU/RoPE {s['other'] * 1e6:.0f} us, "
                     f"attention {s['attention'] * 1e6:.0f} us"
                     + (f"; {m / step_t:.0f} tok/s at this batch" if m in decode_ms else ""))


def check_gemm(ops, kc, tuner, rng, name, n, k, ms):
    """Rows for one weight at each M; yields (M, cublasGemmEx s, tuned s)."""
    nbytes = n * k * 2
    copies = 1 if kc.OPTS["small"] else max(1, -(-3 * kc.L2_BYTES // nbytes))  # > L2: cold
    ws = [ops.random_weight((n, k), k**-0.5, rng) for _ in range(copies)]
    w_h = ops.to_host(ws[0][:4096])  # the twin checks the first 8 x 4096 outputs
    for m in ms:
        x = ops.random_weight((m, k), 1.0, rng)  # device RNG: 8192-row inputs in no time
        want, got = cupy.empty((m, n), ops.storage), cupy.empty((m, n), ops.storage)
        ops._gemm.tuned = None
        ops._gemm(x, ws[0], want, ops.dtype)
        big = 2 * m * n * k > 2e11
        calls, reps = (max(4, copies), 3) if big else (max(20, copies), 10)
        it = iter(range(10**9))
        scratch = cupy.empty_like(want)  # the timed calls cycle weight copies: keep `want`
        t_default = kc.graph_time(lambda x=x, it=it, out=scratch: ops._gemm(
            x, ws[next(it) % copies], out, ops.dtype), calls, reps)
        key = (cuda_gemm_tune.bucket(m), n, k, ops.dtype)
        cuda_gemm_tune.PLANS.pop(key, None)  # measured here, on these operands
        ops._gemm.tuned = tuner
        ops._gemm(x, ws[0], got, ops.dtype)  # tunes, then runs the plan
        plan = cuda_gemm_tune.PLANS[key]
        twin = kc.REF.linear(ops.to_host(x[:8]), w_h)
        err = (f"{kc.rel(ops.to_host(got[:8, :4096]), twin):.1e}, "
               f"vs Ex {_device_rel(ops, got, want):.1e}")
        it = iter(range(10**9))
        t_tuned = kc.graph_time(lambda x=x, it=it, out=scratch: ops._gemm(
            x, ws[next(it) % copies], out, ops.dtype), calls, reps)
        ops._gemm.tuned = None
        timings = sorted(cuda_gemm_tune.TIMINGS.get(key, []))
        flops = 2 * m * n * k
        label = "cublasGemmEx" if plan is None else tuner.describe(plan[1])
        kc.row("w1", f"GEMM {name} {n}x{k} M={m} tuned", err, t_tuned, nbytes + 2 * m * (n + k),
               flops, extra=f"cublasGemmEx {t_default * 1e6:.1f} us "
                            f"{flops / t_default / 1e12:.0f} TFLOP/s -> "
                            f"{t_default / t_tuned:.3f}x; plan: {label}; tuning "
                            f"{len(timings)} timed, fastest {_fmt(timings[:3])}")
        yield m, t_default, t_tuned


SWEEP_MS = tuple(range(64, 257, 16))  # the decode graphs' sizes from 64 rows on (cuda_graph.py)


def _layer_operands(ops, kc, rng, ms):
    """(name, n, k, weight copies, m, x) for each Llama-3-8B layer product (no lm_head) at each
    row count m: enough weight copies to exceed the L2 (read cold), x random at m rows."""
    for name, (n, k) in kc.SHAPES["llama3-8b"].items():
        if name == "lm_head":
            continue
        copies = 1 if kc.OPTS["small"] else max(1, -(-3 * kc.L2_BYTES // (n * k * 2)))
        ws = [ops.random_weight((n, k), k**-0.5, rng) for _ in range(copies)]
        for m in ms:
            yield name, n, k, ws, m, ops.random_weight((m, k), 1.0, rng)


def check_gemm_sweep(ops, kc):
    """--only gemm-m: cublasGemmEx alone at every decode graph size from 64 to 256 rows, Llama-3-8B
    shapes (weights cold): does a GEMM of 144 rows cost what one of 256 does (tiles over the token
    dimension rounded up), and how the four products of a layer add up at each size."""
    ms = (64, 128) if kc.OPTS["small"] else SWEEP_MS
    per_m = dict.fromkeys(ms, 0.0)
    saved, ops._gemm.tuned = ops._gemm.tuned, None
    try:
        for name, n, k, ws, m, x in _layer_operands(ops, kc, np.random.default_rng(12), ms):
            out = cupy.empty((m, n), ops.storage)
            sec = _time_gemm(kc, lambda a, b, o: ops._gemm(a, b, o, ops.dtype), x, ws, out)
            per_m[m] += sec
            kc.row("gemm-m", f"GEMM {name} {n}x{k} M={m}", "-", sec, n * k * 2 + 2 * m * (n + k),
                   2 * m * n * k, extra=f"{sec / m * 1e9:.1f} ns a row")
    finally:
        ops._gemm.tuned = saved
    flops_row = 2 * sum(n * k for name, (n, k) in kc.SHAPES["llama3-8b"].items()
                        if name != "lm_head")
    for m, sec in per_m.items():
        kc.row("gemm-m", f"layer's GEMMs M={m}", "-", sec, 0, flops_row * m,
               extra=f"{sec * 1e6:.1f} us a layer, {LAYERS * sec * 1e3:.2f} ms a step")
    check_prefill_chunk(ops, kc, flops_row)


PREFILL_CHUNK_MS = (8192, 2048)  # W1's prompt steps fill the 8,192-token budget


def check_prefill_chunk(ops, kc, flops_row):
    """gemm-m's prefill rows: W1's steps with prompt tokens run eagerly (more tokens than
    mixed_graphs.py's buckets), so their GEMMs go through cuda_gemm_plan.PlannedGemm
    (cuBLASLt's first heuristic algorithm, kept per shape), not through the cublasGemmEx that the
    graph-timed rows measure. Both here, eagerly, the same operands: which algorithm the plan
    took and whether it is slower (session 14: 186.5 ms a prompt step against ~165 expected)."""
    from engine.executor.ops.cuda_gemm_plan import PlannedGemm

    ms = (256,) if kc.OPTS["small"] else PREFILL_CHUNK_MS
    planned = PlannedGemm(ops._gemm)
    tuner = cuda_gemm_tune.TunedGemm(ops._gemm)  # describes a plan's algorithm
    per_m = {m: [0.0, 0.0] for m in ms}
    saved = ops._gemm.tuned
    try:
        for name, n, k, ws, m, x in _layer_operands(ops, kc, np.random.default_rng(14), ms):
            want, got = cupy.empty((m, n), ops.storage), cupy.empty((m, n), ops.storage)
            ops._gemm.tuned = None
            ops._gemm(x, ws[0], want, ops.dtype)
            t_ex = _eager_time(kc, lambda w, o, x=x: ops._gemm(x, w, o, ops.dtype), ws,
                               want)
            ops._gemm.tuned = planned
            ops._gemm(x, ws[0], got, ops.dtype)  # plans the shape
            plan = planned.plans.get((m, n, k, ops.dtype))
            t_lt = _eager_time(kc, lambda w, o, x=x: ops._gemm(x, w, o, ops.dtype), ws,
                               got)
            per_m[m][0] += t_ex
            per_m[m][1] += t_lt
            flops = 2 * m * n * k
            how = "refused: cublasGemmEx" if plan is None else tuner.describe(plan[4])
            kc.row("gemm-m", f"prefill GEMM {name} {n}x{k} M={m} eager, plan",
                   f"vs Ex {_device_rel(ops, got, want):.1e}", t_lt, n * k * 2 + 2 * m * (n + k),
                   flops, extra=f"cublasGemmEx {t_ex * 1e6:.0f} us "
                                f"{flops / t_ex / 1e12:.0f} TFLOP/s ({t_ex / t_lt:.3f}x); {how}")
    finally:
        ops._gemm.tuned = saved
    for m, (t_ex, t_lt) in per_m.items():
        kc.row("gemm-m", f"prefill layer's GEMMs M={m} eager, plan", "-", t_lt, 0, flops_row * m,
               extra=f"{LAYERS * t_lt * 1e3:.1f} ms a step's layers; cublasGemmEx "
                     f"{LAYERS * t_ex * 1e3:.1f} ms")


def _eager_time(kc, fn, ws, out, calls: int = 6) -> float:
    """Seconds per fn(w, out) launched eagerly, as a step with prompt tokens runs, cycling the
    weight copies ws; the median of three runs of `calls` calls between events."""
    if kc.OPTS["small"]:
        calls = 2
    fn(ws[0], out)  # warm-up
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(3):
        start.record()
        for i in range(calls):
            fn(ws[i % len(ws)], out)
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3 / calls)
    return float(np.median(times))


SKINNY_MS = (16, 64, 128, 144, 160, 192, 208, 256)


def check_skinny(ops, kc):
    """--only skinny: cuda_gemm_sm90.skinny_gemm (the wgmma GEMM for <= 256 token rows) against
    cublasGemmEx at Llama-3-8B shapes, weights cold; its error against cuBLAS's output, its time
    with the planned K splits and with none, captured as PDL launches (each call's weight reads
    start under the previous call, as under the norm or attention kernel in a step), and with
    clusters of 2 blocks sharing x (TMA multicast)."""
    from engine.executor.ops import cuda_gemm_sm90 as sk

    ms = (64, 144) if kc.OPTS["small"] else SKINNY_MS
    sms = sk.num_sms()
    saved, ops._gemm.tuned = ops._gemm.tuned, None
    # per layer: cuBLAS (+ activation.cu's SiLU-mul), skinny (planned, PDL; gate_up's GLU form)
    totals = {m: [0.0, 0.0] for m in ms}
    try:
        for name, n, k, ws, m, x in _layer_operands(ops, kc, np.random.default_rng(13), ms):
            want, got = cupy.empty((m, n), ops.storage), cupy.empty((m, n), ops.storage)
            ops._gemm(x, ws[0], want, ops.dtype)
            sk.skinny_gemm(x, ws[0], got, ops.ctype)
            err = f"vs cuBLAS {_device_rel(ops, got, want):.1e}"
            out = cupy.empty((m, n), ops.storage)
            t_blas = _time_gemm(kc, lambda a, b, o: ops._gemm(a, b, o, ops.dtype), x, ws, out)
            t_plan = _time_gemm(kc, lambda a, b, o: sk.skinny_gemm(a, b, o, ops.ctype), x, ws,
                                out)
            t_one = _time_gemm(kc, lambda a, b, o: sk.skinny_gemm(a, b, o, ops.ctype, splits=1),
                               x, ws, out)
            t_pdl = _time_gemm(kc, lambda a, b, o: sk.skinny_gemm(a, b, o, ops.ctype), x, ws,
                               out, pdl=True)
            sk.skinny_gemm(x, ws[0], got, ops.ctype, cluster=2)
            err += f", cluster 2 {_device_rel(ops, got, want):.1e}"
            t_cl2 = _time_gemm(kc, lambda a, b, o: sk.skinny_gemm(a, b, o, ops.ctype, cluster=2),
                               x, ws, out, pdl=True)
            rows, splits = sk.gemm_plan(m, n, k, sms)
            if name == "gate_up":  # the layer sums take the SiLU-mul: activation.cu, or fused
                act = cupy.empty((m, n // 2), ops.storage)
                sk.skinny_glu(x, ws[0], act, ops.ctype)
                glu_err = _device_rel(ops, act, ops.silu_and_mul(want))
                t_silu = kc.graph_time(lambda out=out: ops.silu_and_mul(out), pdl=True)
                t_glu = _time_gemm(kc, lambda a, b, o: sk.skinny_glu(a, b, o, ops.ctype), x, ws,
                                   act, pdl=True)
                totals[m][0] += t_blas + t_silu
                totals[m][1] += t_glu
                kc.row("skinny", f"GLU {name} {n}x{k} M={m} skinny_glu (PDL)",
                       f"vs cuBLAS + SiLU {glu_err:.1e}", t_glu, n * k * 2 + m * (n + k),
                       2 * m * n * k, extra=f"cuBLAS + SiLU-mul {(t_blas + t_silu) * 1e6:.1f} "
                                            f"us -> {(t_blas + t_silu) / t_glu:.3f}x")
            else:
                totals[m][0] += t_blas
                totals[m][1] += t_pdl
            kc.row("skinny", f"GEMM {name} {n}x{k} M={m} skinny (PDL)", err, t_pdl,
                   n * k * 2 + 2 * m * (n + k), 2 * m * n * k,
                   extra=f"cuBLAS {t_blas * 1e6:.1f} us -> {t_blas / t_pdl:.3f}x; without "
                         f"PDL {t_plan * 1e6:.1f} us; {rows} rows, {splits} splits "
                         f"(1 split: {t_one * 1e6:.1f} us); clusters of 2 sharing x "
                         f"{t_cl2 * 1e6:.1f} us")
    finally:
        ops._gemm.tuned = saved
    for m, (blas, skinny) in totals.items():
        kc.row("skinny", f"layer's GEMMs + SiLU-mul M={m} skinny (PDL)", "-", skinny,
               extra=f"cuBLAS {blas * 1e6:.1f} us -> {blas / skinny:.3f}x; a step's 32 layers "
                     f"{LAYERS * (blas - skinny) * 1e3:+.2f} ms")


def _time_gemm(kc, fn, x, ws, out, pdl=False) -> float:
    """Seconds per fn(x, w, out), cycling through the weight copies ws (cold in L2)."""
    it = iter(range(10**9))
    return kc.graph_time(lambda: fn(x, ws[next(it) % len(ws)], out), max(20, len(ws)), 10,
                         pdl=pdl)


def _device_rel(ops, got, want) -> float:
    """kc.rel on the device (a 8192 x 28672 product is slow to compare on the host)."""
    def f32(a):
        if ops.dtype == "bfloat16":
            return (a.astype(cupy.uint32) << 16).view(cupy.float32)
        return a.astype(cupy.float32)
    g, w = f32(got), f32(want)
    return float(cupy.linalg.norm(g - w) / max(float(cupy.linalg.norm(w)), 1e-30))


def _fmt(timings) -> str:
    return ", ".join(f"{us:.1f} us [{label}]" for us, label in timings)


def check_elementwise(ops, kc, rng, m) -> float:
    """add + RMSNorm (twice a layer), SiLU-mul, RoPE + KV write at m rows; seconds per layer."""
    from engine.executor.transformer import rope_cos_sin
    from engine.model.config import ModelConfig

    # inputs made on the device; the twins check the first 64 rows
    x, res, nw = (ops.random_weight(shape, 1.0, rng) for shape in ((m, HIDDEN), (m, HIDDEN),
                                                                   (HIDDEN,)))
    h, _ = ops.add_rms_norm(x, res.copy(), nw, 1e-5)
    err = kc.rel(ops.to_host(h[:64]), kc.REF.add_rms_norm(
        ops.to_host(x[:64]), ops.to_host(res[:64]), ops.to_host(nw), 1e-5)[0])
    t_norm = kc.graph_time(lambda: ops.add_rms_norm(x, res, nw, 1e-5))
    kc.row("w1", f"add_rms_norm M={m}x{HIDDEN}", f"{err:.1e}", t_norm, m * HIDDEN * 2 * 4)
    gu = ops.random_weight((m, 2 * INTER), 1.0, rng)
    saved = cuda_ops.SILU_MUL_VEC8
    try:
        outs, times = {}, {}
        for vec in (False, True):
            cuda_ops.SILU_MUL_VEC8 = vec
            outs[vec] = ops.silu_and_mul(gu)
            times[vec] = kc.graph_time(lambda: ops.silu_and_mul(gu))
    finally:
        cuda_ops.SILU_MUL_VEC8 = saved
    err = kc.rel(ops.to_host(outs[True][:64]), kc.REF.silu_and_mul(ops.to_host(gu[:64])))
    same = "bit-identical" if cupy.array_equal(outs[True], outs[False]) else "DIFFER"
    t_silu = times[saved]
    kc.row("w1", f"silu_and_mul vec8 M={m}x{2 * INTER}", f"{err:.1e}", times[True],
           m * INTER * 2 * 3, extra=f"scalar kernel {times[False] * 1e6:.1f} us "
                                    f"({times[False] / times[True]:.2f}x), {same}")
    nh, nkv, hd = HEADS
    cfg = ModelConfig("LlamaForCausalLM", LAYERS, HIDDEN, INTER, 1, nh, nkv, hd,
                      rope_theta=5e5)
    cs = ops.from_host(rope_cos_sin(cfg, 8192))
    qkv = ops.random_weight((m, (nh + 2 * nkv) * hd), 1.0, rng)
    blocks = -(-m // 16)
    cache = ops.alloc_kv_cache(1, blocks, nkv, 16, hd)[0]
    pos = cupy.asarray(rng.integers(0, 8192, m).astype(np.int32))
    slots = cupy.asarray(rng.permutation(blocks * 16)[:m].astype(np.int32))
    t_rope = kc.graph_time(lambda: ops.qk_norm_rope_kv_write(
        qkv, pos, cs, None, None, 1e-5, cache[0], cache[1], slots, nh, nkv))
    kc.row("w1", f"rope_kv_write M={m} (32/8/128)", "-", t_rope,
           m * ((nh + 2 * nkv) * hd * 2 + 2 * nkv * hd) * 2)
    return 2 * t_norm + t_silu + t_rope


def check_attention(ops, kc, rng, batch) -> float:
    """Decode attention (the engine's default kernel and graph grid) at W1's mix."""
    nh, nkv, hd = HEADS
    ctx = rng.integers(600, 1001, batch).tolist()
    meta, cache = kc._decode_batch(ops, ctx, nkv, hd)
    qkv = ops.random_weight((batch, (nh + 2 * nkv) * hd), 1.0, rng)
    dmeta = ops.prepare_metadata(meta)
    dmeta.num_splits = ca.decode_plan(batch, nkv, nh // nkv, 32768).num_splits
    sec = kc.graph_time(lambda: ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv,
                                              hd**-0.5))
    kv_bytes = sum(ctx) * nkv * hd * 2 * 2
    kc.row("w1", f"decode attention B={batch} ctx 600..1000 ({ca.DECODE_KERNEL})", "-", sec,
           kv_bytes, extra=f"{kv_bytes / 1e6:.0f} MB of K/V; grid splits {dmeta.num_splits}")
    return sec
