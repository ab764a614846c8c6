"""The model runner: one scheduled batch in, one sampled token per sampling sequence out.

It flattens the batch into the arrays the model reads (ops/__init__.py, AttentionMetadata),
uploads them in one transfer, runs one forward pass, and samples once. Sequence i of the batch
computes seq.token_ids[c : c + n] with c = seq.num_computed_tokens (before the step) and
n = batch.num_new_tokens[i]; it samples iff batch.is_sampling[i] (the scheduler decides: its
prompt, or recompute, is done). The runner never changes a sequence: the engine core does that
after the step.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from engine.executor.ops import AttentionMetadata, SamplerOutput, SamplingTensors
from engine.executor.step_inputs import HostBlockTables, StepInputs, build_step_inputs
from engine.model.config import EngineConfig, ModelConfig

logger = logging.getLogger(__name__)

# Decode steps replay captured CUDA graphs (cuda_graph.py) unless enforce_eager is set or
# PAGEDSERVE_DECODE_GRAPHS=0 (a switch for debugging the kernels eagerly).
DECODE_GRAPHS = os.environ.get("PAGEDSERVE_DECODE_GRAPHS", "1") != "0"

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
    import cupy  # the runner is the one floor-2 module besides the cuda backend that may

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
                 max_model_len: int | None = None):
        self.model_config = model_config
        self.config = engine_config
        self.ops = ops
        self.model = model
        self.kv_cache = kv_cache  # (layers, 2, num_blocks, kv_heads, block_size, head_dim)
        self.block_size = engine_config.block_size
        # Ids that min_tokens holds back (the engine adds the tokenizer's eos here).
        self.eos_token_ids = list(model_config.eos_token_ids if eos_token_ids is None
                                  else eos_token_ids)
        max_len = (max_model_len or engine_config.max_model_len
                   or model_config.max_position_embeddings)
        self.max_blocks_per_seq = -(-max_len // self.block_size)
        # Twice the batch cap: a batch's sequences always find rows without evicting each other.
        self.host_tables = HostBlockTables(2 * engine_config.max_num_seqs, self.max_blocks_per_seq)
        self.graphs = None
        if ops.name == "cuda" and not engine_config.enforce_eager and DECODE_GRAPHS:
            self.capture_decode_graphs()

    def capture_decode_graphs(self) -> None:
        """Capture the decode forward for every padded batch size up to max_num_seqs."""
        from engine.executor.cuda_graph import DecodeGraphs

        t = time.perf_counter()
        graphs = DecodeGraphs(self.model, self.kv_cache, self.config.max_num_seqs,
                              self.max_blocks_per_seq)
        graphs.capture()
        self.graphs = graphs
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.2f s",
                    len(self.graphs.sizes), self.config.max_num_seqs, time.perf_counter() - t)

    # ------------------------------------------------------------------ one step

    def run(self, batch, fill_bitmask=None) -> SamplerOutput | None:
        """Forward the batch; sample one token per sampling sequence (None when none samples).

        fill_bitmask() -> (R, ceil(vocab / 32)) int32 allowed-token bits per sampling row
        (structured outputs): called once the forward is queued, so on the GPU the host fills the
        masks while the device computes the logits; masked tokens get -inf before sampling."""
        if not batch.seqs:
            return None
        inputs = self.prepare_inputs(batch)
        graphs = self.graphs
        if graphs is not None and inputs.is_decode_only and graphs.can_run(len(batch.seqs)):
            logits = graphs.run(inputs.input_ids, inputs.positions, inputs.meta)  # (B, vocab)
        else:
            logits = self._forward_eager(inputs)  # (R, vocab)
        if not len(inputs.logits_indices):
            return None
        # The forward is queued on the GPU: the masks and sampling settings are built while it
        # runs.
        if fill_bitmask is not None:
            logits = self.ops.apply_token_bitmask(logits, fill_bitmask())
        return self.ops.sample(logits, self.prepare_sampling(batch.sampling_seqs))

    def prepare_inputs(self, batch) -> StepInputs:
        """Host int32 arrays: input_ids, positions, logits_indices, and the attention metadata."""
        return build_step_inputs(batch, self.block_size, self.host_tables)

    def _forward_eager(self, inputs: StepInputs):
        flat, where = inputs.pack()
        dev = self.ops.from_host(flat)  # the step's one host -> device copy
        view = {name: dev[s] for name, s in where.items()}
        host = inputs.meta
        arrays = dict(slot_mapping=view["slot_mapping"], query_start_loc=view["query_start_loc"],
                      context_lens=view["context_lens"],
                      block_tables=view["block_tables"].reshape(host.block_tables.shape))
        if self.ops.name == "cuda":
            from engine.executor.ops.cuda_attention import DeviceAttentionMetadata

            meta = DeviceAttentionMetadata(**arrays, max_query_len=host.max_query_len,
                                           max_context_len=host.max_context_len, host=host)
        else:
            meta = self.ops.prepare_metadata(AttentionMetadata(
                **arrays, max_query_len=host.max_query_len, max_context_len=host.max_context_len))
        return self.model.forward(view["input_ids"], view["positions"], self.kv_cache, meta,
                                  view["logits_indices"])  # (R, vocab)

    # ------------------------------------------------------------------ sampling settings

    def prepare_sampling(self, seqs: list) -> SamplingTensors:
        params = [s.sampling_params for s in seqs]
        num_rows = len(seqs)
        # One tuple of settings per row; in a batch they are nearly always all equal (one
        # request's defaults, or a benchmark's), and then each column is one np.full.
        rows = [(p.temperature, p.top_k, p.top_p, p.min_p, p.presence_penalty,
                 p.frequency_penalty, p.repetition_penalty, p.logprobs or 0, p.min_tokens,
                 bool(p.logit_bias)) for p in params]
        if rows.count(rows[0]) == num_rows:
            columns = [np.full(num_rows, v, np.float64) for v in rows[0]]
        else:
            columns = list(np.array(rows, np.float64).T)
        try:
            seeds = np.array([s.seed for s in seqs], np.uint64)  # (R,)
        except OverflowError:  # a seed outside [0, 2**64): its low 64 bits
            seeds = np.array([s.seed & 0xFFFFFFFFFFFFFFFF for s in seqs], np.uint64)
        t = SamplingTensors(
            temperature=columns[0].astype(np.float32),
            top_k=columns[1].astype(np.int32),
            top_p=columns[2].astype(np.float32),
            min_p=columns[3].astype(np.float32),
            seeds=seeds,
            steps=np.fromiter((len(s.token_ids) - s.num_prompt_tokens for s in seqs), np.uint32,
                              num_rows),
            presence_penalty=columns[4].astype(np.float32),
            frequency_penalty=columns[5].astype(np.float32),
            repetition_penalty=columns[6].astype(np.float32),
            num_logprobs=int(columns[7].max()),
        )
        uses_penalties = (columns[4] != 0) | (columns[5] != 0) | (columns[6] != 1)  # (R,)
        if uses_penalties.any():
            # Rows without penalties stay all -1: they cost nothing in the penalty pass.
            t.prompt_ids = _pad([s.prompt_token_ids if u else []
                                 for s, u in zip(seqs, uses_penalties.tolist(), strict=True)])
            t.output_ids = _pad([s.output_token_ids if u else []
                                 for s, u in zip(seqs, uses_penalties.tolist(), strict=True)])
        if columns[8].any() or columns[9].any():  # some row has min_tokens or a logit_bias
            biases = [self._row_bias(s) for s in seqs]
            if any(biases):
                width = max(len(b) for b in biases)
                t.bias_ids = np.full((num_rows, width), -1, np.int32)  # (R, max_biases)
                t.bias_values = np.zeros((num_rows, width), np.float32)  # (R, max_biases)
                for r, bias in enumerate(biases):
                    t.bias_ids[r, : len(bias)] = list(bias.keys())
                    t.bias_values[r, : len(bias)] = list(bias.values())
        return t

    def _row_bias(self, seq) -> dict[int, float]:
        p = seq.sampling_params
        bias = dict(p.logit_bias)
        if seq.num_output_tokens < p.min_tokens:
            # min_tokens: no token that would end the sequence, whatever ignore_eos says.
            for token_id in (*self.eos_token_ids, *p.stop_token_ids):
                bias[token_id] = -np.inf
        return bias


def _pad(rows: list[list[int]]) -> np.ndarray:
    """(R, max(1, longest row)) int32, padded with -1."""
    out = np.full((len(rows), max(1, max(len(r) for r in rows))), -1, np.int32)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = ids
    return out
