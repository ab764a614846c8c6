"""Model loading on wrong, partial or hostile files: an error of the project's kind (LoadError /
ConfigError / GGUFError / TokenizerError) naming the file and the problem; never a hang, a raw
exception, or silently wrong weights. Each case below once did one of those."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import struct

import numpy as np
import pytest
from conftest import GOLDEN_DIR, write_tiny_gguf
from test_loader import write_raw_safetensors as write_safetensors

from engine.executor.ops.numpy_ops import NumpyOps
from engine.model import fp8, gguf_loader
from engine.model.config import ConfigError
from engine.model.gguf_loader import GGUFError
from engine.model.loader import LoadError, SafetensorsFile, load_model
from engine.model.tokenizer import Tokenizer, TokenizerError


class Hang(BaseException):  # a BaseException: the loader's `except Exception` cannot wrap it
    pass


@contextlib.contextmanager
def deadline(seconds: int):
    def fire(*_):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def golden_copy(tmp_path, name="llama"):
    return shutil.copytree(GOLDEN_DIR / name, tmp_path / name)


def golden_tensors(name="llama") -> dict[str, np.ndarray]:
    st = SafetensorsFile(GOLDEN_DIR / name / "model.safetensors")
    return {n: np.array(st.get(n)) for n in st.tensors}


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------- GGUF


def test_gguf_array_claiming_a_huge_length_is_refused_not_a_hang(tmp_path):
    """A 300 KB GGUF whose one uint8 array field claims 2**40 items: gguf.GGUFReader walked past
    the end of the file forever (reads past EOF return empty arrays, no error), growing memory
    by ~130 MB/s. Now: a GGUFError naming the file, at once."""
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, extra=lambda w: w.add_array("zz.arr", [7, 7, 7]))
    b = bytearray(path.read_bytes())
    at = b.find(b"zz.arr") + len(b"zz.arr")  # then: value type, item type, item count
    struct.pack_into("<IQ", b, at + 4, 0, 2**40)  # uint8 items, 2**40 of them
    path.write_bytes(bytes(b))
    with deadline(5), pytest.raises(GGUFError, match=re.escape(str(path))):
        gguf_loader.read_gguf(path)


def test_gguf_string_value_that_is_not_utf8_names_the_file(tmp_path):
    """Metadata values were decoded (ReaderField.contents) outside open_gguf's try: a raw
    UnicodeDecodeError that named neither the file nor the key."""
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, extra=lambda w: w.add_string("general.name", "AAAA"))
    b = bytearray(path.read_bytes())
    at = b.find(b"AAAA")
    b[at:at + 4] = b"\xff\xfe\xfd\xfc"
    path.write_bytes(bytes(b))
    with pytest.raises(GGUFError, match=re.escape(str(path))):
        load_model(str(path), NumpyOps())


def _tensor_info_at(b: bytes, name: str) -> int:
    """Byte offset of the n_dims field of tensor `name`'s info in a GGUF file's bytes."""
    key = name.encode()
    return b.find(struct.pack("<Q", len(key)) + key) + 8 + len(key)


def test_gguf_tensor_name_of_a_damaged_length_is_not_read_whole(tmp_path):
    """The header check read a tensor's name at its claimed length before checking it: a damaged
    length copied the rest of the file into memory (gigabytes for a real model) and into the
    error's message (here ~395 KB of a 315 KB file). Now at most 64 bytes of it, as for keys."""
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    b = bytearray(path.read_bytes())
    name = b"token_embd.weight"
    at = b.find(struct.pack("<Q", len(name)) + name)
    struct.pack_into("<Q", b, at, len(b) - at - 1000)  # inside the file: the walk goes on
    path.write_bytes(bytes(b))
    with pytest.raises(GGUFError, match=re.escape(f"{path}: tensor 'token_embd.weight")) as got:
        gguf_loader.read_gguf(path)
    assert len(str(got.value)) < 500


