"""The transformer, written once against the op interface (engine/executor/ops/__init__.py).

Llama, Mistral, Qwen2 and Qwen3 differ only in switches of ModelConfig: q/k/v bias (Qwen2),
per-head q/k RMSNorm (Qwen3), llama3 RoPE scaling, tied embeddings. Weights arrive already fused
(q/k/v into one matrix, gate/up into another) so each layer runs four matrix products.
Under tensor parallelism each rank runs this on its slice of the weights (tensor_parallel.py); the
ops' all_reduce and gather_vocab join the slices, and are identities on one rank.
"""

from __future__ import annotations

import math

import numpy as np

from engine.executor.ops import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.weights import ModelWeights


def rope_cos_sin(config: ModelConfig, max_positions: int) -> np.ndarray:
    """(max_positions, head_dim) float32: cos of each rotary frequency, then its sin."""
    half = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / config.head_dim)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1's frequency rescaling: long wavelengths slowed by `factor`, short ones kept,
    a smooth blend between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(
        wavelen > old_len / low,
        inv_freq / factor,
        np.where(wavelen < old_len / high, inv_freq, blended),
    )


# ----------------------------------------------------------------------------- forward


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, ops, max_positions: int):
        self.config = config
        self.weights = weights
        self.ops = ops
        self.cos_sin = ops.from_host(rope_cos_sin(config, max_positions))  # (max_pos, head_dim)
        self.scale = config.head_dim**-0.5

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata, logits_indices):
        """Logits for the rows in logits_indices (None: every row, as in a decode-only step),
        after writing every new token's k/v to the cache.

        input_ids (T,) int32, positions (T,) int32, kv_cache (layers, 2, blocks, kv_heads,
        block_size, head_dim), logits_indices (R,) int32 -> logits (R, vocab), float32 on numpy
        and the compute dtype on cuda
        """
        c = self.config
        x = self.ops.embedding(input_ids, self.weights.embed)  # (T, hidden)
        residual = None
        fold = self.rope_in_attention(meta)
        rope = (positions, self.cos_sin) if fold else None
        for i in range(len(self.weights.layers)):
            k_cache, v_cache = kv_cache[i, 0], kv_cache[i, 1]
            qkv, residual = self.attention_inputs(i, x, residual, positions, k_cache, v_cache,
                                                  meta.slot_mapping, rope=not fold)
            attn = self.ops.attention(qkv, k_cache, v_cache, meta, c.num_heads, c.num_kv_heads,
                                      self.scale, rope=rope)  # (T, q_size)
            x, residual = self.layer_output(i, attn, residual)
        return self.logits(self.final_norm(x, residual), logits_indices)

    def rope_in_attention(self, meta) -> bool:
        """Whether this step leaves RoPE and the k/v cache write to the attention (ops.folds_rope:
        decode-only steps: the cuda backend's mma decode kernel does them, one launch a layer
        fewer, and the numpy twin does the same); not with q/k norms or a qkv bias, which the
        attention does not do."""
        c = self.config
        return (not c.qk_norm and self.weights.layers[0].qkv_bias is None
                and self.ops.folds_rope(meta, c.num_heads, c.num_kv_heads))

    # The layer, cut at attention: mixed_graphs.py replays the parts between two attentions as
    # CUDA graphs and runs the attention itself eagerly.

    def attention_inputs(self, i: int, x, residual, positions, k_cache, v_cache, slot_mapping,
                         rope: bool = True):
        """Layer i up to its attention: (qkv (T, q_size + 2 * kv_size), residual (T, hidden)),
        every new token's k and v written to the cache (rope False: qkv straight from its GEMM,
        for an attention that does RoPE and the write itself)."""
        ops, c, layer = self.ops, self.config, self.weights.layers[i]
        # residual += x, RMSNorm, qkv GEMM: one GEMV launch on the GPU at decode batches
        qkv, residual = ops.add_rms_norm_linear(x, residual, layer.input_norm, c.rms_norm_eps,
                                                layer.qkv)
        if not rope:
            return qkv, residual
        # bias, q/k norm, RoPE and the cache write: one kernel on the GPU
        ops.qk_norm_rope_kv_write(
            qkv, positions, self.cos_sin, layer.q_norm if c.qk_norm else None,
            layer.k_norm if c.qk_norm else None, c.rms_norm_eps, k_cache, v_cache, slot_mapping,
            c.num_heads, c.num_kv_heads, bias=layer.qkv_bias)
        return qkv, residual

    def layer_output(self, i: int, attn, residual):
        """Layer i from its attention's output (T, q_size): (x, residual), each (T, hidden)."""
        ops, c, layer = self.ops, self.config, self.weights.layers[i]
        # defer_sum: o's and down's products may stay in split-K partial sums, which the next
        # add + RMSNorm (mlp's, the next layer's or the final one) reduces in its own launch
        x = ops.all_reduce(ops.linear(attn, layer.o, defer_sum=True))  # summed over ranks
        # residual += x, RMSNorm, gate_up, SiLU-and-mul, down: two GEMVs at batch 1
        x, residual = ops.mlp(x, residual, layer.post_norm, c.rms_norm_eps, layer.gate_up,
                              layer.down, defer_sum=True)
        return ops.all_reduce(x), residual  # summed over ranks

    def final_norm(self, x, residual):
        """(T, hidden): the last residual add and the model's RMSNorm."""
        return self.ops.add_rms_norm(x, residual, self.weights.norm, self.config.rms_norm_eps)[0]

    def logits(self, h, logits_indices):
        """(R, vocab) logits of the rows of h (T, hidden) in logits_indices (None: all)."""
        ops = self.ops
        if logits_indices is not None:  # None saves a launch when every row samples
            h = ops.gather_rows(h, logits_indices)  # (R, hidden): only the rows that sample
        # (R, vocab): with tensor parallelism each rank's vocabulary slice, joined on rank 0
        # (None on the other ranks)
        return ops.gather_vocab(ops.linear(h, self.weights.lm_head))
