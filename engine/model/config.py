"""Model and engine configuration (floor 1: importing it needs the stdlib and
engine/core/limits.py's is_int; EngineConfig.validate() imports gguf_quants, hence numpy).

`ModelConfig` is the one description of a transformer that the loader, the model and the
benchmarks share. It comes from an HF `config.json`, from GGUF metadata (gguf_loader.py),
or from a shipped preset (engine/model/presets/*.json) for dummy weights.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from engine.core.limits import is_int

# HF architecture name -> (family, q/k/v bias, per-head q/k RMSNorm)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False, False),
    "MistralForCausalLM": ("llama", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}

PRESETS_DIR = Path(__file__).parent / "presets"
# EngineConfig.dtype's values; vLLM's other names (half, float) become the first ones at validate()
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
DTYPES = ("auto", "float16", "bfloat16", "float32", *DTYPE_ALIASES)


class ConfigError(ValueError):
    """A model description that pagedserve cannot run; the message names the field."""


# ModelConfig's field -> the config.json key a message should name
_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads"}


def json_object(path: Path, error: type[ValueError] = ConfigError) -> dict:
    """A JSON file holding an object, or `error` naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # also: nested past Python's limit
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = (
        None  # HF `rope_scaling`; only type "llama3" changes the frequencies
    )
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    dtype: str = "float32"  # dtype the checkpoint is stored in: float32 | float16 | bfloat16
    # "fp8": the checkpoint stores its linear weights as E4M3 with scales (quantization_config)
    quantization: str | None = None
    # HF's sliding_window where some layer attends only to that many latest tokens (Mistral v0.1;
    # Qwen2/3 with use_sliding_window); None: full attention. The attention here is always full,
    # which equals the windowed one only while a sequence fits the window: core_setup keeps
    # max_model_len within it.
    sliding_window: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{_HF_NAMES.get(name, name)} must be an integer >= 1, got "
                                  f"{value!r}")
            setattr(self, name, int(value))  # (GGUF metadata holds numpy integers)
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            # not `value <= 0`: NaN passed it (every norm, or every rotation, NaN), as did inf
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not 0 < value < float("inf")):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
            setattr(self, name, float(value))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"rope_scaling must be an object, got {self.rope_scaling!r}")
        if self.rope_scaling is not None and _rope_kind(self.rope_scaling) == "llama3":
            _check_llama3_scaling(self.rope_scaling)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (RoPE turns pairs of values), got "
                              f"{self.head_dim}")
        for name in ("tie_word_embeddings", "attention_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):  # "false" is no false
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        bad = [e for e in self.eos_token_ids if not 0 <= e < self.vocab_size]
        if bad:
            raise ConfigError(f"eos_token_id {bad[0]} is outside the vocabulary (vocab_size "
                              f"{self.vocab_size})")
        if self.sliding_window is not None and (not is_int(self.sliding_window)
                                                or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be an integer >= 1 or null, got "
                              f"{self.sliding_window!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_linear_params(self) -> int:
        """Parameters in matrix products per token, lm_head included (for rooflines)."""
        h, i = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i
        return self.num_layers * per_layer + self.vocab_size * h

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"architectures must be a list of names, got {archs!r:.80}")
        arch = archs[0] if archs else cfg.get("model_type", "<missing 'architectures'>")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        _family, bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        # Fields that change the math the transformer does not do: refused, never run without
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {act!r} is not supported (the MLP is SiLU-gated)")
        if cfg.get("mlp_bias"):
            raise ConfigError("mlp_bias: true is not supported (the MLP's projections have no "
                              "bias here)")

        def need(key):
            if key not in cfg:
                raise ConfigError(f"config.json is missing {key!r}")
            return cfg[key]

        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        layers = need("num_hidden_layers")
        for key, value in (("num_attention_heads", num_heads), ("hidden_size", hidden),
                           ("num_hidden_layers", layers)):
            if not is_int(value) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
        if cfg.get("head_dim") is None and hidden % num_heads:
            raise ConfigError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads "
                              f"({num_heads}) and no head_dim is given")
        # None means "not given"; an explicit 0 is left for the checks to refuse by name
        head_dim = hidden // num_heads if cfg.get("head_dim") is None else cfg["head_dim"]
        eos = _as_list(cfg.get("eos_token_id"))
        if generation_config:
            eos += [e for e in _as_list(generation_config.get("eos_token_id"),
                                        "generation_config.json's eos_token_id") if e not in eos]
        # transformers >= 5 writes `rope_parameters` (theta and scaling in one dict) instead of
        # `rope_theta` + `rope_scaling`; read both spellings
        rope = cfg.get("rope_parameters") or {}
        for key, value in (("rope_parameters", rope),
                           ("quantization_config", cfg.get("quantization_config") or {})):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be an object, got {value!r:.80}")
        scaling = cfg.get("rope_scaling")
        if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            scaling = rope
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise ConfigError(f"rope_scaling must be an object, got {scaling!r}")
            kind = _rope_kind(scaling)
            if kind not in ("llama3", "default"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
        # Mistral windows every layer when sliding_window is set; Qwen2/3 only with
        # use_sliding_window, from layer max_window_layers on (HF's layer_types)
        window = cfg.get("sliding_window")
        window_layers = cfg.get("max_window_layers", 28)
        if _family != "llama" and cfg.get("use_sliding_window") and not is_int(window_layers):
            raise ConfigError(f"max_window_layers must be an integer, got {window_layers!r:.80}")
        if _family != "llama" and not (cfg.get("use_sliding_window") and window_layers < layers):
            window = None
        if arch == "LlamaForCausalLM":  # Llama has no sliding window
            window = None
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=layers,
            num_heads=num_heads,
            num_kv_heads=(num_heads if cfg.get("num_key_value_heads") is None
                          else cfg["num_key_value_heads"]),
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", bias) or bias,
            qk_norm=qk_norm,
            eos_token_ids=eos,
            bos_token_id=cfg.get("bos_token_id"),
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            quantization=_checkpoint_quantization(cfg.get("quantization_config")),
            sliding_window=window,
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ModelConfig:
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in model folder {str(folder)!r}")
        cfg = json_object(path)
        gen_path = folder / "generation_config.json"
        gen = json_object(gen_path) if gen_path.is_file() else None
        try:
            return cls.from_dict(cfg, gen)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def cut(self, num_layers: int, vocab_size: int) -> ModelConfig:
        """A copy with fewer layers and a smaller vocabulary, its layers at full width: kernel
        checks at a model's real shapes that run in seconds. End-of-sequence ids past the new
        vocabulary are dropped."""
        return replace(self, num_layers=num_layers, vocab_size=vocab_size,
                       eos_token_ids=[e for e in self.eos_token_ids if e < vocab_size])

    def end_ids(self, tokenizer) -> list[int]:
        """The ids that end a generation: the config's eos ids, and the tokenizer's eos_token
        where it is another row of the logits (one past them can never be sampled, and masking
        it for min_tokens indexed past the logits)."""
        eos = list(self.eos_token_ids)
        extra = getattr(tokenizer, "eos_token_id", None)
        if extra is not None and extra not in eos and 0 <= extra < self.vocab_size:
            eos.append(extra)
        return eos

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
        return cls.from_dict(json.loads(path.read_text()))


# generation_config.json's keys that give sampling defaults, as vLLM reads them
# (ModelConfig.get_diff_sampling_param); it looks at no other key, do_sample included.
GENERATION_SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p",
                            "max_new_tokens")


