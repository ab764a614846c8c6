"""Tensor parallelism on GPUs over NCCL (issue 17): TP=2 against TP=1, CUDA graphs on and off.
Needs two GPUs; on one, only the start-up check runs (more ranks than GPUs is refused)."""

from __future__ import annotations

import types

import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.model.config import ConfigError, EngineConfig, ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402

NUM_GPUS = cupy.cuda.runtime.getDeviceCount()
two_gpus = pytest.mark.skipif(NUM_GPUS < 2, reason=f"tensor parallel needs >= 2 GPUs, "
                                                   f"CuPy sees {NUM_GPUS}")


def _tiny_qwen3():
    """Qwen3-0.6B's layer shapes (16 heads, 8 KV heads, head_dim 128), 2 layers, with sharp
    logits so that bf16 all-reduce rounding does not flip greedy choices."""
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, 4096
    weights = dummy_weights(config, CudaOps("bfloat16"), seed=3)
    ops = CudaOps("bfloat16")
    weights.lm_head = ops.from_host(ops.to_host(weights.lm_head) * 20)
    return types.SimpleNamespace(config=config, tokenizer=None, weights=weights)


def _generate(loaded, size: int, enforce_eager: bool = False):
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256,
                                    max_num_seqs=4, num_kv_blocks=96, enforce_eager=enforce_eager,
                                    tensor_parallel_size=size), loaded_model=loaded)
    prompts = [{"prompt_token_ids": [(13 * i + 7 * j) % 4096 for j in range(10 + 9 * i)]}
               for i in range(6)]
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12 + 5 * i)
              for i in range(6)]
    with LLM.from_engine(engine) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_more_ranks_than_gpus_is_refused_at_start_up():
    with pytest.raises(ConfigError, match=rf"needs {NUM_GPUS + 1} GPUs on this host from GPU 0 "
                                          rf"on, and CuPy sees {NUM_GPUS}"):
        _generate(_tiny_qwen3(), NUM_GPUS + 1)


@two_gpus
def test_tp2_greedy_tokens_match_tp1_with_graphs_and_eager():
    loaded = _tiny_qwen3()
    want = _generate(loaded, 1)
    assert _generate(loaded, 2) == want  # decode graphs hold the NCCL all-reduces
    assert _generate(loaded, 2, enforce_eager=True) == want


def _nccl_available() -> bool:
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", True))


@pytest.mark.skipif(not _nccl_available(), reason="CuPy finds no NCCL (install the "
                                                  "nvidia-nccl-cu12/13 wheel: the cuda extras)")
def test_one_rank_nccl_group_runs_the_transformer_and_its_graphs():
    """What one GPU can check of the NCCL path: a 1-rank communicator behind TensorParallelOps
    (vocab-masked embedding, bf16 all-reduces, the logits gather) gives the plain backend's
    logits, eagerly and replayed from a decode graph that captured the collectives."""
    import numpy as np

    from engine.executor.cuda_graph import DecodeGraphs
    from engine.executor.distributed import NcclCommunicator
    from engine.executor.ops import AttentionMetadata
    from engine.executor.tensor_parallel import TensorParallelOps
    from engine.executor.transformer import Transformer

    loaded = _tiny_qwen3()
    c = loaded.config
    plain = CudaOps("bfloat16")
    comm = NcclCommunicator(NcclCommunicator.new_unique_id(), 0, 1, "bfloat16")
    tp = TensorParallelOps(plain, comm, 0, 1, c.vocab_size)
    meta = AttentionMetadata(slot_mapping=np.arange(5, dtype=np.int32),
                             query_start_loc=np.array([0, 5], np.int32),
                             context_lens=np.array([5], np.int32),
                             block_tables=np.array([[0]], np.int32), max_query_len=5,
                             max_context_len=5)
    ids, pos = np.array([5, 17, 3, 60, 4000], np.int32), np.arange(5, dtype=np.int32)
    logits = []
    for ops in (plain, tp):
        cache = plain.alloc_kv_cache(c.num_layers, 8, c.num_kv_heads, 16, c.head_dim)
        model = Transformer(c, loaded.weights, ops, 256)
        logits.append(plain.to_host(model.forward(plain.from_host(ids), plain.from_host(pos),
                                                  cache, plain.prepare_metadata(meta), None)))
        graphs = DecodeGraphs(model, cache, 2, 8)
        graphs.capture()
        decode = AttentionMetadata(np.array([5], np.int32), np.array([0, 1], np.int32),
                                   np.array([6], np.int32), np.array([[0]], np.int32), 1, 6)
        logits.append(plain.to_host(graphs.run(np.array([9], np.int32),
                                               np.array([5], np.int32), decode)))
    np.testing.assert_array_equal(logits[0], logits[2])  # one rank: the sums are x itself
    np.testing.assert_array_equal(logits[1], logits[3])
    assert np.isfinite(logits[1]).all()
    comm.close()
