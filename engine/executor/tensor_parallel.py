"""Tensor parallelism: which slice of every weight a rank holds, and the ops that join the slices.

Rank r of N holds (Megatron-style, so each layer needs two all-reduces):
    qkv        its num_heads/N query heads, and its KV heads: num_kv_heads/N of them, or, when
               there are fewer KV heads than ranks, the one its query heads read (replicated)
    o          the columns of its query heads; the partial products are summed (all_reduce)
    gate_up    its intermediate/N rows of gate and of up
    down       the matching columns; all_reduce
    embed      vocabulary rows r*V/N:(r+1)*V/N; a token outside them looks up zeros; all_reduce
    lm_head    the same rows; rank 0 gathers the (R, V/N) pieces into (R, V) logits and samples
Norms (and the rotary table) are replicated. So the transformer (transformer.py) reads the same at
every N: `ops.all_reduce` and `ops.gather_vocab` are identities on the plain backends, and
TensorParallelOps (below) makes them collectives.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.executor.distributed import CommunicatorError
from engine.model.config import ConfigError, ModelConfig
from engine.model.quantized import QuantizedWeight
from engine.model.weights import LayerWeights, ModelWeights


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """ConfigError naming the field that N=size does not divide."""
    if size == 1:
        return
    name = f"tensor_parallel_size ({size})"
    for field, value in (("num_attention_heads", config.num_heads),
                         ("intermediate_size", config.intermediate_size),
                         ("vocab_size", config.vocab_size)):
        if value % size:
            raise ConfigError(f"{name} must divide the model's {field} ({value})")
    kv = config.num_kv_heads
    if kv % size and size % kv:
        raise ConfigError(f"{name} and the model's num_key_value_heads ({kv}) must divide one "
                          "another (KV heads are split, or replicated when fewer than ranks)")


def shard_config(config: ModelConfig, size: int) -> ModelConfig:
    """The shape one rank's transformer and KV cache see (vocab_size stays the model's)."""
    return dataclasses.replace(config, num_heads=config.num_heads // size,
                               num_kv_heads=max(1, config.num_kv_heads // size),
                               intermediate_size=config.intermediate_size // size)


def shard_weights(weights: ModelWeights, config: ModelConfig, rank: int, size: int
                  ) -> ModelWeights:
    """Rank `rank`'s slice of every weight (module docstring), as new contiguous arrays of the
    same kind (numpy or cupy); the full arrays can be dropped after."""
    if size == 1:
        return weights
    c, part = config, shard_config(config, size)
    d = c.head_dim
    q_heads = np.arange(rank * part.num_heads, (rank + 1) * part.num_heads)
    # The KV heads rank r's query heads read: a slice of them, or (replicated) the one of its group.
    first_kv = (rank * c.num_kv_heads // size if c.num_kv_heads < size
                else rank * part.num_kv_heads)
    kv_heads = np.arange(first_kv, first_kv + part.num_kv_heads)
    qkv_rows = np.concatenate([_head_rows(q_heads, d), c.q_size + _head_rows(kv_heads, d),
                               c.q_size + c.kv_size + _head_rows(kv_heads, d)])
    q_cols = _head_rows(q_heads, d)
    i, n = c.intermediate_size, part.intermediate_size
    inter = np.arange(rank * n, (rank + 1) * n)
    gate_up_rows = np.concatenate([inter, i + inter])
    v = c.vocab_size // size
    vocab = slice(rank * v, (rank + 1) * v)

    def layer(w: LayerWeights) -> LayerWeights:
        return LayerWeights(
            input_norm=w.input_norm, q_norm=w.q_norm, k_norm=w.k_norm, post_norm=w.post_norm,
            qkv=_take(w.qkv, rows=qkv_rows),  # (part q + 2 part kv, hidden)
            qkv_bias=None if w.qkv_bias is None else _take(w.qkv_bias, rows=qkv_rows),
            o=_take(w.o, cols=q_cols),  # (hidden, part q)
            gate_up=_take(w.gate_up, rows=gate_up_rows),  # (2 * inter / N, hidden)
            down=_take(w.down, cols=inter))  # (hidden, inter / N)

    embed = _take(weights.embed, rows=vocab)  # (vocab / N, hidden)
    lm_head = embed if weights.lm_head is weights.embed else _take(weights.lm_head, rows=vocab)
    return ModelWeights(embed=embed, layers=[layer(w) for w in weights.layers],
                        norm=weights.norm, lm_head=lm_head)


def map_weights(fn, weights: ModelWeights) -> ModelWeights:
    """`fn` applied to every array (a tied LM head stays the embedding's)."""
    def layer(w: LayerWeights) -> LayerWeights:
        return LayerWeights(**{f.name: None if getattr(w, f.name) is None
                               else fn(getattr(w, f.name)) for f in dataclasses.fields(w)})

    embed = fn(weights.embed)
    lm_head = embed if weights.lm_head is weights.embed else fn(weights.lm_head)
    return ModelWeights(embed=embed, layers=[layer(w) for w in weights.layers],
                        norm=fn(weights.norm), lm_head=lm_head)


def _head_rows(heads: np.ndarray, head_dim: int) -> np.ndarray:
    """Row indices of `heads` in a (heads * head_dim, ...) matrix."""
    return (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def _take(w, rows=None, cols=None):
    if isinstance(w, QuantizedWeight):
        raise ConfigError("tensor_parallel_size > 1 does not support quantized weights (fp8, "
                          "GGUF kept quantized) yet; use a float checkpoint or "
                          "tensor_parallel_size 1")
    if rows is not None:
        w = w[_like(w, rows)]
    if cols is not None:
        w = w[:, _like(w, cols)]
    return w.copy()  # C-contiguous, and no view keeps the full array alive


def _like(w, index):
    """An index array on w's device (cupy gathers with a cupy index); a slice as it is."""
    if isinstance(w, np.ndarray) or isinstance(index, slice):
        return index
    import cupy

    return cupy.asarray(index)


def release_unused_memory(ops) -> None:
    """Hand the blocks that the dropped full weights held back to the device (cuda), so that
    the KV cache, sized from free memory, gets them."""
    if ops.name == "cuda":
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()


# ----------------------------------------------------------------------------- ops


class TensorParallelOps:
    """A backend (NumpyOps, CudaOps) whose embedding, all_reduce and gather_vocab span the
    tensor-parallel group; every other op is the backend's own."""

    def __init__(self, ops, comm, rank: int, size: int, vocab_size: int):
        self._ops, self.comm = ops, comm
        self.rank, self.size = rank, size
        self.vocab_start = rank * (vocab_size // size)
        self.vocab_rows = vocab_size // size
        if ops.name == "numpy":
            self._xp = np
        else:
            import cupy

            self._xp = cupy

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def is_fatal(self, error: BaseException) -> bool:
        """A failed collective leaves the group out of step: nothing can run after it."""
        return isinstance(error, CommunicatorError) or self._ops.is_fatal(error)

    def embedding(self, ids, table):
        # ids (T,) int32, table (vocab / N, hidden): this rank's rows -> (T, hidden) summed
        xp = self._xp
        local = ids - np.int32(self.vocab_start)
        mine = (local >= 0) & (local < self.vocab_rows)  # (T,)
        x = self._ops.embedding(xp.where(mine, local, 0).astype(np.int32, copy=False), table)
        # Zero bits are +0.0 in every float format, the bf16-as-uint16 storage included.
        x = xp.where(mine[:, None], x, xp.zeros((), x.dtype))
        return self.all_reduce(x)

    def all_reduce(self, x):
        if hasattr(x, "resolve"):  # a product left in split-K partial sums: summed here first
            x = x.resolve()
        return self.comm.all_reduce(x)

    def gather_vocab(self, logits):
        """(R, vocab / N) on every rank -> rank 0: (R, vocab); other ranks: None."""
        return self.comm.gather(logits)
