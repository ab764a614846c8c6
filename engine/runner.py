"""The model runner: one scheduled batch in, one sampled token per sampling sequence out.

It flattens the batch into the arrays the model reads (engine/ops/__init__.py, AttentionMetadata),
uploads them in one transfer, runs one forward pass, and samples once. Sequence i of the batch
computes seq.token_ids[c : c + n] with c = seq.num_computed_tokens (before the step) and
n = batch.num_new_tokens[i]; it samples iff c + n == len(seq), i.e. its prompt (or recompute) is
done. The runner never changes a sequence: the engine does that after the step.
"""

from __future__ import annotations

import logging

import numpy as np

from engine.config import EngineConfig, ModelConfig
from engine.ops import AttentionMetadata, SamplerOutput, SamplingTensors

logger = logging.getLogger(__name__)

# The numpy backend is a reference, not a server: its KV pool holds at most this many bytes.
NUMPY_KV_CACHE_BYTES = 1 << 30
# ... and aims at this many full-length sequences (fewer when max_num_seqs is smaller).
NUMPY_KV_FULL_SEQS = 8


def sampling_seqs(batch) -> list:
    """The batch's sequences that sample this step, in batch order."""
    return [seq for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
            if seq.num_computed_tokens + n == len(seq)]


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
                 kv_cache, eos_token_ids: list[int] | None = None):
        self.model_config = model_config
        self.config = engine_config
        self.ops = ops
        self.model = model
        self.kv_cache = kv_cache  # (layers, 2, num_blocks, kv_heads, block_size, head_dim)
        self.block_size = engine_config.block_size
        # Ids that min_tokens holds back (the engine adds the tokenizer's eos here).
        self.eos_token_ids = list(model_config.eos_token_ids if eos_token_ids is None
                                  else eos_token_ids)

    # ------------------------------------------------------------------ one step

    def run(self, batch) -> SamplerOutput | None:
        """Forward the batch; sample one token per sampling sequence (None when none samples)."""
        if not batch.seqs:
            return None
        tokens, meta = self.prepare_inputs(batch)
        # One transfer for the token arrays; the backend uploads the attention metadata once
        # (ops.prepare_metadata) and every layer reuses it.
        flat = self.ops.from_host(np.concatenate(list(tokens.values())))
        t = len(tokens["input_ids"])
        input_ids, positions, logits_indices = flat[:t], flat[t : 2 * t], flat[2 * t :]
        meta = self.ops.prepare_metadata(meta)
        logits = self.model.forward(input_ids, positions, self.kv_cache, meta,
                                    logits_indices)  # (R, vocab)
        sampling = sampling_seqs(batch)
        if not sampling:
            return None
        return self.ops.sample(logits, self.prepare_sampling(sampling))

    def prepare_inputs(self, batch) -> tuple[dict[str, np.ndarray], AttentionMetadata]:
        """Host int32 arrays: input_ids, positions, logits_indices, and the attention metadata."""
        bs = self.block_size
        num_seqs = len(batch.seqs)
        num_tokens = int(sum(batch.num_new_tokens))
        input_ids = np.empty(num_tokens, np.int32)  # (T,)
        positions = np.empty(num_tokens, np.int32)  # (T,)
        slot_mapping = np.empty(num_tokens, np.int32)  # (T,)
        context_lens = np.empty(num_seqs, np.int32)  # (B,)
        query_start_loc = np.zeros(num_seqs + 1, np.int32)  # (B+1,)
        width = max(-(-(s.num_computed_tokens + n) // bs)
                    for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True))
        block_tables = np.full((num_seqs, width), -1, np.int32)  # (B, max_blocks)
        logits_indices = []
        start = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            c = seq.num_computed_tokens
            end = start + n
            input_ids[start:end] = seq.token_ids[c : c + n]
            pos = np.arange(c, c + n, dtype=np.int32)
            positions[start:end] = pos
            table = np.asarray(seq.block_table[: width], np.int32)
            slot_mapping[start:end] = table[pos // bs] * bs + pos % bs
            block_tables[i, : len(table)] = table
            context_lens[i] = c + n
            query_start_loc[i + 1] = end
            if c + n == len(seq):
                logits_indices.append(end - 1)
            start = end
        tokens = {
            "input_ids": input_ids,
            "positions": positions,
            "logits_indices": np.asarray(logits_indices, np.int32),  # (R,)
        }
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            context_lens=context_lens,
            block_tables=block_tables,
            max_query_len=int(max(batch.num_new_tokens)),
            max_context_len=int(context_lens.max()),
        )
        return tokens, meta

    # ------------------------------------------------------------------ sampling settings

    def prepare_sampling(self, seqs: list) -> SamplingTensors:
        params = [s.sampling_params for s in seqs]
        num_rows = len(seqs)

        def column(get, dtype):
            return np.array([get(p) for p in params], dtype)

        t = SamplingTensors(
            temperature=column(lambda p: p.temperature, np.float32),
            top_k=column(lambda p: p.top_k, np.int32),
            top_p=column(lambda p: p.top_p, np.float32),
            min_p=column(lambda p: p.min_p, np.float32),
            seeds=np.array([s.seed & 0xFFFFFFFFFFFFFFFF for s in seqs], np.uint64),
            steps=np.array([s.num_output_tokens for s in seqs], np.uint32),
            presence_penalty=column(lambda p: p.presence_penalty, np.float32),
            frequency_penalty=column(lambda p: p.frequency_penalty, np.float32),
            repetition_penalty=column(lambda p: p.repetition_penalty, np.float32),
            num_logprobs=max((p.logprobs or 0) for p in params),
        )
        if any(p.uses_penalties for p in params):
            # Rows without penalties stay all -1: they cost nothing in the penalty pass.
            t.prompt_ids = _pad([s.prompt_token_ids if s.sampling_params.uses_penalties else []
                                 for s in seqs])
            t.output_ids = _pad([s.output_token_ids if s.sampling_params.uses_penalties else []
                                 for s in seqs])
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
