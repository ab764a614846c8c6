"""GGUF files (llama architecture): metadata -> ModelConfig, tensors dequantized at load.

Dequantizing a quantized file costs seconds, so the result (already fused and in HF row order) is
cached on disk as .npy files and memory-mapped on later loads. The cache key holds the source's
path, size and mtime, so a changed file is dequantized again.

NOTE: quantized and F16 tensors are kept in float16, F32 and BF16 ones in float32: the default
model's entry is 257 MiB instead of 514 MiB in float32. A 4-bit or 8-bit weight dequantizes to
d * q (+ m) with a float16 scale d; float16 holds that to 11 bits, far finer than the quantization
step (the greedy continuations of tests/data/golden/smollm2_greedy.json are unchanged). The GPU
serves these values in float16 or bfloat16; the cpu backend widens them to float32 at load. A
tensor with values beyond float16's range stays float32. Values are rounded before fusing and
caching, so a first load serves exactly what later loads read back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.model.config import ConfigError, ModelConfig
from engine.model.weights import LayerWeights, ModelWeights

logger = logging.getLogger("pagedserve." + __name__)
# Part of the cache key: entries written in another layout are rewritten (and the old removed).
CACHE_FORMAT = "f16-matrices"
FLOAT16_MAX = float(np.finfo(np.float16).max)


class GGUFError(ValueError):
    """A GGUF file pagedserve cannot run; the message names the file and the field."""


# ----------------------------------------------------------------------------- metadata


@dataclass
class GGUFFile:
    path: Path
    metadata: dict  # every key-value field, as plain Python values
    tensor_names: list[str]
    reader: object | None  # an open gguf.GGUFReader; None when the metadata came from the cache


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata and tensor names of a llama GGUF.

    Parsing the header costs seconds (gguf.GGUFReader builds every one of ~100k vocabulary
    strings in Python), so the plain metadata is cached as JSON beside the dequantized weights.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {str(path)!r} does not exist")
    meta_file = _meta_file(cache_dir_for(path))
    gguf_file = None
    if meta_file.is_file():
        try:
            cached = json.loads(meta_file.read_text())
            gguf_file = GGUFFile(path, cached["metadata"], cached["tensor_names"], None)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt from the file
    if gguf_file is None:
        reader = open_gguf(path)
        metadata = {k: field_contents(reader, k, path) for k in reader.fields
                    if not k.startswith("GGUF.")}
        gguf_file = GGUFFile(path, metadata, [t.name for t in reader.tensors], reader)
    _check_architecture(gguf_file.metadata, path)
    if gguf_file.reader is not None:
        try:
            _write_atomic(meta_file, json.dumps(
                {"metadata": gguf_file.metadata, "tensor_names": gguf_file.tensor_names},
                default=_plain))
        except OSError:
            pass  # a read-only or full disk only costs the next load its speed
    return gguf_file


def open_gguf(path: str | Path):
    """A gguf.GGUFReader for a llama-architecture file."""
    import gguf

    path = Path(path)
    try:
        _check_metadata_sizes(path)
        reader = gguf.GGUFReader(path)
    except GGUFError:
        raise
    except Exception as e:  # the gguf package raises ValueError/struct errors on bad files
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None
    arch = field_contents(reader, "general.architecture", path)
    _check_architecture({"general.architecture": arch}, path)
    return reader


def field_contents(reader, key: str, path):
    """A metadata field's value (None if absent); a GGUFError naming the key if its text is not
    UTF-8."""
    field = reader.get_field(key)
    try:
        return field.contents() if field is not None else None
    except UnicodeDecodeError as e:
        raise GGUFError(f"{path}: metadata {key!r} is not UTF-8 text ({e})") from None


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9  # GGUF's value types


def _check_metadata_sizes(path: Path) -> None:
    """Every length in the key-value header fits in the file. gguf.GGUFReader trusts them: an
    array claiming 2**40 items in a 300 KB file made it read past the end for ever, its memory
    growing ~130 MB/s. Then every tensor's type is one GGML knows and its data lies inside the
    file (_check_tensor_info)."""
    data = np.memmap(path, np.uint8, mode="r")
    size, at = len(data), 16  # past the magic, the version and the tensor count

    def u(nbytes: int) -> int:
        nonlocal at
        if at + nbytes > size:
            raise GGUFError(f"{path}: truncated GGUF header (at byte {at} of {size})")
        value = int.from_bytes(data[at:at + nbytes].tobytes(), "little")
        at += nbytes
        return value

    def skip(nbytes: int) -> None:
        nonlocal at
        if nbytes > size - at:
            raise GGUFError(f"{path}: a GGUF metadata value claims {nbytes} bytes, past the end "
                            f"of the file (at byte {at} of {size})")
        at += nbytes

    def value(kind: int, depth: int = 0) -> None:
        if kind in _SCALAR_BYTES:
            skip(_SCALAR_BYTES[kind])
        elif kind == _STRING:
            skip(u(8))
        elif kind == _ARRAY and depth < 4:
            item, count = u(4), u(8)
            if item in _SCALAR_BYTES:
                skip(count * _SCALAR_BYTES[item])
                return
            if count > (size - at) // 8:  # every string or array item takes 8 bytes at least
                raise GGUFError(f"{path}: a GGUF metadata array claims {count} items, more than "
                                f"the file holds (at byte {at} of {size})")
            for _ in range(count):
                value(item, depth + 1)
        else:
            raise GGUFError(f"{path}: unknown GGUF metadata value type {kind} at byte {at}")

    version = int.from_bytes(data[4:8].tobytes(), "little") if size >= 8 else 0
    if size < 24 or data[:4].tobytes() != b"GGUF" or version < 2:
        return  # the reader's own message says what is wrong (version 1: other widths)
    alignment = 32  # GGUF_DEFAULT_ALIGNMENT, unless general.alignment says otherwise
    for _ in range(min(u(8), size)):  # key-value pairs: a key, its type, its value
        length = u(8)
        key = data[at:at + min(length, 64)].tobytes()
        skip(length)
        kind = u(4)
        if key == b"general.alignment" and kind == 4:  # a uint32
            alignment = u(4)
        else:
            value(kind)
    # the tensor infos: name, dims (fastest first), GGML type, offset into the aligned data
    tensors = int.from_bytes(data[8:16].tobytes(), "little")
    if tensors > (size - at) // 24:  # an info takes 24 bytes at least
        raise GGUFError(f"{path}: the GGUF header claims {tensors} tensors, more than the file "
                        f"holds (at byte {at} of {size})")
    infos = []
    for _ in range(tensors):
        length = u(8)
        # at most GGML_MAX_NAME (64) bytes, as the keys above: a damaged length had copied the
        # rest of the file (gigabytes) into memory, and into the message that names the tensor
        name = data[at:at + min(length, 64)].tobytes().decode("utf-8", "replace")
        skip(length)
        n_dims = u(4)
        if n_dims > 4:  # GGML_MAX_DIMS
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions; GGML has 4 at most")
        dims = [u(8) for _ in range(n_dims)]
        infos.append((name, dims, u(4), u(8)))
    if 0 < alignment and not alignment & (alignment - 1):  # else the reader's own message
        start = -(-at // alignment) * alignment
        for info in infos:
            _check_tensor_info(path, size, start, *info)


def _check_tensor_info(path: Path, size: int, start: int, name: str, dims: list, kind: int,
                       offset: int) -> None:
    """A tensor's GGML type is one the gguf package knows, its rows whole blocks and its data
    inside the file. gguf.GGUFReader failed on these in numpy's or the enum's words, naming no
    tensor ("cannot reshape array of size 231 into shape (256,)", "99 is not a valid
    GGMLQuantizationType")."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        kind = GGMLQuantizationType(kind)
    except ValueError:
        raise GGUFError(f"{path}: tensor {name!r} has GGML type {kind}, which the gguf package "
                        "does not know (a newer or damaged file)") from None
    block, nbytes = GGML_QUANT_SIZES[kind]
    shape = tuple(reversed(dims))
    if dims and dims[0] % block:
        raise GGUFError(f"{path}: tensor {name!r} ({kind.name} {shape}): rows of {dims[0]} values "
                        f"are not whole {kind.name} blocks of {block}")
    first = start + offset
    end = first + int(np.prod(dims, dtype=object)) // block * nbytes
    if end > size:
        raise GGUFError(f"{path}: tensor {name!r} ({kind.name} {shape}) lies at bytes {first}.."
                        f"{end} of a {size}-byte file: the file is truncated or damaged")


def _check_architecture(metadata: dict, path):
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported; only 'llama' is "
            f"(Llama, Mistral, SmolLM); for Qwen use an HF safetensors folder"
        )


