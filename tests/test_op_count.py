"""How many ops one transformer layer calls (issue 12: fewer launches per decode layer).

Counted on the numpy backend through a recording wrapper, so CI holds the count. On the cuda
backend each op is one kernel launch except where noted; a Qwen3 decode layer at batch 1
(CUDA graphs, split attention) launches:

    before (11 ops, 12 kernels)               after (5 ops, 7 kernels)
    add_rms_norm, linear qkv (cuBLAS)         add_rms_norm_linear     (gemv.cu: add + norm + GEMV)
    qk_norm, rope, write_kv_cache             qk_norm_rope_kv_write   (qk_rope_kv.cu)
    attention             (decode + reduce)   attention               (decode + reduce)
    linear o              (cuBLAS)            linear o                (gemv.cu, M <= 8)
    add_rms_norm, linear gate_up (cuBLAS)     mlp: gate_up GEMV with the add + norm before it
    silu_and_mul, linear down (cuBLAS)             and the SiLU-and-mul on its output; down GEMV

Llama-3-8B shapes launch 6 (issue 12's first count there was 9: its gate_up's norm and the SiLU
ran as their own kernels; then 7): with no q/k norm and no qkv bias, a decode step's RoPE and KV
write run inside the attention's decode kernel (attention(rope=...), where folds_rope says so).
cuBLAS may itself launch two kernels for one GEMM (split-K + reduction); the GEMV never does.
Where cuda_gemv.py's rule says a fusion does not pay (more rows) the ops fall back to the unfused
kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.executor.ops import AttentionMetadata
from engine.executor.ops.numpy_ops import NumpyOps
from engine.executor.transformer import Transformer
from engine.model.config import ModelConfig
from engine.model.loader import dummy_weights

# all_reduce (and gather_vocab after the LM head) are identities on one rank: no launch; under
# tensor parallelism they are the collectives (engine/executor/tensor_parallel.py).
LAYER_OPS = ["add_rms_norm_linear", "qk_norm_rope_kv_write", "attention", "linear", "all_reduce",
             "mlp", "all_reduce"]
FOLDED_LAYER_OPS = [op for op in LAYER_OPS if op != "qk_norm_rope_kv_write"]  # Llama's


class RecordingOps:
    """NumpyOps with every method call appended to `calls` by name."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call


def _decode_step(arch: str, **overrides):
    config = ModelConfig(arch, 64, 64, 128, 3, 4, 2, 16, max_position_embeddings=256,
                         **overrides)
    ops = RecordingOps(NumpyOps())
    model = Transformer(config, dummy_weights(config, NumpyOps(), seed=0), ops, 64)
    cache = ops.inner.alloc_kv_cache(3, 8, 2, 4, 16)
    tables = np.arange(8, dtype=np.int32).reshape(2, 4)
    meta = AttentionMetadata(np.array([5, 21], np.int32), np.arange(3, dtype=np.int32),
                             np.array([6, 6], np.int32), tables, 1, 6)
    ops.calls.clear()
    logits = model.forward(np.array([3, 9], np.int32), np.array([5, 5], np.int32), cache, meta,
                           np.arange(2, dtype=np.int32))
    return ops.calls, logits, config


@pytest.mark.parametrize("arch,overrides", [
    ("Qwen3ForCausalLM", {"qk_norm": True}),
    ("Qwen2ForCausalLM", {"attention_bias": True}),
    ("LlamaForCausalLM", {}),
])
def test_ops_per_decode_layer(arch, overrides):
    calls, logits, config = _decode_step(arch, **overrides)
    folded = not overrides  # no q/k norm, no bias: RoPE and the KV write go into attention
    assert calls[:2] == (["embedding", "folds_rope"] if folded else ["embedding",
                                                                      "add_rms_norm_linear"])
    calls = [c for c in calls if c != "folds_rope"]  # asked once a step; launches nothing
    assert calls[-4:] == ["add_rms_norm", "gather_rows", "linear", "gather_vocab"]
    layers = calls[1:-4]
    layer_ops = FOLDED_LAYER_OPS if folded else LAYER_OPS
    assert len(layers) == len(layer_ops) * config.num_layers, layers
    for i in range(config.num_layers):
        assert layers[i * len(layer_ops) : (i + 1) * len(layer_ops)] == layer_ops
    assert logits.shape == (2, 64) and np.isfinite(logits).all()


