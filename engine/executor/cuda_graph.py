"""CUDA graphs for decode-only steps: the forward captured once per padded batch size.

A decode step launches ~15 kernels per layer; from Python each costs microseconds, so at small
batches the GPU mostly waits. Replaying a captured graph launches them all at once. Inputs live in
persistent device buffers that each step overwrites; padding rows have slot -1 and context 0, so
they write nothing and attend to nothing (slot -1 stops qk_rope_kv.cu's write; where the decode
kernel writes the key itself, the RoPE fold, context 0 does). The host stages them in one of two
pinned buffers, in turn, so staging step N+1 never overwrites what step N's (asynchronous) upload
still reads; input placeholders of an overlapped step are resolved on the stream right before the
replay.

Short contexts: for batches of up to cuda_attention.SHORT_DECODE_MAX_SEQS sequences a second graph
per size runs each (sequence, kv head)'s attention as one thread-block cluster whose blocks combine
their splits in distributed shared memory, which saves the reduce kernel's launch in every layer;
run() replays it while every context of the step holds at most SHORT_DECODE_CONTEXT keys
(takes_short_graph), the split graph past that.

Speculative verify steps replay the same graphs: StepInputs.as_decode_rows() turns the 1 + k
tokens of each sequence into 1 + k decode rows (row t attends to keys 0..positions[t] of its
sequence), so B sequences verifying k drafts replay the graph of the smallest size >= B * (1 + k).

    graphs = DecodeGraphs(model, kv_cache, max_num_seqs=64, max_blocks_per_seq=256)
    graphs.capture()
    if meta.is_decode_only and graphs.can_run(len(meta.context_lens)):
        logits = graphs.run(input_ids, positions, meta)   # (B, vocab) on the device
"""

from __future__ import annotations

import contextlib
import gc
import logging

import cupy
import numpy as np

from engine.executor.ops import AttentionMetadata, cuda_kernels, longest_first
from engine.executor.ops.cuda_attention import (
    DeviceAttentionMetadata,
    decode_order,
    decode_plan,
    short_graph_sizes,
    takes_short_graph,
)

logger = logging.getLogger("pagedserve." + __name__)