def _plain(value):
    """JSON fallback for the numpy scalars and arrays GGUF field contents can hold."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def config_from_gguf(gguf_file: GGUFFile) -> ModelConfig:
    meta, path = gguf_file.metadata, gguf_file.path

    def get(key, default=_MISSING, kind=int):
        """The metadata value at `key` as `kind` (int or float), else a GGUFError naming it."""
        if key not in meta:
            if default is _MISSING:
                raise GGUFError(f"{path}: GGUF metadata has no {key!r}")
            return default
        value = meta[key]
        number = numbers.Integral if kind is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, number):
            raise GGUFError(f"{path}: GGUF metadata {key!r} must be "
                            f"{'an integer' if kind is int else 'a number'}, got {value!r:.80}")
        return kind(value)

    hidden = get("llama.embedding_length")
    num_heads = get("llama.attention.head_count")
    if num_heads < 1:
        raise GGUFError(f"{path}: GGUF metadata 'llama.attention.head_count' must be >= 1, got "
                        f"{num_heads}")
    head_dim = get("llama.attention.key_length", hidden // num_heads)
    names = set(gguf_file.tensor_names)
    if "rope_freqs.weight" in names:
        # Llama 3.1 GGUFs bake llama3 rope scaling into this tensor; its parameters are lost
        raise GGUFError(f"{path}: GGUF with rope_freqs (llama3 rope scaling) is not supported")
    _check_plain_rope(meta, path, head_dim, get)
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, (list, tuple)):
        raise GGUFError(f"{path}: GGUF metadata 'tokenizer.ggml.tokens' must be an array of "
                        f"strings, got {tokens!r:.80}")
    vocab = len(tokens) if tokens is not None else get("llama.vocab_size")
    # As llama.cpp: end-of-turn and end-of-message tokens end a generation too, those the
    # metadata names and every token spelled as one (files converted before the eot key existed
    # name only <|end_of_text|>: Llama 3 Instruct never stopped at <|eot_id|>)
    ends = [get(f"tokenizer.ggml.{key}_token_id", None) for key in ("eos", "eot", "eom")]
    ends += [i for i, t in enumerate(tokens or ()) if isinstance(t, str)
             and t in END_OF_GENERATION_TEXTS]
    bos = get("tokenizer.ggml.bos_token_id", None)
    try:
        config = ModelConfig(
            architecture="LlamaForCausalLM",
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("llama.feed_forward_length"),
            num_layers=get("llama.block_count"),
            num_heads=num_heads,
            num_kv_heads=get("llama.attention.head_count_kv", num_heads),
            head_dim=head_dim,
            rms_norm_eps=get("llama.attention.layer_norm_rms_epsilon", 1e-5, float),
            rope_theta=get("llama.rope.freq_base", 10000.0, float),
            max_position_embeddings=get("llama.context_length", 2048),
            tie_word_embeddings="output.weight" not in names,
            eos_token_ids=list(dict.fromkeys(e for e in ends if e is not None)),
            bos_token_id=bos,
            dtype="float32",  # dequantized at load
        )
    except ConfigError as e:  # in HF's names (the config's fields); the file named here
        raise GGUFError(f"{path}: {e}") from None
    # As llama.cpp: a tensor the model would not use (a bias, a layer past block_count) means
    # the file is not the model its metadata describes; serving it would be silently wrong.
    unused = sorted(names - _tensor_names(config.num_layers))
    if unused:
        raise GGUFError(f"{path}: GGUF holds {len(unused)} tensor(s) a llama model does not use: "
                        f"{', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}")
    return config


# The tokens llama.cpp ends a generation on by their text (llama-vocab.cpp's special_eog_ids)
END_OF_GENERATION_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"})

LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_norm", "ffn_gate",
                 "ffn_up", "ffn_down")


def _tensor_names(num_layers: int) -> set[str]:
    """Every tensor a llama GGUF of num_layers layers may hold (output.weight: untied only)."""
    return {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{n}.{t}.weight" for n in range(num_layers) for t in LAYER_TENSORS}


_MISSING = object()


def _check_plain_rope(meta: dict, path, head_dim: int, get) -> None:
    """Refuse what the model would run wrongly: rope scaling (linear, YaRN, ...) and rotary
    embeddings over part of a head; llama.cpp applies both, this engine neither."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind != "none":
        raise GGUFError(f"{path}: GGUF metadata 'llama.rope.scaling.type' = {kind!r:.40}: rope "
                        f"scaling is not supported")
    for key in ("llama.rope.scaling.factor", "llama.rope.scale_linear"):
        factor = get(key, 1.0, float)
        if factor not in (0.0, 1.0):  # llama.cpp reads 0 as no scaling
            raise GGUFError(f"{path}: GGUF metadata {key!r} = {factor}: rope scaling is not "
                            f"supported")
    rotary = get("llama.rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise GGUFError(f"{path}: GGUF metadata 'llama.rope.dimension_count' = {rotary}: rotary "
                        f"embeddings over part of a head ({head_dim}) are not supported")


