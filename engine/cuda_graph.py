"""CUDA graphs for decode-only steps: the forward captured once per padded batch size.

A decode step launches ~15 kernels per layer; from Python each costs microseconds, so at small
batches the GPU mostly waits. Replaying a captured graph launches them all at once. Inputs live in
persistent device buffers that each step overwrites; padding rows have slot -1 and context 0, so
they write nothing and attend to nothing.

    graphs = DecodeGraphs(model, kv_cache, max_num_seqs=64, max_blocks_per_seq=256)
    graphs.capture()
    if meta.is_decode_only and graphs.can_run(len(meta.context_lens)):
        logits = graphs.run(input_ids, positions, meta)   # (B, vocab) on the device
"""

from __future__ import annotations

import cupy
import numpy as np

from engine.ops import AttentionMetadata
from engine.ops.cuda_attention import DeviceAttentionMetadata, choose_splits


def padded_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] + (8 if sizes[-1] < 32 else 16))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model, kv_cache, max_num_seqs: int, max_blocks_per_seq: int,
                 max_context_len: int | None = None):
        self.model, self.kv_cache = model, kv_cache
        self.sizes = padded_sizes(max_num_seqs)
        n = max_num_seqs
        block_size = kv_cache.shape[4]
        self.max_context_len = max_context_len or max_blocks_per_seq * block_size
        # persistent inputs, (n,) unless noted
        self.input_ids = cupy.zeros(n, cupy.int32)
        self.positions = cupy.zeros(n, cupy.int32)
        self.slot_mapping = cupy.full(n, -1, cupy.int32)
        self.query_start_loc = cupy.arange(n + 1, dtype=cupy.int32)  # (n + 1,) one token each
        self.context_lens = cupy.zeros(n, cupy.int32)
        self.block_tables = cupy.zeros((n, max_blocks_per_seq), cupy.int32)
        self.logits_indices = cupy.arange(n, dtype=cupy.int32)
        self.graphs: dict[int, tuple] = {}  # size -> (graph, logits (size, vocab))
        self.pool = cupy.cuda.MemoryPool()  # owns every intermediate the graphs write

    def _meta(self, size: int) -> DeviceAttentionMetadata:
        c = self.model.config
        group = c.num_heads // c.num_kv_heads
        work = cupy.zeros((size, 3), cupy.int32)  # decode items: (seq, 0, 1)
        work[:, 0] = cupy.arange(size, dtype=cupy.int32)
        work[:, 2] = 1
        splits = choose_splits(size, c.num_kv_heads, self.max_context_len)
        return DeviceAttentionMetadata(
            self.slot_mapping[:size], self.query_start_loc[: size + 1], self.context_lens[:size],
            self.block_tables[:size], 1, self.max_context_len, host=None,
            work={group: (work, splits)}, num_splits=splits)

    def capture(self):
        stream = cupy.cuda.Stream(non_blocking=True)
        with cupy.cuda.using_allocator(self.pool.malloc), stream:
            for size in sorted(self.sizes, reverse=True):
                meta = self._meta(size)
                args = (self.input_ids[:size], self.positions[:size], self.kv_cache, meta,
                        self.logits_indices[:size])
                self.model.forward(*args)  # warm-up: compiles, and fills the pool for capture
                stream.synchronize()
                stream.begin_capture()
                logits = self.model.forward(*args)
                graph = stream.end_capture()
                self.graphs[size] = (graph, logits, meta)
        stream.synchronize()

    def can_run(self, num_seqs: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.sizes[-1]

    def run(self, input_ids: np.ndarray, positions: np.ndarray, meta: AttentionMetadata):
        """Replays the graph of the smallest captured size >= B; returns logits (B, vocab)."""
        b = len(meta.context_lens)
        size = next(s for s in self.sizes if s >= b)
        graph, logits, _ = self.graphs[size]
        width = meta.block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ValueError(f"block_tables has {width} columns; graphs captured for "
                             f"{self.block_tables.shape[1]}")
        self.input_ids[:b].set(np.asarray(input_ids, np.int32))
        self.positions[:b].set(np.asarray(positions, np.int32))
        slots = np.full(size, -1, np.int32)
        slots[:b] = meta.slot_mapping
        self.slot_mapping[:size].set(slots)
        ctx = np.zeros(size, np.int32)
        ctx[:b] = meta.context_lens
        self.context_lens[:size].set(ctx)
        tables = np.zeros((b, self.block_tables.shape[1]), np.int32)
        tables[:, :width] = meta.block_tables
        self.block_tables[:b].set(tables)
        graph.launch(cupy.cuda.get_current_stream())
        return logits[:b]
