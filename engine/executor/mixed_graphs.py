"""CUDA graphs for the steps decode graphs cannot take (a prompt among decodes), cut at attention.

Such a step ran eagerly: ~10 ms of host time on Qwen3-0.6B's 28 layers (W2's time to first
token), for ~1 ms of GPU work. Everything in a layer but attention depends on the token count
alone, so MixedGraphs captures, per bucket of token counts, the forward between two attentions
as one graph: the embedding up to layer 0's attention inputs (norm, qkv, q/k norm + RoPE + cache
write), then each layer's output (o, norm, MLP) up to the next layer's attention inputs, then the
last layer's output and the final norm. Each attention runs eagerly between two replays, on the
step's own metadata (its kernels' grids follow the step's sequences), into one static buffer that
the next graph reads; so does the lm_head, on the rows that sample.

The step's T tokens fill the first T rows of static input buffers; rows T..bucket are padding:
slot -1 (no cache write), never attended to, and every other op is row-wise, so their values
never reach a real row.

NOTE: a piece's qkv is kept as a view that does not hold its memory: the capture pool may give
that memory to a later piece, whose replay only writes it after this step's attention of the
layer has read it (one stream). Everything else the replays share lives outside the pool.

    graphs = MixedGraphs(model, kv_cache, max_tokens=8192)
    graphs.capture()
    if graphs.can_run(len(input_ids)):
        logits = graphs.run(input_ids, positions, slot_mapping, device_meta, logits_indices)

On by default (PAGEDSERVE_MIXED_GRAPHS=0 turns it off): on the H200 (session 7,
tools/profile_prefill_host.py) a step of 8 decodes and a 64-token prompt takes 2.41 ms of host
time to launch instead of 8.35, with the same logits.
"""

from __future__ import annotations

import cupy

from engine.executor.cuda_graph import collector_paused
from engine.executor.ops.cuda_attention import DeviceAttentionMetadata

# Token counts a step is padded up to; a step of more tokens runs eagerly.
BUCKETS = (16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1152)


def bucket_sizes(max_tokens: int, buckets: tuple[int, ...] = BUCKETS) -> list[int]:
    """The token counts captured, ascending and each once: the buckets below max_tokens, then
    max_tokens itself when it is smaller than the last bucket, else the last bucket."""
    top = min(max_tokens, buckets[-1])
    return [b for b in buckets if b < top] + [top]