def test_mlp_is_the_composition_of_the_unfused_ops():
    rng = np.random.default_rng(0)
    ops = NumpyOps()
    x, res = rng.standard_normal((2, 2, 16)).astype(np.float32)
    nw = rng.standard_normal(16).astype(np.float32)
    gate_up, down = rng.standard_normal((2, 24, 16)).astype(np.float32)
    y, new_res = ops.mlp(x, res, nw, 1e-6, gate_up, down[:16, :12])
    h = ops.rms_norm(x + res, nw, 1e-6)
    g, u = np.split(h @ gate_up.T, 2, axis=1)
    np.testing.assert_allclose(y, (g / (1 + np.exp(-g)) * u) @ down[:16, :12].T, rtol=1e-5)
    np.testing.assert_array_equal(new_res, x + res)


def test_fused_op_is_the_composition_of_the_unfused_ones():
    """qk_norm_rope_kv_write (with bias and norms) == + bias, qk_norm, rope, write_kv_cache."""
    from engine.executor.transformer import rope_cos_sin

    rng = np.random.default_rng(0)
    ops = NumpyOps()
    nh, nkv, hd, bs = 4, 2, 16, 4
    cfg = ModelConfig("Qwen3ForCausalLM", 10, 64, 64, 1, nh, nkv, hd)
    cos_sin = rope_cos_sin(cfg, 32)
    qkv = rng.standard_normal((3, (nh + 2 * nkv) * hd)).astype(np.float32)
    bias, qw, kw = (rng.standard_normal(n).astype(np.float32) for n in (qkv.shape[1], hd, hd))
    pos, slots = np.array([0, 7, 31], np.int32), np.array([2, -1, 13], np.int32)
    caches = [np.zeros((4, nkv, bs, hd), np.float32) for _ in range(4)]
    fused = qkv.copy()
    ops.qk_norm_rope_kv_write(fused, pos, cos_sin, qw, kw, 1e-6, caches[0], caches[1], slots,
                              nh, nkv, bias=bias)
    want = qkv + bias
    ops.qk_norm(want, qw, kw, 1e-6, nh, nkv)
    ops.rope(want, pos, cos_sin, nh, nkv)
    ops.write_kv_cache(want, caches[2], caches[3], slots, nh, nkv)
    np.testing.assert_array_equal(fused, want)
    np.testing.assert_array_equal(caches[0], caches[2])
    np.testing.assert_array_equal(caches[1], caches[3])
    assert np.any(caches[0][0, :, 2] != 0) and not np.any(caches[0][1])  # slot -1 stored nothing


def test_decode_step_without_logits_indices_skips_the_gather():
    """CUDA graphs pass None (every row samples): same logits, one launch fewer."""
    calls, logits, config = _decode_step("Qwen3ForCausalLM", qk_norm=True)
    ops = RecordingOps(NumpyOps())
    model = Transformer(config, dummy_weights(config, NumpyOps(), seed=0), ops, 64)
    cache = ops.inner.alloc_kv_cache(3, 8, 2, 4, 16)
    meta = AttentionMetadata(np.array([5, 21], np.int32), np.arange(3, dtype=np.int32),
                             np.array([6, 6], np.int32),
                             np.arange(8, dtype=np.int32).reshape(2, 4), 1, 6)
    ops.calls.clear()
    got = model.forward(np.array([3, 9], np.int32), np.array([5, 5], np.int32), cache, meta, None)
    assert "gather_rows" not in ops.calls and len(ops.calls) == len(calls) - 1
    np.testing.assert_array_equal(got, logits)
