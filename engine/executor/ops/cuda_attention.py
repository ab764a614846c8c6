"""Paged attention on the GPU: the step's metadata on the device, and the attention kernels' launch.

A step's sequences split in two: those with one new token (decodes) go to a memory-bound decode
kernel, one block per (sequence, kv head, context split): cuda/attention_decode_mma.cu's (tensor
cores, cp.async or TMA stages) or cuda/attention.cu's first one (DECODE_KERNEL), whose splits a
reduce launch combines, or on sm_90, up to 8 splits, the blocks of a thread-block cluster
(merge_cluster, DECODE_CLUSTER_MERGE); those with several
(prefill chunks) go to a tensor-core kernel (cuda_prefill.py picks which, and cuts the work). A
mixed batch launches both, each writing its own rows of the output.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import cupy
import numpy as np

from engine.executor.ops import AttentionMetadata, cuda_kernels, longest_first
from engine.executor.ops.cuda_kernels import (
    DECODE_CLUSTER_CONFIGS,
    DECODE_CLUSTER_MERGE,
    DECODE_GROUPS,
    DECODE_MMA_CONFIGS,
    DECODE_MMA_TMA,
    DECODE_UNROLL,
    HEAD_DIMS,
    MAX_GRID_Y,
    MERGE_CLUSTERS,
    decode_mma_cluster_tma_name,
    decode_mma_name,
    kernel,
    launch,
    sm90_device,
)
from engine.executor.ops.cuda_prefill import (
    prefill_attention,
    prefill_plan,
    sm90_missing,
    tma_map,
)

DECODE_THREADS = 128  # attention.cu's DEC_WARPS warps
# "mma": attention_decode_mma.cu; "v1": attention.cu's scalar kernel. Device run 2
# (tools/kernel_check.py --only attn): W1's batch-256 decode mix 168 against 295 us (Llama-3-8B
# heads, 3.78 TB/s, 89% of the H200's bandwidth) and 166 against 209 (Qwen3-0.6B heads); W1 with
# mma: Qwen3-0.6B 22,868 output tok/s, Llama-3-8B 9,265 (7,678 before).
DECODE_KERNEL = os.environ.get("PAGEDSERVE_DECODE_KERNEL", "mma")
# (warps, cp.async stages per warp) of the mma kernel: DECODE_MMA_CONFIG where the grid splits
# contexts, DECODE_MMA_FULL_CONFIG where it has one split (the batch alone fills the GPU). Session
# 18 on the H200 (kernel_check --only attn): W1's batch-256 mix on 6 warps 161.2 against 164.9 us,
# 1 x 32,532 keys 41.8 against 41.5; W1 Llama-3-8B 10,301 against 10,266 / 10,274 output tok/s.
DECODE_MMA_CONFIG = DECODE_MMA_CONFIGS[0]
DECODE_MMA_FULL_CONFIG = DECODE_MMA_CONFIGS[1]
# Decode blocks that fill an H200's 132 SMs a few times over: past it, one split a sequence.
# Session 18, W1 Llama-3-8B: 512 against 1,024 took the steps of 65-128 sequences from two
# splits and a reduce launch to one, 9.55 -> 9.17 ms (10,322 against 10,266 / 10,274 output
# tok/s; with 6 warps everywhere, 10,380); 256 gave 10,291. Both defaults together, in a later
# call on another machine: 9,997 / 10,064 against 9,952 (65-128 sequences 9.83 -> 9.35 ms). One
# sequence still takes MAX_SPLITS (its blocks a split: at most 16 kv heads x passes).
NUM_BLOCKS_TARGET = 512
# A sequence takes ceil(context / keys per split) of the grid's splits, at most all of them
# (decode_splits.cuh's seq_splits): the grid is sized for the longest context, each sequence for
# its own.
# Keys per split: MIN_KEYS_PER_SPLIT under CUDA graphs; in eager steps the step's decode keys over
# NUM_BLOCKS_TARGET blocks when that is more (splits_for_contexts).
# 64, not 128: device run 2 (tools/kernel_check.py, splits) measured one 512-token sequence at
# 8.6 us against 11.4, 8 x 1024 at 16.4 against 19.7, and long contexts unchanged.
MIN_KEYS_PER_SPLIT = 64
# 32 splits x 8 kv heads = 256 mma blocks, each split long enough to keep its warps' cp.async
# rings busy. Session 8 on the H200 (bench_latency, Qwen3-0.6B shapes, batch 1): 32 against 48
# splits 0.872 against 0.928 ms/token at a 4,096-token context, 1.732 against 1.793 at 32,532.
MAX_SPLITS = int(os.environ.get("PAGEDSERVE_DECODE_MAX_SPLITS", "32"))  # a sweep's knob
# The order of a step's decode rows in the grid (its blockIdx.y): "batch", or "longest" context
# first (ops.longest_first; the decode graphs upload the order with each step's inputs). W1's
# batches mix contexts of 100 to 2,000 keys; a model of the grid (2,048 blocks of 256
# sequences x 8 kv heads, 264 resident, each block's time its keys + 64) puts the last wave's
# imbalance at 10-17% of the ideal in batch order and 1-5% longest first. On the H200 the tail's
# blocks run faster as the wave empties (bandwidth shared by fewer), so the gain is far smaller:
# session 14 measured W1's batch-256 mix listed longest first at 162.7 against 164.8 us on the
# (4, 2) variant, slower on others. In W1 on Llama-3-8B shapes (session 23, an H100, two
# rounds interleaved with "batch"): 8,592 / 8,585 against 8,525 / 8,503 output tok/s.
DECODE_ORDER = os.environ.get("PAGEDSERVE_DECODE_ORDER", "longest")
# Short contexts under CUDA graphs: cuda_graph.py replays, for batches of up to
# SHORT_DECODE_MAX_SEQS sequences whose contexts all hold <= SHORT_DECODE_CONTEXT keys
# (PAGEDSERVE_SHORT_DECODE_CONTEXT; 0 turns them off), graphs whose decode attention runs each
# (sequence, kv head) as one thread-block cluster of SHORT_DECODE_CLUSTER blocks on
# SHORT_DECODE_CONFIG's warps, combined in distributed shared memory: no reduce launch. Session 10
# on the H200 (tools/b1_gap.py --repeat, Llama-3-8B Q4_K, batch-1 step graph, split grid -> 4 x 8
# warps): 255 keys 1.836 -> 1.789 ms, 512 1.834 -> 1.804, 1,024 1.892 -> 1.856, 2,048 1.967 ->
# 1.952. Measured and not taken: one split on 8 warps, no cluster (255 keys 1.833 -> 1.780, but
# 384 1.830 -> 1.860 and 512 -> 1.915: a block streams about 128 keys per ~2.5 us from its one
# SM); clusters of 2 x 8 warps (1.771 at 255, 1.862 at 512), 4 x 4 (1.765 at 255, 1.852 at 512),
# 8 x 4 (2.06-2.19 everywhere); one split on 4 warps or 2 splits on 8 with the reduce launch.
SHORT_DECODE_CONTEXT = int(os.environ.get("PAGEDSERVE_SHORT_DECODE_CONTEXT", "2048"))
SHORT_DECODE_MAX_SEQS = 8
# (warps, stages) and blocks a cluster; a cluster of 1: one split a (sequence, kv head), any GPU
SHORT_DECODE_CONFIG = DECODE_CLUSTER_CONFIGS[0][:2]
SHORT_DECODE_CLUSTER = DECODE_CLUSTER_CONFIGS[0][2]
# The RoPE fold (rope_folds): a decode-only step's q RoPE and k/v cache write run inside the mma
# decode kernel instead of qk_rope_kv.cu's launch between the qkv GEMM and attention.
ROPE_FOLD = os.environ.get("PAGEDSERVE_ROPE_FOLD", "1")
KERNEL_MAX_SPLITS, REDUCE_THREADS = 256, 512  # attention.cu's MAX_SPLITS and RED_THREADS
LOG2E = 1.4426950408889634  # the kernels' softmax is base 2: scores are scaled by scale * log2(e)


@dataclass
class DeviceAttentionMetadata:
    """AttentionMetadata with its arrays on the device (same field names: the model is unaware)."""

    slot_mapping: cupy.ndarray  # (T,) int32
    query_start_loc: cupy.ndarray  # (B+1,) int32
    context_lens: cupy.ndarray  # (B,) int32
    block_tables: cupy.ndarray  # (B, max_blocks_per_seq) int32
    max_query_len: int
    max_context_len: int
    host: AttentionMetadata
    # group -> AttentionPlan (which kernel takes which rows); filled by the first layer
    work: dict = field(default_factory=dict)
    num_splits: int | None = None  # fixed by CUDA graph capture; None = chosen per step

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def _up(a: np.ndarray) -> cupy.ndarray:
    return cupy.asarray(np.ascontiguousarray(a, np.int32))


def prepare_metadata(meta: AttentionMetadata) -> DeviceAttentionMetadata:
    if isinstance(meta, DeviceAttentionMetadata):
        return meta
    return DeviceAttentionMetadata(
        slot_mapping=_up(meta.slot_mapping), query_start_loc=_up(meta.query_start_loc),
        context_lens=_up(meta.context_lens), block_tables=_up(meta.block_tables),
        max_query_len=int(meta.max_query_len), max_context_len=int(meta.max_context_len),
        host=meta)


@dataclass
class AttentionPlan:
    """Which kernel takes which rows of a step (the same for every layer)."""

    decode_seqs: cupy.ndarray  # (Wd,) int32: sequences with one new token
    prefill_work: cupy.ndarray  # (Wp, 3) int32: (sequence, first new token, tokens <= tile)
    num_splits: int  # context splits of the decode kernel's grid
    # keys per split a sequence aims at (decode_splits.cuh's seq_splits); None: MIN_KEYS_PER_SPLIT
    keys_per_split: int | None = None
    # the prefill kernel prefill_work was cut for, and its config (cuda_prefill.prefill_plan)
    prefill_kernel: str = "v1"
    prefill_config: tuple[int, ...] | None = None
    # the mma decode kernel's (warps, stages); None: DECODE_MMA_CONFIG
    decode_config: tuple[int, int] | None = None
    # > 1: num_splits blocks a cluster, combined in it (no reduce launch)
    decode_cluster: int = 1
    # the most keys at the end of a decode row's context that the step itself writes: 1, or
    # 1 + k for graphs that verify k drafts as decode rows; the mma kernel reads those after its
    # PDL wait, the others before it
    fresh_keys: int = 1


def decode_order() -> str:
    if DECODE_ORDER not in ("batch", "longest"):
        raise ValueError(f"PAGEDSERVE_DECODE_ORDER must be 'batch' or 'longest', got "
                         f"{DECODE_ORDER!r}")
    return DECODE_ORDER


def decode_kernel() -> str:
    if DECODE_KERNEL not in ("mma", "v1"):
        raise ValueError(f"PAGEDSERVE_DECODE_KERNEL must be 'mma' or 'v1', got {DECODE_KERNEL!r}")
    return DECODE_KERNEL


def decode_tma(block_size: int) -> bool:
    """Whether the mma decode kernel's stages fill by TMA (DECODE_MMA_TMA): on sm_90 with all
    it needs (_tma_ready), and a block size that is a multiple of 16; else by cp.async."""
    return DECODE_MMA_TMA == "1" and block_size % 16 == 0 and _tma_ready()


@functools.cache
def _tma_ready() -> bool:
    """sm_90 with all that cuda_prefill.sm90_missing asks for (it is None elsewhere); asked once,
    not at each eager decode launch."""
    return sm90_device() and sm90_missing() == ()


def decode_tile(group: int) -> tuple[int, int]:
    """(query heads per decode block, blocks per kv head): for the mma kernel 8 where the group
    fits (the transposed tiles' 8 columns, or with DECODE_MMA_TR=0 8 rows of an m16 tile whose
    other 8 skip their softmax), else 16 (one m16 tile)."""
    groups = (8, 16) if decode_kernel() == "mma" else DECODE_GROUPS
    g = next((g for g in groups if g >= group), groups[-1])
    return g, -(-group // g)


def choose_splits(num_items: int, num_kv_heads: int, max_context_len: int) -> int:
    """The grid's context splits: enough that the decode blocks fill the GPU when the batch is
    small, no more than the longest context needs (`num_items` counts decode blocks per kv
    head). A CUDA graph passes its max_model_len here; at replay each sequence uses only the
    splits its own context needs, and the others exit at once."""
    blocks = max(1, num_items * num_kv_heads)
    if blocks >= NUM_BLOCKS_TARGET:
        return 1
    by_ctx = max(1, max_context_len // MIN_KEYS_PER_SPLIT)
    return int(max(1, min(MAX_SPLITS, KERNEL_MAX_SPLITS, -(-NUM_BLOCKS_TARGET // blocks),
                           by_ctx)))


def splits_for_contexts(decode_ctx: np.ndarray, blocks_per_split: int) -> tuple[int, int]:
    """(grid splits, keys per split) for an eager step whose decode rows have these contexts:
    the step's keys spread over about NUM_BLOCKS_TARGET blocks, so one long sequence among short
    ones still gets enough splits to fill the GPU, and many long ones get few."""
    ctx = np.asarray(decode_ctx, np.int64)
    if not len(ctx):
        return 1, MIN_KEYS_PER_SPLIT
    keys = max(MIN_KEYS_PER_SPLIT, -(-int(ctx.sum()) * blocks_per_split // NUM_BLOCKS_TARGET))
    splits = int(max(1, min(MAX_SPLITS, KERNEL_MAX_SPLITS, -(-int(ctx.max()) // keys))))
    return splits, keys


def make_plan(query_start_loc: np.ndarray, num_kv_heads: int, group: int, max_context_len: int,
              num_splits: int | None = None, context_lens: np.ndarray | None = None
              ) -> AttentionPlan:
    """num_splits fixes the grid (CUDA graphs: sequences then aim at MIN_KEYS_PER_SPLIT keys per
    split); else the host's context_lens size it (eager), else max_context_len does. An eager
    decode-only step that a short-context graph would take (takes_short_graph) gets that graph's
    cluster plan, so that a step computes the same attention whether it replays a graph or not."""
    num_new = np.diff(np.asarray(query_start_loc, np.int64))
    decode = np.flatnonzero(num_new == 1)
    if decode_order() == "longest" and context_lens is not None:
        decode = longest_first(decode, context_lens)
    passes = decode_tile(group)[1]
    keys = None
    if (not num_splits and context_lens is not None and len(decode) == len(num_new)
            and takes_short_graph(len(decode), int(np.max(context_lens, initial=0)))
            and clusters_available()):
        return decode_plan(len(decode), num_kv_heads, group, max_context_len, short=True)
    if num_splits:
        splits = num_splits
    elif context_lens is not None:
        splits, keys = splits_for_contexts(np.asarray(context_lens)[decode],
                                           num_kv_heads * passes)
    else:
        splits = choose_splits(len(decode) * passes, num_kv_heads, max_context_len)
    name, config, items = prefill_plan(query_start_loc, context_lens, num_kv_heads, group)
    return AttentionPlan(_up(decode), _up(items), splits, keys, name, config)


def merge_cluster(splits: int) -> int:
    """The cluster that merges a split grid of `splits` (DECODE_CLUSTER_MERGE: the smallest of
    MERGE_CLUSTERS that holds them), or 1: the reduce launch merges them."""
    if not DECODE_CLUSTER_MERGE or splits < 2 or decode_kernel() != "mma":
        return 1
    return next((c for c in MERGE_CLUSTERS if c >= splits), 1)


def decode_plan(num_seqs: int, num_kv_heads: int, group: int, max_context_len: int,
                short: bool = False, fresh_keys: int = 1):
    """The plan of a decode-only step of `num_seqs` sequences (CUDA graph capture); `short`:
    for contexts of at most SHORT_DECODE_CONTEXT keys, SHORT_DECODE_CLUSTER splits as one
    cluster on SHORT_DECODE_CONFIG's warps (no reduce launch; any context stays correct, only
    slower past the threshold). `fresh_keys`: AttentionPlan.fresh_keys."""
    if short:
        plan = make_plan(np.arange(num_seqs + 1), num_kv_heads, group, max_context_len,
                         SHORT_DECODE_CLUSTER)
        plan.decode_config, plan.decode_cluster = SHORT_DECODE_CONFIG, SHORT_DECODE_CLUSTER
    else:
        plan = make_plan(np.arange(num_seqs + 1), num_kv_heads, group, max_context_len)
    plan.fresh_keys = fresh_keys
    return plan


def clusters_available() -> bool:
    """Whether short-context plans run here: on, the mma kernel, and clusters (sm_90)."""
    return SHORT_DECODE_CONTEXT > 0 and decode_kernel() == "mma" and (
        SHORT_DECODE_CLUSTER == 1 or int(cupy.cuda.Device().compute_capability) >= 90)


def short_graph_sizes(sizes: list[int]) -> list[int]:
    """The graph sizes that get a short-context graph too (none when they are off)."""
    if not clusters_available():
        return []
    return [s for s in sizes if s <= SHORT_DECODE_MAX_SEQS]


def takes_short_graph(num_seqs: int, max_context: int) -> bool:
    """Whether a decode-only step of `num_seqs` sequences whose longest context is
    `max_context` keys replays a short-context graph (SHORT_DECODE_CONTEXT)."""
    return (0 < max_context <= SHORT_DECODE_CONTEXT and num_seqs <= SHORT_DECODE_MAX_SEQS
            and decode_kernel() == "mma")


def step_plan(meta: DeviceAttentionMetadata, num_kv_heads: int, group: int) -> AttentionPlan:
    """The step's AttentionPlan for this GQA group, made by the first layer that asks."""
    plan = meta.work.get(group)
    if plan is None:
        plan = make_plan(meta.host.query_start_loc, num_kv_heads, group, meta.max_context_len,
                         meta.num_splits, meta.host.context_lens)
        meta.work[group] = plan
    return plan


