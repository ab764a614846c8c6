"""GGUF weights kept in their block formats: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K tensors load as
QuantizedWeight (the file's raw block bytes, (rows, bytes_per_row) uint8), so a 4-bit model takes
about a quarter of bf16's memory and of its bytes read per decoded token. Other tensors (F32 norms,
F16/BF16, other quant types) are dequantized to float32 (gguf_loader's cache keeps F16 and
dequantized blocks in float16 instead). Nothing is cached on disk: block bytes are read straight
from the file's memory map.

Rows are whole runs of blocks, so llama.cpp's q/k row permutation is undone on the raw rows, and
q/k/v (gate/up) of one type fuse by concatenating rows.

NOTE: a fused matrix whose parts differ in type (Q4_K_M files store attn_v, and in some layers
ffn_down, in Q6_K next to Q4_K q/k) is dequantized to the compute dtype instead of being split
into separate weights: the transformer keeps one qkv product (one launch, one layout for the fused
RoPE + cache write), and only those layers pay: in a Llama-3-8B Q4_K_M, about a third of the
layers' qkv (6144 x 4096) in bf16, +0.4 GB and ~0.1 ms per token on an H200.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
from tqdm import tqdm

from engine.model import gguf_dot, gguf_quants
from engine.model.config import ModelConfig
from engine.model.gguf_loader import GGUFError, GGUFFile, check_finite, open_gguf, unpermute_rows
from engine.model.quantized import QuantizedWeight, dequantize
from engine.model.weights import LayerWeights, ModelWeights

logger = logging.getLogger("pagedserve." + __name__)


def _host(tensor, shape: tuple, path) -> QuantizedWeight | np.ndarray:
    """One GGUF tensor on the host: its blocks if the format is kept, else float32."""
    from gguf.quants import dequantize as gguf_dequantize

    kind = tensor.tensor_type.name
    if kind in gguf_quants.BLOCKS and len(shape) == 2:
        data = np.asarray(tensor.data).reshape(shape[0], -1)
        bad = gguf_quants.nonfinite_scale(kind, data)
        if bad is not None:
            raise GGUFError(f"{path}: tensor {tensor.name!r} ({kind}): block {bad[1]} of row "
                            f"{bad[0]} has a float16 scale of {bad[2]}: the file is damaged "
                            "(weights must be finite)")
        return QuantizedWeight(kind, shape, data)
    try:
        with np.errstate(invalid="ignore", over="ignore"):  # check_finite names those
            array = gguf_dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    except NotImplementedError as e:
        raise GGUFError(f"{path}: cannot dequantize {tensor.name} ({kind}): {e}") from None
    check_finite(array, tensor.name, kind, path)
    return array.reshape(shape)


def _permuted(w, num_heads: int):
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(w.kind, w.shape, unpermute_rows(w.data, num_heads))
    return unpermute_rows(w, num_heads)


def _fused(parts: list) -> QuantizedWeight | np.ndarray:
    """Row-wise concatenation; parts of one block format stay in it (see the NOTE above)."""
    kinds = {p.kind if isinstance(p, QuantizedWeight) else "float" for p in parts}
    if len(kinds) == 1 and "float" not in kinds:
        rows = sum(p.shape[0] for p in parts)
        return QuantizedWeight(parts[0].kind, (rows, parts[0].shape[1]),
                               np.concatenate([p.data for p in parts]))
    return np.concatenate([dequantize(p) if isinstance(p, QuantizedWeight) else p for p in parts])


def _device(w, ops):
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(w.kind, w.shape, ops.from_host(w.data))
    return ops.from_host(w)


def load_quantized_gguf(gguf_file: GGUFFile, c: ModelConfig, ops) -> ModelWeights:
    """Weights of a llama GGUF on `ops`, kept in their block formats where they can be."""
    path = gguf_file.path
    reader = gguf_file.reader or open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}

    def take(name: str, shape: tuple):
        if name not in tensors:
            raise GGUFError(f"{path}: GGUF has no tensor {name!r}")
        got = tuple(int(d) for d in reversed(tensors[name].shape))  # GGUF lists dims fastest-first
        if got != shape:
            raise GGUFError(f"{path}: tensor {name!r} has shape {got}, the metadata implies "
                            f"{shape}")
        return _host(tensors[name], shape, path)

    h, i = c.hidden_size, c.intermediate_size
    layers = []
    for n in tqdm(range(c.num_layers), desc="loading weights", unit="layer", disable=None):
        b = f"blk.{n}."
        qkv = _fused([_permuted(take(b + "attn_q.weight", (c.q_size, h)), c.num_heads),
                      _permuted(take(b + "attn_k.weight", (c.kv_size, h)), c.num_kv_heads),
                      take(b + "attn_v.weight", (c.kv_size, h))])
        gate_up = _fused([take(b + "ffn_gate.weight", (i, h)), take(b + "ffn_up.weight", (i, h))])
        layers.append(LayerWeights(
            input_norm=_device(take(b + "attn_norm.weight", (h,)), ops),
            qkv=_device(qkv, ops),  # (q_size + 2 * kv_size, hidden)
            qkv_bias=None, q_norm=None, k_norm=None,
            o=_device(take(b + "attn_output.weight", (h, c.q_size)), ops),
            post_norm=_device(take(b + "ffn_norm.weight", (h,)), ops),
            gate_up=_device(gate_up, ops),  # (2 * intermediate, hidden)
            down=_device(take(b + "ffn_down.weight", (h, i)), ops),
        ))
    embed = _device(take("token_embd.weight", (c.vocab_size, h)), ops)
    lm_head = gguf_dot.lm_head(embed if c.tie_word_embeddings else _device(
        take("output.weight", (c.vocab_size, h)), ops))
    weights = ModelWeights(embed=embed, layers=layers,
                           norm=_device(take("output_norm.weight", (h,)), ops), lm_head=lm_head)
    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    logger.info("%s: block formats kept quantized (%s)", path.name,
                ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
    return weights


def dummy_quantized_weights(config: ModelConfig, ops, kind: str, seed: int = 0) -> ModelWeights:
    """Random weights at the model's shapes with every matrix (embedding included) in block
    format `kind`. Each matrix shape's blocks are drawn once and uploaded for every layer: the
    device holds a copy per layer (memory and bytes read are the real ones) while the host draws
    one layer's worth (Llama-3-8B in seconds)."""
    rng = np.random.default_rng(seed)
    c = config
    h, i = c.hidden_size, c.intermediate_size
    drawn: dict[tuple, np.ndarray] = {}

    def rand(*shape):
        if shape not in drawn:
            drawn[shape] = gguf_quants.random_blocks(kind, shape, 0.02, rng)
        return QuantizedWeight(kind, shape, ops.from_host(drawn[shape]))

    values = gguf_quants.BLOCKS[kind][0]
    if any(dim % values for dim in (h, i, c.q_size)):
        raise GGUFError(f"quantization {kind.lower()!r} packs rows in blocks of {values} values; "
                        f"hidden_size {h}, intermediate_size {i} and q_size {c.q_size} are not "
                        "all multiples of it")
    layers = [
        LayerWeights(input_norm=ops.ones((h,)), qkv=rand(c.q_size + 2 * c.kv_size, h),
                     qkv_bias=ops.random_weight((c.q_size + 2 * c.kv_size,), 0.02, rng)
                     if c.attention_bias else None,
                     q_norm=ops.ones((c.head_dim,)) if c.qk_norm else None,
                     k_norm=ops.ones((c.head_dim,)) if c.qk_norm else None, o=rand(h, c.q_size),
                     post_norm=ops.ones((h,)), gate_up=rand(2 * i, h), down=rand(h, i))
        for _ in range(c.num_layers)
    ]
    embed = rand(c.vocab_size, h)
    lm_head = gguf_dot.lm_head(embed if c.tie_word_embeddings else rand(c.vocab_size, h))
    return ModelWeights(embed=embed, layers=layers, norm=ops.ones((h,)), lm_head=lm_head)