# ----------------------------------------------------------------------------- tensors


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rotary pairs adjacent) back to HF's half-split:
    per head, HF row j <- GGUF row 2j and HF row head_dim/2 + j <- GGUF row 2j + 1."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    # (heads, half, 2, ...) -> (heads, 2, half, ...)
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(reader, path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> array in numpy (row-major) order, in the dtype the cache keeps."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    exact_in_float32 = (Q.F32, Q.BF16, Q.F64)

    out = {}
    # disable=None: a bar on a terminal, nothing in a log file
    for t in tqdm(reader.tensors, desc="converting GGUF", unit="tensor", disable=None):
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        try:
            with np.errstate(invalid="ignore", over="ignore"):  # check_finite names those
                array = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        except NotImplementedError as e:
            raise GGUFError(
                f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}"
            ) from None
        check_finite(array, t.name, t.tensor_type.name, path)
        if t.tensor_type not in exact_in_float32 and np.abs(array).max(initial=0) <= FLOAT16_MAX:
            array = array.astype(np.float16)
        out[t.name] = array
    return out


def check_finite(array: np.ndarray, name: str, kind: str, path) -> None:
    """A tensor holding inf or NaN (a float one, or blocks with such a scale) is a damaged file,
    refused at load as llama.cpp's ggml_validate_row_data does: it served NaN for every token."""
    finite = np.isfinite(array)
    if not finite.all():
        at = tuple(int(i) for i in np.unravel_index(np.argmin(finite), array.shape))
        raise GGUFError(f"{path}: tensor {name!r} ({kind}) holds {array[at]} at {at}: the file "
                        "is damaged (weights must be finite)")