def rope_folds(meta: DeviceAttentionMetadata, num_heads: int, num_kv_heads: int) -> bool:
    """Whether paged_attention(rope=...) takes the step: every row a decode of one new token
    (no prefill work, no verify rows), on the mma kernel's transposed tiles (8 query heads a
    block), one split cluster. The caller leaves out qk_norm_rope_kv_write then, and must have
    no q/k norm or qkv bias (the fold does RoPE only)."""
    if ROPE_FOLD != "1" or decode_kernel() != "mma" or num_heads % num_kv_heads:
        return False
    group = num_heads // num_kv_heads
    if decode_tile(group)[0] != 8 or cuda_kernels.DECODE_MMA_TR == "0":
        return False  # the fold is the transposed tiles' (8 query heads as an mma's columns)
    plan = step_plan(meta, num_kv_heads, group)
    return (not len(plan.prefill_work) and plan.fresh_keys == 1 and plan.decode_cluster == 1
            and len(plan.decode_seqs) > 0)


def paged_attention(qkv, k_cache, v_cache, meta: DeviceAttentionMetadata, num_heads: int,
                    num_kv_heads: int, scale: float, ctype: str, out=None,
                    rope=None) -> cupy.ndarray:
    # qkv (T, (nh + 2 nkv) * hd), caches (num_blocks, nkv, block_size, hd) -> (T, nh * hd),
    # written into `out` when given (mixed_graphs.py: the buffer its graphs read). rope:
    # (positions (T,) int32, cos_sin (max_pos, hd) of qkv's dtype) where rope_folds said yes:
    # the kernel applies RoPE to q and k and writes k and v into the cache (qkv unchanged)
    num_blocks, cache_kv_heads, block_size, head_dim = k_cache.shape
    if cache_kv_heads != num_kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"kv cache shape {k_cache.shape} / {v_cache.shape} does not match "
                         f"num_kv_heads={num_kv_heads}")
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"attention: num_heads {num_heads} is not a multiple of "
                         f"num_kv_heads {num_kv_heads}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"attention: head_dim {head_dim} unsupported (one of {HEAD_DIMS})")
    group = num_heads // num_kv_heads
    num_tokens = len(qkv)
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv width {qkv.shape[1]} != (nh + 2 nkv) * head_dim")
    plan = step_plan(meta, num_kv_heads, group)
    rope_args = (np.uint64(0), np.uint64(0))
    if rope is not None:
        positions, cos_sin = rope
        if not rope_folds(meta, num_heads, num_kv_heads):
            raise ValueError("attention: rope given for a step the fold does not take "
                             "(rope_folds is False)")
        if cos_sin.dtype != qkv.dtype or cos_sin.ndim != 2 or cos_sin.shape[1] != head_dim:
            raise ValueError(f"attention: cos_sin must be ({qkv.dtype}, (max_positions, "
                             f"{head_dim})), got {cos_sin.dtype} {cos_sin.shape}")
        if positions.dtype != np.int32 or positions.shape != (num_tokens,):
            raise ValueError(f"attention: positions must be int32 of shape ({num_tokens},), got "
                             f"{positions.dtype} {positions.shape}")
        rope_args = (cos_sin, positions)
    if out is None:
        out = cupy.empty((num_tokens, num_heads * head_dim), qkv.dtype)
    elif (out.shape != (num_tokens, num_heads * head_dim) or out.dtype != qkv.dtype
          or not out._c_contiguous):
        raise ValueError(f"attention: out must be a C-contiguous {qkv.dtype} array of shape "
                         f"{(num_tokens, num_heads * head_dim)}, got {out.dtype} {out.shape}")
    if num_tokens == 0:
        return out
    i32, tables = np.int32, meta.block_tables
    scale_log2 = np.float32(scale * LOG2E)
    num_dec, splits = len(plan.decode_seqs), plan.num_splits
    if not 1 <= splits <= KERNEL_MAX_SPLITS:  # the reduce kernel's shared weights hold this many
        raise ValueError(f"attention: num_splits {splits} outside 1..{KERNEL_MAX_SPLITS}")
    keys_per_split = i32(plan.keys_per_split or MIN_KEYS_PER_SPLIT)
    cluster = plan.decode_cluster
    if cluster > 1 and (splits != cluster or decode_kernel() != "mma"):
        raise ValueError(f"attention: a cluster plan of {cluster} blocks needs the mma decode "
                         f"kernel and as many splits (kernel {decode_kernel()}, {splits} splits)")
    if num_dec:
        g, passes = decode_tile(group)
        merge = 1  # > 1: the split grid merged in clusters of this many blocks (merge_cluster)
        if cluster == 1 and plan.decode_config is None and decode_tma(block_size):
            merge = merge_cluster(splits)
            splits = max(splits, merge)
        if splits > 1 and cluster == 1 and merge == 1:
            part_out = cupy.empty((splits, num_dec, num_heads, head_dim), cupy.float32)
            part_ml = cupy.empty((splits, num_dec, num_heads, 2), cupy.float32)
        else:
            part_out = part_ml = np.uint64(0)
        args = (out, part_out, part_ml, qkv, k_cache, v_cache, plan.decode_seqs,
                meta.query_start_loc, meta.context_lens, tables, i32(tables.shape[1]),
                i32(num_dec), i32(num_heads), i32(num_kv_heads), i32(block_size), scale_log2,
                i32(splits), keys_per_split)
        if decode_kernel() == "mma":
            if num_dec > MAX_GRID_Y:
                raise ValueError(f"attention: {num_dec} decode rows in one step, the mma "
                                 f"kernel takes at most {MAX_GRID_Y} (lower --max-num-seqs)")
            nw, st = plan.decode_config or (DECODE_MMA_CONFIG if splits > 1
                                            else DECODE_MMA_FULL_CONFIG)
            tma = cluster == 1 and decode_tma(block_size)
            if merge > 1:
                name = decode_mma_cluster_tma_name(ctype, head_dim, g, nw, st, merge)
            elif cluster == 1:
                name = decode_mma_name(ctype, head_dim, g, nw, st, tma)
            else:
                name = (f"decode_mma_cluster_kernel<{ctype}, {head_dim}, {g}, {nw}, {st}, "
                        f"{cluster}>")
            grid = (num_kv_heads * passes, num_dec, splits)  # heads fastest
            k = kernel("attention_decode_mma.cu", name, ctype)
            # each warp's stages of K and V tiles (16 keys, padded rows), reused by the merge;
            # TMA's: unpadded, 1024-byte aligned
            row = head_dim if tma else head_dim + 8
            smem = max(nw * st * 2 * 16 * row * 2, nw * g * head_dim * 4) + (1024 if tma else 0)
            if k.max_dynamic_shared_size_bytes < smem:
                k.max_dynamic_shared_size_bytes = smem
            tail = (i32(plan.fresh_keys), *rope_args)
            if tma:  # the maps go by value: launch() sends them
                tail += (tma_map(k_cache, 16), tma_map(v_cache, 16))
            launch(k, grid, (nw * 32,), args + tail, shared_mem=smem, pdl=True)
        else:
            launch(kernel("attention.cu",
                          f"decode_attention_kernel<{ctype}, {head_dim}, {g}, {DECODE_UNROLL}>",
                          ctype), (num_dec, num_kv_heads * passes, splits), (DECODE_THREADS,),
                   args, pdl=True)
        if splits > 1 and cluster == 1 and merge == 1:
            launch(kernel("attention.cu", f"decode_reduce_kernel<{ctype}, {head_dim}>", ctype),
                   (num_dec, num_heads), (REDUCE_THREADS,),
                   (out, part_out, part_ml, plan.decode_seqs, meta.query_start_loc,
                    meta.context_lens, i32(num_dec), i32(num_heads), i32(splits),
                    keys_per_split), pdl=True)
    if len(plan.prefill_work):
        prefill_attention(out, qkv, k_cache, v_cache, meta, plan.prefill_work,
                          plan.prefill_kernel, plan.prefill_config, num_heads, num_kv_heads,
                          scale_log2, ctype)
    return out
