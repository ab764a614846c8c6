"""Prefill attention on the GPU: which kernel takes a step's prefill chunks (sequences with more
than one new token), how their new tokens are cut into work items, and the launch.

v2, cuda/attention_prefill_gqa.cu (the default): one block per (kv head, tile of new tokens), so
that a kv group's query heads share every K/V tile the block loads. Its variants (MI, NW, BN) trade
rows per block against blocks in flight; prefill_plan picks one per step with a small cost model
(the causal tail: one 2k prompt makes too few big blocks to fill the GPU evenly).
v1, cuda/attention_prefill.cu (PAGEDSERVE_PREFILL_KERNEL=v1): one block per (query head, 64 new
tokens); kept as the fallback and as tools/kernel_check.py's timing baseline.
"""

from __future__ import annotations

import functools
import os

import cupy
import numpy as np

from engine.executor.ops.cuda_kernels import PREFILL_CONFIGS, kernel

PREFILL_M, PREFILL_N, PREFILL_THREADS = 64, 64, 128  # v1's PF_M, PF_N, PF_THREADS
PREFILL_KERNELS = ("v2", "v1")
PREFILL_KERNEL = os.environ.get("PAGEDSERVE_PREFILL_KERNEL", "v2")
if PREFILL_KERNEL not in PREFILL_KERNELS:
    raise ValueError(f"PAGEDSERVE_PREFILL_KERNEL={PREFILL_KERNEL!r}: one of {PREFILL_KERNELS}")
# None: prefill_plan picks a v2 variant per step; one of PREFILL_CONFIGS forces it (kernel_check)
PREFILL_CONFIG: tuple[int, ...] | None = None
# v2 variant (MI, NW, BN) -> (TFLOP/s of causal work with every SM busy, blocks per SM), from
# device run 1 (tools/kernel_check.py --only prefill, H200, Llama-3-8B heads, one 32k prompt).
PREFILL_RATES = {(2, 8, 64): (297.0, 1), (2, 4, 64): (282.0, 2), (1, 8, 64): (247.0, 1),
                 (1, 4, 64): (235.0, 2)}
if set(PREFILL_RATES) != set(PREFILL_CONFIGS):  # a rate for every compiled variant, and no more
    raise ValueError(f"PREFILL_RATES {sorted(PREFILL_RATES)} != PREFILL_CONFIGS")


def block_rows(config: tuple[int, ...]) -> int:
    """Query rows of a v2 block: 16 x MI x NW."""
    return 16 * config[0] * config[1]


def prefill_items(query_start_loc: np.ndarray, tile: int = PREFILL_M,
                  context_lens: np.ndarray | None = None) -> np.ndarray:
    """(W, 3) int32 rows (sequence, first new token, tokens): the new tokens of every sequence
    with more than one, in tiles of `tile`. With context_lens, sorted by the tile's last key,
    longest first: the heaviest causal tiles start first and the short ones fill the tail."""
    items, last_key = _items(query_start_loc, tile, context_lens)
    if last_key is not None:
        items = items[np.argsort(-last_key, kind="stable")]
    return items.astype(np.int32).reshape(-1, 3)


def _items(query_start_loc, tile: int, context_lens):
    """((W, 3) int64 items in sequence order, each item's last key + 1 or None)."""
    num_new = np.diff(np.asarray(query_start_loc, np.int64))
    num_new = np.where(num_new > 1, num_new, 0)
    tiles = -(-num_new // tile)
    seq = np.repeat(np.arange(len(num_new)), tiles)
    first_tile = np.repeat(np.cumsum(tiles) - tiles, tiles)
    start = (np.arange(len(seq)) - first_tile) * tile
    count = np.minimum(tile, num_new[seq] - start)
    items = np.stack([seq, start, count], axis=1).reshape(-1, 3)
    if context_lens is None:
        return items, None
    ctx = np.asarray(context_lens, np.int64)
    return items, ctx[seq] - num_new[seq] + start + count


@functools.cache
def _num_sms() -> int:
    return int(cupy.cuda.Device().attributes["MultiProcessorCount"])


def _cost(config, last_key: np.ndarray, num_kv_heads: int) -> float:
    """Estimated time (arbitrary units) of v2 blocks whose work is keys x rows: the longer of the
    work spread over every block slot and the longest single block (the tail)."""
    rate, per_sm = PREFILL_RATES[config]
    work = last_key.astype(np.float64) * block_rows(config)
    spread = work.sum() * num_kv_heads / (_num_sms() * per_sm)
    return max(spread, float(work.max())) * per_sm / rate


def prefill_plan(query_start_loc: np.ndarray, context_lens: np.ndarray | None,
                 num_kv_heads: int, group: int):
    """(kernel name, its config or None, (W, 3) int32 work items cut for it). A kv group wider
    than every v2 block's rows falls back to v1."""
    if PREFILL_KERNEL == "v1":
        return "v1", None, prefill_items(query_start_loc)
    configs = [PREFILL_CONFIG] if PREFILL_CONFIG else list(PREFILL_RATES)
    configs = [c for c in configs if block_rows(c) >= group]
    if not configs:
        return "v1", None, prefill_items(query_start_loc)
    best = configs[0]
    if len(configs) > 1 and context_lens is not None:
        costs = {}
        for c in configs:
            _, last_key = _items(query_start_loc, block_rows(c) // group, context_lens)
            if not len(last_key):
                break
            costs[c] = _cost(c, last_key, num_kv_heads)
        best = min(costs, key=costs.get) if costs else best
    return "v2", best, prefill_items(query_start_loc, block_rows(best) // group, context_lens)


def prefill_attention(out, qkv, k_cache, v_cache, meta, work: cupy.ndarray, name: str,
                      config: tuple[int, ...] | None, num_heads: int, num_kv_heads: int,
                      scale_log2, ctype: str):
    """The prefill rows of `out` (T, nh * hd), by the kernel `name` with the `config` that `work`
    (W, 3) was cut for (prefill_plan); meta is the step's DeviceAttentionMetadata."""
    i32, tables = np.int32, meta.block_tables
    head_dim, block_size = k_cache.shape[3], k_cache.shape[2]
    if name == "v1":
        k = kernel("attention_prefill.cu", f"prefill_attention_kernel<{ctype}, {head_dim}>",
                   ctype)
        smem = 2 * 2 * PREFILL_N * (head_dim + 8) * 2  # 2 stages x (K, V) x keys x padded row
        grid, threads = (num_heads, len(work)), PREFILL_THREADS
    else:
        nw, bn = config[1:3]
        args = f"{ctype}, {head_dim}, {', '.join(map(str, config))}"
        k = kernel("attention_prefill_gqa.cu", f"prefill_gqa_kernel<{args}>", ctype)
        # Q rows + 2 stages x (K, V) x keys, padded rows of 16-bit elements
        smem = (block_rows(config) + 2 * 2 * bn) * (head_dim + 8) * 2
        grid, threads = (num_kv_heads, len(work)), nw * 32
    if k.max_dynamic_shared_size_bytes < smem:
        k.max_dynamic_shared_size_bytes = smem
    k(grid, (threads,),
      (out, qkv, k_cache, v_cache, work, meta.query_start_loc, meta.context_lens, tables,
       i32(tables.shape[1]), i32(num_heads), i32(num_kv_heads), i32(block_size), scale_log2),
      shared_mem=smem)