def generation_config_problem(value) -> str | None:
    """What is wrong with a --generation-config value, or None: "auto" (the model's own file),
    "vllm" (none) or a folder holding generation_config.json."""
    if not isinstance(value, str):
        return f"expected 'auto', 'vllm' or a folder, got {value!r}"
    if value in ("auto", "vllm"):
        return None
    if not Path(value).is_dir():
        return f"{value!r} is not a folder ('auto', 'vllm' or a folder is expected)"
    if not (Path(value) / "generation_config.json").is_file():
        return f"the folder {value!r} holds no generation_config.json"
    return None


def generation_sampling_defaults(folder: Path) -> dict:
    """The SamplingParams fields folder/generation_config.json sets (HF's max_new_tokens is
    max_tokens); {} without the file. Null values are not set, as in vLLM."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    gen = json_object(path)
    return {"max_tokens" if key == "max_new_tokens" else key: gen[key]
            for key in GENERATION_SAMPLING_KEYS if gen.get(key) is not None}


def _checkpoint_quantization(qc: dict | None) -> str | None:
    """config.json's quantization_config -> "fp8" or None; other schemes are refused."""
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported "
                          "(only 'fp8' checkpoints load as they are)")
    if qc.get("weight_block_size"):
        raise ConfigError("quantization_config.weight_block_size: block-wise FP8 scales are not "
                          "supported (per-tensor or per-channel weight_scale only)")
    return "fp8"


