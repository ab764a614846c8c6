"""The numpy backend: the readable fp32 reference for every op.

It reads and writes the same paged KV layout as the cuda backend (ops/__init__.py), so the
tests hold each cuda kernel to the function of the same name here.
"""

from __future__ import annotations

import mmap
import time

import numpy as np

from engine.executor.ops import AttentionMetadata, SamplerOutput, SamplingTensors
from engine.executor.ops.numpy_sampling import TokenCounts, sample
from engine.model import (
    fp8,
    gguf_dot,
    gguf_quants,  # noqa: F401  (registers the GGUF formats' dequantization)
)
from engine.model.quantized import QuantizedWeight, dequantize

ATTENTION_ROWS = 256  # new queries of a sequence whose scores attention() computes at once


def _large_empty(shape: tuple) -> np.ndarray:
    """An uninitialized float32 array in anonymous memory advised for huge pages (Linux), else
    np.empty. The array holds the mapping: it is unmapped when the array goes."""
    nbytes = int(np.prod(shape)) * 4
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes == 0:
        return np.empty(shape, np.float32)
    region = mmap.mmap(-1, nbytes)
    try:
        region.madvise(advice)
    except OSError:  # a kernel without transparent huge pages: 4 KiB pages it is
        pass
    return np.frombuffer(region, np.float32).reshape(shape)


