"""kernel_check.py's `dattn` section (--only dattn): decode attention with its split reduce fused
into the last split block (cuda_attention.FUSED_REDUCE, PAGEDSERVE_DECODE_FUSED_REDUCE=1) against
the reduce launch ("old"), all on the bf16 mma kernel:
- attention alone, CUDA-graph timed as a PDL chain (as the decode graphs launch it), each call on
  its own K/V copy (cold, as layers are), on the grid the decode graphs capture for a 32k
  max_model_len: batch 1 at 512 / 4096 / 32,532 tokens and W1-like batches (B = 64 and 256,
  contexts 600..1000), Qwen3-0.6B heads (16 q / 8 kv, hd 128);
- one sequence of 32,532 tokens, Qwen3-0.6B and Llama-3-8B heads (32 / 8): every
  DECODE_MMA_CONFIGS entry x grid splits SPLITS, old and fused (MIN_KEYS_PER_SPLIT does not bind
  there: 32,532 / 64 > 264), so the constants can be chosen from one run;
- the real Qwen3-0.6B batch-1 step graph (kernel_check_decode1.real_step) at 512 and 32,532
  tokens, old and fused, logits compared bit for bit.
Each row: us per call, TB/s of K/V read, % of the 4.8 TB/s spec; fused rows add old / fused and
whether the outputs are bit-identical (merge_splits repeats the reduce kernel's float order).
Besides kernel_check's table, one short line per case (old | fused) goes to stdout and to
${OUT:-/tmp}/dattn.txt as it comes, and the sweep ends as a matrix (us old / fused per splits).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.executor.ops import cuda_attention as ca
from engine.executor.ops.cuda_kernels import DECODE_MMA_CONFIGS
from tools.kernel_check_attn import HEADS
from tools.kernel_check_decode1 import PEAK_BW, build, real_step

SPLITS = (32, 48, 64, 96, 132, 264)
LONG = 32532
LINES: list[str] = []  # the short lines so far


def say(line: str) -> None:
    LINES.append(line)
    print(f"dattn: {line}", flush=True)
    Path(os.environ.get("OUT", "/tmp"), "dattn.txt").write_text("\n".join(LINES) + "\n")


def check_dattn(ops, kc):
    """kc: the kernel_check module (row, graph_time, rel, REF, OPTS, L2_BYTES)."""
    small = kc.OPTS["small"]
    rng = np.random.default_rng(5)
    w1 = {b: rng.integers(600, 1001, b).tolist() for b in (64, 256)}
    cases = [("B=1 ctx 512", [512]), ("B=1 ctx 4096", [4096]), (f"B=1 ctx {LONG}", [LONG]),
             ("B=64 ctx 600..1000", w1[64]), ("B=256 ctx 600..1000", w1[256])]
    if small:
        cases = [("B=1 ctx 4096", [4096]), ("B=8 ctx 600..1000", w1[64][:8])]
    for label, ctx in cases:
        compare(ops, kc, rng, "qwen3-0.6b", label, ctx)
    sweep = {}  # (preset, config) -> {splits: (old, fused) seconds}
    splits_list = SPLITS[:2] if small else SPLITS
    for preset in ("qwen3-0.6b",) if small else ("qwen3-0.6b", "llama3-8b"):
        for config in DECODE_MMA_CONFIGS[:1] if small else DECODE_MMA_CONFIGS:
            for splits in splits_list:
                sweep.setdefault((preset, config), {})[splits] = compare(
                    ops, kc, rng, preset, f"1 x {LONG} sweep", [LONG], config, splits)
    say(f"sweep, 1 x {LONG}: us old / fused (TB/s fused) by grid splits " + " | ".join(
        str(s) for s in splits_list))
    for (preset, config), row in sweep.items():
        nkv, hd = HEADS[preset][1:]
        tb = LONG * nkv * hd * 4 / 1e12
        say(f"{preset} NW={config[0]} ST={config[1]}: " + " | ".join(
            f"{o * 1e6:.1f} / {f * 1e6:.1f} ({tb / f:.2f})" for o, f in row.values()))
    steps(ops, kc)


def compare(ops, kc, rng, preset, label, ctx, config=None, splits=None):
    """One row per path (old, fused) of one batch; config (warps, stages) and grid splits
    default to the engine's. Returns (old, fused) seconds per call."""
    nh, nkv, hd = HEADS[preset]
    meta = batch_meta(ctx)
    kv_bytes = sum(ctx) * nkv * hd * 2 * 2
    copies = 2 if kc.OPTS["small"] else max(2, -(-3 * kc.L2_BYTES // kv_bytes))
    # (copies, 2, blocks, nkv, 16, hd): call i reads copy i % copies, cold when they exceed L2
    cache = ops.random_weight((copies, 2, int(meta.block_tables.max()) + 1, nkv, 16, hd), 1.0,
                              rng)
    qkv = ops.random_weight((len(ctx), (nh + 2 * nkv) * hd), 1.0, rng)
    want = None
    if sum(ctx) <= 40000 and splits is None:
        want = kc.REF.attention(ops.to_host(qkv), ops.to_host(cache[0, 0]),
                                ops.to_host(cache[0, 1]), meta, nh, nkv, hd**-0.5)
    saved = ca.FUSED_REDUCE, ca.DECODE_KERNEL, ca.DECODE_MMA_CONFIG
    results = {}
    try:
        ca.DECODE_KERNEL, ca.DECODE_MMA_CONFIG = "mma", config or ca.DECODE_MMA_CONFIG
        for fused in (False, True):
            ca.FUSED_REDUCE = fused
            dmeta = ops.prepare_metadata(meta)
            dmeta.num_splits = splits or ca.decode_plan(len(ctx), nkv, nh // nkv,
                                                        32768).num_splits
            it = iter(range(10**9))

            def attn(dmeta=dmeta, it=it):
                c = cache[next(it) % copies]
                return ops.attention(qkv, c[0], c[1], dmeta, nh, nkv, hd**-0.5)

            got = ops.to_host(attn())
            sec = kc.graph_time(attn, max(20, copies), 10, pdl=True)
            results[fused] = sec, got
            name = (f"{preset} {label} {'fused' if fused else 'old'}"
                    f" NW={ca.DECODE_MMA_CONFIG[0]} ST={ca.DECODE_MMA_CONFIG[1]}"
                    f" splits {dmeta.num_splits}")
            err = "-" if want is None else f"{kc.rel(got, want):.1e}"
            extra = (f"{kv_bytes / sec / 1e12:.2f} TB/s; {kv_bytes / sec / PEAK_BW * 100:.0f}% "
                     "of 4.8 TB/s")
            if fused:
                old_sec, old = results[False]
                same = ("bit-identical" if np.array_equal(got, old)
                        else f"max |diff| {np.max(np.abs(got - old)):.3g}")
                extra += f"; old / fused {old_sec / sec:.3f}; {same} to old"
            kc.row("dattn", name, err, sec, kv_bytes, extra=extra)
        (old_sec, old), (sec, got) = results[False], results[True]
        say(f"{preset} {label} NW={ca.DECODE_MMA_CONFIG[0]} ST={ca.DECODE_MMA_CONFIG[1]} "
            f"splits {dmeta.num_splits}: old {old_sec * 1e6:.2f} us "
            f"{kv_bytes / old_sec / PEAK_BW * 100:.0f}% | fused {sec * 1e6:.2f} us "
            f"{kv_bytes / sec / 1e12:.2f} TB/s {kv_bytes / sec / PEAK_BW * 100:.0f}% of 4.8; "
            f"x{old_sec / sec:.3f}; {'same bits' if np.array_equal(got, old) else 'DIFFER'}"
            + (f"; err {err}" if want is not None else ""))
        return old_sec, sec
    finally:
        ca.FUSED_REDUCE, ca.DECODE_KERNEL, ca.DECODE_MMA_CONFIG = saved


def batch_meta(ctx: list[int]):
    """Decode metadata for these contexts, each sequence on its own consecutive cache blocks."""
    from engine.executor.ops import AttentionMetadata

    nb = [-(-c // 16) for c in ctx]
    tables = np.zeros((len(ctx), max(nb)), np.int32)
    start = np.concatenate([[0], np.cumsum(nb)])
    for s, k in enumerate(nb):
        tables[s, :k] = np.arange(start[s], start[s] + k)
    return AttentionMetadata(np.full(len(ctx), -1, np.int32),
                             np.arange(len(ctx) + 1, dtype=np.int32), np.array(ctx, np.int32),
                             tables, 1, max(ctx))


def steps(ops, kc):
    """The real Qwen3-0.6B batch-1 step graph, old then fused, at each context."""
    contexts = (512,) if kc.OPTS["small"] else (512, LONG)
    _, model = build(ops, "qwen3-0.6b", None, kc.OPTS["small"], max(contexts))
    saved = ca.FUSED_REDUCE
    try:
        for ctx in contexts:
            real = {}
            for fused in (False, True):
                ca.FUSED_REDUCE = fused
                real[fused] = r = real_step(ops, kc, model, ctx)
                same = ""
                if fused:
                    same = ("; logits bit-identical to old" if np.array_equal(
                        r["logits"], real[False]["logits"]) else "; logits DIFFER from old")
                    same += f"; old / fused {real[False]['gpu'] / r['gpu']:.3f}"
                line = (f"qwen3-0.6b B=1 ctx {ctx} real step graph {'fused' if fused else 'old'}"
                        f": {r['gpu'] * 1e3:.4f} ms/token GPU, {r['wall'] * 1e3:.3f} wall, "
                        f"{r['total']} launches" + same)
                kc.row("dattn", line, "-", r["gpu"])
                say(line)
    finally:
        ca.FUSED_REDUCE = saved