def _as_list(value, name: str = "eos_token_id") -> list[int]:
    """A token id or a list of them (HF writes either) as a list; else a ConfigError."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(is_int(v) for v in values):
        raise ConfigError(f"{name} must be a token id or a list of them, got {value!r:.80}")
    return [int(v) for v in values]


def _rope_kind(scaling: dict):
    return scaling.get("rope_type", scaling.get("type"))


def _check_llama3_scaling(s: dict) -> None:
    """Llama 3.1's rope_scaling fields, each a number the frequency rescaling can use."""
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        value = s.get(key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not 0 < value < float("inf"):
            raise ConfigError(f"rope_scaling.{key} must be a finite number > 0, got {value!r}")
    old = s.get("original_max_position_embeddings")
    if not is_int(old) or old < 1:
        raise ConfigError(f"rope_scaling.original_max_position_embeddings must be an integer "
                          f">= 1, got {old!r}")
    if s["high_freq_factor"] <= s["low_freq_factor"]:
        raise ConfigError(f"rope_scaling.high_freq_factor ({s['high_freq_factor']}) must be "
                          f"greater than low_freq_factor ({s['low_freq_factor']})")


@dataclass
class SpeculativeConfig:
    """N-gram speculative decoding (prompt lookup), with vLLM's names. Each step, a decoding
    sequence whose last tokens (the longest suffix of prompt_lookup_max down to
    prompt_lookup_min tokens) occurred earlier in its prompt + output proposes the
    num_speculative_tokens that followed; the model verifies them in the same forward."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # No speculation in a step whose running batch is larger: verification costs k extra
    # tokens per sequence, which pays at low load (bound by weight reads) but not under load.
    # 32: measured on the H200 (Llama-3-8B shapes, k = 4, README "Speculative decoding"):
    # +45-50% at batch 32 with either measured acceptance profile, +5-17% at 64, -21% at 128;
    # 32 keeps a margin for workloads that copy less, and its verify graphs (32 x 5 = 160 rows)
    # fit within the decode graphs already captured for max_num_seqs 256.
    disable_by_batch_size: int = 32

    @classmethod
    def from_dict(cls, d: dict) -> SpeculativeConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"speculative_config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"speculative_config has unknown field(s) {unknown}; known: "
                              f"{sorted(known)}")
        if "num_speculative_tokens" not in d:
            raise ConfigError("speculative_config.num_speculative_tokens is required")
        d = dict(d)
        # one bound given: the other's default gives way to it where they would cross (vLLM
        # takes the given bound for both; the defaults 2..4 stay wherever they fit)
        lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
        if lo is None and _positive_int(hi):
            d["prompt_lookup_min"] = min(cls.prompt_lookup_min, hi)
        if hi is None and _positive_int(lo):
            d["prompt_lookup_max"] = max(cls.prompt_lookup_max, lo)
        config = cls(**d)
        config.validate()
        return config

    def validate(self) -> None:
        if self.method != "ngram":
            raise ConfigError(f"speculative_config.method must be 'ngram' (the one method "
                              f"implemented), got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                     "disable_by_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"speculative_config.{name} must be an integer >= 1, "
                                  f"got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) "
                              f"must be <= prompt_lookup_max ({self.prompt_lookup_max})")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class EngineConfig:
    """Everything the engine needs besides the model; field names follow vLLM's flags."""

    model: str | None = (
        None  # HF folder, .gguf file, preset name (with load_format="dummy"), None = default
    )
    device: str = "auto"  # auto | cuda | cpu (numpy, its first name, is an alias)
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32 (half and float: DTYPE_ALIASES)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from memory
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    # Data parallel: engine cores behind one API process (engine/dp_client.py), each a full copy
    # of the model; the rank is set per core, and keeps unseeded sampling apart across cores.
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    # Schedule step N+1 while step N runs on the device (engine/engine_core.py). None: on for cuda,
    # off for numpy (where the host is the device, so nothing overlaps).
    async_scheduling: bool | None = None
    load_format: str = "auto"  # auto | dummy
    # Linear layers kept quantized (model/loader.load_model checks it): "fp8" quantizes a
    # bf16/fp16 checkpoint's qkv, o, gate_up and down to FP8 E4M3 at load (per-output-channel
    # scales; an FP8 checkpoint is FP8 without it); a GGUF block format ("q4_k", "q8_0", ...)
    # draws dummy weights in that format (a GGUF file's formats come from the file).
    quantization: str | None = None
    # GGUF files: dequantize block formats at load (True) or keep them (False); None: kept on
    # cuda, dequantized on cpu (where dequantizing on every call costs more than the step).
    gguf_dequantize: bool | None = None
    seed: int = 0
    # BLAS threads of the host's numpy; 1 measured fastest on a busy 2-core machine (see
    # engine/executor/ops/__init__.py set_cpu_threads); more help long prompts on idle cores.
    cpu_threads: int = 1
    # A dict of SpeculativeConfig fields (validate() turns it into one), or None: no speculation.
    speculative_config: SpeculativeConfig | dict | None = None
    # Tensor parallelism (engine/executor/tensor_parallel.py): one rank per GPU (per process on
    # the cpu backend); this process is rank 0. Ranks 0..tp_local_ranks-1 run on this host (None:
    # all); the others are started with `pagedserve worker --rank R` on theirs and join rank 0 at
    # master_addr:master_port (None: $PAGEDSERVE_MASTER_ADDR / _PORT, else 127.0.0.1, any port).
    tensor_parallel_size: int = 1
    tp_local_ranks: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    # Most logprobs a request may ask per token (-1: the whole vocabulary, which
    # prompt_logprobs=-1 asks). The CLI defaults to vLLM's 20; a library caller, to no cap.
    max_logprobs: int = -1
    # Sampling defaults for what a request leaves unset (vLLM's --generation-config): "auto" =
    # the model folder's generation_config.json, "vllm" = none, else a folder holding one.
    generation_config: str = "auto"

    def _check_types(self):
        """Each field of the type it must have (a bool is no count): a ConfigError naming it,
        not a TypeError from wherever the value is first used."""
        ints = ("max_num_seqs", "max_num_batched_tokens", "block_size", "cpu_threads",
                "tensor_parallel_size", "data_parallel_size", "data_parallel_rank", "seed",
                "max_logprobs")
        optional_ints = ("max_model_len", "num_kv_blocks", "tp_local_ranks", "master_port")
        for name in ints + optional_ints:
            value = getattr(self, name)
            if not (is_int(value) or (name in optional_ints and value is None)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        for name in ("model", "quantization", "master_addr"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {value!r}")
        for name in ("device", "dtype", "load_format"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("enable_prefix_caching", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        gmu = self.gpu_memory_utilization
        if isinstance(gmu, bool) or not isinstance(gmu, (int, float)):
            raise ConfigError(f"gpu_memory_utilization must be a number, got {gmu!r}")

    def validate(self):
        if isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        elif self.speculative_config is not None:
            if not isinstance(self.speculative_config, SpeculativeConfig):
                raise ConfigError("speculative_config must be a dict or None, got "
                                  f"{type(self.speculative_config).__name__}")
            self.speculative_config.validate()
        self._check_types()
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "cpu_threads",
                    "tensor_parallel_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        problem = generation_config_problem(self.generation_config)
        if problem is not None:
            raise ConfigError(f"generation_config: {problem}")
        if self.max_logprobs < -1:
            # as vLLM's: any cap; a request asks at most MAX_LOGPROBS top ones or -1 (the whole
            # vocabulary), which a cap of at least the vocabulary's size allows too
            raise ConfigError(f"max_logprobs must be -1 (the whole vocabulary) or >= 0, got "
                              f"{self.max_logprobs}")
        if not 0 <= self.seed < 2**64:  # numpy's generators take no other seed
            raise ConfigError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.tp_local_ranks is not None:
            if not 1 <= self.tp_local_ranks <= self.tensor_parallel_size:
                raise ConfigError(f"tp_local_ranks must be in 1..tensor_parallel_size "
                                  f"({self.tensor_parallel_size}), got {self.tp_local_ranks}")
        if self.master_port is not None and not 0 <= self.master_port <= 65535:
            raise ConfigError(f"master_port must be in 0..65535, got {self.master_port}")
        if self.gguf_dequantize is not None and not isinstance(self.gguf_dequantize, bool):
            raise ConfigError("gguf_dequantize must be True, False or None (auto), got "
                              f"{self.gguf_dequantize!r}")
        if self.async_scheduling not in (None, True, False):
            raise ConfigError("async_scheduling must be True, False or None (auto), got "
                              f"{self.async_scheduling!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        from engine.model.gguf_quants import KINDS as GGUF_KINDS

        choices = {
            "device": ("auto", "cuda", "cpu", "numpy"),
            "dtype": DTYPES,
            "load_format": ("auto", "dummy"),
            # fp8, or a GGUF block format for dummy weights (model/gguf_quants.py)
            "quantization": (None, "fp8", *(k.lower() for k in GGUF_KINDS)),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.data_parallel_size < 1:
            raise ConfigError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ConfigError(f"data_parallel_rank must be in [0, data_parallel_size = "
                              f"{self.data_parallel_size}), got {self.data_parallel_rank}")
