"""Paged attention on the GPU: the step's metadata on the device, and cuda/attention.cu's launch.

The kernel takes work items (sequence, first new token, tokens) — tiles of at most ROWS // group
new tokens of one sequence — so decode tokens and prefill chunks share one launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cupy
import numpy as np

from engine.ops import AttentionMetadata
from engine.ops.cuda_kernels import kernel

ROWS = 16  # query rows per block in attention.cu: tile tokens * group <= ROWS
NUM_SMS_TARGET = 2 * 132  # blocks that fill an H200 twice over (5 fit per SM: 43 KB smem each)
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 32


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
    # group -> (work items on the device (W, 3) int32, num_splits); filled by the first layer
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


def work_items(query_start_loc: np.ndarray, group: int) -> np.ndarray:
    """(W, 3) int32 rows (sequence, first new token, tokens): every sequence's new tokens, tiled."""
    tile = ROWS // group
    num_new = np.diff(np.asarray(query_start_loc, np.int64))
    tiles = -(-num_new // tile)
    seq = np.repeat(np.arange(len(num_new)), tiles)
    first_tile = np.repeat(np.cumsum(tiles) - tiles, tiles)
    start = (np.arange(len(seq)) - first_tile) * tile
    count = np.minimum(tile, num_new[seq] - start)
    return np.stack([seq, start, count], axis=1).astype(np.int32)


def choose_splits(num_items: int, num_kv_heads: int, max_context_len: int) -> int:
    """Split the context when too few blocks would fill the GPU (long decodes at small batch)."""
    blocks = max(1, num_items * num_kv_heads)
    if blocks >= NUM_SMS_TARGET:
        return 1
    by_ctx = max(1, max_context_len // MIN_KEYS_PER_SPLIT)
    return int(max(1, min(MAX_SPLITS, -(-NUM_SMS_TARGET // blocks), by_ctx)))


def paged_attention(qkv, k_cache, v_cache, meta: DeviceAttentionMetadata, num_heads: int,
                    num_kv_heads: int, scale: float, ctype: str) -> cupy.ndarray:
    # qkv (T, (nh + 2 nkv) * hd), caches (num_blocks, nkv, block_size, hd) -> (T, nh * hd)
    num_blocks, cache_kv_heads, block_size, head_dim = k_cache.shape
    group = num_heads // num_kv_heads
    if cache_kv_heads != num_kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"kv cache shape {k_cache.shape} / {v_cache.shape} does not match "
                         f"num_kv_heads={num_kv_heads}")
    if group > ROWS or num_heads % num_kv_heads:
        raise ValueError(f"attention: group {num_heads}/{num_kv_heads} unsupported (max {ROWS})")
    num_tokens = len(qkv)
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv width {qkv.shape[1]} != (nh + 2 nkv) * head_dim")
    if group not in meta.work:
        items = work_items(meta.host.query_start_loc, group)
        splits = meta.num_splits or choose_splits(len(items), num_kv_heads, meta.max_context_len)
        meta.work[group] = (_up(items.reshape(-1, 3)), splits)
    work, splits = meta.work[group]
    out = cupy.empty((num_tokens, num_heads * head_dim), qkv.dtype)
    if len(work) == 0 or num_tokens == 0:
        return out
    tables = meta.block_tables
    if splits > 1:
        part_out = cupy.empty((splits, num_tokens, num_heads, head_dim), cupy.float32)
        part_ml = cupy.empty((splits, num_tokens, num_heads, 2), cupy.float32)
    else:
        part_out = part_ml = np.uint64(0)
    i32 = np.int32
    kernel("attention.cu", f"paged_attention_kernel<{ctype}, {head_dim}>", ctype)(
        (len(work), num_kv_heads, splits), (128,),
        (out, part_out, part_ml, qkv, k_cache, v_cache, work, meta.query_start_loc,
         meta.context_lens, tables, i32(tables.shape[1]), i32(num_tokens), i32(num_heads),
         i32(num_kv_heads), i32(block_size), np.float32(scale), i32(splits)))
    if splits > 1:
        kernel("attention.cu", f"attention_reduce_kernel<{ctype}, {head_dim}>", ctype)(
            (num_tokens, num_heads), (head_dim,),
            (out, part_out, part_ml, i32(num_tokens), i32(num_heads), i32(splits)))
    return out