@pytest.mark.parametrize("dequantize", [False, True])
def test_gguf_truncated_or_of_an_unknown_type_names_the_tensor(tmp_path, dequantize):
    """gguf.GGUFReader failed on these in numpy's words, naming no tensor: "cannot reshape array
    of size 231 into shape (256,)" for a file cut short, "np.uint32(99) is not a valid
    GGMLQuantizationType" for a type it does not know. Now a GGUFError naming the tensor."""
    import gguf

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    intact = path.read_bytes()
    last = max(gguf.GGUFReader(path).tensors, key=lambda t: t.data_offset).name
    path.write_bytes(intact[:-100])
    with pytest.raises(GGUFError, match=rf"tensor {last!r} \(F32 .* the file is truncated"):
        load_model(str(path), NumpyOps(), gguf_dequantize=dequantize)
    b = bytearray(intact)
    at = _tensor_info_at(b, "blk.1.attn_k.weight")
    struct.pack_into("<I", b, at + 4 + 8 * struct.unpack_from("<I", b, at)[0], 99)  # its type
    path.write_bytes(bytes(b))
    with pytest.raises(GGUFError, match="tensor 'blk.1.attn_k.weight' has GGML type 99"):
        load_model(str(path), NumpyOps(), gguf_dequantize=dequantize)
    b = bytearray(intact)
    at = _tensor_info_at(b, "blk.0.ffn_up.weight")
    struct.pack_into("<I", b, at, 5)  # 5 dimensions
    path.write_bytes(bytes(b))
    with pytest.raises(GGUFError, match="tensor 'blk.0.ffn_up.weight' has 5 dimensions"):
        load_model(str(path), NumpyOps(), gguf_dequantize=dequantize)


@pytest.mark.parametrize("dequantize", [False, True])
@pytest.mark.parametrize("name, at, bits", [
    ("blk.1.attn_v.weight", 5 * 34, 0x7C00),  # Q8_0 block 5's d: +inf
    ("blk.1.ffn_down.weight", 3 * 176 + 2, 0xFE00),  # Q5_K block 3's dmin: NaN
    ("blk.0.ffn_down.weight", 208, 0xFC00),  # Q6_K block 0's d: -inf
    ("blk.1.attn_norm.weight", 4 * 7, None),  # F32 value 7: NaN
])
def test_gguf_with_an_inf_or_nan_block_scale_or_value_names_the_tensor(tmp_path, dequantize,
                                                                        name, at, bits):
    """A block whose float16 scale is inf or NaN has no values (inf * 0 is NaN), and the GEMVs'
    factored products and the twin's disagree on it (inf or NaN): the model loaded and served NaN
    for every token. Refused at load, as llama.cpp's ggml_validate_row_data refuses it, naming
    the tensor; the kernels check nothing."""
    import gguf
    from test_gguf_quantized import write_quantized_gguf

    path = tmp_path / "q.gguf"
    write_quantized_gguf(path)
    start = next(t.data_offset for t in gguf.GGUFReader(path).tensors if t.name == name)
    b = bytearray(path.read_bytes())
    if bits is None:
        struct.pack_into("<f", b, start + at, np.nan)
    else:
        struct.pack_into("<H", b, start + at, bits)
    path.write_bytes(bytes(b))
    with pytest.raises(GGUFError, match=rf"tensor {name!r} .*(inf|nan).*the file is damaged"):
        load_model(str(path), NumpyOps(), gguf_dequantize=dequantize)


@pytest.mark.parametrize("key, field, value", [
    ("llama.attention.layer_norm_rms_epsilon", "rms_norm_eps", float("nan")),
    ("llama.attention.layer_norm_rms_epsilon", "rms_norm_eps", float("inf")),
    ("llama.rope.freq_base", "rope_theta", float("nan")),
    ("llama.rope.freq_base", "rope_theta", float("inf")),
])
def test_gguf_norm_eps_or_rope_base_that_is_nan_or_inf_is_refused(tmp_path, key, field, value):
    """The check was `value <= 0`, which NaN passes: a GGUF whose epsilon is NaN loaded and every
    RMSNorm gave NaN (an inf base: every rotation but the first pair's frequency 0). Now a
    GGUFError naming the file and the field, as a config.json NaN is a ConfigError."""
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, extra=lambda w: w.add_float32(key, value))  # overrides the written one
    with pytest.raises(GGUFError, match=rf"{re.escape(str(path))}: {field} must be a finite"):
        load_model(str(path), NumpyOps())
    folder = golden_copy(tmp_path)
    edit_config(folder, **{field: value})  # json writes NaN / Infinity, and reads them back
    with pytest.raises(ConfigError, match=f"{field} must be a finite number > 0, got {value}"):
        load_model(str(folder), NumpyOps())


