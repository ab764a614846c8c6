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

import os
from dataclasses import dataclass

import numpy as np

from engine.model.config import ConfigError


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


def longest_first(rows: np.ndarray, context_lens: np.ndarray) -> np.ndarray:
    """`rows` (a step's decode rows) in the order a decode attention grid takes them: the longest
    context first, ties in batch order. The GPU hands out thread blocks about in grid order, so
    the longest sequences start first and the short ones fill the last wave, instead of a few
    long ones running alone at its end (longest-processing-time-first scheduling)."""
    rows = np.asarray(rows)
    return rows[np.argsort(-np.asarray(context_lens, np.int64)[rows], kind="stable")]


ALLOWED_PAD = 2**31 - 1  # pads SamplingTensors.allowed_ids


@dataclass
class SamplingTensors:
    """Per-row sampling settings for the rows that sample this step (R rows), built on the host.

    Semantics (identical in both backends; the cuda kernels are tested against numpy_sampling):
      1. logprobs are taken from the raw logits (log_softmax, before anything below).
      2. logit_bias is added (min_tokens enters here as a -inf bias on stop ids), vLLM's order;
         an entry with bias_after >= 0 is added only where the row's previous token (last_ids)
         is that id (bad_words: -inf on a word's last token after the rest of it).
      3. penalties on the biased logits (vLLM's definitions): repetition over prompt and output
         tokens, then frequency and presence over output tokens; then a row with allowed ids
         (allowed_token_ids) sets every other token's logit to -inf.
      4. temperature == 0: greedy argmax (lowest id on ties). Otherwise exp((logit - max) /
         temperature), normalized; keep p >= k-th largest p (top_k), keep p >= smallest p whose
         strictly larger mass < top_p x the mass top_k and min_p keep (top_p, measured on
         their renormalized distribution), keep p >= min_p * max p (min_p); all three keep
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
    # Present only when some entry is conditional: the previous token it needs (-1: none), and
    # each row's previous token: -1 before any, a placeholder (step_inputs.placeholder) while it
    # is pending, resolved by the sampler from the previous step's sampled ids.
    bias_after: np.ndarray | None = None  # (R, max_biases) int32
    last_ids: np.ndarray | None = None  # (R,) int32
    num_logprobs: int = 0  # top-k logprobs to return per row (max over rows)
    # Rows whose logprobs are not the top-k (SamplerOutput.row_logprobs), off the common path:
    # chosen token ids (logprob_token_ids), padded with -1, or the whole vocabulary.
    logprob_rows: np.ndarray | None = None  # (N,) int32
    logprob_ids: np.ndarray | None = None  # (N, max_ids) int32
    full_logprob_rows: np.ndarray | None = None  # (F,) int32
    # Rows that sample only among some tokens (allowed_token_ids): ascending, padded with
    # ALLOWED_PAD (above every id, so the padded rows stay sorted).
    allowed_rows: np.ndarray | None = None  # (M,) int32
    allowed_ids: np.ndarray | None = None  # (M, max_allowed) int32
    # Penalties from token counts kept on the device between steps: row r reads slot
    # count_slots[r] of count_table (ops.alloc_token_counts; -1: no penalties). A row with
    # `rebuild` set first resets its slot from its prompt_ids / output_ids (the other rows' are
    # empty); every row with a slot adds its drawn token to the slot. None: prompt_ids /
    # output_ids alone.
    count_slots: np.ndarray | None = None  # (R,) int32
    rebuild: np.ndarray | None = None  # (R,) bool
    count_table: object | None = None  # the backend's TokenCounts / DeviceTokenCounts

    @property
    def has_penalties(self) -> bool:
        return (self.count_slots is not None or self.prompt_ids is not None
                or self.output_ids is not None)

    @property
    def all_greedy(self) -> bool:
        return bool(np.all(self.temperature == 0))


@dataclass
class SamplerOutput:
    token_ids: np.ndarray  # (R,) int32
    logprobs: np.ndarray  # (R,) float32, raw logprob of each chosen token
    top_ids: np.ndarray | None = None  # (R, num_logprobs) int32
    top_logprobs: np.ndarray | None = None  # (R, num_logprobs) float32
    # Rows whose logprobs are chosen ids or the whole vocabulary (SamplingTensors.logprob_rows,
    # full_logprob_rows) rather than top_ids: row -> (ids, raw logprobs), the whole vocabulary
    # best first.
    row_logprobs: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
    # Rows whose sampling raised (the runner retries row by row): row -> the cause; token -1.
    errors: dict[int, str] | None = None


class DeviceError(RuntimeError):
    """The chosen device cannot run on this machine (no CuPy, no GPU); the message says which."""


# The name users type (and vLLM's) for the numpy backend, and the alias it had first.
CPU_NAMES = ("cpu", "numpy")


def get_ops(device: str, dtype: str = "float32", cpu_threads: int = 1):
    """The backend for `device` ('cpu'/'numpy' or 'cuda'); cupy is imported only for 'cuda'.

    `cpu_threads` caps the BLAS threads of the host's numpy (every backend does some host work).
    """
    set_cpu_threads(cpu_threads)
    if device in CPU_NAMES:
        if dtype not in ("auto", "float32"):
            raise ConfigError(f"dtype {dtype!r} runs only on the cuda backend; the cpu backend "
                              "computes in float32 (use dtype 'auto' or 'float32')")
        from engine.executor.ops.numpy_ops import NumpyOps

        return NumpyOps()
    if device == "cuda":
        if dtype == "float32":
            raise ConfigError("dtype 'float32' runs only on the cpu backend; the cuda backend "
                              "computes in 'float16' or 'bfloat16'")
        check_cuda()
        from engine.executor.ops.cuda_ops import CudaOps

        return CudaOps(dtype)
    raise ValueError(f"device must be 'cpu', 'numpy' or 'cuda', got {device!r}")


def set_cpu_threads(num_threads: int):
    """Process-wide: OpenBLAS has one thread pool. Measured on a 2-core machine serving the
    default model next to another CPU-bound process, 1 thread decoded at 15-19 tok/s and 2 at
    8-9 (the threads wait on each other), hence EngineConfig's default of 1."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=num_threads, user_api="blas")


