"""kernel_check.py's `fp8` section (--only fp8): FP8 W8A8 kernels against engine/model/fp8.py and
timed at Llama-3-8B shapes against bf16.

- quantization kernels (plain, fused with add + RMSNorm, fused with SiLU-mul): codes and scales
  bit-exact vs the twin (mismatch counts), time per call, beside the bf16 path's norm / SiLU-mul;
- FP8 GEMV (M = 1..8) vs FP8 cuBLASLt vs bf16 GEMV / cuBLAS at the same M (GB/s of weights); at
  M <= 2 also the other FP8_GEMV_WORDS and the quantize + GEMV pair chained by PDL; at M <= 4 the
  streaming GEMV (cuda/fp8_fused.cu) on the same codes, plain and chained by PDL;
- batch 1: the streaming GEMV with its quantization fused in vs the two launches, PDL-chained;
- FP8 cuBLASLt GEMM at M = 256 and 2048 vs bf16 cuBLAS (TFLOP/s), with the scale mode cuBLASLt
  took ("outer": scales in its epilogue; "fp32+scale": fp32 out + fp8_scale_kernel);
- a batch-1 decode step of Llama-3-8B shapes (CUDA graph): bf16, FP8, FP8 with the lm_head in
  FP8 too (its logits vs the bf16 lm_head's), PDL off and on, and cuda_fp8.STREAM under PDL.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import cupy
import numpy as np

from engine.executor.ops import cuda_fp8, cuda_gemv
from engine.model import fp8

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def check_fp8(ops, kc):
    """kc: the kernel_check module (its row, graph_time, rel, OPTS and L2 size)."""
    rng = np.random.default_rng(11)
    check_quantize(ops, kc, rng)
    for name, (n, k) in SHAPES.items():
        check_products(ops, kc, rng, name, n, k)
    decode_step(ops, kc)


def _mismatches(q, s, x_host) -> str:
    want_q, want_s = fp8.quantize_rows(x_host)
    bad = int((cupy.asnumpy(q) != want_q).sum()) + int((cupy.asnumpy(s) != want_s).sum())
    return "bit-exact" if bad == 0 else f"{bad} MISMATCHES"


def _words_variants(rows: int, run, check) -> str:
    """At 256+ rows: run() timed with 1 and 4 words per thread (cuda_fp8.QUANT_WORDS), check()
    -> agreement."""
    if rows < 256:
        return ""
    saved = cuda_fp8.QUANT_WORDS, cuda_fp8.QUANT_WORDS_MIN_ELEMENTS
    cuda_fp8.QUANT_WORDS_MIN_ELEMENTS, text = 0, ""
    try:
        for words in (1, 4):
            cuda_fp8.QUANT_WORDS = words
            text += f"; {words} words/thread {run() * 1e6:.1f} us ({check()})"
    finally:
        cuda_fp8.QUANT_WORDS, cuda_fp8.QUANT_WORDS_MIN_ELEMENTS = saved
    return text


def check_quantize(ops, kc, rng):
    for rows, k in ((1, 4096), (8, 14336), (256, 4096), (256, 14336), (2048, 4096),
                    (2048, 14336)):
        x = ops.from_host(rng.standard_normal((rows, k)).astype(np.float32))
        x_h = ops.to_host(x)
        q, s = cuda_fp8.quantize_rows(x, ops.ctype)
        t = kc.graph_time(lambda x=x: cuda_fp8.quantize_rows(x, ops.ctype))
        kc.row("fp8", f"quantize rows {rows}x{k}", _mismatches(q, s, x_h), t, rows * k * 3,
               extra=_words_variants(
                   rows, lambda x=x: kc.graph_time(lambda: cuda_fp8.quantize_rows(x, ops.ctype)),
                   lambda x=x, x_h=x_h: _mismatches(*cuda_fp8.quantize_rows(x, ops.ctype), x_h)))
        nw = ops.from_host(rng.standard_normal(k).astype(np.float32) + 1)
        res = ops.from_host(rng.standard_normal((rows, k)).astype(np.float32))
        h_ref, _ = ops.add_rms_norm(x, res.copy(), nw, 1e-5)
        h = cupy.empty_like(x)  # the kernel's normalized row: its codes are the twin's of it
        q, s, _ = cuda_fp8.norm_quantize(x, res.copy(), nw, 1e-5, ops.ctype, h_out=h)

        def norm_run(x=x, res=res, nw=nw):
            return kc.graph_time(lambda: cuda_fp8.norm_quantize(x, res, nw, 1e-5, ops.ctype))

        def norm_check(x=x, res=res, nw=nw):
            h = cupy.empty_like(x)
            q, s, _ = cuda_fp8.norm_quantize(x, res.copy(), nw, 1e-5, ops.ctype, h_out=h)
            return _mismatches(q, s, ops.to_host(h))

        t = norm_run()
        off = int((ops.to_host(h) != ops.to_host(h_ref)).sum())
        t_bf = kc.graph_time(lambda x=x, res=res, nw=nw: ops.add_rms_norm(x, res, nw, 1e-5))
        kc.row("fp8", f"add+RMSNorm+quantize {rows}x{k}", _mismatches(q, s, ops.to_host(h)), t,
               rows * k * 7, extra=f"h != rms_norm_kernel's in {off} of {rows * k} (sum "
                                   f"order); bf16 add_rms_norm {t_bf * 1e6:.1f} us"
                                   + _words_variants(rows, norm_run, norm_check))
        gu = ops.from_host(rng.standard_normal((rows, 2 * k)).astype(np.float32))
        act = ops.to_host(ops.silu_and_mul(gu))
        q, s = cuda_fp8.silu_quantize(gu, ops.ctype)
        t = kc.graph_time(lambda gu=gu: cuda_fp8.silu_quantize(gu, ops.ctype))
        t_bf = kc.graph_time(lambda gu=gu: ops.silu_and_mul(gu))
        kc.row("fp8", f"SiLU-mul+quantize {rows}x{k}", _mismatches(q, s, act), t, rows * k * 5,
               extra=f"bf16 silu_and_mul {t_bf * 1e6:.1f} us" + _words_variants(
                   rows, lambda gu=gu: kc.graph_time(lambda: cuda_fp8.silu_quantize(gu,
                                                                                   ops.ctype)),
                   lambda gu=gu, act=act: _mismatches(*cuda_fp8.silu_quantize(gu, ops.ctype),
                                                      act)))


def _twin_err(ops, kc, y, q, s, qw) -> str:
    dx, dw = fp8.decode(cupy.asnumpy(q)), fp8.decode(cupy.asnumpy(qw.data))
    want = (dx @ dw.T) * cupy.asnumpy(s)[:, None] * cupy.asnumpy(qw.scale)[None, :]
    return f"{kc.rel(ops.to_host(y), want):.1e}"


def check_products(ops, kc, rng, name, n, k):
    small = kc.OPTS["small"]
    copies = 1 if small else max(1, -(-3 * kc.L2_BYTES // (n * k)))  # > L2: weights read cold
    ws = [ops.random_weight((n, k), k**-0.5, rng) for _ in range(copies)]
    qws = [ops.quantize_fp8(w) for w in ws]
    calls = max(20, copies)
    lt = cuda_fp8.fp8_gemm(ops._gemm)

    def cycled(fn, pdl=False):
        it = iter(range(10**9))
        return kc.graph_time(lambda: fn(next(it) % copies), calls, pdl=pdl)

    for m in ((1, 8) if small else (1, 2, 4, 8)):
        x = ops.from_host(rng.standard_normal((m, k)).astype(np.float32))
        q, s = cuda_fp8.quantize_rows(x, ops.ctype)
        y = cupy.empty((m, n), ops.storage)
        err = _twin_err(ops, kc, cuda_fp8.gemv(q, s, qws[0], y, ops.ctype), q, s, qws[0])
        t_gemv = cycled(lambda i, q=q, s=s, y=y: cuda_fp8.gemv(q, s, qws[i], y, ops.ctype))
        t_lt = cycled(lambda i, q=q, s=s: cuda_fp8.matmul(ops, q, s, qws[i], use_gemv=False))
        t_bf = cycled(lambda i, x=x: ops.linear(x, ws[i]))  # bf16 as the engine runs it
        best = min(("FP8 GEMV", t_gemv), ("FP8 cuBLASLt", t_lt), ("bf16", t_bf),
                   key=lambda p: p[1])[0]
        other = ""
        if m <= 2:  # the other GEMV block size, and a decode graph's chain: quantize + GEMV, PDL
            words = cuda_fp8.FP8_GEMV_WORDS
            cuda_fp8.FP8_GEMV_WORDS = 6 - words  # 2 <-> 4
            t_w = cycled(lambda i, q=q, s=s, y=y: cuda_fp8.gemv(q, s, qws[i], y, ops.ctype))
            cuda_fp8.FP8_GEMV_WORDS = words
            it = iter(range(10**9))
            t_p = kc.graph_time(lambda x=x, y=y, it=it: cuda_fp8.gemv(
                *cuda_fp8.quantize_rows(x, ops.ctype), qws[next(it) % copies], y, ops.ctype),
                calls, pdl=True)
            other = (f"; {6 - words} words/thread {t_w * 1e6:.1f} us; quantize + GEMV PDL chain "
                     f"{t_p * 1e6:.1f} us")
        if m <= cuda_fp8.STREAM_MAX_M:
            y_st = cuda_fp8.stream_gemv(ops, cuda_fp8.PRO_CODES, qws[0], q=q, s=s)[0]
            t_st = cycled(lambda i, q=q, s=s: cuda_fp8.stream_gemv(ops, cuda_fp8.PRO_CODES,
                                                                   qws[i], q=q, s=s))
            t_stp = cycled(lambda i, q=q, s=s: cuda_fp8.stream_gemv(
                ops, cuda_fp8.PRO_CODES, qws[i], q=q, s=s), pdl=True)
            other += (f"; stream GEMV {t_st * 1e6:.1f} us, PDL-chained {t_stp * 1e6:.1f} us "
                      f"({_twin_err(ops, kc, y_st, q, s, qws[0])})")
        kc.row("fp8", f"{name} {n}x{k} M={m} FP8 GEMV", err, t_gemv, n * k + m * k, 2 * m * n * k,
               extra=f"FP8 cuBLASLt {t_lt * 1e6:.1f} us, bf16 {t_bf * 1e6:.1f} us "
                     f"({t_bf / t_gemv:.2f}x) -> {best}{other}")
    check_stream_fused(ops, kc, rng, name, qws)
    for m in ((256,) if small else (144, 256, 2048)):
        x = ops.from_host(rng.standard_normal((m, k)).astype(np.float32))
        q, s = cuda_fp8.quantize_rows(x, ops.ctype)
        err = _twin_err(ops, kc, cuda_fp8.matmul(ops, q, s, qws[0], use_gemv=False), q, s, qws[0])
        plan = lt.plans.get((m, n, k, ops.dtype))
        mode = "no cuBLASLt plan: GEMV chunks" if plan is None else plan[0]
        t_lt = cycled(lambda i, q=q, s=s: cuda_fp8.matmul(ops, q, s, qws[i], use_gemv=False))
        t_q = kc.graph_time(lambda x=x: cuda_fp8.quantize_rows(x, ops.ctype))
        out = cupy.empty((m, n), ops.storage)
        t_bf = cycled(lambda i, x=x, out=out: ops._gemm(x, ws[i], out, ops.dtype))
        kc.row("fp8", f"{name} {n}x{k} M={m} FP8 cuBLASLt ({mode})", err, t_lt,
               n * k + m * k + m * n * 2, 2 * m * n * k,
               extra=f"+ quantize {t_q * 1e6:.1f} us; bf16 cuBLAS {t_bf * 1e6:.1f} us "
                     f"({t_bf / (t_lt + t_q):.2f}x incl. quant)")


def check_stream_fused(ops, kc, rng, name, qws):
    """Batch 1 in a PDL chain, as a decode graph runs it: the streaming GEMV with the quantization
    fused in vs the quantize kernel + fp8.cu's GEMV and the quantize kernel + the streaming GEMV."""
    n, k = qws[0].data.shape
    pro = {"o": cuda_fp8.PRO_QUANTIZE, "down": cuda_fp8.PRO_SILU}.get(name, cuda_fp8.PRO_NORM)

    def up(shape):
        return ops.from_host(rng.standard_normal(shape).astype(np.float32))

    x = up((1, 2 * k if pro == cuda_fp8.PRO_SILU else k))
    res, nw = up((1, k)), up((k,))
    extra = (res, nw, 1e-5) if pro == cuda_fp8.PRO_NORM else ()
    y = cuda_fp8.stream_gemv(ops, pro, qws[0], x, *extra)[0]
    quantize = {cuda_fp8.PRO_QUANTIZE: lambda: cuda_fp8.quantize_rows(x, ops.ctype),
                cuda_fp8.PRO_SILU: lambda: cuda_fp8.silu_quantize(x, ops.ctype),
                cuda_fp8.PRO_NORM: lambda: cuda_fp8.norm_quantize(x, res, nw, 1e-5,
                                                                  ops.ctype)[:2]}[pro]
    q, s = quantize()
    err = _twin_err(ops, kc, y, q, s, qws[0])
    copies, out = len(qws), cupy.empty((1, n), ops.storage)

    def chained(fn):
        it = iter(range(10**9))
        return kc.graph_time(lambda: fn(next(it) % copies), max(20, copies), pdl=True)

    t_f = chained(lambda i: cuda_fp8.stream_gemv(ops, pro, qws[i], x, *extra))
    t_u = chained(lambda i: cuda_fp8.gemv(*quantize(), qws[i], out, ops.ctype))
    def codes_stream(i):
        q, s = quantize()
        return cuda_fp8.stream_gemv(ops, cuda_fp8.PRO_CODES, qws[i], q=q, s=s)

    t_us = chained(codes_stream)
    kind = ("quantize", "SiLU-mul+quantize", "add+RMSNorm+quantize")[pro]
    kc.row("fp8", f"{name} {n}x{k} M=1 stream GEMV, {kind} fused, PDL chain", err, t_f, n * k,
           2 * n * k, extra=f"quantize + GEMV {t_u * 1e6:.1f} us ({t_u / t_f:.2f}x), quantize + "
                            f"stream GEMV {t_us * 1e6:.1f} us; stages "
                            f"{cuda_fp8.stream_stages(1, k)}")


