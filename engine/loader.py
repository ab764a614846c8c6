"""Weights: from safetensors checkpoints, GGUF files, or random ("dummy") at a config's shapes."""

from __future__ import annotations

import numpy as np

from engine.config import ModelConfig
from engine.model import LayerWeights, ModelWeights


def dummy_weights(config: ModelConfig, ops, seed: int = 0) -> ModelWeights:
    """Random weights at the model's shapes (benchmarks and tests without a checkpoint).

    Matrices are N(0, 0.02) like HF's initializer; norms are ones, so activations stay finite.
    """
    rng = np.random.default_rng(seed)
    c = config
    h, i = c.hidden_size, c.intermediate_size

    def rand(*shape):
        return ops.random_weight(shape, 0.02, rng)

    layers = [
        LayerWeights(
            input_norm=ops.ones((h,)),
            qkv=rand(c.q_size + 2 * c.kv_size, h),
            qkv_bias=rand(c.q_size + 2 * c.kv_size) if c.attention_bias else None,
            q_norm=ops.ones((c.head_dim,)) if c.qk_norm else None,
            k_norm=ops.ones((c.head_dim,)) if c.qk_norm else None,
            o=rand(h, c.q_size),
            post_norm=ops.ones((h,)),
            gate_up=rand(2 * i, h),
            down=rand(h, i),
        )
        for _ in range(c.num_layers)
    ]
    embed = rand(c.vocab_size, h)
    lm_head = embed if c.tie_word_embeddings else rand(c.vocab_size, h)
    return ModelWeights(embed=embed, layers=layers, norm=ops.ones((h,)), lm_head=lm_head)
