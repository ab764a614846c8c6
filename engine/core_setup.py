"""What an engine core is built from, in the order it is built.

    backend (ops)     numpy or cuda, in the dtype "auto" picks from the checkpoint
    model             loaded here unless given; under tensor parallel, the WorkerGroup starts
                      ranks 1.. and this process keeps rank 0's slice (`part`)
    KV cache          as many blocks as the memory left holds (runner.num_kv_blocks); a
                      max_model_len the pool cannot hold is an error if asked for, else lowered
    block manager, scheduler, runner
    grammars          the structured-outputs compiler, when the model has a tokenizer

EngineCore (engine_core.py) takes the result and runs steps on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.executor.ops import get_ops, resolve_device
from engine.executor.runner import ModelRunner, num_kv_blocks
from engine.executor.tensor_parallel import release_unused_memory
from engine.executor.transformer import Transformer
from engine.executor.workers import WorkerGroup
from engine.model.config import EngineConfig, ModelConfig
from engine.model.loader import checkpoint_dtype, load_engine_model
from engine.structured_outputs import GrammarCompiler

logger = logging.getLogger("pagedserve." + __name__)


def auto_dtype(device: str, checkpoint: str) -> str:
    """dtype="auto": numpy computes in fp32; the GPU keeps fp16 checkpoints in fp16 and runs
    bf16 and fp32 ones (and dequantized GGUF) in bf16, whose range fp32 weights fit."""
    if device == "numpy":
        return "float32"
    return "float16" if checkpoint == "float16" else "bfloat16"


@dataclass(eq=False, slots=True)
class CoreParts:
    ops: object  # the backend (under tensor parallel, rank 0's)
    model_config: ModelConfig  # the whole model's shape, not one rank's
    # for the in-process front; the core reads its eos ids and builds its grammar compiler on it
    tokenizer: object | None
    workers: WorkerGroup | None  # tensor parallel: ranks 1..; None on one device
    model: Transformer  # this rank's part
    kv_cache: object  # (num_layers, ...) per the backend's alloc_kv_cache
    num_kv_blocks: int
    max_model_len: int  # as configured, or lowered to what the KV cache holds
    block_manager: BlockManager
    scheduler: Scheduler
    eos_token_ids: list[int]  # ModelConfig.end_ids: the model's, and the tokenizer's
    runner: ModelRunner
    grammars: GrammarCompiler | None  # None: the model has no tokenizer


def build_core_parts(engine_config: EngineConfig, loaded_model=None) -> CoreParts:
    """Everything an EngineCore runs on, from a validated config. `loaded_model` (anything with
    .config, .weights, .tokenizer) skips load_engine_model."""
    device = resolve_device(engine_config.device)
    dtype = engine_config.dtype
    if dtype == "auto":
        dtype = auto_dtype(device, loaded_model.config.dtype if loaded_model else
                           checkpoint_dtype(engine_config.model))
    ops = get_ops(device, dtype, engine_config.cpu_threads)
    send_weights = loaded_model is not None  # workers cannot load a model given in memory
    if loaded_model is None:
        loaded_model = load_engine_model(engine_config, ops)
    mc = loaded_model.config
    ops.check_model(mc)
    tokenizer = loaded_model.tokenizer
    max_model_len = engine_config.max_model_len or mc.max_position_embeddings
    if max_model_len > mc.max_position_embeddings:
        logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d",
                       max_model_len, mc.max_position_embeddings)
    if mc.sliding_window is not None and max_model_len > mc.sliding_window:
        # The attention is full: past the window it would attend to tokens the model never sees
        if engine_config.max_model_len is not None:
            raise ValueError(f"max_model_len ({max_model_len}) is longer than the model's "
                             f"sliding_window ({mc.sliding_window}), which pagedserve does not "
                             "apply (its attention is full); lower max_model_len")
        logger.warning("max_model_len lowered from %d to the model's sliding_window %d (sliding-"
                       "window attention is not implemented)", max_model_len, mc.sliding_window)
        max_model_len = mc.sliding_window
    # Tensor parallel: this process is rank 0; `part` is one rank's shape (its heads, its
    # slice of the MLP), which its transformer and KV cache take.
    workers, part, weights = None, mc, loaded_model.weights
    if engine_config.tensor_parallel_size > 1:
        workers = WorkerGroup(engine_config, device, dtype, ops, loaded_model, send_weights)
        ops, part, weights = workers.ops, workers.config, workers.weights
        loaded_model = None  # only this rank's slice stays
        release_unused_memory(ops)
    try:
        return _build_on_part(engine_config, ops, mc, tokenizer, workers, part, weights,
                              max_model_len)
    except BaseException:
        if workers is not None:
            workers.close()
        raise


def _build_on_part(engine_config: EngineConfig, ops, mc: ModelConfig, tokenizer, workers,
                   part: ModelConfig, weights, max_model_len: int) -> CoreParts:
    """Model, KV cache, scheduler and runner, on this rank's part of the model."""
    # The KV cache's size first: a max_model_len it cannot hold fails (or is lowered) before
    # the model builds tables of that length (RoPE's cos / sin: 10**7 positions take 20 s).
    num_blocks = num_kv_blocks(part, engine_config, ops, max_model_len)
    bs = engine_config.block_size
    if num_blocks * bs < max_model_len:
        # A sequence longer than the whole pool could only preempt itself forever.
        if engine_config.max_model_len is not None:
            more = "num_kv_blocks" if resolve_device(engine_config.device) == "numpy" else \
                "num_kv_blocks / gpu_memory_utilization"  # (the cpu's cache has a fixed size)
            raise ValueError(
                f"max_model_len ({max_model_len}) is more than the KV cache holds "
                f"({num_blocks} blocks x {bs} = {num_blocks * bs} tokens); lower "
                f"max_model_len or give more {more}")
        logger.warning("max_model_len lowered from %d to %d, what the KV cache holds",
                       max_model_len, num_blocks * bs)
        max_model_len = num_blocks * bs
    model = Transformer(part, weights, ops, max_model_len)
    kv_cache = ops.alloc_kv_cache(part.num_layers, num_blocks, part.num_kv_heads, bs,
                                  part.head_dim)
    block_manager = BlockManager(num_blocks, bs, engine_config.enable_prefix_caching)
    scheduler = Scheduler(block_manager, engine_config.max_num_seqs,
                          engine_config.max_num_batched_tokens, max_model_len)
    eos = mc.end_ids(tokenizer)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in eos:
        logger.warning("the tokenizer's eos_token %r is token id %d, outside the model's "
                       "vocabulary (vocab_size %d): it cannot be sampled and ends nothing",
                       tokenizer.eos_token, tok_eos, mc.vocab_size)
    if workers is not None:
        workers.start_runners(num_blocks, max_model_len, eos)
    runner = ModelRunner(mc, engine_config, ops, model, kv_cache, eos_token_ids=eos,
                         max_model_len=max_model_len, workers=workers)
    # Structured outputs need the tokens' bytes: only a model with a tokenizer has them (a
    # benchmark may set a compiler of its own on dummy weights).
    grammars = None
    if tokenizer is not None:
        grammars = GrammarCompiler.for_tokenizer(tokenizer, mc.vocab_size, eos)
    return CoreParts(ops, mc, tokenizer, workers, model, kv_cache, num_blocks, max_model_len,
                     block_manager, scheduler, eos, runner, grammars)
