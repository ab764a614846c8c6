"""engine/model/gguf_dot.py, the twin of cuda/gguf_dp4a.cu: x's int8 quantization and the
regrouped products (GPU side: tests/test_cuda_gguf_dp4a.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from engine.model import gguf_dot, gguf_quants
from engine.model.quantized import QuantizedWeight, dequantize


def test_quantize_x_rounds_half_to_even_and_keeps_zero_blocks():
    x = np.zeros((2, 64), np.float32)
    x[0, :32] = 0.5  # amax 1: 0.5 * 127 = 63.5 -> 64 (even), 1.5 / 2 * 127 = 95.25 -> 95
    x[0, 0], x[0, 1], x[0, 2] = -1.0, 1.0 / 127 * 2.5, 0.75
    x[1, 32:] = np.linspace(-3, 2, 32)
    q, dx, sums = gguf_dot.quantize_x(x)
    assert q.dtype == np.int8 and dx.dtype == np.float32 and sums.dtype == np.int32
    assert q[0, 0] == -127 and q[0, 1] == 2 and q[0, 2] == 95 and q[0, 3] == 64
    assert dx[0, 0] == np.float32(1) / np.float32(127)
    assert not q[0, 32:].any() and dx[0, 1] == 0 and not q[1, :32].any()
    assert q[1, 32] == -127 and abs(int(q[1, 63])) < 127
    np.testing.assert_array_equal(sums, q.reshape(2, 2, 32).astype(np.int32).sum(-1))


def test_a_nan_or_inf_in_x_makes_its_group_and_row_nan():
    """A group holding a NaN (an inf): dx NaN (inf), q 0, and every product of the row NaN, as
    the float product's; q was the int8 cast of NaN (undefined: numpy warned), and the cuda
    kernel's max dropped the NaN (tests/test_cuda_gguf_dp4a.py)."""
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    x[0, 3], x[1, 40] = np.nan, np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cast of NaN to int8
        q, dx, sums = gguf_dot.quantize_x(x)
    assert np.isnan(dx[0, 0]) and dx[1, 1] == np.inf and np.isfinite(dx[[0, 1, 2], [1, 0, 0]]).all()
    assert not q[0, :32].any() and not q[1, 32:].any() and sums[0, 0] == sums[1, 1] == 0
    w = QuantizedWeight("Q8_0", (5, 64), gguf_quants.random_blocks(
        "Q8_0", (5, 64), 0.02, np.random.default_rng(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inf * 0
        y = gguf_dot.linear(x, w)
    assert np.isnan(y[:2]).all() and np.isfinite(y[2]).all()


def test_quantize_x_error_is_half_a_step():
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32) * 4
    q, dx, _ = gguf_dot.quantize_x(x)
    assert np.abs(q.astype(np.int32)).max() == 127
    back = q.reshape(3, 8, 32) * dx[..., None]
    assert np.all(np.abs(back - x.reshape(3, 8, 32)) <= dx[..., None] * 0.5001)


@pytest.mark.parametrize("kind", gguf_dot.KINDS)
def test_linear_is_the_dequantized_weight_times_the_quantized_x(kind):
    """The regrouped integer products are exact: only float32 summation order differs from the
    plain product of the two dequantized operands."""
    rng = np.random.default_rng(1)
    cols = 4 * gguf_quants.BLOCKS[kind][0]
    w = QuantizedWeight(kind, (19, cols), gguf_quants.random_blocks(
        kind, (19, cols), 0.02, rng, random_scales=True))
    x = rng.standard_normal((2, 3, cols)).astype(np.float32)
    q, dx, _ = gguf_dot.quantize_x(x.reshape(6, cols))
    xq = (q.reshape(6, -1, 32) * dx[..., None].astype(np.float64)).reshape(6, cols)
    want = (xq @ dequantize(w).astype(np.float64).T).reshape(2, 3, 19)
    got = gguf_dot.linear(x, w)
    assert got.shape == (2, 3, 19) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    exact = x @ dequantize(w).T
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 2e-2


def test_linear_names_kinds_it_does_not_have():
    w = QuantizedWeight("Q5_K", (1, 256), np.zeros((1, 176), np.uint8))
    with pytest.raises(ValueError, match="Q5_K"):
        gguf_dot.linear(np.ones((1, 256), np.float32), w)
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_dot.quantize_x(np.ones((1, 48), np.float32))


def test_the_lm_head_keeps_x_unquantized(monkeypatch):
    """gguf_dot.lm_head marks it (the loaders call it); the numpy backend then multiplies x as it
    is, unless PAGEDSERVE_GGUF_INT8_LM_HEAD (INT8_LM_HEAD)."""
    from engine.executor.ops.numpy_ops import NumpyOps
    from engine.model.config import ModelConfig
    from engine.model.gguf_weights import dummy_quantized_weights

    config = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=256,
                         intermediate_size=512, num_layers=1, num_heads=4, num_kv_heads=2,
                         head_dim=64)
    ops = NumpyOps()
    w = dummy_quantized_weights(config, ops, "Q8_0")
    assert not w.lm_head.quantize_x and w.layers[0].down.quantize_x
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    np.testing.assert_array_equal(ops.linear(x, w.lm_head), x @ dequantize(w.lm_head).T)
    assert not gguf_dot.quantizes_x(w.lm_head) and gguf_dot.quantizes_x(w.layers[0].o)
    monkeypatch.setattr(gguf_dot, "INT8_LM_HEAD", True)
    assert gguf_dot.lm_head(w.lm_head).quantize_x
    np.testing.assert_array_equal(ops.linear(x, w.lm_head), gguf_dot.linear(x, w.lm_head))
