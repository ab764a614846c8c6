"""FP8 (E4M3) W8A8, numpy backend: the encoding against a hand table and ml_dtypes, the product
against a float reference within FP8's error bound, and tiny models run in FP8 against the same
models in fp32 (quantized at load, and loaded from an FP8 checkpoint written here)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import types

import numpy as np
import pytest
from conftest import GOLDEN_DIR, tiny_model_config, write_tiny_gguf
from test_golden import OneSequence
from test_loader import write_raw_safetensors

from engine.executor.ops.numpy_ops import NumpyOps
from engine.executor.transformer import Transformer
from engine.model import fp8
from engine.model.config import ConfigError, EngineConfig, ModelConfig
from engine.model.loader import (
    LoadError,
    SafetensorsFile,
    dummy_weights,
    load_model,
    load_safetensors_weights,
)
from engine.model.quantized import QuantizedWeight, dequantize

# E4M3 has 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of itself,
# a subnormal one (below 2^-6) by at most half the spacing 2^-9.
REL_STEP = 2.0**-4
SUB_STEP = 2.0**-10

# ----------------------------------------------------------------------------- encoding

HAND = [  # (code, value)
    (0x00, 0.0), (0x80, -0.0), (0x01, 2.0**-9), (0x07, 7 * 2.0**-9), (0x08, 2.0**-6),
    (0x38, 1.0), (0x39, 1.125), (0xB8, -1.0), (0x40, 2.0), (0x7E, 448.0), (0xFE, -448.0),
    (0x77, 240.0), (0x30, 0.5),
]


def test_decode_hand_table():
    for code, value in HAND:
        got = fp8.decode(np.array([code], np.uint8))[0]
        assert got == value and np.signbit(got) == np.signbit(value), hex(code)
    assert np.isnan(fp8.decode(np.array([0x7F, 0xFF], np.uint8))).all()
    assert np.isfinite(fp8.decode(np.arange(256, dtype=np.uint8))).sum() == 254


def test_encode_hand_table_rounding_and_saturation():
    cases = [
        (0.0, 0x00), (-0.0, 0x80), (2.0**-9, 0x01), (2.0**-10, 0x00),  # tie -> even (0)
        (3 * 2.0**-10, 0x02),  # tie between 1 and 2 (x 2^-9) -> even
        (0.99 * 2.0**-6, 0x08),  # rounds up into the smallest normal
        (1.0625, 0x38), (1.1875, 0x3A),  # ties: 1.0 (even) and 1.25 (even)
        (1.06, 0x38), (1.07, 0x39), (448.0, 0x7E), (463.9, 0x7E), (464.0, 0x7E), (470.0, 0x7E),
        (1e30, 0x7E), (np.inf, 0x7E), (-np.inf, 0xFE), (-1e9, 0xFE), (1e-30, 0x00),
    ]
    x = np.array([v for v, _ in cases], np.float32)
    assert fp8.encode(x).tolist() == [c for _, c in cases]
    assert fp8.encode(np.array([np.nan], np.float32))[0] == fp8.NAN_CODE


def test_encode_inverts_decode():
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    np.testing.assert_array_equal(fp8.encode(fp8.decode(codes)), codes)


def test_encode_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    codes = np.arange(256, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(fp8.decode(codes), ref)
    finite = np.sort(ref[np.isfinite(ref) & (ref >= 0)])
    mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)  # every tie
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * s
                        for s in (1e-3, 3e-2, 1.0, 60.0)] + [mids, -mids, finite])
    x = x[np.abs(x) <= 448]  # ml_dtypes turns overflow into NaN; we saturate (tested above)
    np.testing.assert_array_equal(fp8.encode(x), x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def test_quantize_rows_scales_and_error():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 200)).astype(np.float32) * np.float32([[1e-3], [1], [50], [1], [1],
                                                                          [1]])
    x[3] = 0  # all-zero row (padding): scale 1, codes 0
    x[4, 7] = -3e4  # one outlier sets the row's scale
    q, s = fp8.quantize_rows(x)
    absmax = np.abs(x).max(axis=1)
    np.testing.assert_array_equal(s, np.where(absmax == 0, 1, absmax / np.float32(448)))
    assert s.dtype == np.float32 and q.dtype == np.uint8
    assert (q[3] == 0).all()
    assert q[4, 7] == 0xFE  # the row's absmax encodes as -448 exactly
    back = fp8.decode(q) * s[:, None]
    assert (np.abs(back - x) <= np.maximum(REL_STEP * np.abs(x), SUB_STEP * s[:, None])).all()


def test_quantize_rows_tiny_row_is_nan_free():
    """A finite row so small that absmax / 448 is subnormal: 1 / s overflowed to inf and the
    row's zeros encoded as NaN (0 * inf), which the product spread over the token's outputs."""
    x = np.zeros((3, 64), np.float32)
    x[0, 3] = 1e-37  # s = 2.2e-40: 1 / s = inf
    x[1, 3], x[1, 5] = 2e-36, -1e-36  # s subnormal, 1 / s finite
    x[2] = 1.0
    q, s = fp8.quantize_rows(x)
    assert not np.isnan(fp8.decode(q)).any()
    np.testing.assert_array_equal(s, np.float32([1, 1, np.float32(1) / np.float32(448)]))
    w = fp8.quantize_weight(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))
    assert np.isfinite(fp8.fp8_linear(x, w)).all()
    assert np.isfinite(dequantize(fp8.quantize_weight(x))).all()


def test_quantize_rows_leaves_a_nan_out_of_the_scale():
    """As the kernels' fmaxf: a NaN is the NaN code and the rest of its row encodes as without
    it (np.max had made the scale NaN and every code of the row NaN; the product is NaN either
    way, but the codes are held to the kernels' bit for bit); a row of NaN only has scale 1."""
    x = np.random.default_rng(3).standard_normal((3, 32)).astype(np.float32)
    clean = x.copy()
    x[0, 5], x[2] = np.nan, np.nan
    q, s = fp8.quantize_rows(x)
    want_q, want_s = fp8.quantize_rows(np.where(np.isnan(x), 0, clean))
    assert s[0] == want_s[0] and s[2] == 1 and q[0, 5] == fp8.NAN_CODE
    np.testing.assert_array_equal(np.delete(q[0], 5), np.delete(want_q[0], 5))
    assert (q[2] == fp8.NAN_CODE).all()
    assert np.isnan(fp8.fp8_linear(x, fp8.quantize_weight(clean[:, :32]))[[0, 2]]).all()


def test_weight_format_and_dequantize():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    qw = fp8.quantize_weight(w)
    assert qw.kind == "fp8" and qw.shape == (16, 32) and qw.scale.shape == (16,)
    assert qw.nbytes == 16 * 32 + 16 * 4
    np.testing.assert_array_equal(dequantize(qw), fp8.decode(qw.data) * qw.scale[:, None])
    both = fp8.stack([qw, fp8.quantize_weight(w[:4])])
    assert both.shape == (20, 32) and both.scale.shape == (20,)


# ----------------------------------------------------------------------------- product


def test_fp8_linear_is_its_definition():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    qw = fp8.quantize_weight(rng.standard_normal((24, 64)).astype(np.float32))
    qx, sx = fp8.quantize_rows(x)
    exact = (fp8.decode(qx).astype(np.float64) @ fp8.decode(qw.data).T.astype(np.float64)
             * sx[:, None] * qw.scale[None, :])
    np.testing.assert_allclose(fp8.fp8_linear(x, qw), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_fp8_linear_within_fp8_error_of_float(scale):
    """|y - x w^T| <= sum_i ex_i (|w_i| + ew_i) + |x_i| ew_i, with ex, ew each element's rounding
    bound (2^-4 relative, or 2^-10 x the row scale below E4M3's normal range), plus fp32
    accumulation slack; and the typical relative error is a few percent."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((7, 256)) * scale).astype(np.float32)
    w = (rng.standard_normal((48, 256)) * 0.05).astype(np.float32)
    x[2, :10] *= 40  # outliers: other elements fall into subnormals
    qw = fp8.quantize_weight(w)
    y = fp8.fp8_linear(x, qw)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    _, sx = fp8.quantize_rows(x)
    ex = np.maximum(REL_STEP * np.abs(x), SUB_STEP * sx[:, None])
    ew = np.maximum(REL_STEP * np.abs(w), SUB_STEP * qw.scale[:, None])
    bound = ex @ (np.abs(w) + ew).T + np.abs(x) @ ew.T + 1e-5 * (np.abs(x) @ np.abs(w).T)
    assert (np.abs(y - ref) <= bound).all()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.05


def test_numpy_ops_dispatch_fp8():
    ops = NumpyOps()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    qw = ops.quantize_fp8(rng.standard_normal((8, 32)).astype(np.float32))
    assert ops.from_host(qw) is qw
    bias = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(ops.linear(x, qw, bias), fp8.fp8_linear(x, qw) + bias)
    gu = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(ops.silu_mul_linear(gu, qw),
                                  fp8.fp8_linear(ops.silu_and_mul(gu), qw))


# ----------------------------------------------------------------------------- tiny models


def quantized_copy(weights):
    """ModelWeights with every layer's four matrix products in FP8 (the rest shared)."""
    layers = [dataclasses.replace(layer, **{f: fp8.quantize_weight(getattr(layer, f))
                                            for f in ("qkv", "o", "gate_up", "down")})
              for layer in weights.layers]
    return dataclasses.replace(weights, layers=layers)


def golden_logits(weights, config, prompt):
    ops = NumpyOps()
    model = Transformer(config, weights, ops, max_positions=64)
    return OneSequence(model, ops, 16, len(prompt)).step(prompt)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_tiny_golden_model_fp8_logits_close(name, monkeypatch):
    """Tolerance: logits within 10% relative (Frobenius) of fp32's and no logit off by more than
    0.4 x their std (measured: 4.5-6.3% and 0.16-0.32: E4M3 rounds each operand by ~2.6% RMS, four
    products per layer); the top token agrees at >= 80% of positions."""
    monkeypatch.setattr(fp8, "LM_HEAD", False)
    folder = GOLDEN_DIR / name
    config = ModelConfig.from_pretrained(folder)
    weights = load_safetensors_weights(folder, config, NumpyOps())
    quantized = load_safetensors_weights(folder, config, NumpyOps(), quantization="fp8")
    assert isinstance(quantized.layers[0].qkv, QuantizedWeight)
    assert not isinstance(quantized.lm_head, QuantizedWeight)  # lm_head and embed stay float
    expected = np.load(folder / "expected.npz")
    want, got = [], []
    for i in range(3):
        want.append(golden_logits(weights, config, expected[f"prompt_{i}"]))
        got.append(golden_logits(quantized, config, expected[f"prompt_{i}"]))
    want, got = np.concatenate(want), np.concatenate(got)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1
    assert np.abs(got - want).max() < 0.4 * want.std()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_tiny_golden_model_fp8_lm_head(name, monkeypatch):
    """fp8.LM_HEAD: the lm_head in FP8 too (qwen2's is tied: a quantized copy, the embedding stays
    float). Measured: one more FP8 product moves the logits by 3.4% of the FP8-layers model's, 6.4-
    7.0% of fp32's in all (< the 10% above), the largest error 0.27-0.37 std; top token vs fp32 at
    >= 88% of positions, vs FP8 layers alone >= 97%."""
    folder = GOLDEN_DIR / name
    config = ModelConfig.from_pretrained(folder)
    weights = load_safetensors_weights(folder, config, NumpyOps())
    monkeypatch.setattr(fp8, "LM_HEAD", False)
    layers_only = load_safetensors_weights(folder, config, NumpyOps(), quantization="fp8")
    monkeypatch.setattr(fp8, "LM_HEAD", True)
    quantized = load_safetensors_weights(folder, config, NumpyOps(), quantization="fp8")
    assert isinstance(quantized.lm_head, QuantizedWeight)
    assert quantized.embed.dtype == np.float32
    np.testing.assert_array_equal(quantized.lm_head.data,
                                  fp8.quantize_weight(weights.lm_head).data)
    expected = np.load(folder / "expected.npz")
    want, base, got = [], [], []
    for i in range(3):
        prompt = expected[f"prompt_{i}"]
        want.append(golden_logits(weights, config, prompt))
        base.append(golden_logits(layers_only, config, prompt))
        got.append(golden_logits(quantized, config, prompt))
    want, base, got = np.concatenate(want), np.concatenate(base), np.concatenate(got)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1
    assert np.linalg.norm(got - base) / np.linalg.norm(base) < 0.05
    assert np.abs(got - want).max() < 0.45 * want.std()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85
    assert (got.argmax(-1) == base.argmax(-1)).mean() >= 0.95


def write_fp8_checkpoint(src, dst, per_tensor: bool = False):
    """The golden checkpoint with its linear weights stored as float8_e4m3fn + weight_scale
    (per output channel, or one per tensor), as FP8 checkpoints store them."""
    shutil.copytree(src, dst)
    st = SafetensorsFile(src / "model.safetensors")
    tensors = {}
    for name in st.tensors:
        array = np.ascontiguousarray(st.get(name), np.float32)
        if name.endswith("proj.weight"):
            if per_tensor:
                scale = np.float32(np.abs(array).max() / 448)
                data, scale = fp8.encode(array / scale), np.array([scale], np.float32)
            else:
                qw = fp8.quantize_weight(array)
                data, scale = qw.data, qw.scale[:, None]
            tensors[name] = ("F8_E4M3", array.shape, data.tobytes())
            tensors[name + "_scale"] = ("F32", scale.shape, scale.tobytes())
        else:
            tensors[name] = ("F32", array.shape, array.tobytes())
    write_raw_safetensors(dst / "model.safetensors", tensors)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_fp8_checkpoint_loads_as_stored(tmp_path):
    src = GOLDEN_DIR / "llama"
    folder = write_fp8_checkpoint(src, tmp_path / "fp8")
    loaded = load_model(str(folder), NumpyOps())
    assert loaded.config.quantization == "fp8"
    at_load = load_safetensors_weights(src, ModelConfig.from_pretrained(src), NumpyOps(),
                                       quantization="fp8")
    for a, b in zip(loaded.weights.layers, at_load.layers, strict=True):
        for field in ("qkv", "o", "gate_up", "down"):
            np.testing.assert_array_equal(getattr(a, field).data, getattr(b, field).data)
            np.testing.assert_array_equal(getattr(a, field).scale, getattr(b, field).scale)
    per_tensor = load_model(str(write_fp8_checkpoint(src, tmp_path / "t", per_tensor=True)),
                            NumpyOps()).weights.layers[0].qkv
    assert len(set(per_tensor.scale[:64].tolist())) == 1  # q_proj's one scale on each row
    np.testing.assert_allclose(dequantize(per_tensor), dequantize(at_load.layers[0].qkv),
                               rtol=0.15, atol=1e-3)


def test_fp8_checkpoint_errors(tmp_path):
    src = GOLDEN_DIR / "llama"
    cfg = json.loads((src / "config.json").read_text())
    for qc, words in (({"quant_method": "awq"}, "quant_method 'awq'"),
                      ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise")):
        with pytest.raises(ConfigError, match=words):
            ModelConfig.from_dict({**cfg, "quantization_config": qc})
    folder = write_fp8_checkpoint(src, tmp_path / "fp8")
    st = SafetensorsFile(folder / "model.safetensors")
    kept = {n: (st.tensors[n]["dtype"], st.tensors[n]["shape"], st.get(n).tobytes())
            for n in st.tensors if n != "model.layers.0.mlp.down_proj.weight_scale"}
    write_raw_safetensors(folder / "model.safetensors", kept)
    with pytest.raises(LoadError, match="down_proj.weight_scale"):
        load_model(str(folder), NumpyOps())
    # a scale stored as E4M3 codes: it was read as the codes' integer values (1.0 -> 56.0)
    scale = "model.layers.0.mlp.down_proj.weight_scale"
    write_raw_safetensors(folder / "model.safetensors", {
        **kept, scale: ("F8_E4M3", st.tensors[scale]["shape"],
                        np.full(st.get(scale).size, 0x38, np.uint8).tobytes())})
    with pytest.raises(LoadError, match=r"down_proj.weight_scale' in .* is F8_E4M3; an FP8"):
        load_model(str(folder), NumpyOps())
    with pytest.raises(ValueError, match="block-wise"):
        fp8.from_checkpoint("w", np.zeros((4, 16), np.uint8), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="block-wise"):  # (out / 128, in / 128) = 256 values
        fp8.from_checkpoint("w", np.zeros((256, 16384), np.uint8), np.ones((2, 128), np.float32))
    # an inf or NaN scale (per tensor or a row's): every token's output on those rows was NaN
    # or inf, loaded without a word
    for bad in (np.array([np.inf], np.float32), np.array([1, 1, np.nan, 1], np.float32)):
        with pytest.raises(ValueError, match=r"w_scale holds (inf|nan) \(value [02]\): a damaged"):
            fp8.from_checkpoint("w", np.zeros((4, 16), np.uint8), bad)
    for per_row in (np.ones(4, np.float32), np.ones((4, 1), np.float32)):
        assert fp8.from_checkpoint("w", np.zeros((4, 16), np.uint8), per_row).scale.shape == (4,)
    # E4M3 tensors under a config without quantization_config: refused, not read as their
    # uint8 codes (they had loaded as weights of value 56 and so on)
    plain = write_fp8_checkpoint(src, tmp_path / "plain")
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"proj.weight' in .* is F8_E4M3, but config.json has no"):
        load_model(str(plain), NumpyOps())


def test_quantization_field_and_gguf_refusal(tmp_path):
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(quantization="int4").validate()
    EngineConfig(quantization="fp8").validate()
    write_tiny_gguf(tmp_path / "m.gguf")
    with pytest.raises(LoadError, match="GGUF"):
        load_model(str(tmp_path / "m.gguf"), NumpyOps(), quantization="fp8")


def test_dummy_fp8_weights_same_draws(monkeypatch):
    monkeypatch.setattr(fp8, "LM_HEAD", False)
    config = tiny_model_config()
    ops = NumpyOps()
    plain = dummy_weights(config, ops, seed=3)
    quantized = dummy_weights(config, ops, seed=3, quantization="fp8")
    np.testing.assert_array_equal(quantized.layers[1].down.data,
                                  fp8.quantize_weight(plain.layers[1].down).data)
    assert quantized.embed.dtype == np.float32  # the embedding stays float
    assert quantized.lm_head is quantized.embed  # tied, fp8.LM_HEAD off


def test_dummy_fp8_lm_head_is_a_quantized_copy(monkeypatch):
    monkeypatch.setattr(fp8, "LM_HEAD", True)
    config = tiny_model_config()
    plain = dummy_weights(config, NumpyOps(), seed=3)
    quantized = dummy_weights(config, NumpyOps(), seed=3, quantization="fp8")
    np.testing.assert_array_equal(quantized.embed, plain.embed)
    np.testing.assert_array_equal(quantized.lm_head.data, fp8.quantize_weight(plain.embed).data)
    assert not isinstance(plain.lm_head, QuantizedWeight)  # bf16 layers: the lm_head too


def test_tiny_engine_greedy_tokens_agree(make_engine, run_engine):
    """The engine on the tiny random model in FP8 vs fp32: the first greedy token agrees on >= 6
    of 8 prompts. (Whole 8-token runs mostly part: the model's top two logits are often closer
    than FP8's ~9% logit error, and one different token changes everything after it.)"""
    from conftest import _tiny_loaded

    from engine.core.sampling_params import SamplingParams
    from engine.engine import LLMEngine

    base = _tiny_loaded(512, False)
    loaded = types.SimpleNamespace(config=base.config, weights=quantized_copy(base.weights),
                                   tokenizer=None)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    rng = np.random.default_rng(6)
    requests = {str(i): ({"prompt_token_ids": rng.integers(3, 512, 12).tolist()}, params)
                for i in range(8)}
    want, _ = run_engine(make_engine(), requests)
    got, _ = run_engine(LLMEngine(EngineConfig(device="numpy"), loaded_model=loaded), requests)
    agree = sum(want[r].outputs[0].token_ids[0] == got[r].outputs[0].token_ids[0]
                for r in requests)
    assert agree >= 6
    assert all(len(got[r].outputs[0].token_ids) == 8 for r in requests)
