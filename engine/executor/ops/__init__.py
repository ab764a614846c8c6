"""The op interface the model is written against, and the two backends behind it.

`numpy_ops` is the fp32 reference that runs anywhere; `cuda_ops` runs the same ops on an NVIDIA GPU
with CuPy and the kernels in cuda/. Both take the inputs below, laid out identically, so every cuda
op can be held to its numpy twin.

Layouts shared by both backends (T = new tokens this step, B = sequences this step):
    qkv        (T, (num_heads + 2 * num_kv_heads) * head_dim)   q heads, then k heads, then v heads
    k_cache    (num_blocks, num_kv_heads, block_size, head_dim)  one per layer; v_cache the same
    slot       block_table[pos // block_size] * block_size + pos % block_size
Query head h reads KV head h // (num_heads // num_kv_heads) (grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat batch and in the paged cache.

    Sequence s owns new tokens query_start_loc[s]:query_start_loc[s+1]; after they are written, its
    cache holds context_lens[s] tokens, so its i-th new token is at position
    context_lens[s] - num_new + i and attends causally to cache positions 0..that position.
    """

    slot_mapping: np.ndarray  # (T,) int32, cache slot of each new token
    query_start_loc: np.ndarray  # (B+1,) int32, cumulative new-token counts
    context_lens: np.ndarray  # (B,) int32, tokens in the cache after this step's write
    block_tables: np.ndarray  # (B, max_blocks_per_seq) int32, padded with -1
    max_query_len: int  # host-side: longest new-token run (1 for a decode-only batch)
    max_context_len: int  # host-side: longest context

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass
class SamplingTensors:
    """Per-row sampling settings for the rows that sample this step (R rows), built on the host.

    Semantics (identical in both backends; the cuda kernels are tested against numpy_sampling):
      1. logprobs are taken from the raw logits (log_softmax, before anything below).
      2. penalties on the logits (vLLM's definitions): repetition over prompt and output tokens,
         then frequency and presence over output tokens.
      3. logit_bias is added (min_tokens enters here as a -inf bias on stop ids).
      4. temperature == 0: greedy argmax (lowest id on ties). Otherwise exp((logit - max) /
         temperature), normalized; keep p >= k-th largest p (top_k), keep p >= smallest p whose
         strictly larger mass < top_p (top_p), keep p >= min_p * max p (min_p); all three keep
         ties, and the largest p is always kept. A row with every logit -inf takes the argmax.
         Every float32 value is valid (a 0 top_p, a denormal temperature, an inf or 0
         repetition penalty): the sampler clamps rather than fails.
      5. draw: u = uniform(seed, step) from a counter-based hash; the token is the first id whose
         running sum (in id order) of kept p exceeds u * (sum of kept p). So a row's draws depend
         only on its seed and step, never on the rest of the batch.
    """

    temperature: np.ndarray  # (R,) float32, 0 = greedy
    top_k: np.ndarray  # (R,) int32, 0 = off
    top_p: np.ndarray  # (R,) float32, 1 = off
    min_p: np.ndarray  # (R,) float32, 0 = off
    seeds: np.ndarray  # (R,) uint64
    steps: np.ndarray  # (R,) uint32, tokens this row has generated so far
    presence_penalty: np.ndarray  # (R,) float32, 0 = off
    frequency_penalty: np.ndarray  # (R,) float32, 0 = off
    repetition_penalty: np.ndarray  # (R,) float32, 1 = off
    # Present only when some row uses a penalty: token ids padded with -1.
    prompt_ids: np.ndarray | None = None  # (R, max_prompt_len) int32
    output_ids: np.ndarray | None = None  # (R, max_output_len) int32
    # Present only when some row has a bias: (token id, value) pairs padded with id -1.
    bias_ids: np.ndarray | None = None  # (R, max_biases) int32
    bias_values: np.ndarray | None = None  # (R, max_biases) float32
    num_logprobs: int = 0  # top-k logprobs to return per row (max over rows)

    @property
    def all_greedy(self) -> bool:
        return bool(np.all(self.temperature == 0))


@dataclass
class SamplerOutput:
    token_ids: np.ndarray  # (R,) int32
    logprobs: np.ndarray  # (R,) float32, raw logprob of each chosen token
    top_ids: np.ndarray | None = None  # (R, num_logprobs) int32
    top_logprobs: np.ndarray | None = None  # (R, num_logprobs) float32
    # Rows whose sampling raised (the runner retries row by row): row -> the cause; token -1.
    errors: dict[int, str] | None = None


def get_ops(device: str, dtype: str = "float32"):
    """The backend for `device` ('numpy' or 'cuda'); cupy is imported only for 'cuda'."""
    if device == "numpy":
        from engine.executor.ops.numpy_ops import NumpyOps

        return NumpyOps()
    if device == "cuda":
        from engine.executor.ops.cuda_ops import CudaOps

        return CudaOps(dtype)
    raise ValueError(f"device must be 'numpy' or 'cuda', got {device!r}")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when CuPy is installed and sees a GPU, else 'numpy'."""
    if device != "auto":
        return device
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return "cuda"
    except Exception:  # no cupy, no driver, or no device: all mean "run on the CPU"
        pass
    return "numpy"
