"""kernel_check.py's `decode1` section (--only decode1): where a batch-1 decode step's time goes.

For each shape and weight format of VARIANTS (dummy weights, as tools/bench_latency.py runs them):
- every op of Transformer.forward, called on the op interface as the forward calls it, graph-timed
  alone: one CUDA graph holds `num_layers` calls, call i on layer i's weights (and its own K/V
  copy), so every call reads its bytes cold as in the step; timed as a PDL chain (how the decode
  graph launches) and plainly (each kernel after the previous one's end); its launches by kernel;
- the step those ops imply: embedding + layers x (a layer's ops) + final add + norm + lm_head;
- the real step: the decode CUDA graph (engine/executor/cuda_graph.py) replayed back to back (GPU
  time per step), the engine's wall time for it (upload, replay, host sync) and the greedy
  sampler after it. real - implied is what the chain costs beyond its ops alone;
- a chain of trivial PDL kernels as long as the step's: the price of the launches alone.
Then STEP_VARIANTS (cuda_gemv's x prefetch) re-time the real step
(and the GEMV ops) against the default, with its logits compared bit for bit.

    PYTHONPATH=. python tools/kernel_check.py --only decode1 [--decode1 qwen3-0.6b,llama3-8b:fp8]

The table: op | launches | us in a PDL chain | us plain | MB read | GB/s | % of 4.8 TB/s | us per
step | share of the real step (GPU time of the graph). Every table also goes to ${OUT:-/tmp}/b1.txt
(rewritten after each shape); the log's tail ends with one summary line per shape.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import time
from pathlib import Path

import numpy as np

from engine.executor.ops import AttentionMetadata

PEAK_BW = 4.8e12  # the H200's HBM3e bandwidth (spec sheet)
# (preset, weight format: None = the compute dtype, "fp8", or a GGUF kind), contexts
VARIANTS = (("qwen3-0.6b", None, (512, 32532)), ("llama3-8b", None, (512,)),
            ("llama3-8b", "fp8", (512,)), ("llama3-8b", "q4_k", (512,)),
            ("llama3-8b", "q8_0", (512,)))
GEMV_OPS = ("add+norm+qkv", "o", "mlp", "down", "lm_head")
# label -> (module of engine.executor.ops, attributes set on it, ops re-timed besides the real
# step, only on the compute dtype's weights): each against the default, at every context
STEP_VARIANTS = {
    "GEMV x not prefetched": ("cuda_gemv", {"GEMV_PREFETCH_X": False}, GEMV_OPS, True),
}
BLOCK = 16


@dataclasses.dataclass
class OpTime:
    name: str
    sec: float  # per call, in a PDL chain
    plain_sec: float  # per call, plain launches
    nbytes: int  # weight (or K/V) bytes a call reads
    per_step: int  # calls per step: num_layers for a layer's op
    launches: str = ""  # kernels per call, by name
    in_sum: bool = True  # False: part of another row (down within mlp)


def implied_step(rows: list[OpTime]) -> float:
    return sum(r.sec * r.per_step for r in rows if r.in_sum)


def table(title: str, rows: list[OpTime], real_sec: float | None) -> list[str]:
    """Markdown lines: one per op, then the implied step against the real one."""
    lines = [f"#### {title}", "| op | launches | us (PDL chain) | us (plain) | MB read | GB/s | "
             "% of 4.8 TB/s | us per step | share of step |", "|---" * 9 + "|"]
    for r in rows:
        rate = r.nbytes / r.sec if r.sec > 0 else 0.0
        step_us = r.sec * r.per_step * 1e6
        share = f"{r.sec * r.per_step / real_sec * 100:.1f}%" if real_sec else "-"
        name = r.name if r.in_sum else f"({r.name}, within the row above)"
        lines.append(f"| {name} | {r.launches or '-'} | {r.sec * 1e6:.2f} | "
                     f"{r.plain_sec * 1e6:.2f} | {r.nbytes / 1e6:.2f} | "
                     f"{rate / 1e9:.0f} | {rate / PEAK_BW * 100:.1f} | {step_us:.1f} | {share} |")
    implied = implied_step(rows)
    plain = sum(r.plain_sec * r.per_step for r in rows if r.in_sum)
    nbytes = sum(r.nbytes * r.per_step for r in rows if r.in_sum)
    share = f"{implied / real_sec * 100:.1f}%" if real_sec else "-"
    lines.append(f"| implied step (ops alone, summed) | | {implied * 1e6:.1f} | {plain * 1e6:.1f} "
                 f"| {nbytes / 1e6:.0f} | {nbytes / implied / 1e9:.0f} | "
                 f"{nbytes / implied / PEAK_BW * 100:.1f} | {implied * 1e6:.1f} | {share} |")
    return lines


def variants(spec: str | None):
    """VARIANTS, or those `spec` names ('qwen3-0.6b,llama3-8b:fp8'; 'llama3-8b' alone is bf16)."""
    if not spec:
        return VARIANTS
    wanted = {tuple(s.split(":")) if ":" in s else (s, None) for s in spec.split(",")}
    return tuple(v for v in VARIANTS if (v[0], v[1]) in wanted)


def preset_config(preset: str, small: bool):
    """The preset's ModelConfig; small: 2 layers and a 4096-token vocabulary (--small)."""
    from engine.model.config import ModelConfig

    config = ModelConfig.from_preset(preset)
    return config.cut(2, 4096) if small else config