def _convert(tensors: dict[str, np.ndarray], c: ModelConfig, path) -> dict[str, np.ndarray]:
    """GGUF names -> our flat weight names (see `_to_weights`), fused and in HF row order."""

    def take(name: str, shape: tuple) -> np.ndarray:
        if name not in tensors:
            raise GGUFError(f"{path}: GGUF has no tensor {name!r}")
        if tensors[name].shape != shape:
            raise GGUFError(
                f"{path}: tensor {name!r} has shape {tensors[name].shape}, "
                f"the metadata implies {shape}"
            )
        return tensors.pop(name)

    h, i = c.hidden_size, c.intermediate_size
    out = {"embed": take("token_embd.weight", (c.vocab_size, h)),
           "norm": take("output_norm.weight", (h,))}
    if not c.tie_word_embeddings:
        out["lm_head"] = take("output.weight", (c.vocab_size, h))
    for n in range(c.num_layers):
        b, p = f"blk.{n}.", f"layers.{n}."
        q = unpermute_rows(take(b + "attn_q.weight", (c.q_size, h)), c.num_heads)
        k = unpermute_rows(take(b + "attn_k.weight", (c.kv_size, h)), c.num_kv_heads)
        v = take(b + "attn_v.weight", (c.kv_size, h))
        out[p + "qkv"] = np.concatenate([q, k, v])  # (q_size + 2 * kv_size, hidden)
        out[p + "o"] = take(b + "attn_output.weight", (h, c.q_size))
        out[p + "input_norm"] = take(b + "attn_norm.weight", (h,))
        out[p + "post_norm"] = take(b + "ffn_norm.weight", (h,))
        gate, up = take(b + "ffn_gate.weight", (i, h)), take(b + "ffn_up.weight", (i, h))
        out[p + "gate_up"] = np.concatenate([gate, up])  # (2 * intermediate, hidden)
        out[p + "down"] = take(b + "ffn_down.weight", (h, i))
    return out


