"""One run on the GPU machine: check every cuda op against numpy at real shapes, time each, and time
whole decode steps (Qwen3-0.6B shapes, dummy weights). Prints a table last.

    PYTHONPATH=. python tools/gpu_check.py [--graphs] [--only attn] [--variants]
        [--baseline old_attention.cu]

--only SUBSTR runs the sections whose name holds SUBSTR (layers, attn, sampling, decode-step);
--only new runs tools/kernel_check.py instead (issue 12's kernels, CUDA-graph timed);
--variants also times the v1 decode kernel (attention.cu) at other unroll depths; --baseline
times a previous attention.cu (its paged_attention_kernel / attention_reduce_kernel) on the
same decode and prefill cases.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.executor.ops import AttentionMetadata, SamplingTensors  # noqa: E402
from engine.executor.transformer import Transformer, rope_cos_sin  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402
from tools import kernel_check  # noqa: E402
from tools.kernel_check import BW, FLOPS, REF, rel, up  # noqa: E402
from tools.workloads import existing_file_arg, require_gpu  # noqa: E402

try:  # without CuPy main() still parses its command line, then says what is missing
    import cupy

    from engine.executor.ops.cuda_ops import CudaOps
except ImportError as e:
    GPU_IMPORT_ERROR: ImportError | None = e  # raised once check_cuda has found CuPy and a GPU
else:
    GPU_IMPORT_ERROR = kernel_check.GPU_IMPORT_ERROR

SECTIONS = ("layers", "attn", "sampling", "decode-step")  # what --only picks from
rows: list[tuple] = []


def bench(fn, reps: int = 20) -> float:
    """Median seconds per call over `reps` timings of 10 back-to-back calls (events)."""
    fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(10):
            fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3 / 10)
    return statistics.median(times)


def record(name, err, sec, nbytes=0, flops=0):
    bw = nbytes / sec / 1e9 if nbytes else 0
    tf = flops / sec / 1e12 if flops else 0
    frac = max(nbytes / sec / BW, flops / sec / FLOPS)
    rows.append((name, err, sec * 1e6, bw, tf, frac))
    print(f"{name:44s} err {err:9.2e}  {sec * 1e6:9.1f} us  {bw:7.0f} GB/s  {tf:6.1f} TF/s  "
          f"{frac * 100:5.1f}%", flush=True)


def check_layers(ops):
    rng = np.random.default_rng(0)
    t, hid, nh, nkv, hd, inter = 4096, 1024, 16, 8, 128, 3072
    x, xh = up(ops, rng.standard_normal((t, hid)))
    w, wh = up(ops, rng.standard_normal(hid))
    out = ops.rms_norm(x, w, 1e-6)
    record("rms_norm (4096x1024)", rel(ops.to_host(out), REF.rms_norm(xh, wh, 1e-6)),
           bench(lambda: ops.rms_norm(x, w, 1e-6)), 2 * x.nbytes)
    res = x.copy()
    record("add_rms_norm (4096x1024)", 0.0, bench(lambda: ops.add_rms_norm(x, res, w, 1e-6)),
           4 * x.nbytes)
    for tokens in (1, 64, 4096):
        a, ah = up(ops, rng.standard_normal((tokens, hid)))
        wq, wqh = up(ops, rng.standard_normal(((nh + 2 * nkv) * hd, hid)) * 0.03)
        err = rel(ops.to_host(ops.linear(a, wq)), ah @ wqh.T)
        sec = bench(lambda a=a, wq=wq: ops.linear(a, wq))
        record(f"linear qkv T={tokens} (4096x1024)", err, sec, wq.nbytes + a.nbytes,
               2 * tokens * wq.size)
    wl, _ = up(ops, rng.standard_normal((151936, hid)) * 0.03)
    a, _ = up(ops, rng.standard_normal((64, hid)))
    record("linear lm_head T=64 (151936x1024)", 0.0, bench(lambda: ops.linear(a, wl)), wl.nbytes,
           2 * 64 * wl.size)
    qkv, qkvh = up(ops, rng.standard_normal((t, (nh + 2 * nkv) * hd)))
    qn, qnh = up(ops, rng.standard_normal(hd))
    got = qkv.copy()
    ops.qk_norm(got, qn, qn, 1e-6, nh, nkv)
    want = qkvh.copy()
    REF.qk_norm(want, qnh, qnh, 1e-6, nh, nkv)
    record("qk_norm (4096 tok)", rel(ops.to_host(got), want),
           bench(lambda: ops.qk_norm(got, qn, qn, 1e-6, nh, nkv)), 2 * qkv.nbytes * 2 // 3)
    cfg = ModelConfig("Qwen3ForCausalLM", 10, hid, inter, 1, nh, nkv, hd, rope_theta=1e6)
    cs_h = rope_cos_sin(cfg, 8192)
    cs = ops.from_host(cs_h)
    pos = rng.integers(0, 8192, t).astype(np.int32)
    got = qkv.copy()
    ops.rope(got, pos, cs, nh, nkv)
    want = qkvh.copy()
    REF.rope(want, pos, cs_h, nh, nkv)
    pos_d = cupy.asarray(pos)
    record("rope (4096 tok)", rel(ops.to_host(got), want),
           bench(lambda: ops.rope(got, pos_d, cs, nh, nkv)), 2 * qkv.nbytes * 2 // 3)
    gu, guh = up(ops, rng.standard_normal((t, 2 * inter)))
    record("silu_and_mul (4096x3072)", rel(ops.to_host(ops.silu_and_mul(gu)),
                                          REF.silu_and_mul(guh)),
           bench(lambda: ops.silu_and_mul(gu)), gu.nbytes * 3 // 2)


def attention_case(ops, name, num_new, ctx, nh=16, nkv=8, hd=128, bs=16):
    rng = np.random.default_rng(1)
    num_blocks = sum(-(-c // bs) for c in ctx)
    tables = np.full((len(ctx), max(-(-c // bs) for c in ctx)), -1, np.int32)
    slots, used = [], 0
    for s, (n, c) in enumerate(zip(num_new, ctx, strict=True)):
        k = -(-c // bs)
        tables[s, :k] = np.arange(used, used + k)
        used += k
        p = np.arange(c - n, c)
        slots.append(tables[s, p // bs] * bs + p % bs)
    meta = AttentionMetadata(np.concatenate(slots).astype(np.int32),
                             np.concatenate([[0], np.cumsum(num_new)]).astype(np.int32),
                             np.array(ctx, np.int32), tables, max(num_new), max(ctx))
    cache, cache_h = up(ops, rng.standard_normal((2, num_blocks, nkv, bs, hd)))
    qkv, qkvh = up(ops, rng.standard_normal((sum(num_new), (nh + 2 * nkv) * hd)))
    dmeta = ops.prepare_metadata(meta)
    ops.write_kv_cache(qkv, cache[0], cache[1], dmeta.slot_mapping, nh, nkv)
    kh, vh = cache_h[0].copy(), cache_h[1].copy()
    REF.write_kv_cache(qkvh, kh, vh, meta.slot_mapping, nh, nkv)
    got = ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5)
    err = rel(ops.to_host(got), REF.attention(qkvh, kh, vh, meta, nh, nkv, hd**-0.5))
    sec = bench(lambda: ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5))
    kv_bytes = sum(ctx) * nkv * hd * 2 * 2
    flops = sum(4 * n * c * hd * nh for n, c in zip(num_new, ctx, strict=True))
    record(name, err, sec, kv_bytes, flops)
    if name.startswith("attn decode B=64"):
        record("write_kv_cache (64 tok)", 0.0,
               bench(lambda: ops.write_kv_cache(qkv, cache[0], cache[1], dmeta.slot_mapping, nh,
                                                nkv)), 64 * 2 * nkv * hd * 2 * 2)


def attention_cases(ops):
    attention_case(ops, "attn decode B=64 ctx=1024 (GQA 2)", [1] * 64, [1024] * 64)
    attention_case(ops, "attn decode B=256 ctx=1024 (GQA 2)", [1] * 256, [1024] * 256)
    ctx = np.random.default_rng(5).integers(100, 2049, 256).tolist()
    attention_case(ops, "attn decode B=256 ctx 100..2048 (W1)", [1] * 256, ctx)
    attention_case(ops, "attn decode B=1 ctx=4096 (split)", [1], [4096])
    attention_case(ops, "attn decode B=16 ctx=4096 (split)", [1] * 16, [4096] * 16)
    attention_case(ops, "attn prefill 1x2048 (tensor cores)", [2048], [2048])
    attention_case(ops, "attn prefill 4x512 on 1024 prefix", [512] * 4, [1536] * 4)
    attention_case(ops, "attn mixed: 512 chunk+1024 prefix, 32 dec",
                   [512] + [1] * 32, [1536] + [700] * 32)


def attention_variants(ops):
    """The v1 decode kernel (attention.cu; the mma kernel has no unroll) at other unroll depths
    (recompiles attention.cu for each)."""
    from engine.executor.ops import cuda_attention, cuda_kernels

    default, kernel = cuda_attention.DECODE_UNROLL, cuda_attention.DECODE_KERNEL
    cuda_attention.DECODE_KERNEL = "v1"
    try:
        for u in sorted({2, 4, 8} - {default}) + [default]:  # ends on the default, recompiled
            # attention.cu's compiled names follow cuda_kernels', its launch cuda_attention's
            cuda_attention.DECODE_UNROLL = cuda_kernels.DECODE_UNROLL = u
            cuda_kernels._module.cache_clear()
            cuda_kernels.kernel.cache_clear()
            if u != default:
                for b in (64, 256):
                    attention_case(ops, f"attn decode v1 B={b} ctx=1024 U={u}", [1] * b,
                                   [1024] * b)
    finally:
        cuda_attention.DECODE_KERNEL = kernel
        if cuda_attention.DECODE_UNROLL != default:  # stopped early: back to the default
            cuda_attention.DECODE_UNROLL = cuda_kernels.DECODE_UNROLL = default
            cuda_kernels._module.cache_clear()
            cuda_kernels.kernel.cache_clear()


def attention_baseline(ops, path):
    """The previous kernel (work items of 16 // group tokens, fp32 smem tiles), same cases."""
    from engine.executor.ops.cuda_kernels import cuda_dir

    src = open(path).read()
    names = [f"{k}<{ops.ctype}, 128>"
             for k in ("paged_attention_kernel", "attention_reduce_kernel")]
    mod = cupy.RawModule(code=src, options=("-std=c++17", f"-I{cuda_dir()}"),
                         name_expressions=names)
    mod.compile()
    attn, red = (mod.get_function(n) for n in names)

    def old(qkv, k, v, meta, nh, nkv, scale):
        group, i32 = nh // nkv, np.int32
        tile = 16 // group
        num_new = np.diff(meta.host.query_start_loc)
        tiles = -(-num_new // tile)
        seq = np.repeat(np.arange(len(num_new)), tiles)
        first = np.repeat(np.cumsum(tiles) - tiles, tiles)
        start = (np.arange(len(seq)) - first) * tile
        items = np.stack([seq, start, np.minimum(tile, num_new[seq] - start)], 1)
        work = cupy.asarray(items.astype(np.int32))
        blocks = len(items) * nkv
        splits = 1 if blocks >= 264 else int(max(1, min(32, -(-264 // blocks),
                                                         meta.max_context_len // 256)))
        t = len(qkv)
        out = cupy.empty((t, nh * 128), qkv.dtype)
        po = cupy.empty((splits, t, nh, 128), cupy.float32) if splits > 1 else np.uint64(0)
        pm = cupy.empty((splits, t, nh, 2), cupy.float32) if splits > 1 else np.uint64(0)
        tb = meta.block_tables
        attn((len(items), nkv, splits), (128,),
             (out, po, pm, qkv, k, v, work, meta.query_start_loc, meta.context_lens, tb,
              i32(tb.shape[1]), i32(t), i32(nh), i32(nkv), i32(k.shape[2]), np.float32(scale),
              i32(splits)))
        if splits > 1:
            red((t, nh), (128,), (out, po, pm, i32(t), i32(nh), i32(splits)))
        return out

    real = ops.attention
    ops.attention = old
    try:
        for b in (64, 256):
            attention_case(ops, f"BASELINE attn decode B={b} ctx=1024", [1] * b, [1024] * b)
        attention_case(ops, "BASELINE attn decode B=1 ctx=4096", [1], [4096])
        attention_case(ops, "BASELINE attn prefill 1x2048", [2048], [2048])
    finally:
        ops.attention = real


def check_sampling(ops):
    rng = np.random.default_rng(2)
    r, v = 64, 151936
    logits = (rng.standard_normal((r, v)) * 3).astype(np.float32)
    t = SamplingTensors(np.zeros(r, np.float32), np.zeros(r, np.int32), np.ones(r, np.float32),
                        np.zeros(r, np.float32), rng.integers(0, 2**63, r).astype(np.uint64),
                        np.zeros(r, np.uint32), np.zeros(r, np.float32), np.zeros(r, np.float32),
                        np.ones(r, np.float32))
    d = cupy.asarray(logits)
    want, got = REF.sample(logits, t), ops.sample(d, t)
    record("sample greedy (64x151936)", float(np.mean(want.token_ids != got.token_ids)),
           bench(lambda: ops.sample(d, t), 5), d.nbytes)
    t.temperature[:] = 0.8
    t.top_p[:] = 0.9
    t.top_k[:] = 50
    want, got = REF.sample(logits, t), ops.sample(d, t)
    record("sample top-k/top-p (64x151936)", float(np.mean(want.token_ids != got.token_ids)),
           bench(lambda: ops.sample(d, t), 5), d.nbytes)


def decode_step(ops, batch, ctx=512, graphs=False):
    config = ModelConfig.from_preset("qwen3-0.6b")
    weights = dummy_weights(config, ops, seed=0)
    model = Transformer(config, weights, ops, 4096)
    bs = 16
    nb = batch * -(-(ctx + 1) // bs)
    cache = ops.alloc_kv_cache(config.num_layers, nb, config.num_kv_heads, bs, config.head_dim)
    tables = np.arange(nb, dtype=np.int32).reshape(batch, -1)
    pos = np.full(batch, ctx, np.int32)
    meta = AttentionMetadata((tables[:, ctx // bs] * bs + ctx % bs).astype(np.int32),
                             np.arange(batch + 1, dtype=np.int32),
                             np.full(batch, ctx + 1, np.int32), tables, 1, ctx + 1)
    ids = np.random.default_rng(3).integers(0, config.vocab_size, batch).astype(np.int32)
    t = SamplingTensors(np.zeros(batch, np.float32), np.zeros(batch, np.int32),
                        np.ones(batch, np.float32), np.zeros(batch, np.float32),
                        np.zeros(batch, np.uint64), np.zeros(batch, np.uint32),
                        np.zeros(batch, np.float32), np.zeros(batch, np.float32),
                        np.ones(batch, np.float32))
    last = np.arange(batch, dtype=np.int32)

    def step():
        m = ops.prepare_metadata(meta)
        logits = model.forward(ids, pos, cache, m, last)
        return ops.sample(logits, t)

    step()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    weight_bytes = config.num_linear_params() * 2
    kv = batch * (ctx + 1) * config.num_layers * config.num_kv_heads * config.head_dim * 4
    flops = 2 * batch * config.num_linear_params()
    record(f"decode step B={batch} ctx={ctx} eager (wall)", 0.0, sec, weight_bytes + kv, flops)
    if not graphs:
        return
    from engine.executor.cuda_graph import DecodeGraphs

    g = DecodeGraphs(model, cache, max_num_seqs=batch, max_blocks_per_seq=tables.shape[1],
                     max_context_len=ctx + 1)
    g.capture()
    eager = ops.to_host(model.forward(ids, pos, cache, ops.prepare_metadata(meta), last))
    err = rel(ops.to_host(g.run(ids, pos, meta)), eager)

    def graph_step():
        return ops.sample(g.run(ids, pos, meta), t)

    graph_step()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        graph_step()
        times.append(time.perf_counter() - t0)
    record(f"decode step B={batch} ctx={ctx} CUDA graph (wall)", err, statistics.median(times),
           weight_bytes + kv, flops)


def only_arg(text: str) -> str:
    """argparse type of --only: `new`, or a part of one or more of the SECTIONS' names."""
    if text != "new" and not any(text in name for name in SECTIONS):
        raise argparse.ArgumentTypeError(
            f"{text!r} is in no section's name; the sections: {', '.join(SECTIONS)}; or new")
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=only_arg, default=None, metavar="SUBSTR",
                    help=f"run the sections whose name holds SUBSTR, of: {', '.join(SECTIONS)}; "
                         "new: tools/kernel_check.py's sections instead (default: all of these)")
    ap.add_argument("--graphs", action="store_true",
                    help="decode-step: also time each step replayed as a CUDA graph")
    ap.add_argument("--variants", action="store_true",
                    help="attn: also time the v1 decode kernel (attention.cu) at other unroll "
                         "depths")
    ap.add_argument("--baseline", type=existing_file_arg, default=None, metavar="ATTENTION_CU",
                    help="attn: also time this previous attention.cu (its paged_attention_kernel "
                         "/ attention_reduce_kernel) on the same cases")
    ap.add_argument("--quick", action="store_true",
                    help="with --only new: kernel_check.py's --quick")
    args = ap.parse_args(argv)
    require_gpu("gpu_check")
    if GPU_IMPORT_ERROR is not None:
        raise GPU_IMPORT_ERROR
    ops = CudaOps("bfloat16")
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}", flush=True)
    only = args.only

    def want(section: str) -> bool:
        return only is None or only in section

    if want("layers"):
        check_layers(ops)
    if want("attn"):
        if args.baseline:
            attention_baseline(ops, args.baseline)
        attention_cases(ops)
        if args.variants:
            attention_variants(ops)
    if want("sampling"):
        check_sampling(ops)
    if only == "new":  # issue 12's kernels: tools/kernel_check.py prints its own tables
        from tools.kernel_check import run_all

        run_all(ops, quick=args.quick)
        return
    if want("decode-step"):
        for batch in (1, 64):
            decode_step(ops, batch, graphs=args.graphs)
    print("\n| op | err vs numpy | us | GB/s | TFLOP/s | % of ceiling |")
    print("|---|---|---|---|---|---|")
    for name, err, us, bw, tf, frac in rows:
        print(f"| {name} | {err:.2e} | {us:.1f} | {bw:.0f} | {tf:.1f} | {frac * 100:.1f} |")


if __name__ == "__main__":
    main()