def build(ops, preset: str, quant: str | None, small: bool, max_ctx: int):
    """(config, Transformer) with dummy weights in the format `quant`."""
    from engine.executor.transformer import Transformer
    from engine.model.gguf_weights import dummy_quantized_weights
    from engine.model.loader import dummy_weights

    config = preset_config(preset, small)
    if quant in (None, "fp8"):
        weights = dummy_weights(config, ops, seed=0, quantization=quant)
    else:
        weights = dummy_quantized_weights(config, ops, quant.upper(), seed=0)
    return config, Transformer(config, weights, ops, max_ctx + BLOCK)


def decode_meta(ops, config, ctx: int):
    """(host metadata, the ops' metadata) of one sequence decoding its token at position ctx;
    on the GPU with the attention grid DecodeGraphs captures for a 32k-token max_model_len."""
    nb = -(-(ctx + 1) // BLOCK)
    meta = AttentionMetadata(np.array([ctx], np.int32), np.arange(2, dtype=np.int32),
                             np.array([ctx + 1], np.int32),
                             np.arange(nb, dtype=np.int32).reshape(1, -1), 1, ctx + 1)
    dmeta = ops.prepare_metadata(meta)
    if ops.name == "cuda":
        from engine.executor.ops.cuda_attention import decode_plan

        group = config.num_heads // config.num_kv_heads
        dmeta.num_splits = decode_plan(1, config.num_kv_heads, group,
                                       max(ctx + 1, 32768)).num_splits
    return meta, dmeta


def layer_ops(ops, model, ctx: int, kv_copies: int, rng) -> list[tuple]:
    """[(name, fn(i), bytes per call, calls per step, in the sum)]: the forward's op calls at
    batch 1 (Transformer.forward), call i on layer i's weights and K/V copy i."""
    c, w = model.config, model.weights
    nh, nkv, eps, layers = c.num_heads, c.num_kv_heads, c.rms_norm_eps, w.layers

    def rand(*shape):
        return ops.random_weight(shape, 1.0, rng)

    def layer(i):
        return layers[i % c.num_layers]

    def size(a) -> int:
        return 0 if a is None else int(a.nbytes)

    x, res, res2, h = (rand(1, c.hidden_size) for _ in range(4))
    qkv, attn, act = rand(1, c.q_size + 2 * c.kv_size), rand(1, c.q_size), \
        rand(1, c.intermediate_size)
    # (kv_copies, 2, blocks, kv heads, BLOCK, head_dim): one copy per call, cold when copies > L2
    cache = ops.alloc_kv_cache(kv_copies, -(-(ctx + 1) // BLOCK), nkv, BLOCK, c.head_dim)
    _, meta = decode_meta(ops, c, ctx)
    pos, ids = ops.from_host(np.array([ctx], np.int32)), ops.from_host(np.array([7], np.int32))
    kv_bytes = (ctx + 1) * c.kv_size * 2 * cache.itemsize
    lw = layers[0]

    def rope(i):
        k = i % kv_copies
        ops.qk_norm_rope_kv_write(qkv, pos, model.cos_sin, layer(i).q_norm if c.qk_norm else None,
                                  layer(i).k_norm if c.qk_norm else None, eps, cache[k, 0],
                                  cache[k, 1], pos, nh, nkv, bias=layer(i).qkv_bias)

    def attention(i):
        k = i % kv_copies
        return ops.attention(qkv, cache[k, 0], cache[k, 1], meta, nh, nkv, model.scale)

    return [
        ("add+norm+qkv", lambda i: ops.add_rms_norm_linear(x, res, layer(i).input_norm, eps,
                                                           layer(i).qkv),
         size(lw.qkv) + size(lw.qkv_bias), c.num_layers, True),
        ("qk-norm+rope+kv write", rope, 0, c.num_layers, True),  # slot = position: block i
        (f"attention ctx {ctx + 1}", attention, kv_bytes, c.num_layers, True),
        ("o", lambda i: ops.linear(attn, layer(i).o), size(lw.o), c.num_layers, True),
        ("mlp", lambda i: ops.mlp(x, res, layer(i).post_norm, eps, layer(i).gate_up,
                                  layer(i).down), size(lw.gate_up) + size(lw.down), c.num_layers,
         True),
        ("down", lambda i: ops.linear(act, layer(i).down), size(lw.down), c.num_layers, False),
        ("embedding", lambda i: ops.embedding(ids, w.embed), c.hidden_size * x.itemsize, 1, True),
        ("final add+norm", lambda i: ops.add_rms_norm(x, res2, w.norm, eps), 0, 1, True),
        ("lm_head", lambda i: ops.linear(h, w.lm_head), size(w.lm_head), 1, True),
    ]


def time_ops(ops, kc, model, ctx: int, rng, only: tuple | None = None) -> list[OpTime]:
    """OpTime of every layer_ops entry (those named in `only`)."""
    c = model.config
    copy_bytes = -(-(ctx + 1) // BLOCK) * BLOCK * c.kv_size * 2 * 2
    kv_copies = 2 if kc.OPTS["small"] else max(2, -(-3 * kc.L2_BYTES // copy_bytes))
    rows = []
    for name, fn, nbytes, per_step, in_sum in layer_ops(ops, model, ctx, kv_copies, rng):
        if only is not None and name not in only:
            continue
        calls = {1: 8}.get(per_step, c.num_layers)
        if name.startswith(("attention", "qk-norm")):
            calls = max(calls, kv_copies)
        times = []
        for pdl in (True, False):
            it = iter(range(10**9))
            times.append(kc.graph_time(lambda fn=fn, it=it: fn(next(it)), calls, 10, pdl=pdl))
        rows.append(OpTime(name, times[0], times[1], nbytes, per_step,
                           launches(ops, kc, lambda fn=fn: fn(0))[0], in_sum))
        kc.check_device(f"decode1 op {name}")
    return rows


def launches(ops, kc, fn) -> tuple[str, int]:
    """('kernel xn, ...', total) of one eager call; ('?', 0) where counting fails (it is
    informational: it must not cost the section its timings)."""
    try:
        counts = count_all(ops, kc, fn) if ops.name == "cuda" else kc.count_launches(ops, fn)
    except Exception as e:  # noqa: BLE001
        return f"? ({type(e).__name__}: {e})", 0
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())), sum(counts.values())


def count_all(ops, kc, fn):
    """kc.count_launches, plus the launches of the quantized formats' modules (which
    kernel_check's own list leaves out)."""
    import collections

    from engine.executor.ops import cuda_fp8, cuda_kernels, cuda_quant_gguf

    extra: collections.Counter = collections.Counter()
    original = cuda_kernels.kernel

    def counting(file, name, ctype="float"):
        return kc._Counted(original(file, name, ctype), name, extra)

    modules = (cuda_fp8, cuda_quant_gguf)
    for m in modules:
        m.kernel = counting
    try:  # count_launches turns PDL off while fn runs: every launch passes a wrapper
        return kc.count_launches(ops, fn) + extra
    finally:
        for m in modules:
            m.kernel = original


def real_step(ops, kc, model, ctx: int) -> dict:
    """The decode CUDA graph of one sequence at this context: GPU time per replay (back to back),
    the engine's wall time per step (DecodeGraphs.run + sync), the greedy sampler's GPU time,
    the step's launches (one eager forward)."""
    import cupy

    from engine.executor.cuda_graph import DecodeGraphs

    c = model.config
    nb = -(-(ctx + 1) // BLOCK)
    cache = ops.alloc_kv_cache(c.num_layers, nb, c.num_kv_heads, BLOCK, c.head_dim)
    meta, dmeta = decode_meta(ops, c, ctx)
    graphs = DecodeGraphs(model, cache, max_num_seqs=1, max_blocks_per_seq=nb,
                          max_context_len=max(ctx + 1, 32768))
    graphs.capture()
    ids, pos = np.array([7], np.int32), np.array([ctx], np.int32)
    stream = cupy.cuda.get_current_stream()
    walls = []
    for _ in range(3 if kc.OPTS["small"] else 20):
        t0 = time.perf_counter()
        logits = graphs.run(ids, pos, meta)
        stream.synchronize()
        walls.append(time.perf_counter() - t0)
    graph = graphs.pick(np.array([ctx + 1]))[1][0]  # the graph run() replayed
    gpu = kc.replay_time(graph, stream, 1, 5, launches=2 if kc.OPTS["small"] else 10)
    sample = kc.time_greedy_sample(ops, logits)
    forward_ids, forward_pos = cupy.asarray(ids), cupy.asarray(pos)
    names, total = launches(ops, kc, lambda: model.forward(forward_ids, forward_pos, cache,
                                                           dmeta, None))
    return {"gpu": gpu, "wall": statistics.median(walls), "sample": sample,
            "launches": names, "total": total, "logits": cupy.asnumpy(logits)}


def launch_floor(ops, kc, hidden: int) -> tuple[float, float]:
    """(PDL chain, plain) seconds per launch of a trivial kernel (a one-row gather)."""
    x = ops.random_weight((1, hidden), 1.0, np.random.default_rng(0))
    idx = ops.from_host(np.zeros(1, np.int32))
    return tuple(kc.graph_time(lambda: ops.gather_rows(x, idx), 200, 10, pdl=pdl)
                 for pdl in (True, False))


def check_decode1(ops, kc):
    """kc: the kernel_check module (graph_time, count_launches, time_greedy_sample, row,
    check_device, OPTS, L2_BYTES, tables)."""
    small, lines = kc.OPTS["small"], []
    rng = np.random.default_rng(12)
    on_gpu = ops.name == "cuda"
    if on_gpu:
        chain, plain = launch_floor(ops, kc, 1024)
        lines.append(f"trivial kernel (one-row gather) per launch: PDL chain {chain * 1e6:.2f} us, "
                     f"plain {plain * 1e6:.2f} us")
        print("decode1", lines[-1], flush=True)
    summary = []
    for preset, quant, ctxs in variants(kc.OPTS.get("decode1")):
        config, model = build(ops, preset, quant, small, max(ctxs))
        for ctx in ctxs:
            title = f"{preset} {quant or ops.dtype} B=1 ctx={ctx}"
            rows = time_ops(ops, kc, model, ctx, rng)
            real = real_step(ops, kc, model, ctx) if on_gpu else None
            lines += report(kc, title, rows, real, chain if on_gpu else None)
            line = f"{title}: implied {implied_step(rows) * 1e6:.1f} us"
            if real is not None:
                line += (f", real step {real['gpu'] * 1e6:.1f} us GPU "
                         f"({real['wall'] * 1e6:.1f} wall)")
            for label, variant in STEP_VARIANTS.items() if on_gpu else ():
                if quant is None or not variant[3]:
                    more, ratio = compare(ops, kc, model, ctx, rng, f"{label}, {title}", variant,
                                          rows, real)
                    lines += more
                    line += f"; {label} x{ratio}"
            summary.append(line)
            print(f"decode1 summary: {line}", flush=True)
            save(lines + ["", "### decode1 summary"] + summary)
        del model
        if on_gpu:
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()
    # the tables above are long; the summary is what a short log tail keeps
    print("\n### decode1 summary (tables above and in ${OUT:-/tmp}/b1.txt)\n" + "\n".join(summary),
          flush=True)
    return lines


def save(lines: list[str]) -> None:
    """Everything so far into ${OUT:-/tmp}/b1.txt (a device run brings $OUT back)."""
    Path(os.environ.get("OUT", "/tmp"), "b1.txt").write_text("\n".join(lines) + "\n")


def report(kc, title: str, rows: list[OpTime], real: dict | None, per_launch) -> list[str]:
    real_sec = None if real is None else real["gpu"]
    lines = table(title, rows, real_sec)
    if real is not None:
        implied, total = implied_step(rows), real["total"]
        lines.append(f"real step: graph {real['gpu'] * 1e6:.1f} us GPU (replays back to back), "
                     f"{real['wall'] * 1e6:.1f} us wall as DecodeGraphs.run + sync, greedy "
                     f"sampler {real['sample'] * 1e6:.1f} us; implied {implied * 1e6:.1f} us, "
                     f"real - implied {(real['gpu'] - implied) * 1e6:+.1f} us; {total} launches "
                     f"x {per_launch * 1e6:.2f} us trivial-kernel chain = "
                     f"{total * per_launch * 1e6:.0f} us; launches: {real['launches']}")
        kc.row("decode1", f"{title} real step graph", f"{total} launches", real["gpu"],
               sum(r.nbytes * r.per_step for r in rows if r.in_sum),
               extra=f"implied by the ops alone {implied * 1e6:.1f} us; wall "
                     f"{real['wall'] * 1e6:.1f} us; sampler {real['sample'] * 1e6:.1f} us")
    print("\n".join(lines), flush=True)
    return lines


class _Settings:
    """A module's attributes set for a with-block, restored after."""

    def __init__(self, module, settings: dict):
        self.module, self.settings, self.saved = module, settings, {}

    def __enter__(self):
        self.saved = {k: getattr(self.module, k) for k in self.settings}
        for k, v in self.settings.items():
            setattr(self.module, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(self.module, k, v)


def compare(ops, kc, model, ctx, rng, title, variant, rows, real) -> tuple[list[str], str]:
    """The real step (and the ops named) again with a STEP_VARIANTS entry: new against default;
    (lines, 'new / default step time (logits same or not)')."""
    module, settings, retime, _ = variant
    with _Settings(importlib.import_module(f"engine.executor.ops.{module}"), settings):
        new_rows = time_ops(ops, kc, model, ctx, rng, only=retime) if retime else []
        new_real = real_step(ops, kc, model, ctx)
    old = {r.name: r for r in rows}
    lines = [f"#### {title}: {module} {settings} against the default",
             "| op | default us (PDL) | new us (PDL) | default plain | new plain | "
             "new / default |", "|---|---|---|---|---|---|"]
    for r in new_rows:
        o = old[r.name]
        lines.append(f"| {r.name} | {o.sec * 1e6:.2f} | {r.sec * 1e6:.2f} | "
                     f"{o.plain_sec * 1e6:.2f} | {r.plain_sec * 1e6:.2f} | {r.sec / o.sec:.3f} |")
    same = ("bit-identical logits" if np.array_equal(real["logits"], new_real["logits"])
            else f"logits differ: max |diff| {_max_diff(real['logits'], new_real['logits']):.3g}")
    ratio = f"{new_real['gpu'] / real['gpu']:.3f} ({same})"
    lines.append(f"| real step graph ({same}) | {real['gpu'] * 1e6:.1f} | "
                 f"{new_real['gpu'] * 1e6:.1f} | wall {real['wall'] * 1e6:.1f} | "
                 f"wall {new_real['wall'] * 1e6:.1f} | {new_real['gpu'] / real['gpu']:.3f} |")
    print("\n".join(lines), flush=True)
    return lines, ratio


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference of two logit rows as stored (bf16 as uint16 bits: compared as floats)."""
    def f32(x):
        return (x.astype(np.uint32) << 16).view(np.float32) if x.dtype == np.uint16 else x
    return float(np.max(np.abs(f32(a).astype(np.float64) - f32(b))))