class NumpyOps:
    name = "numpy"
    dtype = "float32"

    @staticmethod
    def is_fatal(error: BaseException) -> bool:
        """Whether `error` leaves the backend unusable: never on the CPU."""
        return False

    def close(self) -> None:
        """Nothing to release: numpy arrays go with their last reference."""

    # ---------------------------------------------------------------- memory

    def check_model(self, config) -> None:
        """The reference runs every shape the model code knows."""

    def from_host(self, array: np.ndarray) -> np.ndarray:
        """A weight or buffer on this backend (fp32 for floats, int32 kept; a QuantizedWeight
        as it is)."""
        if isinstance(array, QuantizedWeight):
            return array
        if array.dtype.kind == "f":
            return np.ascontiguousarray(array, dtype=np.float32)
        return np.ascontiguousarray(array)

    def to_host(self, array) -> np.ndarray:
        return np.asarray(array)

    def quantize_fp8(self, weight: np.ndarray) -> QuantizedWeight:
        """(out, in) weight -> E4M3 codes with per-output-channel scales (engine/model/fp8.py)."""
        return fp8.quantize_weight(weight)

    def random_weight(self, shape: tuple, std: float, rng: np.random.Generator) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    def ones(self, shape: tuple) -> np.ndarray:
        return np.ones(shape, np.float32)

    def alloc_kv_cache(self, num_layers, num_blocks, num_kv_heads, block_size, head_dim):
        # (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim): [l, 0] keys, [l, 1] vals
        shape = (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim)
        # np.zeros maps pages lazily, so RSS would grow as the allocator first walks the pool and
        # look like a leak; writing every page now makes the cache resident from the start. In
        # 2 MiB pages where Linux gives them (anonymous memory advised MADV_HUGEPAGE): a 2-core
        # machine faulted the default model's 1 GiB cache in 0.43 s instead of 2.7 s in 4 KiB pages.
        kv_cache = _large_empty(shape)
        kv_cache.fill(0.0)
        return kv_cache

    def kv_bytes_per_token(self, num_layers, num_kv_heads, head_dim) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * 4

    def copy_blocks(self, kv_cache: np.ndarray, copies: list[tuple[int, int]]) -> None:
        """kv_cache[:, :, dst] = kv_cache[:, :, src] for every (src, dst), every layer, k and v."""
        src, dst = np.array(copies, np.int64).reshape(-1, 2).T
        kv_cache[:, :, dst] = kv_cache[:, :, src]

    # ---------------------------------------------------------------- layers

    def embedding(self, ids: np.ndarray, table: np.ndarray) -> np.ndarray:
        # ids (T,) int32, table (vocab, hidden) -> (T, hidden)
        if isinstance(table, QuantizedWeight):
            return self._quantized_embedding(ids, table)
        return table[ids]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        # x (T, hidden), weight (hidden,)
        variance = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(variance + eps) * weight

    def add_rms_norm(self, x, residual, weight, eps):
        """residual += x; return (rms_norm(residual), residual). residual=None starts the stream."""
        residual = x.copy() if residual is None else residual + x
        return self.rms_norm(residual, weight, eps), residual

    def add_rms_norm_linear(self, x, residual, norm_weight, eps, weight):
        """add_rms_norm, then linear of its output: (y, residual). The cuda backend runs it as
        one GEMV at small batches (cuda/gemv.cu's gemv_kernel with NORM)."""
        h, residual = self.add_rms_norm(x, residual, norm_weight, eps)
        return self.linear(h, weight), residual

    def linear(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
               defer_sum: bool = False):
        # x (T, in), weight (out, in) as stored by HF, bias (out,) -> (T, out). defer_sum: the
        # cuda backend may hand back a product still in split-K partial sums, which only the ops
        # that start with add_rms_norm take; here the product is always whole.
        if isinstance(weight, QuantizedWeight) and weight.kind == "fp8":
            return _fp8_linear(x, weight, bias)
        if gguf_dot.quantizes_x(weight):
            y = gguf_dot.linear(x, weight)  # x quantized to int8, as cuda/gguf_dp4a.cu does
            return y if bias is None else y + bias
        if isinstance(weight, QuantizedWeight):
            weight = self._quantized_matrix(weight)
        y = x @ weight.T
        return y if bias is None else y + bias

    def _quantized_matrix(self, weight: QuantizedWeight) -> np.ndarray:
        """(out, in) float32 of a weight kept quantized: dequantized on every call (speed is not
        this backend's job; holding float copies would undo the memory saving)."""
        return dequantize(weight)

    def _quantized_embedding(self, ids: np.ndarray, table: QuantizedWeight) -> np.ndarray:
        """Only the looked-up rows are dequantized (every format quantizes row by row)."""
        scale = None if table.scale is None else np.asarray(table.scale)[ids]
        rows = QuantizedWeight(table.kind, (len(ids), table.shape[1]),
                               np.asarray(table.data)[ids], scale)
        return dequantize(rows)

    def qk_norm(self, qkv, q_weight, k_weight, eps, num_heads, num_kv_heads):
        """Per-head RMSNorm of the q and k heads of qkv, in place (Qwen3)."""
        head_dim = q_weight.shape[0]
        q, k, _ = _split_heads(qkv, num_heads, num_kv_heads, head_dim)
        q[...] = self.rms_norm(q, q_weight, eps)
        k[...] = self.rms_norm(k, k_weight, eps)

    def rope(self, qkv, positions, cos_sin, num_heads, num_kv_heads):
        """Rotate q and k heads of qkv in place, HF's half-split convention.

        cos_sin (max_positions, head_dim): cos of the head_dim/2 frequencies, then their sin.
        """
        head_dim = cos_sin.shape[1]
        half = head_dim // 2
        cos = cos_sin[positions, :half][:, None, :]  # (T, 1, half)
        sin = cos_sin[positions, half:][:, None, :]
        q, k, _ = _split_heads(qkv, num_heads, num_kv_heads, head_dim)
        for x in (q, k):
            x1, x2 = x[..., :half].copy(), x[..., half:].copy()
            x[..., :half] = x1 * cos - x2 * sin
            x[..., half:] = x2 * cos + x1 * sin

    def qk_norm_rope_kv_write(self, qkv, positions, cos_sin, q_weight, k_weight, eps, k_cache,
                              v_cache, slot_mapping, num_heads, num_kv_heads, bias=None):
        """Everything between the qkv GEMM and attention, in place on qkv: + bias (if any), q/k
        norm (if weights are given), RoPE on q and k, then k and v into the cache at their slots.
        The cuda backend runs it as one kernel (cuda/qk_rope_kv.cu)."""
        if bias is not None:
            qkv += bias
        if q_weight is not None:
            self.qk_norm(qkv, q_weight, k_weight, eps, num_heads, num_kv_heads)
        self.rope(qkv, positions, cos_sin, num_heads, num_kv_heads)
        self.write_kv_cache(qkv, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)

    def silu_and_mul(self, gate_up: np.ndarray) -> np.ndarray:
        # gate_up (T, 2 * inter): gate first, then up -> (T, inter)
        gate, up = np.split(gate_up, 2, axis=-1)
        return gate / (1.0 + np.exp(-gate)) * up

    def silu_mul_linear(self, gate_up: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """linear(silu_and_mul(gate_up), weight): the MLP's second half (mlp() calls it)."""
        return self.linear(self.silu_and_mul(gate_up), weight)

    def mlp(self, x, residual, norm_weight, eps, gate_up, down, defer_sum=False):
        """The MLP after attention: add_rms_norm_linear(x, residual, norm_weight, eps, gate_up),
        then silu_mul_linear(.., down) -> (y, residual). The cuda backend runs it as two GEMV
        launches at batch 1 (the SiLU-and-mul on the gate_up GEMV's output). defer_sum: as
        linear's (for down)."""
        gate_up_out, residual = self.add_rms_norm_linear(x, residual, norm_weight, eps, gate_up)
        return self.silu_mul_linear(gate_up_out, down), residual

    def gather_rows(self, x: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return x[indices]

    # ---------------------------------------------------------------- tensor parallel

    def all_reduce(self, x):
        """The sum over tensor-parallel ranks: one rank here (tensor_parallel.py has the N-rank
        version), so x itself."""
        return x

    def gather_vocab(self, logits):
        """Every rank's vocabulary columns side by side: one rank holds them all."""
        return logits

    # ---------------------------------------------------------------- attention

    def prepare_metadata(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The step's metadata as attention wants it; the cuda backend uploads it once here."""
        return meta

    def write_kv_cache(self, qkv, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads):
        """Store each new token's k and v heads at its slot; slot -1 means 'do not store'."""
        num_blocks, _, block_size, head_dim = k_cache.shape
        _, k, v = _split_heads(qkv, num_heads, num_kv_heads, head_dim)
        keep = slot_mapping >= 0
        blocks, offsets = np.divmod(slot_mapping[keep], block_size)
        k_cache[blocks, :, offsets] = k[keep]
        v_cache[blocks, :, offsets] = v[keep]

    def folds_rope(self, meta: AttentionMetadata, num_heads, num_kv_heads) -> bool:
        """Whether attention(rope=...) takes this step's RoPE and k/v cache write: decode-only
        steps, as on the cuda backend (whose mma decode kernel does them in its own launch)."""
        return meta.max_query_len == 1

    def attention(
        self, qkv, k_cache, v_cache, meta: AttentionMetadata, num_heads, num_kv_heads, scale,
        rope=None,
    ):
        """Causal attention of every new query over its sequence's paged cache -> (T, q_size).
        rope (positions, cos_sin), where folds_rope said yes: first RoPE on a copy of q and k
        and k and v into the cache at meta.slot_mapping (qkv itself unchanged), as the cuda
        backend's decode kernel does in the same launch.

        A sequence's new queries go ATTENTION_ROWS at a time, each group against only the keys its
        last query sees: the scores stay a few MB however long the prompt, and the products are
        BLAS matrix products (a 6,000-token prompt: ~1 s a layer on one core, 17 s with a score
        square over the whole prompt)."""
        head_dim = k_cache.shape[-1]
        block_size = k_cache.shape[2]
        group = num_heads // num_kv_heads
        if rope is not None:
            qkv = qkv.copy()
            self.rope(qkv, rope[0], rope[1], num_heads, num_kv_heads)
            self.write_kv_cache(qkv, k_cache, v_cache, meta.slot_mapping, num_heads, num_kv_heads)
        q, _, _ = _split_heads(qkv, num_heads, num_kv_heads, head_dim)
        out = np.empty(q.shape, np.float32)  # (T, num_heads, head_dim)
        for s in range(len(meta.context_lens)):
            start, end = meta.query_start_loc[s], meta.query_start_loc[s + 1]
            num_new, ctx = end - start, int(meta.context_lens[s])
            blocks = meta.block_tables[s, : -(-ctx // block_size)]
            # (num_kv_heads, 1, ctx, head_dim): the sequence's cache, gathered through its block
            # table (the 1 broadcasts over a kv head's group of query heads)
            k, v = (c[blocks].transpose(1, 0, 2, 3).reshape(num_kv_heads, 1, -1, head_dim)
                    [:, :, :ctx] for c in (k_cache, v_cache))
            # (num_kv_heads, group, num_new, head_dim)
            qs = q[start:end].reshape(num_new, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)
            for r0 in range(0, num_new, ATTENTION_ROWS):
                r1 = min(num_new, r0 + ATTENTION_ROWS)
                pos = ctx - num_new + np.arange(r0, r1)  # the queries' positions
                keys = int(pos[-1]) + 1
                scores = np.matmul(qs[:, :, r0:r1], k[:, :, :keys].swapaxes(-1, -2)) * scale
                if r1 - r0 > 1:  # (a single query sees every key)
                    scores[..., np.arange(keys)[None, :] > pos[:, None]] = -np.inf
                scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
                scores /= scores.sum(axis=-1, keepdims=True)
                o = np.matmul(scores, v[:, :, :keys])  # (num_kv_heads, group, rows, head_dim)
                out[start + r0:start + r1] = o.transpose(2, 0, 1, 3).reshape(
                    r1 - r0, num_heads, head_dim)
        return out.reshape(len(q), num_heads * head_dim)

    # ---------------------------------------------------------------- sampling

    def sample(self, logits: np.ndarray, tensors: SamplingTensors) -> SamplerOutput:
        # logits (R, vocab) float32
        return self.sample_start(logits, tensors).wait()

    def sample_start(self, logits: np.ndarray, tensors: SamplingTensors,
                     prev_sampled: np.ndarray | None = None) -> ReadySample:
        """Sample now (numpy has no device to wait for); `prev_sampled` resolves placeholders
        among the penalties' output ids and the rows' previous tokens (step_inputs.placeholder)."""
        if prev_sampled is not None:
            for name in ("output_ids", "last_ids"):
                ids = getattr(tensors, name)
                if ids is not None:
                    setattr(tensors, name, ids.copy())
                    resolve_placeholders(getattr(tensors, name).reshape(-1), prev_sampled)
        return ReadySample(sample(np.asarray(logits, np.float32), tensors))

    def alloc_token_counts(self, num_slots: int, vocab: int) -> TokenCounts:
        """The per-sequence token counts that penalties read between steps."""
        return TokenCounts(num_slots, vocab)

    def resolve_placeholders(self, ids: np.ndarray, prev_sampled: np.ndarray) -> None:
        resolve_placeholders(ids, prev_sampled)

    def record_event(self) -> float:
        """A point in time of this backend's device, the CPU: steps run as they are launched."""
        return time.perf_counter()

    def wait_event(self, event: float) -> None:
        pass

    def elapsed_s(self, start: float, end: float) -> float:
        return end - start

    def bitmask_buffer(self, rows: int, words: int) -> np.ndarray:
        """A host array for a step's token bitmask, to be filled and then given to
        apply_token_bitmask (the cuda backend hands out its pinned staging buffer)."""
        return np.empty((rows, words), np.int32)

    def apply_token_bitmask(self, logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
        """Disallowed tokens' logits -> -inf, in place; returns `logits`.
        logits (R, vocab) float32; bitmask (R, ceil(vocab / 32)) int32, bit j of word w set when
        token 32 * w + j is allowed (llguidance's packing)."""
        vocab = logits.shape[1]
        # Little-endian words: byte k of word w holds tokens 32w + 8k .. 32w + 8k + 7, low bit 1st.
        allowed = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1,
                                bitorder="little")[:, :vocab]  # (R, vocab) uint8
        logits[allowed == 0] = -np.inf
        return logits

    def synchronize(self):
        pass


class ReadySample:
    """sample_start's answer: on numpy the ids are known at once."""

    __slots__ = ("out",)

    def __init__(self, out: SamplerOutput):
        self.out = out

    @property
    def token_ids(self) -> np.ndarray:
        """(R,) int32: what the next step's placeholders read."""
        return self.out.token_ids

    def wait(self) -> SamplerOutput:
        return self.out


def resolve_placeholders(ids: np.ndarray, sampled: np.ndarray) -> None:
    """In place: each id <= -2 becomes sampled[-2 - id] (column 0 if `sampled` is (R, W))."""
    # ids (N,) int32, sampled (R,) or (R, W) int32
    held = ids <= -2
    if held.any():
        column = sampled if sampled.ndim == 1 else sampled[:, 0]
        ids[held] = column[-2 - ids[held]]


def _fp8_linear(x: np.ndarray, weight: QuantizedWeight, bias: np.ndarray | None):
    """W8A8 with per-token activation scales: the definition cuda/fp8.cu is held to."""
    y = fp8.fp8_linear(x, weight)
    return y if bias is None else y + bias


def _split_heads(qkv: np.ndarray, num_heads: int, num_kv_heads: int, head_dim: int):
    """Views (T, heads, head_dim) of the q, k and v parts of a fused qkv row."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    t = len(qkv)
    q = qkv[:, :q_size].reshape(t, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].reshape(t, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].reshape(t, num_kv_heads, head_dim)
    return q, k, v
