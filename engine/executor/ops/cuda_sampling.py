"""Sampling on the GPU (cuda/sampling.cu): numpy_sampling.sample's semantics.

Penalties read a table of per-sequence token counts (DeviceTokenCounts: count words and a bitmap
of the non-zero ones) that the sampler keeps: rows being rebuilt are reset from their ids first,
every row with a slot adds its drawn token after the draw (SamplingTensors.count_slots). A step
that sends ids instead (count_slots None) builds a table of its own rows. The sampling passes read
one bit per token for penalties; a step with a logit bias (or the bisect sampler) writes the
penalized logits to a float32 copy first.

sample_kernel finds top-k / top-p thresholds from a histogram pass and a sort of the few
candidates in shared memory (3 passes over a row; 4 or 5 when the kept set is thousands of
tokens: the cut's window of bins, refined once more if needed, and a draw over the row; it
bisects only for nearly flat rows); SAMPLER = "bisect" selects the previous kernel
(cuda/sampling_bisect.cu, ~31 passes per threshold), which tools/kernel_check.py times as baseline.
SAMPLER = "twopass", the default (device run 2: top_k 50 + top_p 0.95 over 256 x 151,936 in
126 us against select's 246, W1 sampled at 98.5% of greedy), runs the same kernel with a leaner
statistics pass and, for rows with a top-k or a peaked top-p, the cut from the block's thread
maxima in one more pass (cuda/sampling_twopass.cuh); above one row per SM it gives a row 512
threads, so that two rows share an SM in one wave instead of two waves of one. SAMPLER = "select"
(PAGEDSERVE_SAMPLER=select) keeps the previous steps exactly.

The sampled ids stay on the device (the next overlapped step's placeholders read them there) and
reach the host through a copy into pinned memory followed by an event: DeviceSample.wait() is the
step's one host <-> device sync, and it can come after the next step is launched.
"""

from __future__ import annotations

import os

import cupy
import numpy as np

from engine.executor.ops import SamplerOutput, SamplingTensors
from engine.executor.ops.cuda_kernels import kernel, num_sms
from engine.executor.ops.numpy_sampling import gather_row_logprobs

NUM_PARAMS = 10  # words per row, laid out as in cuda/sampling.cu's header
SAMPLER = os.environ.get("PAGEDSERVE_SAMPLER", "twopass")  # or "select", "bisect": older ones
SAMPLERS = ("select", "twopass", "bisect")
# cuda/sampling_greedy.cu splits a row over up to this many blocks, of at least GREEDY_CHUNK
# logits each, aiming at GREEDY_BLOCKS blocks in all.
GREEDY_MAX_CHUNKS, GREEDY_CHUNK, GREEDY_BLOCKS = 64, 2048, 2048


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