def padded_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, then every multiple of 8, and max_num_seqs. A step runs
    the smallest size that holds its rows; the padding rows cost GEMM work like real ones, and
    cuBLAS tiles the token dimension in steps of 8. Steps of 16 above 32 rows (before session 24)
    padded 7.5 rows on average: W1 on the H200, Llama-3-8B shapes, 10,344-10,372 output tok/s
    against 10,396-10,432 with steps of 8 (Qwen3-0.6B 25,767 / 25,901 against 25,918 / 26,044);
    steps of 4 gave 10,430, within the noise, for twice the graphs."""
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] + 8)
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


@contextlib.contextmanager
def collector_paused():
    """Python's garbage collector runs once, then stays off while graphs are captured.

    NOTE: a reference cycle it breaks mid-capture can free what an engine made before held: a
    memory pool returns its blocks (cudaFree), a stream or event is destroyed. The driver refuses
    those while a stream captures, and the capture fails (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED),
    which depends on when the collector happens to run, not on the graph."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class DecodeGraphs:
    def __init__(self, model, kv_cache, max_num_seqs: int, max_blocks_per_seq: int,
                 max_context_len: int | None = None, fresh_keys: int = 1):
        # fresh_keys: 1 + the drafts a verify step replays as decode rows (AttentionPlan)
        self.model, self.kv_cache, self.fresh_keys = model, kv_cache, fresh_keys
        self.sizes = padded_sizes(max_num_seqs)
        n = max_num_seqs
        block_size = kv_cache.shape[4]
        self.max_context_len = max_context_len or max_blocks_per_seq * block_size
        # Persistent inputs, (n,) unless noted. The per-step ones sit in one buffer so that a step
        # uploads once: [input_ids | positions | slot_mapping | context_lens | order | staged
        # tables], order: the rows in the decode attention grid's order (cuda_attention
        # DECODE_ORDER "longest"; unused in "batch" order, where each plan keeps its own).
        size = 5 * n + n * max_blocks_per_seq
        self._pinned = [cupy.cuda.alloc_pinned_memory(size * 4) for _ in range(2)]
        self._staging = [np.frombuffer(m, np.int32, size) for m in self._pinned]
        for h in self._staging:  # the order region, as uploaded where run() does not write it
            h[4 * n : 5 * n] = np.arange(n)
        self._uploaded: list = [None, None]  # event after each staging buffer's last upload
        self._turn = 0
        self._device = cupy.zeros(size, cupy.int32)
        self.input_ids = self._device[:n]
        self.positions = self._device[n : 2 * n]
        self.slot_mapping = self._device[2 * n : 3 * n]
        self.context_lens = self._device[3 * n : 4 * n]
        self.order = self._device[4 * n : 5 * n]
        self.ordered = decode_order() == "longest"
        self.slot_mapping.fill(-1)  # the warm-up forward at capture must write no k/v
        self.order[:] = cupy.arange(n, dtype=cupy.int32)  # each row once, at capture too
        self.query_start_loc = cupy.arange(n + 1, dtype=cupy.int32)  # (n + 1,) one token each
        self.block_tables = cupy.zeros((n, max_blocks_per_seq), cupy.int32)
        self.graphs: dict[int, tuple] = {}  # size -> (graph, logits (size, vocab), meta)
        self.short_graphs: dict[int, tuple] = {}  # the same, short contexts (module docstring)
        self.pool = cupy.cuda.MemoryPool()  # owns every intermediate the graphs write

    def _meta(self, size: int, short: bool = False) -> DeviceAttentionMetadata:
        c = self.model.config
        group = c.num_heads // c.num_kv_heads
        # every row a decode; the context splits are fixed for the graph's lifetime
        plan = decode_plan(size, c.num_kv_heads, group, self.max_context_len, short,
                           self.fresh_keys)
        if self.ordered:
            plan.decode_seqs = self.order[:size]  # run() writes each step's order
        return DeviceAttentionMetadata(
            self.slot_mapping[:size], self.query_start_loc[: size + 1], self.context_lens[:size],
            self.block_tables[:size], 1, self.max_context_len, host=None,
            work={group: plan}, num_splits=plan.num_splits)

    def capture(self):
        # NOTE: each graph's metadata (its attention plan) must outlive every replay, so it is
        # allocated here, outside the shared pool. Made inside it, a plan could land on memory
        # that an earlier graph freed as scratch during its capture, and that graph's replays
        # would overwrite it.
        metas = {size: self._meta(size) for size in self.sizes}
        short = {size: self._meta(size, short=True) for size in short_graph_sizes(self.sizes)}
        # NOTE: the capture stream is non-blocking: it does not wait for the legacy default
        # stream, where the weights, the KV cache and this object's buffers (slot_mapping's
        # fill(-1)) were made. Without this sync the warm-up forward can read slot_mapping
        # before the fill lands - recycled pool memory, garbage slots - and store k/v far out
        # of the cache (cudaErrorIllegalAddress, only when the pool held old data).
        cupy.cuda.Device().synchronize()
        try:
            with collector_paused():
                self._capture_all(metas)
        except Exception as e:  # a driver that cannot capture programmatic launches
            if not cuda_kernels.PDL:
                raise
            logger.warning("capturing decode graphs with PDL failed (%s: %s): capturing them "
                           "without", type(e).__name__, e)
            cuda_kernels.PDL = False
            self.graphs.clear()
            cupy.cuda.Device().synchronize()
            with collector_paused():
                self._capture_all(metas)
        if short:
            self._capture_short(short)

    def _capture_short(self, metas: dict):
        """The short-context graphs, after the split ones: if they cannot be captured (a cluster
        launch the GPU refuses), the step runs the split graphs, and PDL stays as it was."""
        pdl = cuda_kernels.PDL
        try:
            with collector_paused(), cuda_kernels.early_triggers(cuda_kernels.PDL_EARLY_SHORT):
                self._capture_all(metas, self.short_graphs)
        except Exception as e:
            if self.model.ops.is_fatal(e):  # the context is lost: nothing can run
                raise
            logger.warning("capturing the short-context decode graphs failed (%s: %s): decode "
                           "steps replay the split graphs only", type(e).__name__, e)
            self.short_graphs.clear()
            cuda_kernels.PDL = pdl  # a failed launch turned it off for every kernel
            cupy.cuda.Device().synchronize()

    def _capture_all(self, metas: dict, into: dict | None = None):
        """A graph per size of `metas` into `into` (self.graphs by default), largest first."""
        into = self.graphs if into is None else into
        stream = cupy.cuda.Stream(non_blocking=True)
        # On sm_90 (unless PAGEDSERVE_PDL=0) the warm-up and the capture launch the decode
        # kernels as programmatic dependent launches (cuda_kernels.py).
        with cupy.cuda.using_allocator(self.pool.malloc), stream, \
                cuda_kernels.programmatic_launches():
            for size in sorted(metas, reverse=True):
                meta = metas[size]
                # every row samples: no logits_indices gather
                args = (self.input_ids[:size], self.positions[:size], self.kv_cache, meta, None)
                self.model.forward(*args)  # warm-up: compiles, and fills the pool for capture
                stream.synchronize()
                stream.begin_capture()
                try:
                    logits = self.model.forward(*args)
                finally:  # leaves capture mode even when the forward raised
                    graph = stream.end_capture()
                into[size] = (graph, logits, meta)
        stream.synchronize()

    def can_run(self, num_seqs: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.sizes[-1]

    def pick(self, context_lens: np.ndarray) -> tuple[int, tuple]:
        """(size, (graph, logits, meta)) that a step with these contexts replays: the smallest
        captured size >= B, its short-context graph when takes_short_graph() says so."""
        b = len(context_lens)
        size = next(s for s in self.sizes if s >= b)
        if b and size in self.short_graphs and takes_short_graph(b, int(np.max(context_lens))):
            return size, self.short_graphs[size]
        return size, self.graphs[size]

    def run(self, input_ids: np.ndarray, positions: np.ndarray, meta: AttentionMetadata,
            prev_sampled=None):
        """Replays the graph pick() chooses; returns logits (B, vocab).
        `prev_sampled`: the previous step's sampled ids, for placeholder input ids."""
        b = len(meta.context_lens)
        size, (graph, logits, _) = self.pick(meta.context_lens)
        n, max_blocks = len(self.input_ids), self.block_tables.shape[1]
        width = meta.block_tables.shape[1]
        if width > max_blocks:
            raise ValueError(f"block_tables has {width} columns; graphs captured for "
                             f"{max_blocks}")
        # Padding rows b..size-1: slot -1 writes nothing, context 0 attends to nothing.
        turn, self._turn = self._turn, 1 - self._turn
        if self._uploaded[turn] is not None:
            self._uploaded[turn].synchronize()  # two steps back: long done in practice
        h = self._staging[turn]
        for i, (a, pad) in enumerate(((input_ids, 0), (positions, 0), (meta.slot_mapping, -1),
                                      (meta.context_lens, 0))):
            h[i * n : i * n + b] = a
            h[i * n + b : i * n + size] = pad
        if self.ordered:  # padding rows (context 0) last
            h[4 * n : 4 * n + b] = longest_first(np.arange(b), meta.context_lens)
            h[4 * n + b : 4 * n + size] = np.arange(b, size)
        end = 5 * n + b * width
        h[5 * n : end].reshape(b, width)[:] = meta.block_tables
        stream = cupy.cuda.get_current_stream()
        self._device[:end].set(h[:end], stream)  # the step's one host -> device copy
        event = self._uploaded[turn] = cupy.cuda.Event(disable_timing=True)
        event.record(stream)
        # The staged (b, width) tables into the (n, max_blocks) rows the graph reads, on the GPU.
        item = self._device.itemsize
        cupy.cuda.runtime.memcpy2DAsync(
            self.block_tables.data.ptr, max_blocks * item, self._device.data.ptr + 5 * n * item,
            width * item, width * item, b, cupy.cuda.runtime.memcpyDeviceToDevice, stream.ptr)
        if prev_sampled is not None:
            self.model.ops.resolve_placeholders(self.input_ids[:b], prev_sampled)
        graph.launch(stream)
        return None if logits is None else logits[:b]  # None: a tensor-parallel worker rank