def check_cuda():
    """Raise DeviceError naming what is missing when CuPy or a GPU is not there."""
    try:
        import cupy
    except ImportError:
        raise DeviceError(f"device 'cuda' needs CuPy, which is not installed; install it with "
                          f"pip install -e '.[{cuda_extra()}]' in the checkout (make serve "
                          f"does it where nvidia-smi reports CUDA 12 or 13)") from None
    try:
        num_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, or a driver too old for this CuPy
        raise DeviceError(f"device 'cuda': CuPy cannot reach a GPU ({e})") from None
    if num_gpus == 0:
        raise DeviceError("device 'cuda': CuPy sees no NVIDIA GPU")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (ids or UUIDs; "0",
    "1", ... when it is unset); DeviceError without CuPy or a GPU."""
    check_cuda()
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [name.strip() for name in listed.split(",")][:count]


def cuda_extra() -> str:
    """The pagedserve extra matching the NVIDIA driver (asked through libcuda, without CuPy):
    'cuda13' for a driver that runs CUDA 13, else 'cuda12'."""
    import ctypes

    version = ctypes.c_int(0)
    try:
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
    except (OSError, AttributeError):
        return "cuda12"  # no driver to ask; the more common one
    return "cuda13" if version.value >= 13000 else "cuda12"


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when CuPy is installed and sees a GPU, else 'numpy'; 'cpu' -> 'numpy'."""
    if device in CPU_NAMES:
        return "numpy"
    if device != "auto":
        return device
    try:
        check_cuda()
    except DeviceError:  # no cupy, no driver, or no device: all mean "run on the CPU"
        return "numpy"
    return "cuda"