# ----------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.norm.weight"])
def test_fp8_checkpoint_with_an_fp8_tensor_outside_the_linear_layers_is_refused(tmp_path, name):
    """With quant_method 'fp8' any tensor may be F8_E4M3: an embedding or norm stored so was
    handed to the model as its raw uint8 codes (embed dtype uint8), and the model ran on them.
    Now: a LoadError naming the tensor (only the linear weights are read as FP8)."""
    folder = golden_copy(tmp_path)
    edit_config(folder, quantization_config={"quant_method": "fp8"})
    out = {}
    for n, a in golden_tensors().items():
        if n.endswith("proj.weight"):
            q = fp8.quantize_weight(a)
            out[n] = ("F8_E4M3", a.shape, q.data.tobytes())
            out[n + "_scale"] = ("F32", q.scale.shape, q.scale.tobytes())
        elif n == name:
            codes = fp8.encode(a)
            out[n] = ("F8_E4M3", a.shape, codes.tobytes())
        else:
            out[n] = ("F32", a.shape, a.astype(np.float32).tobytes())
    write_safetensors(folder / "model.safetensors", out)
    with pytest.raises(LoadError, match=re.escape(name)):
        load_model(str(folder), NumpyOps())


# ----------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("change, needle", [
    ({"hidden_act": "gelu"}, "hidden_act"),  # the MLP is SiLU whatever the config says
    ({"mlp_bias": True}, "mlp_bias"),  # gate/up/down biases never applied
])
def test_config_that_changes_the_math_is_refused_not_ignored(tmp_path, change, needle):
    folder = golden_copy(tmp_path)
    edit_config(folder, **change)
    with pytest.raises(ConfigError, match=needle):
        load_model(str(folder), NumpyOps())


def test_llama_attention_bias_o_proj_bias_is_not_dropped(tmp_path):
    """HF's Llama (and Qwen3) with attention_bias=true have an o_proj bias too; the loader read
    q/k/v's and only logged that o_proj.bias was 'not used', then served without it."""
    folder = golden_copy(tmp_path)
    edit_config(folder, attention_bias=True)
    tensors = golden_tensors()
    for n in range(2):
        a = f"model.layers.{n}.self_attn."
        for proj, size in (("q", 64), ("k", 32), ("v", 32), ("o", 64)):
            tensors[a + f"{proj}_proj.bias"] = np.full(size, 0.5, np.float32)
    write_safetensors(folder / "model.safetensors",
                      {k: ("F32", v.shape, v.tobytes()) for k, v in tensors.items()})
    with pytest.raises((ConfigError, LoadError), match="o_proj.bias"):
        load_model(str(folder), NumpyOps())


@pytest.mark.parametrize("field", ["num_key_value_heads", "head_dim"])
def test_a_zero_head_count_or_head_dim_is_refused_not_replaced(tmp_path, field):
    """`cfg.get(field) or default` turned an explicit 0 into the default: 0 KV heads loaded as
    multi-head attention (dummy weights), or failed later on a tensor's shape."""
    folder = golden_copy(tmp_path)
    edit_config(folder, **{field: 0})
    with pytest.raises(ConfigError, match=field):
        load_model(str(folder), NumpyOps(), load_format="dummy")


# ----------------------------------------------------------------------------- JSON files


def _deep(folder, which):
    nested = b"[" * 100_000
    if which == "model.safetensors":
        (folder / which).write_bytes(struct.pack("<Q", len(nested)) + nested)
    else:
        (folder / which).write_bytes(nested)


@pytest.mark.parametrize("which", ["config.json", "generation_config.json", "model.safetensors",
                                   "tokenizer_config.json"])
