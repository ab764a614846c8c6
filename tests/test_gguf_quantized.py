"""GGUF block formats kept quantized (issue 16), on the numpy backend: the formats' numpy
dequantization against the `gguf` package's, the ops' QuantizedWeight dispatch, the quantized
loader (fusing, mixed types, tied and untied embeddings), dummy block weights, and the quantized
model against the dequantized one."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import llama_cpp_permute
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from engine.executor.ops import AttentionMetadata
from engine.executor.ops.numpy_ops import NumpyOps
from engine.executor.transformer import Transformer
from engine.model import gguf_dot, gguf_loader, gguf_quants
from engine.model.config import ModelConfig
from engine.model.loader import LoadError, load_model
from engine.model.quantized import QuantizedWeight, dequantize

OPS = NumpyOps()


def blocks(kind, rows, cols, seed=0, random_scales=True):
    return gguf_quants.random_blocks(kind, (rows, cols), 0.02, np.random.default_rng(seed),
                                     random_scales=random_scales)


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("kind", gguf_quants.KINDS)
@pytest.mark.parametrize("random_scales", [True, False])
def test_dequantize_equals_gguf_bit_for_bit(kind, random_scales):
    cols = 3 * gguf_quants.BLOCKS[kind][0]
    raw = blocks(kind, 17, cols, random_scales=random_scales)
    ours = dequantize(QuantizedWeight(kind, (17, cols), raw))
    theirs = gguf_dequantize(raw, Q[kind])
    assert ours.dtype == np.float32 and ours.shape == (17, cols)
    assert np.isfinite(ours).all() and np.abs(ours).max() > 0
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])  # what gguf.quants can quantize
def test_dequantize_of_gguf_quantized_values(kind):
    x = np.random.default_rng(1).standard_normal((9, 256)).astype(np.float32)
    raw = gguf_quantize(x, Q[kind])
    ours = dequantize(QuantizedWeight(kind, x.shape, raw))
    np.testing.assert_array_equal(ours.view(np.uint32),
                                  gguf_dequantize(raw, Q[kind]).view(np.uint32))
    assert np.abs(ours - x).max() < (0.02 if kind == "Q8_0" else 0.5)  # and it is x, roughly


def test_random_blocks_spread_like_the_dummy_weights():
    for kind in gguf_quants.KINDS:
        w = dequantize(QuantizedWeight(kind, (64, 1024), blocks(kind, 64, 1024,
                                                                 random_scales=False)))
        assert 0.01 < w.std() < 0.04 and abs(w.mean()) < 0.003, kind


def test_bad_layout_names_the_shapes():
    with pytest.raises(ValueError, match=r"uint8 of shape \(4, 144\)"):
        dequantize(QuantizedWeight("Q4_K", (4, 256), np.zeros((4, 145), np.uint8)))
    with pytest.raises(ValueError, match="multiples of 256"):
        gguf_quants.row_bytes("Q6_K", 576)


# ----------------------------------------------------------------------------- numpy ops


@pytest.mark.parametrize("kind", gguf_quants.KINDS)
def test_numpy_ops_dequantize_per_call(kind):
    """Formats with an int8-activation kernel (gguf_dot.KINDS) multiply through its twin; the
    others multiply x by the dequantized matrix."""
    cols = 2 * gguf_quants.BLOCKS[kind][0]
    w = QuantizedWeight(kind, (24, cols), blocks(kind, 24, cols))
    dense = dequantize(w)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    product = gguf_dot.linear if kind in gguf_dot.KINDS else lambda x, w: x @ dense.T
    np.testing.assert_array_equal(OPS.linear(x, w), product(x, w))
    ids = np.array([5, 0, 23, 5], np.int32)
    np.testing.assert_array_equal(OPS.embedding(ids, w), dense[ids])
    r, n = rng.standard_normal((2, 3, cols)).astype(np.float32), np.ones(cols, np.float32)
    y, res = OPS.add_rms_norm_linear(x, r, n, 1e-5, w)
    h, _ = OPS.add_rms_norm(x, r, n, 1e-5)
    np.testing.assert_array_equal(y, product(h, w))
    gate_up = rng.standard_normal((3, 2 * cols)).astype(np.float32)
    np.testing.assert_array_equal(OPS.silu_mul_linear(gate_up, w),
                                  product(OPS.silu_and_mul(gate_up), w))


# ----------------------------------------------------------------------------- loader

CONFIG = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=256, intermediate_size=512,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                     max_position_embeddings=128, rope_theta=5e4, tie_word_embeddings=False)
# Layer 0 is a Q4_K_M-like mix (v in Q6_K: the fused qkv falls back to float); layer 1 one type
# per matrix.
TYPES = {"blk.0.attn_q": "Q4_K", "blk.0.attn_k": "Q4_K", "blk.0.attn_v": "Q6_K",
         "blk.0.attn_output": "Q4_K", "blk.0.ffn_gate": "Q4_K", "blk.0.ffn_up": "Q4_K",
         "blk.0.ffn_down": "Q6_K", "blk.1.attn_q": "Q8_0", "blk.1.attn_k": "Q8_0",
         "blk.1.attn_v": "Q8_0", "blk.1.attn_output": "Q4_0", "blk.1.ffn_gate": "Q4_1",
         "blk.1.ffn_up": "Q4_1", "blk.1.ffn_down": "Q5_K", "token_embd": "Q6_K",
         "output": "Q8_0"}


def write_quantized_gguf(path, config: ModelConfig = CONFIG, types=None, seed: int = 0) -> dict:
    """A llama GGUF of random blocks (and F32 norms); returns name -> (kind, raw rows)."""
    types = TYPES if types is None else types
    c, rng = config, np.random.default_rng(seed)
    h, i = c.hidden_size, c.intermediate_size
    shapes = {"token_embd": (c.vocab_size, h), "output": (c.vocab_size, h)}
    for n in range(c.num_layers):
        shapes.update({f"blk.{n}.attn_q": (c.q_size, h), f"blk.{n}.attn_k": (c.kv_size, h),
                       f"blk.{n}.attn_v": (c.kv_size, h), f"blk.{n}.attn_output": (h, c.q_size),
                       f"blk.{n}.ffn_gate": (i, h), f"blk.{n}.ffn_up": (i, h),
                       f"blk.{n}.ffn_down": (h, i)})
    if c.tie_word_embeddings:
        del shapes["output"]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, c.num_layers),
                       (w.add_context_length, c.max_position_embeddings),
                       (w.add_embedding_length, h), (w.add_feed_forward_length, i),
                       (w.add_head_count, c.num_heads), (w.add_head_count_kv, c.num_kv_heads),
                       (w.add_layer_norm_rms_eps, c.rms_norm_eps),
                       (w.add_rope_freq_base, c.rope_theta)):
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["t", "0", "t0"] + [f"t{n}" for n in range(1, c.vocab_size - 2)])
    w.add_token_merges(["t 0"])
    written = {}
    for name, shape in shapes.items():
        kind = types[name]
        raw = gguf_quants.random_blocks(kind, shape, 0.1, rng)
        written[name] = (kind, raw)
        heads = {"attn_q": c.num_heads, "attn_k": c.num_kv_heads}.get(name.split(".")[-1])
        stored = llama_cpp_permute(raw, heads) if heads else raw
        w.add_tensor(name + ".weight", stored, raw_dtype=Q[kind])
    for name in ["output_norm"] + [f"blk.{n}.{x}" for n in range(c.num_layers)
                                   for x in ("attn_norm", "ffn_norm")]:
        w.add_tensor(name + ".weight", (1 + 0.1 * rng.standard_normal(h)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def test_quantized_load_keeps_blocks_fuses_and_falls_back_on_mixed_types(tmp_path):
    written = write_quantized_gguf(tmp_path / "q.gguf")
    m = load_model(str(tmp_path / "q.gguf"), OPS, gguf_dequantize=False)
    layer0, layer1 = m.weights.layers

    def dense(name):
        kind, raw = written[name]
        values, nbytes = gguf_quants.BLOCKS[kind]
        return dequantize(QuantizedWeight(kind, (len(raw), raw.shape[1] // nbytes * values), raw))

    # mixed q/k/v kinds: one float matrix, the blocks' exact values
    assert isinstance(layer0.qkv, np.ndarray)
    np.testing.assert_array_equal(layer0.qkv, np.concatenate(
        [dense("blk.0.attn_q"), dense("blk.0.attn_k"), dense("blk.0.attn_v")]))
    # one kind: the raw rows concatenated, in HF row order
    assert layer1.qkv.kind == "Q8_0" and layer1.qkv.shape == (256 + 2 * 128, 256)
    np.testing.assert_array_equal(layer1.qkv.data, np.concatenate(
        [written[f"blk.1.attn_{x}"][1] for x in "qkv"]))
    assert layer1.gate_up.kind == "Q4_1" and layer1.gate_up.shape == (1024, 256)
    assert (layer0.down.kind, layer1.down.kind, layer1.o.kind) == ("Q6_K", "Q5_K", "Q4_0")
    assert m.weights.embed.kind == "Q6_K" and m.weights.lm_head.kind == "Q8_0"
    assert isinstance(m.weights.norm, np.ndarray) and m.weights.norm.dtype == np.float32
    # nothing was converted or cached on disk
    assert not gguf_loader.cache_dir_for(tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_model_logits_match_the_dequantized_model(tmp_path, monkeypatch, tied):
    """NOTE: the dequantized path keeps 4/8-bit tensors in float16 (gguf_loader's cache), the
    quantized one dequantizes exactly in float32: with x in float (no gguf_dot kinds) logits
    agree to the float16 rounding of the weights, relative error < 5e-3 (measured ~1e-3), the
    same argmax everywhere. With the Q4_K, Q8_0 and Q6_K products on int8 activations (gguf_dot,
    the default; the lm_head keeps x unquantized) relative error < 3e-2 (measured 1.4e-2
    untied, 1.7e-2 tied, on this random 2-layer model)."""
    config = ModelConfig(**{**vars(CONFIG), "tie_word_embeddings": tied})
    write_quantized_gguf(tmp_path / "q.gguf", config)
    quant = load_model(str(tmp_path / "q.gguf"), OPS, gguf_dequantize=False)
    deq = load_model(str(tmp_path / "q.gguf"), OPS, gguf_dequantize=True)
    assert isinstance(quant.weights.layers[1].qkv, QuantizedWeight)
    assert quant.weights.layers[1].qkv.kind in gguf_dot.KINDS
    assert isinstance(deq.weights.layers[1].qkv, np.ndarray)
    assert (quant.weights.lm_head is quant.weights.embed) == tied
    ids = np.array([3, 17, 5, 60, 1, 9, 33], np.int32)
    want = _prefill_logits(deq, ids)
    err = np.linalg.norm(_prefill_logits(quant, ids) - want) / np.linalg.norm(want)
    assert 5e-3 < err < 3e-2
    assert not quant.weights.lm_head.quantize_x and quant.weights.layers[1].qkv.quantize_x
    monkeypatch.setattr(gguf_dot, "KINDS", ())
    got = _prefill_logits(quant, ids)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < err < 5e-3
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def _prefill_logits(loaded, ids, ops=OPS):
    c = loaded.config
    model = Transformer(c, loaded.weights, ops, 64)
    kv = ops.alloc_kv_cache(c.num_layers, 4, c.num_kv_heads, 16, c.head_dim)
    t = len(ids)
    meta = AttentionMetadata(np.arange(t, dtype=np.int32), np.array([0, t], np.int32),
                             np.array([t], np.int32), np.array([[0, 1, 2, 3]], np.int32), t, t)
    return model.forward(ids, np.arange(t, dtype=np.int32), kv, meta, None)


def test_weights_bytes_are_the_quantized_size(tmp_path):
    from engine.logs import weights_nbytes

    written = write_quantized_gguf(tmp_path / "q.gguf")
    m = load_model(str(tmp_path / "q.gguf"), OPS, gguf_dequantize=False)
    packed = sum(raw.nbytes for name, (_, raw) in written.items()
                 if name not in ("blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v"))
    qkv0 = (256 + 2 * 128) * 256 * 4  # the mixed-type qkv, float32 on numpy
    norms = (2 * 2 + 1) * 256 * 4
    assert weights_nbytes(m.weights) == packed + qkv0 + norms


# ----------------------------------------------------------------------------- dummy


@pytest.mark.parametrize("kind", ["q4_k", "q8_0", "Q6_K"])
def test_dummy_weights_in_a_block_format(kind):
    config = ModelConfig("Qwen3ForCausalLM", vocab_size=64, hidden_size=256,
                         intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=64, qk_norm=True)
    from engine.model.gguf_weights import dummy_quantized_weights

    w = dummy_quantized_weights(config, OPS, kind.upper(), seed=1)
    assert all(getattr(layer, name).kind == kind.upper() for layer in w.layers
               for name in ("qkv", "o", "gate_up", "down"))
    assert w.embed.kind == kind.upper() and w.layers[0].q_norm.shape == (64,)
    logits = _prefill_logits(type("M", (), {"config": config, "weights": w}), np.arange(5))
    assert np.isfinite(logits).all() and logits.std() > 0


def test_dummy_quantization_through_load_model_and_its_errors():
    with pytest.raises(LoadError, match="quantization must be None, 'fp8' or a GGUF block format"):
        load_model("smollm2-135m", OPS, load_format="dummy", quantization="q3_k")
    with pytest.raises(LoadError, match="load_format='dummy' only"):
        load_model(None, OPS, quantization="q8_0")
    with pytest.raises(ValueError, match="quantization 'q4_k' packs rows in blocks of 256"):
        load_model("smollm2-135m", OPS, load_format="dummy", quantization="q4_k")
    loaded = load_model("smollm2-135m", OPS, load_format="dummy", quantization="q8_0")
    assert loaded.weights.layers[0].down.kind == "Q8_0"
