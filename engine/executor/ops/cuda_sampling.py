"""Sampling on the GPU (cuda/sampling.cu): numpy_sampling.sample's semantics, one sync a step.

sample_kernel finds top-k / top-p thresholds from a histogram pass and a sort of the few
candidates in shared memory (3 passes over a row; 4 or 5 when the kept set is thousands of
tokens: the cut's window of bins, refined once more if needed, and a draw over the row; it
bisects only for nearly flat rows); SAMPLER = "bisect" selects the previous kernel
(cuda/sampling_bisect.cu, ~31 passes per threshold), which tools/kernel_check.py times as baseline.
"""

from __future__ import annotations

import cupy
import numpy as np

from engine.executor.ops import SamplerOutput, SamplingTensors
from engine.executor.ops.cuda_kernels import kernel

NUM_PARAMS = 10  # words per row, laid out as in cuda/sampling_common.cuh
SAMPLER = "select"  # or "bisect": the previous kernel


def pack_params(t: SamplingTensors) -> np.ndarray:
    """(R, NUM_PARAMS) int32: the per-row settings as 32-bit words (floats bit-cast)."""
    rows = len(t.temperature)
    words = np.zeros((rows, NUM_PARAMS), np.uint32)
    f = words.view(np.float32)
    seeds = np.asarray(t.seeds, np.uint64)
    f[:, 0] = t.temperature
    words[:, 1] = np.asarray(t.top_k, np.int64).astype(np.uint32)
    f[:, 2] = t.top_p
    f[:, 3] = t.min_p
    words[:, 4] = (seeds & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    words[:, 5] = (seeds >> np.uint64(32)).astype(np.uint32)
    words[:, 6] = np.asarray(t.steps, np.uint32)
    f[:, 7] = t.presence_penalty
    f[:, 8] = t.frequency_penalty
    f[:, 9] = t.repetition_penalty
    return words.view(np.int32)


def _ids(a) -> tuple:
    if a is None or a.size == 0:
        return np.uint64(0), 0
    a = np.ascontiguousarray(a, np.int32)
    return cupy.asarray(a), a.shape[1]


def upload(t: SamplingTensors) -> dict:
    """The step's per-row settings on the device (host -> device copies only)."""
    dev = {"params": cupy.asarray(pack_params(t)), "prompt": _ids(t.prompt_ids),
           "output": _ids(t.output_ids), "bias": None}
    if t.bias_ids is not None and t.bias_ids.size:
        dev["bias"] = (cupy.asarray(np.ascontiguousarray(t.bias_ids, np.int32)),
                       cupy.asarray(np.ascontiguousarray(t.bias_values, np.float32)))
    return dev


def launch(logits: cupy.ndarray, t: SamplingTensors, dev: dict, ctype: str) -> cupy.ndarray:
    """The sampling kernels on the current stream (no host copy: CUDA-graph capturable) ->
    (R, 2 + 2 * num_logprobs) int32 results, laid out as in cuda/sampling_common.cuh."""
    rows, vocab = logits.shape
    n_lp = int(t.num_logprobs)
    params, i32 = dev["params"], np.int32
    adjusted = np.uint64(0)
    has_penalty = t.prompt_ids is not None or t.output_ids is not None
    if has_penalty or dev["bias"] is not None:
        counts = np.uint64(0)
        if has_penalty:
            counts = cupy.zeros((rows, vocab), cupy.int32)
            (prompt, p_len), (output, o_len) = dev["prompt"], dev["output"]
            kernel("sampling.cu", "penalty_counts_kernel")(
                (rows,), (256,), (counts, prompt, output, i32(p_len), i32(o_len), i32(vocab)))
        adjusted = cupy.empty((rows, vocab), cupy.float32)
        kernel("sampling.cu", f"adjust_logits_kernel<{ctype}>")(
            (rows, -(-vocab // 256)), (256,), (adjusted, logits, counts, params, i32(vocab)))
        if dev["bias"] is not None:
            ids, values = dev["bias"]
            kernel("sampling.cu", "add_logit_bias_kernel")(
                (rows,), (1,), (adjusted, ids, values, i32(ids.shape[1]), i32(vocab)))
    result = cupy.empty((rows, 2 + 2 * n_lp), cupy.int32)
    if SAMPLER == "bisect":
        probs = np.uint64(0) if t.all_greedy else cupy.empty((rows, vocab), cupy.float32)
        kernel("sampling_bisect.cu", f"sample_bisect_kernel<{ctype}>")(
            (rows,), (1024,), (result, probs, logits, adjusted, params, i32(vocab), i32(n_lp)))
    else:
        kernel("sampling.cu", f"sample_kernel<{ctype}>")(
            (rows,), (1024,), (result, logits, adjusted, params, i32(vocab), i32(n_lp)))
    return result


def sample_on_device(logits: cupy.ndarray, t: SamplingTensors, ctype: str) -> SamplerOutput:
    # logits (R, vocab), float32 / half / bf16 as uint16
    rows = logits.shape[0]
    n_lp = int(t.num_logprobs)
    if rows == 0:
        empty = np.empty(0, np.int32)
        return SamplerOutput(empty, np.empty(0, np.float32))
    host = cupy.asnumpy(launch(logits, t, upload(t), ctype))  # the step's one device -> host sync
    out = SamplerOutput(host[:, 0].copy(), host[:, 1].copy().view(np.float32))
    if n_lp > 0:
        out.top_ids = host[:, 2 : 2 + n_lp].copy()
        out.top_logprobs = host[:, 2 + n_lp :].copy().view(np.float32)
    return out
