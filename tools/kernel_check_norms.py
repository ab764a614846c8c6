"""kernel_check.py's `norms` section (--only norms): the row-wise kernels of a decode step that
engine/executor/ops/cuda_norm.py vectorizes (PAGEDSERVE_NORM_VEC), old kernel against new, each
checked against its numpy twin and timed by CUDA-graph replay (plain, as kernel_check --only w1
timed the old ones, and as a PDL chain, as decode graphs run them):
- add + RMSNorm (mode 2, the one a layer runs twice) and the plain RMSNorm (mode 0) at M = 1, 16,
  64, 256, 2048 rows of hidden 1024 (Qwen3-0.6B) and 4096 (Llama-3-8B); 5120 and 8192 at 16 rows;
- the GGUF GEMVs with the fused add + norm at M = 1 (v3 Q4_K one block per SM, v3 Q8_0, v2
  Q8_0; Llama-3-8B's qkv, 6144 x 4096), the norm weight loaded after the sum of squares vs with x
  (NORM_W_EARLY), in a PDL chain;
- the fused q/k norm + RoPE + KV write (qk_rope_kv.cu) with NORM_W_EARLY or without, in a PDL
  chain: Qwen3-0.6B (16/8/128 heads, q/k norm) and Llama-3-8B (32/8/128) at the same M;
- the row gather (embedding lookup) at the same M, hidden 4096;
- a Qwen3-0.6B batch-1 decode step (graph replay, ctx 512) with PAGEDSERVE_NORM_VEC off and on
  (kernel_check's `decode` table).
"""

from __future__ import annotations

import cupy
import numpy as np

from engine.executor.ops import cuda_norm

MS = (1, 16, 64, 256, 2048)
HIDDENS = (1024, 4096)


def _bits_differ(a, b) -> int:
    return int(cupy.count_nonzero(a.view(cupy.uint16) != b.view(cupy.uint16)))


def _norm_row(ops, kc, rng, m, hidden, mode):
    eps = 1e-5
    x, res, nw = (ops.random_weight(s, 1.0, rng) for s in ((m, hidden), (m, hidden), (hidden,)))
    outs = {}
    for vec in (False, True):
        out, r = cupy.empty_like(x), res.copy()
        cuda_norm.rms_norm(out, r if mode else None, x, nw, eps, mode, ops.ctype, vec=vec)
        outs[vec] = out, r
    n = min(m, 64)
    x_h, res_h, nw_h = ops.to_host(x[:n]), ops.to_host(res[:n]), ops.to_host(nw)
    want = (kc.REF.rms_norm(x_h, nw_h, eps) if mode == 0
            else kc.REF.add_rms_norm(x_h, res_h, nw_h, eps)[0])
    err = kc.rel(ops.to_host(outs[True][0][:n]), want)
    off = _bits_differ(outs[True][0], outs[False][0])
    agree = f"out differs from the scalar kernel's in {off} of {m * hidden} (sum order)"
    if mode == 2:
        same = cupy.array_equal(outs[True][1], outs[False][1])
        agree += "; residual " + ("bit-identical" if same else "DIFFERS")
    times = {}
    for vec, pdl in ((False, False), (True, False), (False, True), (True, True)):
        out, r = cupy.empty_like(x), res.copy()
        times[vec, pdl] = kc.graph_time(
            lambda vec=vec, out=out, r=r: cuda_norm.rms_norm(out, r if mode else None, x, nw,
                                                             eps, mode, ops.ctype, vec=vec),
            pdl=pdl)
    shape = cuda_norm.vec_launch(hidden, x, res, nw)
    what = "add_rms_norm" if mode == 2 else "rms_norm"
    nbytes = m * hidden * 2 * (4 if mode == 2 else 2)
    kc.row("norms", f"{what} vec M={m}x{hidden} (V={shape[0]}, {shape[1]} threads)",
           f"{err:.1e}", times[True, False], nbytes,
           extra=f"scalar {times[False, False] * 1e6:.1f} us "
                 f"({times[False, False] / times[True, False]:.2f}x); PDL chain: scalar "
                 f"{times[False, True] * 1e6:.1f} -> vec {times[True, True] * 1e6:.1f} us; {agree}")