def test_json_nested_past_the_recursion_limit_names_the_file(tmp_path, which):
    """json.loads raises RecursionError (no ValueError) on deep nesting: it escaped every
    `except ValueError` of the loader, and the CLI printed it without the file."""
    folder = golden_copy(tmp_path)
    _write_tokenizer(folder)
    _deep(folder, which)
    with pytest.raises((ConfigError, LoadError, TokenizerError), match=re.escape(which)):
        load_model(str(folder), NumpyOps())


# ----------------------------------------------------------------------------- chat template


def _write_tokenizer(folder, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from engine.model.tokenizer import byte_to_unicode

    vocab = {ch: i for i, ch in enumerate(byte_to_unicode().values())}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": chat_template}))


def test_a_chat_template_that_is_not_valid_jinja_names_the_file(tmp_path):
    """The template was compiled on the first chat: a raw jinja2 TemplateSyntaxError ("unexpected
    '}'") naming neither the file nor chat_template (the server answered every chat with a 400
    blaming the request). Now a TokenizerError at load, naming tokenizer_config.json."""
    folder = golden_copy(tmp_path)
    _write_tokenizer(folder, chat_template="{% for m in messages %}{{ m['content'] }")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        tok = Tokenizer.from_pretrained(folder)
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_tokenizer_eos_token_outside_the_models_vocabulary_ends_nothing(tmp_path, caplog):
    """The tokenizer's eos_token joined the config's eos ids (which are checked against
    vocab_size) unchecked: one past the model's vocabulary failed every request with min_tokens
    in sampling ("IndexError: index 257 is out of bounds for axis 0 with size 200"). It cannot
    be sampled, so it ends nothing: the load warns, naming it, and requests run."""
    from engine import LLM, SamplingParams

    folder = golden_copy(tmp_path)
    _write_tokenizer(folder)  # 256 byte tokens, then <s> (256) and </s> (257)
    edit_config(folder, vocab_size=200, eos_token_id=2)
    with caplog.at_level("WARNING", logger="pagedserve"):
        llm = LLM(str(folder), device="numpy", load_format="dummy", max_model_len=64)
    try:
        assert "eos_token '</s>' is token id 257, outside the model's vocabulary (vocab_size " \
               "200)" in caplog.text
        assert 2 in llm.engine.core.eos_token_ids and 257 not in llm.engine.core.eos_token_ids
        params = SamplingParams(max_tokens=4, min_tokens=3, temperature=0)
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)[0].outputs[0]
        assert 3 <= len(out.token_ids) <= 4 and max(out.token_ids) < 200
    finally:
        llm.close()


# ---------------------------------------------------------------- across the process boundary


def test_a_load_error_the_api_process_cannot_rebuild_arrives_as_its_type_and_message():
    """The core pickles what loading raised and the API process raises it again. An exception
    whose __init__ takes more than its message (ParamError(field, message)) pickles but does
    not unpickle: the user read a TypeError about __init__ instead of the load error."""
    import pickle

    from engine.core.sampling_params import ParamError
    from engine.core_client import MPClient
    from engine.core_process import FAILED, _pickled
    from engine.model.config import EngineConfig

    again = pickle.loads(_pickled(ParamError("max_model_len", "max_model_len 9 is too long")))
    assert type(again) is RuntimeError
    assert str(again) == "ParamError: max_model_len 9 is too long"
    kept = pickle.loads(_pickled(GGUFError("model.gguf: no tensors")))  # rebuilds: as it was
    assert type(kept) is GGUFError and str(kept) == "model.gguf: no tensors"

    class Outputs:  # the core's FAILED, its payload an exception that cannot be rebuilt
        def poll(self, timeout_ms):
            return True

        def recv_multipart(self):
            return [FAILED, pickle.dumps(ParamError("n", "n must be 1"))]

    client = MPClient(EngineConfig())
    client._outputs = Outputs()
    with pytest.raises(RuntimeError, match="^loading the engine core failed, and its error "
                                           "could not be read back: TypeError: ") as got:
        client.poll_ready(0)
    assert type(got.value) is RuntimeError