def _to_weights(get, c: ModelConfig, ops) -> ModelWeights:
    layers = [
        LayerWeights(
            input_norm=ops.from_host(get(f"layers.{n}.input_norm")),
            qkv=ops.from_host(get(f"layers.{n}.qkv")),
            qkv_bias=None,
            q_norm=None,
            k_norm=None,
            o=ops.from_host(get(f"layers.{n}.o")),
            post_norm=ops.from_host(get(f"layers.{n}.post_norm")),
            gate_up=ops.from_host(get(f"layers.{n}.gate_up")),
            down=ops.from_host(get(f"layers.{n}.down")),
        )
        for n in tqdm(range(c.num_layers), desc="loading weights", unit="layer", disable=None)
    ]
    embed = ops.from_host(get("embed"))
    lm_head = embed if c.tie_word_embeddings else ops.from_host(get("lm_head"))
    return ModelWeights(embed=embed, layers=layers, norm=ops.from_host(get("norm")),
                        lm_head=lm_head)


# ----------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """$PAGEDSERVE_CACHE_DIR, else $XDG_CACHE_HOME/pagedserve, else ~/.cache/pagedserve."""
    if os.environ.get("PAGEDSERVE_CACHE_DIR"):
        return Path(os.environ["PAGEDSERVE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pagedserve"


def cache_dir_for(path: str | Path) -> Path:
    """<root>/gguf/<stem>-<hash of path>-<hash of size and mtime>: one entry per source file,
    a new one whenever the file changes."""
    path = Path(path).resolve()
    st = path.stat()
    source = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    key = f"{st.st_size}:{st.st_mtime_ns}:{CACHE_FORMAT}"
    version = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{source}-{version}"


def load_gguf_weights(gguf_file: GGUFFile, config: ModelConfig, ops) -> ModelWeights:
    """Weights of a llama GGUF on `ops`, through the cache (written on first load)."""
    path = gguf_file.path
    entry = cache_dir_for(path)
    if not (entry / "complete").is_file():
        logger.info("converting %s once; cached in %s", path, entry)
        reader = gguf_file.reader or open_gguf(path)
        tensors = _convert(_dequantize(reader, path), config, path)
        try:
            _write_cache(entry, tensors)
        except OSError:
            pass  # a read-only or full disk only costs the next load its speed
        return _to_weights(tensors.__getitem__, config, ops)

    def get(name: str) -> np.ndarray:
        return np.load(entry / f"{name}.npy", mmap_mode="r")

    return _to_weights(get, config, ops)


def _write_cache(entry: Path, tensors: dict[str, np.ndarray]):
    """Write to a temp folder and rename, so a crash never leaves a half entry that looks done;
    older entries for the same source file are removed."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, array in tensors.items():
        np.save(tmp / f"{name}.npy", array)
    (tmp / "complete").write_text("")
    source_prefix = entry.name.rsplit("-", 1)[0] + "-"
    keep = (tmp, _meta_file(entry))
    for old in entry.parent.glob(source_prefix + "*"):
        if old not in keep:
            old.unlink() if old.is_file() else shutil.rmtree(old, ignore_errors=True)
    tmp.rename(entry)


def _meta_file(entry: Path) -> Path:
    return entry.with_name(entry.name + ".meta.json")


def _write_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
