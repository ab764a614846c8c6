"""kernel_check.py's `attn` section (--only attn): the paged decode attention kernels side by side,
attention.cu's scalar one (v1) and attention_decode_mma.cu's tensor-core one (mma, each (warps,
cp.async stages) variant), timed by CUDA-graph replay on the grid the engine's decode graphs launch
(splits sized for a 32k max_model_len), with the K/V bytes the step must read, their rate and its %
of the H200's 4.27 TB/s:
- W1's decode mix at batch 256 (contexts 100..1100), Llama-3-8B heads (32 q / 8 kv, hd 128) and
  Qwen3-0.6B heads (16 / 8, hd 128); for Llama-3-8B heads also the same bytes with every context
  600 (no tail of long sequences) and 256 x 2,400 (4x the keys a block streams: its fixed costs
  amortized), which tell where the mix's rate goes; and the mix in 64-token cache blocks (session
  15: the same 3.85 TB/s as 16-token blocks);
- one sequence of 16,384 and of 32,532 tokens, with split-count sweeps for mma;
- a whole batch-1 decode step of Qwen3-0.6B shapes at a 32,532-token context: v1, then mma.
Errors: against the numpy twin where the cache is small enough to copy back, else against v1.
"""

from __future__ import annotations

import numpy as np

from engine.executor.ops import cuda_attention as ca
from engine.executor.ops.cuda_kernels import DECODE_MMA_CONFIGS

HEADS = {"llama3-8b": (32, 8, 128), "qwen3-0.6b": (16, 8, 128)}  # (nh, nkv, hd)
# grid splits for one long sequence besides the default MAX_SPLITS, and (warps, stages) there
SWEEP = (((4, 2), 40), ((4, 2), 56), ((4, 2), 96), ((4, 2), 128), ((4, 3), 32))
BATCH_SPLITS = (2, 4)  # grid splits tried on the batch-256 mixes (the engine's grid has 1)


def check_attn(ops, kc):
    """kc: the kernel_check module (its row, graph_time, rel, up, REF, OPTS, decode_step)."""
    rng = np.random.default_rng(3)
    w1 = rng.integers(100, 1101, 256).tolist()  # W1's decode steps: 256 x 100..1100
    cases = [("llama3-8b", "W1 B=256", w1), ("llama3-8b", "B=256 x 600 (no tail)", [600] * 256),
             ("llama3-8b", "B=256 x 2400", [2400] * 256),
             ("llama3-8b", "W1 B=256 block 64", w1, 64), ("qwen3-0.6b", "W1 B=256", w1),
             ("qwen3-0.6b", "1 x 16384", [16384]), ("qwen3-0.6b", "1 x 32532", [32532]),
             ("llama3-8b", "1 x 32532", [32532])]
    if kc.OPTS["small"]:
        cases = [("qwen3-0.6b", "B=8 x 300", [300] * 8), ("llama3-8b", "1 x 4096", [4096])]
    for preset, label, ctx, *bs in cases:
        check_case(ops, kc, rng, preset, label, ctx, *bs)
    saved = ca.DECODE_KERNEL
    try:
        for kernel in ("v1", "mma"):
            ca.DECODE_KERNEL = kernel
            kc.decode_step(ops, "qwen3-0.6b", 32532, gemv_on=False, tag=f", attn {kernel}")
    finally:
        ca.DECODE_KERNEL = saved


def check_case(ops, kc, rng, preset, label, ctx, block_size=16):
    """One batch of decode rows with contexts `ctx` in a cache of `block_size`-token blocks
    (the engine's --block-size; 16 by default): a K or V block of one kv head is block_size x
    head_dim contiguous values, so larger blocks make longer contiguous reads."""
    nh, nkv, hd = HEADS[preset]
    meta, cache = kc._decode_batch(ops, ctx, nkv, hd, block_size)
    qkv, qkv_h = kc.up(ops, rng.standard_normal((len(ctx), (nh + 2 * nkv) * hd)))
    scale = hd**-0.5
    want = None
    if sum(ctx) <= 40000:
        want = kc.REF.attention(qkv_h, ops.to_host(cache[0]), ops.to_host(cache[1]), meta, nh,
                                nkv, scale)
    kv_bytes = sum(ctx) * nkv * hd * 2 * 2
    # (kernel, (warps, stages), grid splits or None: the default)
    # v1 at its own former default of 128 splits, the baseline of the "x v1" column
    variants = [("v1", None, 128)] + [("mma", c, None) for c in DECODE_MMA_CONFIGS]
    if len(ctx) == 1 and not kc.OPTS["small"]:
        variants += [("mma", c, s) for c, s in SWEEP]
    if len(ctx) >= 256 and not kc.OPTS["small"]:
        # a batch that fills the GPU runs one split a sequence; 2 and 4 splits halve and quarter
        # each block's keys (shorter tail of long sequences, a reduce launch more)
        variants += [("mma", DECODE_MMA_CONFIGS[0], s) for s in BATCH_SPLITS]
    base_sec = base_out = None
    for kernel, config, max_splits in variants:
        sec, got, splits = time_kernel(ops, kc, meta, cache, qkv, nh, nkv, scale, kernel, config,
                                       max_splits)
        if want is not None:
            err = f"{kc.rel(got, want):.1e}"
        else:
            err = "v1" if base_out is None else f"vs v1 {kc.rel(got, base_out):.1e}"
        if base_sec is None:
            base_sec, base_out = sec, got
        name = f"{preset} {label} {kernel}" + (f" NW={config[0]} ST={config[1]}" if config else "")
        name += f" max splits {max_splits}" if max_splits else ""
        kc.row("attn", name, err, sec, kv_bytes,
               extra=f"{kv_bytes / sec / 1e12:.2f} TB/s; {base_sec / sec:.2f}x v1; "
               f"grid splits {splits}")


def time_kernel(ops, kc, meta, cache, qkv, nh, nkv, scale, kernel, config, max_splits):
    """(seconds per call, output on the host, grid splits) of one decode kernel variant."""
    saved = (ca.DECODE_KERNEL, ca.DECODE_MMA_CONFIG, ca.DECODE_MMA_FULL_CONFIG, ca.MAX_SPLITS,
             ca.NUM_BLOCKS_TARGET)
    try:
        ca.DECODE_KERNEL = kernel
        if config:  # the variant on split grids and on grids of one split alike
            ca.DECODE_MMA_CONFIG = ca.DECODE_MMA_FULL_CONFIG = config
        if max_splits:
            ca.MAX_SPLITS = max_splits
            # enough blocks wanted that the grid takes max_splits splits at this batch
            ca.NUM_BLOCKS_TARGET = max(ca.NUM_BLOCKS_TARGET, max_splits * nkv,
                                       max_splits * nkv * len(meta.context_lens))
        dmeta = ops.prepare_metadata(meta)
        # the engine's decode graphs: a grid sized for a 32k max_model_len, whatever the contexts
        dmeta.num_splits = ca.decode_plan(len(meta.context_lens), nkv, nh // nkv,
                                          32768).num_splits

        def attn():
            return ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, scale)

        got = ops.to_host(attn())
        return kc.graph_time(attn), got, dmeta.num_splits
    finally:
        (ca.DECODE_KERNEL, ca.DECODE_MMA_CONFIG, ca.DECODE_MMA_FULL_CONFIG, ca.MAX_SPLITS,
         ca.NUM_BLOCKS_TARGET) = saved
