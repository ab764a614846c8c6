"""Prefill attention on the GPU: which kernel takes a step's prefill chunks (sequences with more
than one new token), how their new tokens are cut into work items, and the launch.

sm90, cuda/attention_prefill_sm90.cu (the default on Hopper, PAGEDSERVE_PREFILL_KERNEL=auto):
blocks of 128 query rows, warp-specialized: a producer warpgroup brings K/V tiles by TMA while
two consumer warpgroups run S = Q K^T and P V on wgmma in turns. H200, Llama-3-8B heads, one 8k
prompt: 534 TFLOP/s of causal work against v2's 285 (tools/kernel_check.py --only prefill90).
v2, cuda/attention_prefill_gqa.cu (the default elsewhere): one block per (kv head, tile of new
tokens), so that a kv group's query heads share every K/V tile the block loads. Its variants
(MI, NW, BN) trade rows per block against blocks in flight; prefill_plan picks one per step with
a small cost model (the causal tail: one 2k prompt makes too few big blocks to fill the GPU).
v1, cuda/attention_prefill.cu (PAGEDSERVE_PREFILL_KERNEL=v1): one block per (query head, 64 new
tokens); kept as the fallback and as tools/kernel_check.py's timing baseline.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os

import cupy
import numpy as np

from engine.executor.ops.cuda_kernels import (
    MAX_GRID_Y,
    PREFILL_CONFIGS,
    SM90_CONFIGS,
    can_launch_by_value,
    kernel,
    launch,
    num_sms,
)

logger = logging.getLogger("pagedserve." + __name__)

PREFILL_M, PREFILL_N, PREFILL_THREADS = 64, 64, 128  # v1's PF_M, PF_N, PF_THREADS
PREFILL_KERNELS = ("auto", "sm90", "v2", "v1")  # auto: sm90 on Hopper, else v2
PREFILL_KERNEL = os.environ.get("PAGEDSERVE_PREFILL_KERNEL", "auto")
if PREFILL_KERNEL not in PREFILL_KERNELS:
    raise ValueError(f"PAGEDSERVE_PREFILL_KERNEL={PREFILL_KERNEL!r}: one of {PREFILL_KERNELS}")
# None: prefill_plan picks a v2 variant per step; one of PREFILL_CONFIGS forces it (kernel_check)
PREFILL_CONFIG: tuple[int, ...] | None = None
SM90_ROWS = 128  # the sm90 kernel's query rows a block
SM90_FLAGS = 0  # the sm90 kernel's experiment bits (its source says which; kernel_check only)
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
def sm90_missing() -> tuple[str, ...] | None:
    """None off Hopper; on sm_90, what an sm_90a (wgmma + TMA) kernel needs that this process
    lacks: NVRTC 12+ (sm_90a), libcuda's cuLaunchKernelEx, cuTensorMapEncodeTiled (empty: all
    there). The prefill kernel and the skinny GEMM both ask."""
    if cupy.cuda.Device().compute_capability != "90":
        return None
    missing = []
    if cupy.cuda.nvrtc.getVersion() < (12, 0):
        missing.append("NVRTC 12+ (sm_90a)")
    if not can_launch_by_value():
        missing.append("cuLaunchKernelEx")
    try:
        _encode_tiled()
    except (OSError, AttributeError):
        missing.append("cuTensorMapEncodeTiled")
    return tuple(missing)


@functools.cache
def _sm90_ready() -> bool:
    """Hopper with what the sm90 prefill kernel needs (sm90_missing); without it v2 takes its
    place (a warning)."""
    missing = sm90_missing()
    if missing:
        logger.warning("the sm90 prefill kernel needs %s: prefill attention runs v2",
                       ", ".join(missing))
    return missing == ()


_num_sms = num_sms  # (a module name of its own: tests set it)


def _cost(config, last_key: np.ndarray, num_kv_heads: int) -> float:
    """Estimated time (arbitrary units) of v2 blocks whose work is keys x rows: the longer of the
    work spread over every block slot and the longest single block (the tail)."""
    rate, per_sm = PREFILL_RATES[config]
    work = last_key.astype(np.float64) * block_rows(config)
    spread = work.sum() * num_kv_heads / (_num_sms() * per_sm)
    return max(spread, float(work.max())) * per_sm / rate


def prefill_plan(query_start_loc: np.ndarray, context_lens: np.ndarray | None,
                 num_kv_heads: int, group: int):
    """(kernel name, its config or None, (W, 3) int32 work items cut for it). sm90 (auto's
    choice on Hopper) cuts for its blocks of SM90_ROWS rows; off Hopper, or for a kv group wider
    than them, v2 takes its place, and v1 that of a group wider than every v2 block."""
    if PREFILL_KERNEL == "v1":
        return "v1", None, prefill_items(query_start_loc)
    if PREFILL_KERNEL in ("auto", "sm90") and _sm90_ready() and group <= SM90_ROWS:
        config = PREFILL_CONFIG if PREFILL_CONFIG in SM90_CONFIGS else SM90_CONFIGS[0]
        items = prefill_items(query_start_loc, SM90_ROWS // group, context_lens)
        return "sm90", config, items
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


class TmaMap(ctypes.Structure):
    """CUtensorMap: 128 opaque bytes that cuTensorMapEncodeTiled fills; a kernel parameter."""
    _fields_ = [("words", ctypes.c_uint64 * 16)]


@functools.cache
def _encode_tiled():
    fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p,
                   u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MAPS: dict[tuple, TmaMap] = {}
_UINT16, _SWIZZLE_128B, _L2_256B = 1, 3, 3  # CUtensorMapDataType / Swizzle / L2promotion values


def tma_map(cache, box_rows: int) -> TmaMap:
    """One layer's K or V cache (num_blocks, nkv, block_size, hd) of 16-bit values as TMA's 2-D
    tensor of num_blocks x nkv x block_size rows, copied in boxes of box_rows x 64 values with the
    128-byte swizzle (the layout the sm90 kernel's wgmma reads). Made once per cache and box."""
    if not cache.flags.c_contiguous or cache.itemsize != 2:
        raise ValueError("tma_map: a contiguous cache of 16-bit values")
    return tma_map_2d(cache.data.ptr, cache.size // cache.shape[-1], cache.shape[-1], box_rows)


def tma_map_2d(ptr: int, rows: int, cols: int, box_rows: int) -> TmaMap:
    """TMA's view of `rows` contiguous rows of `cols` 16-bit values at device address `ptr`
    (cols % 8 == 0), copied in boxes of box_rows x 64 values with the 128-byte swizzle; a box
    past the last row arrives as zeros. Made once per (ptr, shape, box)."""
    key = (ptr, rows, cols, box_rows)
    found = _MAPS.get(key)
    if found is not None:
        return found
    raw = ctypes.create_string_buffer(128 + 64)  # the map is 64-byte aligned
    addr = (ctypes.addressof(raw) + 63) & ~63
    status = _encode_tiled()(
        addr, _UINT16, 2, ptr, (ctypes.c_uint64 * 2)(cols, rows),
        (ctypes.c_uint64 * 1)(cols * 2), (ctypes.c_uint32 * 2)(64, box_rows),
        (ctypes.c_uint32 * 2)(1, 1), 0, _SWIZZLE_128B, _L2_256B, 0)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {status})")
    if len(_MAPS) >= 1024:  # caches and activations come and go: keep the newest
        _MAPS.clear()
    _MAPS[key] = TmaMap.from_buffer_copy(ctypes.string_at(addr, 128))
    return _MAPS[key]


def sm90_box(block_size: int, tile: int) -> int:
    """The sm90 kernel's TMA box rows for this cache: gcd(block_size, tile) keys lie in one cache
    block and start one; 0 (cp.async instead) where that is no multiple of 8 (a box must start
    a 1024-byte swizzle atom)."""
    box = math.gcd(block_size, tile)
    return box if box % 8 == 0 else 0


def prefill_attention(out, qkv, k_cache, v_cache, meta, work: cupy.ndarray, name: str,
                      config: tuple[int, ...] | None, num_heads: int, num_kv_heads: int,
                      scale_log2, ctype: str):
    """The prefill rows of `out` (T, nh * hd), by the kernel `name` with the `config` that `work`
    (W, 3) was cut for (prefill_plan); meta is the step's DeviceAttentionMetadata."""
    i32, tables = np.int32, meta.block_tables
    head_dim, block_size = k_cache.shape[3], k_cache.shape[2]
    if len(work) > MAX_GRID_Y:
        raise ValueError(f"{len(work)} prefill work items in a step: the {name} kernel's grid "
                         f"takes at most {MAX_GRID_Y} (lower --max-num-batched-tokens)")
    # the parameters every prefill kernel takes after its cache arguments
    tail = (work, meta.query_start_loc, meta.context_lens, tables, i32(tables.shape[1]),
            i32(num_heads), i32(num_kv_heads), i32(block_size), scale_log2)
    if name == "v1":
        k = kernel("attention_prefill.cu", f"prefill_attention_kernel<{ctype}, {head_dim}>",
                   ctype)
        smem = 2 * 2 * PREFILL_N * (head_dim + 8) * 2  # 2 stages x (K, V) x keys x padded row
        grid, threads = (num_heads, len(work)), PREFILL_THREADS
        args = (out, qkv, k_cache, v_cache, *tail)
    elif name == "sm90":
        bn, st = config
        k = kernel("attention_prefill_sm90.cu",
                   f"prefill_sm90_kernel<{ctype}, {head_dim}, {bn}, {st}>", ctype)
        # 1024 for the 128-byte swizzle's alignment, Q + st stages x (K, V), 1 + 4 st mbarriers
        smem = 1024 + (SM90_ROWS + 2 * st * bn) * head_dim * 2 + 8 * (1 + 4 * st)
        grid, threads = (num_kv_heads, len(work)), 384
        box = sm90_box(block_size, bn)
        maps = (tma_map(k_cache, box), tma_map(v_cache, box)) if box else (TmaMap(), TmaMap())
        args = (out, qkv, k_cache, v_cache, *maps, *tail, i32(k_cache.size // head_dim),
                i32(box), i32(SM90_FLAGS))  # the maps go by value: launch() sends them
    else:
        nw, bn = config[1:3]
        names = f"{ctype}, {head_dim}, {', '.join(map(str, config))}"
        k = kernel("attention_prefill_gqa.cu", f"prefill_gqa_kernel<{names}>", ctype)
        # Q rows + 2 stages x (K, V) x keys, padded rows of 16-bit elements
        smem = (block_rows(config) + 2 * 2 * bn) * (head_dim + 8) * 2
        grid, threads = (num_kv_heads, len(work)), nw * 32
        args = (out, qkv, k_cache, v_cache, *tail)
    if k.max_dynamic_shared_size_bytes < smem:
        k.max_dynamic_shared_size_bytes = smem
    launch(k, grid, (threads,), args, shared_mem=smem)