class MixedGraphs:
    def __init__(self, model, kv_cache, max_tokens: int, buckets: tuple[int, ...] = BUCKETS):
        self.model = model
        self.sizes = bucket_sizes(max_tokens, buckets)
        n, c = self.sizes[-1], model.config
        self.num_layers = len(model.weights.layers)
        self.caches = [(kv_cache[i, 0], kv_cache[i, 1]) for i in range(self.num_layers)]
        # Static inputs (n,) int32 and the attention output (n, q_size) the graphs read.
        self.input_ids = cupy.zeros(n, cupy.int32)
        self.positions = cupy.zeros(n, cupy.int32)
        self.slot_mapping = cupy.full(n, -1, cupy.int32)  # the warm-ups write no k/v
        self.attn = cupy.zeros((n, c.num_heads * c.head_dim), model.ops.storage)
        self.pool = cupy.cuda.MemoryPool()  # every intermediate the graphs write
        self.graphs: dict[int, _Bucket] = {}

    def can_run(self, num_tokens: int) -> bool:
        return bool(self.graphs) and 0 < num_tokens <= self.sizes[-1]

    def capture(self) -> None:
        # NOTE: the capture stream does not wait for the legacy stream where the buffers above
        # were filled (cuda_graph.DecodeGraphs.capture says what goes wrong without this sync).
        cupy.cuda.Device().synchronize()
        stream = cupy.cuda.Stream(non_blocking=True)
        with collector_paused(), cupy.cuda.using_allocator(self.pool.malloc), stream:
            for size in sorted(self.sizes, reverse=True):
                self.graphs[size] = self._capture(size, stream)
        stream.synchronize()

    def _capture(self, size: int, stream) -> _Bucket:
        attn = self.attn[:size]
        for capturing in (False, True):  # a warm-up (compiles, fills the pool), then the capture
            state: dict = {}
            graphs, qkvs = [], []
            for i in range(self.num_layers + 1):
                if capturing:
                    stream.begin_capture()
                try:
                    self._piece(i, state, size, attn)
                finally:  # leaves capture mode even when the piece raised
                    if capturing:
                        graphs.append(stream.end_capture())
                if i < self.num_layers:
                    qkvs.append(_unheld_view(state.pop("qkv"), self.pool))
            stream.synchronize()
        return _Bucket(graphs, qkvs, attn, state["h"])

    def _piece(self, i: int, state: dict, size: int, attn) -> None:
        """Graph i: layer i-1's output (or the embedding), then layer i's attention inputs (or
        the final norm)."""
        m = self.model
        if i == 0:
            x, residual = m.ops.embedding(self.input_ids[:size], m.weights.embed), None
        else:
            x, residual = m.layer_output(i - 1, attn, state["residual"])
        if i == self.num_layers:
            state["h"] = m.final_norm(x, residual)  # (size, hidden)
            return
        k_cache, v_cache = self.caches[i]
        state["qkv"], state["residual"] = m.attention_inputs(
            i, x, residual, self.positions[:size], k_cache, v_cache, self.slot_mapping[:size])

    def run(self, input_ids, positions, slot_mapping, meta: DeviceAttentionMetadata,
            logits_indices):
        """Logits (R, vocab) of the rows in logits_indices (None: all T) of a step of T tokens,
        its k/v written to the cache; input_ids, positions, slot_mapping (T,) int32 on the
        device (placeholders already resolved)."""
        t = len(input_ids)
        size = next(s for s in self.sizes if s >= t)
        bucket = self.graphs[size]
        stream = cupy.cuda.get_current_stream()
        copy = cupy.cuda.runtime.memcpyDeviceToDevice
        for dst, src in ((self.input_ids, input_ids), (self.positions, positions),
                         (self.slot_mapping, slot_mapping)):
            cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, t * 4, copy, stream.ptr)
        if size > t:  # padding rows: slot -1 (all bits set); stale ids and positions are valid
            cupy.cuda.runtime.memsetAsync(self.slot_mapping.data.ptr + t * 4, 0xFF,
                                          (size - t) * 4, stream.ptr)
        m, c = self.model, self.model.config
        for i in range(self.num_layers):
            bucket.graphs[i].launch(stream)
            k_cache, v_cache = self.caches[i]
            m.ops.attention(bucket.qkvs[i], k_cache, v_cache, meta, c.num_heads, c.num_kv_heads,
                            m.scale, out=bucket.attn)
        bucket.graphs[self.num_layers].launch(stream)
        return m.logits(bucket.h if logits_indices is not None else bucket.h[:t],
                        logits_indices)


class _Bucket:
    __slots__ = ("graphs", "qkvs", "attn", "h")

    def __init__(self, graphs: list, qkvs: list, attn, h):
        self.graphs = graphs  # num_layers + 1 graphs, replayed in order
        self.qkvs = qkvs  # (size, q_size + 2 * kv_size) per layer: what its attention reads
        self.attn = attn  # (size, q_size): the attention output the graphs read
        self.h = h  # (size, hidden): the final norm's output, held


def _unheld_view(a: cupy.ndarray, pool) -> cupy.ndarray:
    """a's memory seen through an array that does not keep it allocated (module NOTE), but
    keeps the pool it came from."""
    mem = cupy.cuda.UnownedMemory(a.data.ptr, a.nbytes, pool)
    return cupy.ndarray(a.shape, a.dtype, cupy.cuda.MemoryPointer(mem, 0))