class DeviceTokenCounts:
    """numpy_sampling.TokenCounts on the device, with the bitmap of its non-zero words."""

    def __init__(self, num_slots: int, vocab: int, zero: bool = True):
        make = cupy.zeros if zero else cupy.empty
        self.vocab, self.words = vocab, -(-vocab // 32)
        self.counts = make((num_slots, vocab), cupy.int32)  # (S, vocab) count words
        self.seen = make((num_slots, self.words), cupy.uint32)  # (S, words) bit t: word t != 0

    @property
    def table(self) -> np.ndarray:
        """(S, vocab) int32 on the host, as numpy's TokenCounts holds it (tests)."""
        return cupy.asnumpy(self.counts)


def _ids(a) -> tuple:
    if a is None or a.size == 0:
        return np.uint64(0), 0
    a = np.ascontiguousarray(a, np.int32)
    return cupy.asarray(a), a.shape[1]


def upload(t: SamplingTensors, resolve=None) -> dict:
    """The step's per-row settings on the device (host -> device copies only).

    resolve(ids): replaces placeholders among the penalties' output ids and the rows' previous
    tokens (overlapped steps)."""
    dev = {"params": cupy.asarray(pack_params(t)), "prompt": _ids(t.prompt_ids),
           "output": _ids(t.output_ids), "bias": None, "slots": None}
    rows = len(t.temperature)
    if t.count_slots is not None:
        slots = t.count_slots
        rebuild = np.zeros(rows) if t.rebuild is None else t.rebuild
    elif t.has_penalties:  # ids only: each row rebuilds a slot of a table of the step's own
        slots, rebuild = np.arange(rows), np.ones(rows)
    if t.has_penalties:  # (2, R): each row's slot, then its rebuild flag
        dev["slots"] = cupy.asarray(np.stack([slots, rebuild]).astype(np.int32))
    output, o_len = dev["output"]
    if resolve is not None and o_len:
        resolve(output.reshape(-1))
    if t.bias_ids is not None and t.bias_ids.size:
        after, last = np.uint64(0), np.uint64(0)  # null: every entry adds
        if t.bias_after is not None:
            after = cupy.asarray(np.ascontiguousarray(t.bias_after, np.int32))
            last = cupy.asarray(np.ascontiguousarray(t.last_ids, np.int32))
            if resolve is not None:
                resolve(last)
        dev["bias"] = (cupy.asarray(np.ascontiguousarray(t.bias_ids, np.int32)),
                       cupy.asarray(np.ascontiguousarray(t.bias_values, np.float32)), after, last)
    dev["allowed"] = None if t.allowed_rows is None else (
        cupy.asarray(np.ascontiguousarray(t.allowed_rows, np.int32)),
        cupy.asarray(np.ascontiguousarray(t.allowed_ids, np.int32)))
    return dev


def launch(logits: cupy.ndarray, t: SamplingTensors, dev: dict, ctype: str) -> cupy.ndarray:
    """The sampling kernels on the current stream (no host copy: CUDA-graph capturable) ->
    (R, 2 + 2 * num_logprobs) int32 results, laid out as in cuda/sampling.cu's header."""
    rows, vocab = logits.shape
    n_lp = int(t.num_logprobs)
    if takes_greedy(t):
        return greedy(logits, ctype)
    params, i32, null = dev["params"], np.int32, np.uint64(0)
    slots, counts = dev["slots"], t.count_table
    if t.count_slots is not None:
        if not isinstance(counts, DeviceTokenCounts) or counts.vocab != vocab:
            raise ValueError(f"count_slots need a DeviceTokenCounts count_table of the logits' "
                             f"vocabulary ({vocab}), got {counts!r}")
    elif slots is not None:  # ids only: a table of this step's rows, each rebuilt
        counts = DeviceTokenCounts(rows, vocab, zero=False)
    if counts is not None:
        (prompt, p_len), (output, o_len) = dev["prompt"], dev["output"]
        kernel("sampling.cu", "rebuild_counts_kernel")(
            (rows,), (256,), (counts.counts, counts.seen, slots, prompt, output, i32(rows),
                              i32(p_len), i32(o_len), i32(vocab), i32(counts.words)))
    adjusted = null
    if (dev["bias"] is not None or dev["allowed"] is not None
            or (SAMPLER == "bisect" and counts is not None)):
        # vLLM's order: the logit bias first, then the penalties on the biased logits (in place).
        adjusted = cupy.empty((rows, vocab), cupy.float32)
        grid, biased = (rows, -(-vocab // 256)), dev["bias"] is not None
        penalize = (null, null) if counts is None else (counts.counts, slots)
        kernel("sampling.cu", f"adjust_logits_kernel<{ctype}>")(
            grid, (256,), (adjusted, logits, *((null, null) if biased else penalize), params,
                           i32(vocab)))
        if biased:
            ids, values, after, last = dev["bias"]
            kernel("sampling.cu", "add_logit_bias_kernel")(
                (rows,), (1,), (adjusted, ids, values, after, last, i32(ids.shape[1]),
                                i32(vocab)))
            if counts is not None:
                kernel("sampling.cu", "adjust_logits_kernel<float>")(
                    grid, (256,), (adjusted, adjusted, *penalize, params, i32(vocab)))
        if dev["allowed"] is not None:
            which, allowed = dev["allowed"]
            kernel("sampling_tokens.cu", "allow_only_kernel")(
                (-(-vocab // 256), len(which)), (256,),
                (adjusted, which, allowed, i32(allowed.shape[1]), i32(vocab)))
    result = cupy.empty((rows, 2 + 2 * n_lp), cupy.int32)
    if SAMPLER == "bisect":
        probs = null if t.all_greedy else cupy.empty((rows, vocab), cupy.float32)
        kernel("sampling_bisect.cu", f"sample_bisect_kernel<{ctype}>")(
            (rows,), (1024,), (result, probs, logits, adjusted, params, i32(vocab), i32(n_lp)))
    else:
        table = (null, null, null, 0) if counts is None else (counts.counts, counts.seen, slots,
                                                               counts.words)
        twopass = SAMPLER == "twopass"
        # Above one row per SM, 512 threads a row: two rows share an SM in one wave (device run
        # 3: 122 us against 138 at 1024 threads for top_k 50 + top_p over 256 rows).
        threads = 512 if twopass and rows > num_sms() else 1024
        kernel("sampling.cu", f"sample_kernel<{ctype}>")(
            (rows,), (threads,), (result, logits, adjusted, params, *table[:3], i32(table[3]),
                                  i32(vocab), i32(n_lp), i32(twopass)))
    if t.count_slots is not None:  # the kept table counts this step's draws
        kernel("sampling.cu", "count_drawn_kernel")(
            (-(-rows // 256),), (256,), (counts.counts, counts.seen, dev["slots"], result,
                                         i32(rows), i32(result.shape[1]), i32(vocab),
                                         i32(counts.words)))
    return result


def sampler() -> str:
    """SAMPLER, checked: every step asks (an all-greedy one too), so a bad PAGEDSERVE_SAMPLER fails
    the first step, the start-up warm-up, rather than the first sampled step mid-serving."""
    if SAMPLER not in SAMPLERS:
        raise ValueError(f"cuda_sampling.SAMPLER (PAGEDSERVE_SAMPLER) must be one of {SAMPLERS}, "
                         f"got {SAMPLER!r}")
    return SAMPLER


def takes_greedy(t: SamplingTensors) -> bool:
    """Whether the step runs greedy(): every row takes the argmax with nothing to apply first
    (no penalties, bias, allowed ids or top logprobs; greedy() needs none of upload()'s copies),
    unless the bisect sampler was chosen."""
    return (sampler() != "bisect" and t.all_greedy and int(t.num_logprobs) == 0
            and not t.has_penalties and (t.bias_ids is None or not t.bias_ids.size)
            and t.allowed_rows is None)


# greedy_kernel's per-row counters of finished blocks. The kernel leaves them at 0, so one zeroed
# buffer per (device, stream) serves every launch after it; a larger one is added when the rows
# outgrow it, the earlier ones kept (a CUDA graph may have captured them). release_buffers()
# (CudaOps.close) drops them all.
_done_counters: dict[tuple[int, int], list[cupy.ndarray]] = {}


def _done(rows: int) -> cupy.ndarray:
    stream = cupy.cuda.get_current_stream()
    if stream.is_capturing():  # a zeroing made now would only be recorded: one for this launch
        return cupy.zeros(rows, cupy.int32)
    kept = _done_counters.setdefault((cupy.cuda.Device().id, stream.ptr), [])
    if not kept or kept[-1].size < rows:
        kept.append(cupy.zeros(max(rows, 256, 2 * kept[-1].size if kept else 0), cupy.int32))
    return kept[-1][:rows]


def release_buffers() -> None:
    """Drop the kept counters (the caller has synchronized the device)."""
    _done_counters.clear()


def greedy(logits: cupy.ndarray, ctype: str) -> cupy.ndarray:
    """(R, 2) int32 results of rows that are all greedy, without penalties, bias or top
    logprobs: the argmax and its raw logprob, each row over several blocks."""
    rows, vocab = logits.shape
    chunks = max(1, min(GREEDY_MAX_CHUNKS, -(-vocab // GREEDY_CHUNK), -(-GREEDY_BLOCKS // rows)))
    per_chunk = -(-vocab // chunks)
    chunk = -(-per_chunk // 8) * 8  # a multiple of 8: 16-byte loads stay within a chunk
    chunks = -(-vocab // chunk)
    done = _done(rows)
    partial = cupy.empty((rows, chunks, 4), cupy.float32)
    result = cupy.empty((rows, 2), cupy.int32)
    vec = vocab % 8 == 0 and logits.data.ptr % 16 == 0
    kernel("sampling_greedy.cu", f"greedy_kernel<{ctype}>")(
        (rows, chunks), (256,), (result, partial, done, logits, np.int32(vocab), np.int32(chunk),
                                 np.int32(vec)))
    return result


def sample_on_device(logits: cupy.ndarray, t: SamplingTensors, ctype: str,
                     resolve=None) -> cupy.ndarray:
    """Queue the penalties, bias and draw; (R, 2 + 2 * num_logprobs) int32 on the device: per row
    the id, its logprob's bits, then the top ids and their logprobs' bits.

    resolve(ids): replaces placeholders among the penalties' output ids and the rows' previous
    tokens (overlapped steps)."""
    # logits (R, vocab), float32 / half / bf16 as uint16
    rows = logits.shape[0]
    if rows == 0:
        return cupy.empty((0, 2 + 2 * int(t.num_logprobs)), cupy.int32)
    if takes_greedy(t):  # nothing to upload: the argmax alone
        return greedy(logits, ctype)
    return launch(logits, t, upload(t, resolve), ctype)


def row_logprobs_on_device(logits: cupy.ndarray, t: SamplingTensors, ctype: str) -> tuple | None:
    """Queue the logprobs of the rows that want chosen ids or the whole vocabulary (nothing
    when no row does): (chosen (N, max_ids), full (F, vocab)) float32 on the device, either
    None."""
    # logits (R, vocab), float32 / half / bf16 as uint16
    if t.logprob_rows is None and t.full_logprob_rows is None:
        return None
    vocab, fn = logits.shape[1], kernel("sampling_tokens.cu", f"row_logprobs_kernel<{ctype}>")

    def run(rows: np.ndarray, ids: np.ndarray | None) -> cupy.ndarray:
        width = vocab if ids is None else ids.shape[1]
        out = cupy.empty((len(rows), width), cupy.float32)
        fn((len(rows),), (1024,), (out, logits, cupy.asarray(rows.astype(np.int32)),
                                   np.uint64(0) if ids is None else cupy.asarray(ids, np.int32),
                                   np.int32(width), np.int32(vocab)))
        return out

    return (None if t.logprob_rows is None else run(t.logprob_rows, t.logprob_ids),
            None if t.full_logprob_rows is None else run(t.full_logprob_rows, None))


class DeviceSample:
    """Sampled ids on their way to the host: a copy into pinned memory, then an event."""

    __slots__ = ("token_ids", "_mems", "_hosts", "_event", "_tensors")

    def __init__(self, result: cupy.ndarray, row_logprobs: tuple | None = None,
                 tensors: SamplingTensors | None = None):
        # result (R, 2 + 2 * num_logprobs) int32, from sample_on_device; row_logprobs from
        # row_logprobs_on_device with the tensors they were asked by
        self.token_ids = result  # column 0: what the next step's placeholders read
        stream = cupy.cuda.get_current_stream()
        self._tensors = tensors
        self._mems, self._hosts = [], []
        for a in (result, *(row_logprobs or ())):
            # A buffer of its own from CuPy's pinned pool: the step after this one copies into
            # another while this one may still be unread (that is the double buffering).
            host = None
            if a is not None:
                mem = cupy.cuda.alloc_pinned_memory(max(4, a.nbytes))
                host = np.frombuffer(mem, a.dtype, a.size).reshape(a.shape)
                self._mems.append(mem)
                if a.size:
                    cupy.cuda.runtime.memcpyAsync(host.ctypes.data, a.data.ptr, a.nbytes,
                                                  cupy.cuda.runtime.memcpyDeviceToHost,
                                                  stream.ptr)
            self._hosts.append(host)
        self._event = cupy.cuda.Event(disable_timing=True)
        self._event.record(stream)

    def wait(self) -> SamplerOutput:
        """The SamplerOutput once the copies have landed (blocks until then)."""
        self._event.synchronize()
        host = self._hosts[0]
        n_lp = (host.shape[1] - 2) // 2
        out = SamplerOutput(host[:, 0].copy(), host[:, 1].copy().view(np.float32))
        if n_lp > 0:
            out.top_ids = host[:, 2 : 2 + n_lp].copy()
            out.top_logprobs = host[:, 2 + n_lp :].copy().view(np.float32)
        if len(self._hosts) > 1:  # copied out by gather_row_logprobs
            out.row_logprobs = gather_row_logprobs(self._tensors, *self._hosts[1:])
        self._hosts = self._mems = None  # back to the pool: nothing writes them any more
        return out
