"""The model runner: one scheduled batch in, one sampled token per sampling sequence out.

It flattens the batch into the arrays the model reads (ops/__init__.py, AttentionMetadata),
uploads them in one transfer, runs one forward pass, and samples once. Sequence i of the batch
computes seq.token_ids[c : c + n] with c = seq.num_computed_tokens (before the step) and
n = batch.num_new_tokens[i]; it samples iff batch.is_sampling[i] (the scheduler decides: its
prompt, or recompute, is done). The runner never changes a sequence: the engine core does that
after the step.

    handle = runner.launch(batch, sampling)  # queued on the device; returns at once on cuda
    ...                                # the host schedules and launches the next step meanwhile
    sampled = handle.result()          # waits for this step's sampled ids (pinned copy + event)

A sequence whose last token is pending (it sampled in the previous launch, whose result the host
has not read: num_computed_tokens == len(token_ids)) decodes from a placeholder that the device
resolves from the previous launch's sampled ids; its penalties' output ids likewise.
"""

from __future__ import annotations

import gc
import logging
import os
import time

import numpy as np

from engine.core.outputs import EngineDeadError
from engine.executor.ops import AttentionMetadata, SamplerOutput, SamplingTensors
from engine.executor.penalty_slots import PenaltySlots
from engine.executor.prompt_logprobs import PendingPromptLogprobs, PromptLogprobs
from engine.executor.sampling_inputs import expand_draft_rows, sampling_tensors
from engine.executor.step_inputs import (
    HostBlockTables,
    StepInputs,
    WorkerStep,
    build_step_inputs,
)
from engine.model.config import EngineConfig, ModelConfig

logger = logging.getLogger("pagedserve." + __name__)

# Decode steps replay captured CUDA graphs (cuda_graph.py) unless enforce_eager is set or
# PAGEDSERVE_DECODE_GRAPHS=0 (a switch for debugging the kernels eagerly).
DECODE_GRAPHS = os.environ.get("PAGEDSERVE_DECODE_GRAPHS", "1") != "0"
# Steps with a prompt replay mixed_graphs.py's pieces (attention eager between them) unless
# PAGEDSERVE_MIXED_GRAPHS=0. H200, session 7 (tools/profile_prefill_host.py, Qwen3-0.6B shapes,
# 8 decodes + a 64/256-token prompt): the step's launch 8.35 / 8.18 ms of host time -> 2.41 / 2.40,
# logits the same.
MIXED_GRAPHS = os.environ.get("PAGEDSERVE_MIXED_GRAPHS", "1") == "1"
# Penalties read token counts the sampler keeps on the device (penalty_slots.py) unless
# PAGEDSERVE_DEVICE_COUNTS=0, which sends every row's prompt and output ids each step instead.
DEVICE_COUNTS = os.environ.get("PAGEDSERVE_DEVICE_COUNTS", "1") != "0"

# The numpy backend is a reference, not a server: its KV pool holds at most this many bytes.
NUMPY_KV_CACHE_BYTES = 1 << 30
# ... and aims at this many full-length sequences (fewer when max_num_seqs is smaller).
NUMPY_KV_FULL_SEQS = 8


