"""The weights of one model, as the loaders hand them to the transformer.

Arrays are on the backend's device (the loaders upload each with ops.from_host as they read it),
or QuantizedWeight for blocks kept quantized. Q/K/V arrive fused into one matrix and gate/up into
another, so each layer runs four matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayerWeights:
    input_norm: object  # (hidden,)
    qkv: object  # (q_size + 2 * kv_size, hidden), rows: q heads, k heads, v heads
    qkv_bias: object | None  # (q_size + 2 * kv_size,) Qwen2 only
    q_norm: object | None  # (head_dim,) Qwen3 only
    k_norm: object | None  # (head_dim,) Qwen3 only
    o: object  # (hidden, q_size)
    post_norm: object  # (hidden,)
    gate_up: object  # (2 * intermediate, hidden), rows: gate, then up
    down: object  # (hidden, intermediate)


@dataclass
class ModelWeights:
    embed: object  # (vocab, hidden)
    layers: list[LayerWeights]
    norm: object  # (hidden,)
    lm_head: object  # (vocab, hidden); the same array as embed when tied