def _gather_row(ops, kc, rng, m, table):
    hidden = table.shape[1]
    ids = cupy.asarray(rng.integers(0, len(table), m).astype(np.int32))
    saved = cuda_norm.NORM_VEC
    try:
        got, times = {}, {}
        for vec in (False, True):
            cuda_norm.NORM_VEC = vec
            got[vec] = ops.embedding(ids, table)
            times[vec] = kc.graph_time(lambda: ops.embedding(ids, table), pdl=True)
    finally:
        cuda_norm.NORM_VEC = saved
    same = all(cupy.array_equal(got[v], table[ids]) for v in (False, True))
    threads = cuda_norm.gather_threads(hidden // 8, True)
    kc.row("norms", f"embedding gather M={m}x{hidden} ({threads} threads)",
           "exact" if same else "DIFFER", times[True], 2 * m * hidden * 2,
           extra=f"128 threads {times[False] * 1e6:.1f} us ({times[False] / times[True]:.2f}x);"
                 " PDL chain")


def _gguf_row(ops, kc, rng, version, kind, big, n=6144, k=4096):
    from engine.executor.ops import cuda_quant_gguf as cq
    from engine.model import gguf_quants as gq
    from engine.model.quantized import QuantizedWeight

    w = QuantizedWeight(kind, (n, k), cupy.asarray(gq.random_blocks(kind, (n, k), 0.02, rng)))
    x, res, nw = (ops.random_weight(s, 1.0, rng) for s in ((1, k), (1, k), (k,)))
    saved = cq.GEMV_KERNEL, cq.GEMV3_BIG, cuda_norm.NORM_VEC
    got, times = {}, {}
    try:
        cq.GEMV_KERNEL, cq.GEMV3_BIG = version, big
        for early in (False, True):
            cuda_norm.NORM_VEC = early
            got[early] = ops.add_rms_norm_linear(x, res.copy(), nw, 1e-5, w)
            r = res.copy()
            times[early] = kc.graph_time(lambda r=r: ops.add_rms_norm_linear(x, r, nw, 1e-5, w),
                                         pdl=True)
    finally:
        cq.GEMV_KERNEL, cq.GEMV3_BIG, cuda_norm.NORM_VEC = saved
    same = all(cupy.array_equal(a, b) for a, b in zip(got[True], got[False], strict=True))
    label = f"{version}{' big' if big else ''}"
    kc.row("norms", f"gguf {label} {kind} add+norm+GEMV {n}x{k} M=1, norm weight early",
           "bit-identical" if same else "DIFFER", times[True], gq.row_bytes(kind, k) * n,
           extra=f"weight after the sum of squares {times[False] * 1e6:.1f} us "
                 f"({times[False] / times[True]:.3f}x); PDL chain")


def _qk_rope_row(ops, kc, rng, m, preset):
    from engine.executor.transformer import rope_cos_sin
    from engine.model.config import ModelConfig

    cfg = ModelConfig.from_preset(preset)
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cs = ops.from_host(rope_cos_sin(cfg, 8192))
    qkv = ops.random_weight((m, (nh + 2 * nkv) * hd), 1.0, rng)
    qn, kn = ((ops.random_weight((hd,), 1.0, rng) for _ in range(2)) if cfg.qk_norm
              else (None, None))
    blocks = -(-m // 16)
    cache = ops.alloc_kv_cache(1, blocks, nkv, 16, hd)[0]
    pos = cupy.asarray(rng.integers(0, 8192, m).astype(np.int32))
    slots = cupy.asarray(rng.permutation(blocks * 16)[:m].astype(np.int32))
    saved = cuda_norm.NORM_VEC
    got, times = {}, {}
    try:
        for early in (False, True):
            cuda_norm.NORM_VEC = early
            q, c = qkv.copy(), cache.copy()
            ops.qk_norm_rope_kv_write(q, pos, cs, qn, kn, 1e-6, c[0], c[1], slots, nh, nkv)
            got[early] = q, c
            q, c = qkv.copy(), cache.copy()
            times[early] = kc.graph_time(lambda q=q, c=c: ops.qk_norm_rope_kv_write(
                q, pos, cs, qn, kn, 1e-6, c[0], c[1], slots, nh, nkv), pdl=True)
    finally:
        cuda_norm.NORM_VEC = saved
    same = all(cupy.array_equal(got[True][i], got[False][i]) for i in (0, 1))
    kc.row("norms", f"qk_rope_kv {preset} M={m} ({nh}/{nkv}/{hd}), weights early",
           "bit-identical" if same else "DIFFER", times[True],
           m * ((nh + 2 * nkv) * hd * 2 + 2 * nkv * hd) * 2,
           extra=f"weights after the wait {times[False] * 1e6:.1f} us "
                 f"({times[False] / times[True]:.2f}x); PDL chain")


def check_norms(ops, kc):
    """kc: the kernel_check module (row, graph_time, rel, REF, OPTS)."""
    rng = np.random.default_rng(5)
    small = kc.OPTS["small"]
    ms = (1, 16) if small else MS
    for hidden in HIDDENS:
        for m in ms:
            _norm_row(ops, kc, rng, m, hidden, 2)
    for hidden in (1024,) if small else (5120, 8192):
        _norm_row(ops, kc, rng, 16, hidden, 2)
    for m in (1, 16) if small else (1, 256):
        _norm_row(ops, kc, rng, m, 4096, 0)
    for preset in ("qwen3-0.6b", "llama3-8b"):
        for m in (1, 16) if small else (1, 16, 256, 2048):
            _qk_rope_row(ops, kc, rng, m, preset)
    for version, kind, big in (("v3", "Q4_K", True), ("v3", "Q8_0", False), ("v2", "Q8_0", None)):
        _gguf_row(ops, kc, rng, version, kind, big)
    table = ops.random_weight((32768, 4096), 1.0, rng)  # (vocab, hidden)
    for m in ms:
        _gather_row(ops, kc, rng, m, table)
    del table
    saved = cuda_norm.NORM_VEC
    try:
        for vec in (False, True, False, True):  # twice each: the step's noise shows
            cuda_norm.NORM_VEC = vec
            kc.decode_step(ops, "qwen3-0.6b", 512, gemv_on=False, tag=f", NORM_VEC={int(vec)}")
    finally:
        cuda_norm.NORM_VEC = saved