def num_kv_blocks(model_config: ModelConfig, engine_config: EngineConfig, ops,
                  max_model_len: int) -> int:
    """How many KV blocks to allocate.

    - `engine_config.num_kv_blocks` when given.
    - numpy: enough for min(max_num_seqs, 8) sequences of max_model_len tokens, capped at
      NUMPY_KV_CACHE_BYTES (1 GiB) of fp32 cache; the numpy backend runs on a CPU's RAM and is
      too slow to use a bigger pool anyway.
    - cuda: gpu_memory_utilization of the device's memory, less what is already in use (weights)
      and an allowance for activations, like vLLM's profiling run but estimated instead of measured.
    """
    if engine_config.num_kv_blocks is not None:
        return engine_config.num_kv_blocks
    c, bs = model_config, engine_config.block_size
    bytes_per_block = ops.kv_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim) * bs
    blocks_per_seq = -(-max_model_len // bs)
    if ops.name == "numpy":
        wanted = blocks_per_seq * min(engine_config.max_num_seqs, NUMPY_KV_FULL_SEQS)
        return max(1, min(wanted, NUMPY_KV_CACHE_BYTES // bytes_per_block))
    import cupy  # here, not at the top: the numpy backend runs without CuPy

    free, total = cupy.cuda.runtime.memGetInfo()
    used = total - free
    # Activations of the largest step: a few (T, max(hidden, q+2kv, 2*inter)) buffers plus the
    # (R, vocab) fp32 logits; 4x headroom because the estimate ignores allocator fragmentation.
    width = max(c.hidden_size, c.q_size + 2 * c.kv_size, 2 * c.intermediate_size)
    tokens = engine_config.max_num_batched_tokens
    activations = 4 * (4 * tokens * width * 4 + engine_config.max_num_seqs * c.vocab_size * 4)
    budget = int(total * engine_config.gpu_memory_utilization) - used - activations
    if budget < bytes_per_block:
        raise MemoryError(
            f"no GPU memory left for the KV cache: {used / 2**30:.2f} GiB in use of "
            f"{total / 2**30:.2f} GiB; raise gpu_memory_utilization "
            f"({engine_config.gpu_memory_utilization}) or lower max_num_batched_tokens"
        )
    return budget // bytes_per_block


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, ops, model,
                 kv_cache, eos_token_ids: list[int] | None = None,
                 max_model_len: int | None = None, workers=None):
        """`workers`: on rank 0 of a tensor-parallel group, the group (workers.py), which each
        step's inputs are sent to; None on one rank and on the worker ranks themselves."""
        self.model_config = model_config
        self.config = engine_config
        self.ops = ops
        self.model = model
        self.kv_cache = kv_cache  # (layers, 2, num_blocks, kv_heads, block_size, head_dim)
        self.block_size = engine_config.block_size
        self.workers = workers
        # Ids that min_tokens holds back (the engine adds the tokenizer's eos here).
        self.eos_token_ids = list(model_config.eos_token_ids if eos_token_ids is None
                                  else eos_token_ids)
        max_len = (max_model_len or engine_config.max_model_len
                   or model_config.max_position_embeddings)
        self.max_blocks_per_seq = -(-max_len // self.block_size)
        # Twice the batch cap: a batch's sequences always find rows without evicting each other.
        try:
            self.host_tables = HostBlockTables(2 * engine_config.max_num_seqs,
                                               self.max_blocks_per_seq)
        except MemoryError as e:
            raise ValueError(f"the block tables do not fit in host memory ({e}): lower "
                             f"max_num_seqs ({engine_config.max_num_seqs}) or max_model_len "
                             f"({max_len})") from e
        # The last launch's sampled ids on the device, and which sequence owns which row of them:
        # what the next launch's placeholders read.
        self._last_sampled = None
        self._last_rows: dict[int, int] = {}
        # Token counts for penalties, one slot per sequence of a batch; the table is allocated
        # by the first step that has a penalty.
        self.penalty_slots = PenaltySlots(engine_config.max_num_seqs) if DEVICE_COUNTS else None
        self.token_counts = None
        self.time_gpu = False  # record device time per step (benchmarks) in gpu_step_times
        self.gpu_step_times: list[float] = []  # seconds, in launch order, once results are read
        # With time_gpu and an origin event (ops.record_event()), each step's (start, end) in
        # seconds after it as well: the device's idle time between steps (bench_throughput --idle)
        self.time_origin = None
        self.gpu_step_spans: list[tuple[float, float]] = []
        self.graphs = self.mixed_graphs = None
        # Steps that replayed a decode graph, and how many of them verified drafts (tests).
        self.num_graph_steps = self.num_graph_verify_steps = 0
        if ops.name == "cuda" and not engine_config.enforce_eager and DECODE_GRAPHS:
            self.capture_decode_graphs()
        # One rank only: a tensor-parallel step's collectives are not captured in pieces.
        if (ops.name == "cuda" and not engine_config.enforce_eager and MIXED_GRAPHS
                and workers is None and not hasattr(ops, "comm")):
            self.capture_mixed_graphs()

    def capture_decode_graphs(self) -> None:
        """Capture the decode forward for every padded batch size up to max_num_seqs, or up to
        the rows of the largest verify step when speculation is configured."""
        from engine.executor.cuda_graph import DecodeGraphs

        t = time.perf_counter()
        max_rows, fresh = self.config.max_num_seqs, 1
        spec = self.config.speculative_config
        if spec is not None:  # verify steps: 1 + k rows per sequence (StepInputs.as_decode_rows)
            fresh = 1 + spec.num_speculative_tokens
            max_rows = max(max_rows, min(spec.disable_by_batch_size, max_rows) * fresh)
        graphs = DecodeGraphs(self.model, self.kv_cache, max_rows, self.max_blocks_per_seq,
                              fresh_keys=fresh)
        graphs.capture()
        self.graphs = graphs
        logger.info("captured %d decode CUDA graphs (1..%d rows) in %.2f s",
                    len(self.graphs.sizes), max_rows, time.perf_counter() - t)

    def capture_mixed_graphs(self) -> None:
        """Capture the pieces of a step with a prompt per bucket of token counts
        (mixed_graphs.py)."""
        from engine.executor.mixed_graphs import MixedGraphs

        t = time.perf_counter()
        graphs = MixedGraphs(self.model, self.kv_cache, self.config.max_num_batched_tokens)
        try:
            graphs.capture()
        except Exception as e:  # an op that cannot be captured, a capture the driver refused
            if self.ops.is_fatal(e):
                raise
            logger.warning("capturing mixed-step CUDA graphs failed (%s: %s): steps with a "
                           "prompt run eagerly", type(e).__name__, e)
            return
        self.mixed_graphs = graphs
        logger.info("captured mixed-step CUDA graphs for %d token buckets (up to %d) in %.2f s",
                    len(graphs.sizes), graphs.sizes[-1], time.perf_counter() - t)

    def close(self) -> None:
        """Drop the device memory the runner holds (graphs and their pool, the KV cache, the
        model); the engine then closes the ops backend."""
        self.ops.synchronize()
        pools = [g.pool for g in (self.graphs, self.mixed_graphs) if g is not None]
        # the graphs, their static buffers and captured intermediates
        self.graphs = self.mixed_graphs = None
        if pools:
            gc.collect()  # a graph caught in a reference cycle would keep its pool blocks in use
        for pool in pools:
            pool.free_all_blocks()
        self.kv_cache = self.model = self._last_sampled = self.token_counts = None

    # ------------------------------------------------------------------ one step

    def run(self, batch, sampling: tuple[list, list[int]],
            fill_bitmask=None) -> SamplerOutput | None:
        """launch + result: the synchronous step."""
        return self.launch(batch, sampling, fill_bitmask).result()

    def launch(self, batch, sampling: tuple[list, list[int]], fill_bitmask=None) -> StepHandle:
        """Queue the forward and the sampling of one token per row of `sampling`
        (batch.sampling_rows(): the sequences that sample, and which logits row each fork
        reads); .result() reads them (None when no row samples).

        fill_bitmask(out) fills out (R, ceil(vocab / 32)) int32 with the allowed-token bits of
        each sampling row and returns it, or None when no row is constrained after all
        (structured outputs): called once the forward is queued, so on the GPU the host fills the
        masks while the device computes the logits; masked tokens get -inf before sampling."""
        try:
            return self._launch(batch, sampling, fill_bitmask)
        except Exception as e:
            self.raise_if_fatal(e)
            raise

    def raise_if_fatal(self, e: Exception) -> None:
        """EngineDeadError if `e` leaves the backend unusable (a lost CUDA context), or if the
        step ran on a tensor-parallel group: its ranks would be out of step from here on."""
        if self.ops.is_fatal(e) or self.workers is not None:
            raise EngineDeadError(f"the {self.ops.name} backend failed and cannot go on: "
                                  f"{type(e).__name__}: {e}") from e

    def _launch(self, batch, sampling: tuple[list, list[int]], fill_bitmask) -> StepHandle:
        if not batch.seqs:
            return StepHandle(None, self, None)
        ops = self.ops
        inputs = self.prepare_inputs(batch)
        # Device time runs from the first upload; host work before it is not the device's.
        start = ops.record_event() if self.time_gpu else None
        if batch.block_copies:  # before anything writes after a fork's copied tail
            ops.copy_blocks(self.kv_cache, batch.block_copies)
        prev = self._last_sampled if inputs.num_placeholders else None
        prompt = None
        rows = self._graph_rows(inputs, batch)
        seqs, fork_rows = sampling
        if batch.num_spec_tokens:  # 1 + k rows for a sequence verifying k drafts
            seqs, fork_rows = expand_draft_rows(seqs, fork_rows)
        if self.workers is not None:
            self.workers.send_step(inputs, batch.block_copies, rows is not None, prev is not None,
                                   len(seqs) if len(inputs.logits_indices) else 0)
        if rows is not None:
            logits = self.graphs.run(rows.input_ids, rows.positions, rows.meta,
                                     prev)  # (T, vocab): B decodes, or a verify's T tokens
            self.num_graph_steps += 1
            self.num_graph_verify_steps += bool(batch.num_spec_tokens)
        else:
            logits = self._forward_eager(inputs, prev)  # (R + Q, vocab)
            if inputs.prompt is not None:
                num_rows = len(inputs.logits_indices)
                prompt = PendingPromptLogprobs(ops, logits[num_rows:], inputs.prompt)
                logits = logits[:num_rows]  # (R, vocab)
        if not len(inputs.logits_indices):
            self._last_sampled, self._last_rows = None, {}
            return StepHandle(None, self, None if start is None else (start, ops.record_event()),
                              prompt, self._group_done())
        if fork_rows:  # forks sample from their parent's row
            rows = np.concatenate([np.arange(len(inputs.logits_indices)), fork_rows])
            logits = logits[ops.from_host(rows.astype(np.int32))]
        # The forward is queued on the GPU: the masks and sampling settings are built while it
        # runs.
        if fill_bitmask is not None:  # filled in place: the cuda backend's pinned stage
            words = -(-logits.shape[1] // 32)
            mask = fill_bitmask(ops.bitmask_buffer(logits.shape[0], words))
            if mask is not None:  # None: no row constrained after all
                logits = ops.apply_token_bitmask(logits, mask)
        try:
            pending = ops.sample_start(logits, self.prepare_sampling(seqs), prev)
        except Exception as e:
            if ops.is_fatal(e):
                raise
            pending = _HostSample(self._sample_rows_alone(logits, seqs, prev), ops)
        timing = None if start is None else (start, ops.record_event())
        self._last_sampled = pending.token_ids
        if self.workers is not None:  # the worker ranks' placeholders read them too
            ids = pending.token_ids  # (R,), or (R, W) with the ids in column 0 (cuda)
            self.ops.comm.broadcast(ids if ids.ndim == 1 else ids[:, 0].copy())
        self._last_rows = {seq.seq_id: r for r, seq in enumerate(seqs)}
        return StepHandle(pending, self, timing, prompt, self._group_done())

    def _group_done(self):
        """Tensor parallel: an event after the step's collectives, which result() waits on while
        it watches the other ranks (a collective whose peer died never completes)."""
        return None if self.workers is None else self.ops.record_event()

    def _graph_rows(self, inputs: StepInputs, batch) -> StepInputs | None:
        """The step as the rows a decode graph replays, or None: it runs eagerly."""
        if self.graphs is None or inputs.prompt is not None:
            return None
        rows = inputs if inputs.is_decode_only else None
        # NOTE: tensor-parallel workers replay the packed inputs as they are (run_worker_step),
        # so at TP > 1 verify steps run eagerly rather than as decode rows.
        if rows is None and batch.num_spec_tokens and self.workers is None:
            rows = inputs.as_decode_rows()
        if rows is None or not self.graphs.can_run(len(rows.input_ids)):
            return None
        return rows

    def _sample_rows_alone(self, logits, seqs: list, prev) -> SamplerOutput:
        """Sampling the batch raised: sample each row on its own, so that one sequence's bad
        settings fail that sequence alone (SamplerOutput.errors) and the others go on."""
        rows = len(seqs)
        width = max(s.sampling_params.num_top_logprobs for s in seqs)
        out = SamplerOutput(np.full(rows, -1, np.int32), np.zeros(rows, np.float32),
                            np.zeros((rows, width), np.int32), np.zeros((rows, width), np.float32),
                            errors={})
        for r, seq in enumerate(seqs):
            try:
                one = self.ops.sample_start(logits[r : r + 1],
                                            self.prepare_sampling([seq]), prev).wait()
            except Exception as e:
                if self.ops.is_fatal(e):
                    raise
                logger.exception("sampling failed for sequence %d of request %s", seq.seq_id,
                                 seq.request_id)
                out.errors[r] = f"sampling failed: {type(e).__name__}: {e}"
                continue
            out.token_ids[r], out.logprobs[r] = one.token_ids[0], one.logprobs[0]
            if one.top_ids is not None:
                k = one.top_ids.shape[1]
                out.top_ids[r, :k], out.top_logprobs[r, :k] = one.top_ids[0], one.top_logprobs[0]
            if one.row_logprobs:
                out.row_logprobs = {**(out.row_logprobs or {}), r: one.row_logprobs[0]}
        return out

    def prepare_inputs(self, batch) -> StepInputs:
        """Host int32 arrays: input_ids, positions, logits_indices, and the attention metadata."""
        return build_step_inputs(batch, self.block_size, self.host_tables, self._last_rows,
                                 self.model_config.vocab_size)

    def _forward_eager(self, inputs: StepInputs, prev):
        flat, where = inputs.pack()
        return self._forward_packed(flat, where, inputs.meta, prev)

    def _forward_packed(self, flat: np.ndarray, where: dict[str, slice], host: AttentionMetadata,
                        prev):
        dev = self.ops.from_host(flat)  # the step's one host -> device copy
        view = {name: dev[s] for name, s in where.items()}
        if prev is not None:
            self.ops.resolve_placeholders(view["input_ids"], prev)
        arrays = dict(slot_mapping=view["slot_mapping"], query_start_loc=view["query_start_loc"],
                      context_lens=view["context_lens"],
                      block_tables=view["block_tables"].reshape(host.block_tables.shape))
        if self.ops.name == "cuda":
            from engine.executor.ops.cuda_attention import DeviceAttentionMetadata

            meta = DeviceAttentionMetadata(**arrays, max_query_len=host.max_query_len,
                                           max_context_len=host.max_context_len, host=host)
            if self.mixed_graphs is not None and self.mixed_graphs.can_run(
                    len(view["input_ids"])):
                return self.mixed_graphs.run(view["input_ids"], view["positions"],
                                             view["slot_mapping"], meta,
                                             view["logits_indices"])  # (R + Q, vocab)
        else:
            meta = self.ops.prepare_metadata(AttentionMetadata(
                **arrays, max_query_len=host.max_query_len, max_context_len=host.max_context_len))
        return self.model.forward(view["input_ids"], view["positions"], self.kv_cache, meta,
                                  view["logits_indices"])  # (R + Q, vocab)

    def run_worker_step(self, step: WorkerStep, flat: np.ndarray) -> None:
        """A tensor-parallel worker rank's part of rank 0's step: the same block copies and
        forward on this rank's shard (its logits go to rank 0 in the forward's gather), then
        the sampled ids rank 0 broadcasts, which the next step's placeholders read."""
        ops = self.ops
        if step.block_copies:
            ops.copy_blocks(self.kv_cache, step.block_copies)
        prev = self._last_sampled if step.has_prev else None
        view, host = step.host_views(flat)
        if step.use_graph:
            self.graphs.run(view["input_ids"], view["positions"], host, prev)
        else:
            where = {name: slice(a, b) for name, (a, b) in step.where.items()}
            self._forward_packed(flat, where, host, prev)
        self._last_sampled = None
        if step.num_rows:
            self._last_sampled = ops.comm.broadcast(ops.from_host(np.zeros(step.num_rows,
                                                                           np.int32)))

    # ------------------------------------------------------------------ sampling settings

    def prepare_sampling(self, seqs: list) -> SamplingTensors:
        """Settings of the rows that sample (sampling_inputs.py), placeholders included.
        Penalties read the token counts kept on the device, except in steps where a sequence
        has several rows (speculation's drafts would share its slot): those send ids."""
        t = sampling_tensors(seqs, self.model_config.vocab_size, self.eos_token_ids,
                             self._last_rows, self.penalty_slots)
        if t.count_slots is not None:
            if self.token_counts is None:  # the first step with a penalty
                self.token_counts = self.ops.alloc_token_counts(
                    self.penalty_slots.num_slots, self.model_config.vocab_size)
            t.count_table = self.token_counts
        return t


class StepHandle:
    """A launched step. result() waits for its sampled ids (None when no row sampled); after it,
    prompt_logprobs holds the prompt positions the step scored (prompt_logprobs.py)."""

    __slots__ = ("_pending", "_runner", "_timing", "_prompt", "_done", "prompt_logprobs")

    def __init__(self, pending, runner: ModelRunner, timing, prompt=None, done=None):
        self._pending, self._runner, self._timing = pending, runner, timing
        self._prompt, self._done = prompt, done
        self.prompt_logprobs: list[PromptLogprobs] = []

    def result(self) -> SamplerOutput | None:
        try:
            if self._done is not None:
                self._runner.ops.comm.wait(self._done)
            out = None if self._pending is None else self._pending.wait()
            if self._prompt is not None:
                self.prompt_logprobs, self._prompt = self._prompt.wait(), None
        except Exception as e:  # the device failed while running the step
            self._runner.raise_if_fatal(e)
            raise
        if self._timing is not None:
            ops = self._runner.ops
            ops.wait_event(self._timing[1])
            runner = self._runner
            runner.gpu_step_times.append(ops.elapsed_s(*self._timing))
            if runner.time_origin is not None:
                runner.gpu_step_spans.append(tuple(ops.elapsed_s(runner.time_origin, e)
                                                   for e in self._timing))
            self._timing = None
        self._pending = None
        return out


class _HostSample:
    """Rows sampled one by one (the fallback): known at once. The ids the next step's
    placeholders read go to the device, a failed row's -1 as 0: its request fails, and what the
    next step computes for it is dropped."""

    __slots__ = ("out", "token_ids")

    def __init__(self, out: SamplerOutput, ops):
        self.out = out
        self.token_ids = ops.from_host(np.maximum(out.token_ids, 0).astype(np.int32))

    def wait(self) -> SamplerOutput:
        return self.out