def decode_step(ops, kc, preset: str = "llama3-8b", ctx: int = 512):
    """Batch-1 decode, one CUDA graph per step with programmatic dependent launches: FP8 layers,
    then FP8 layers + FP8 lm_head (dummy weights, same draws), each with the two-launch products
    and with the streaming GEMV (cuda_fp8.STREAM, 16 and 8 warps a block); the logits against
    the two-launch ones and the FP8 lm_head's against the bf16 lm_head's. (Device run A timed
    bf16 and PDL off: 4145 us bf16, 3310 us FP8 without PDL.)"""
    from engine.executor.cuda_graph import DecodeGraphs
    from engine.executor.ops import AttentionMetadata, cuda_kernels
    from engine.executor.transformer import Transformer
    from engine.logs import weights_nbytes
    from engine.model.config import ModelConfig
    from engine.model.loader import dummy_weights

    config = ModelConfig.from_preset(preset)
    if kc.OPTS["small"]:
        config = config.cut(2, 4096)
    bs, nb = 16, -(-(ctx + 1) // 16)
    meta = AttentionMetadata(np.array([ctx], np.int32), np.arange(2, dtype=np.int32),
                             np.array([ctx + 1], np.int32),
                             np.arange(nb, dtype=np.int32).reshape(1, -1), 1, ctx + 1)
    ids, pos = np.array([7], np.int32), np.array([ctx], np.int32)
    kv = (ctx + 1) * config.num_layers * config.num_kv_heads * config.head_dim * 4
    saved_pdl, cuda_kernels.PDL = cuda_kernels.PDL, True
    logits = {}
    for label in ("fp8", "fp8 + fp8 lm_head"):
        if label == "fp8":
            saved_lm_head, fp8.LM_HEAD = fp8.LM_HEAD, False  # the bf16 lm_head first
            weights = dummy_weights(config, ops, seed=0, quantization="fp8")
            fp8.LM_HEAD = saved_lm_head
        else:
            weights = dataclasses.replace(weights, lm_head=ops.quantize_fp8(weights.lm_head))
        read = weights_nbytes(weights) - weights.embed.nbytes * (weights.embed is not
                                                                 weights.lm_head)
        model = Transformer(config, weights, ops, ctx + 16)
        cache = ops.alloc_kv_cache(config.num_layers, nb, config.num_kv_heads, bs,
                                   config.head_dim)
        for knobs in ({}, {"STREAM": True}, {"STREAM": True, "STREAM_WARPS": 8}):
            saved = {name: getattr(cuda_fp8, name) for name in knobs}
            for name, value in knobs.items():
                setattr(cuda_fp8, name, value)
            g = DecodeGraphs(model, cache, max_num_seqs=1, max_blocks_per_seq=nb,
                             max_context_len=max(ctx + 1, 32768))
            g.capture()
            times = []
            for _ in range(3 if kc.OPTS["small"] else 30):
                t0 = time.perf_counter()
                out = g.run(ids, pos, meta)
                cupy.cuda.get_current_stream().synchronize()
                times.append(time.perf_counter() - t0)
            for name, value in saved.items():
                setattr(cuda_fp8, name, value)
            got = logits[label, bool(knobs)] = np.asarray(ops.to_host(out), np.float32)
            extra = f"GEMV caps {cuda_gemv.GEMV_MAX_M}/{cuda_fp8.FP8_GEMV_MAX_M}"
            if knobs:
                extra += "; logits vs two launches: " + _agreement(kc, got, logits[label, False])
            elif label != "fp8":
                extra += "; logits vs bf16 lm_head: " + _agreement(kc, got, logits["fp8", False])
            knob_text = "".join(f", {n}={v}" for n, v in knobs.items())
            kc.row("fp8", f"decode {preset} B=1 ctx={ctx} graph, {label}, PDL "
                   f"{'on' if cuda_kernels.PDL else 'FELL BACK'}{knob_text} "
                   f"({weights_nbytes(weights) / 1e6:.0f} MB weights)",
                   "-", statistics.median(times), read + kv, extra=extra)
            del g
        del model, cache
        cupy.get_default_memory_pool().free_all_blocks()
    cuda_kernels.PDL = saved_pdl


def _agreement(kc, got, want) -> str:
    return (f"{kc.rel(got, want):.1e} rel, top-1 "
            f"{'same' if got.argmax() == want.argmax() else 'DIFF'}")
