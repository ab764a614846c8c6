"""mixed_graphs.MixedGraphs (on unless PAGEDSERVE_MIXED_GRAPHS=0): a step with a prompt among
decodes, replayed as CUDA graphs cut at attention, gives the eager forward's logits and cache
writes (padding rows write nothing), and an engine using it generates what the eager engine does
(GPU only)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.executor.mixed_graphs import MixedGraphs  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.transformer import Transformer  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402
from tools.profile_prefill_host import BLOCK, host_step, run_step  # noqa: E402

NUM_BLOCKS = 256


@pytest.fixture(scope="module")
def setup():
    ops = CudaOps("bfloat16")
    config = dataclasses.replace(ModelConfig.from_preset("qwen3-0.6b"), num_layers=2,
                                 vocab_size=4096, eos_token_ids=[2])  # the preset's is past 4096
    model = Transformer(config, dummy_weights(config, ops, seed=0), ops, 2048)
    return ops, config, model


def new_cache(ops, config):
    return ops.alloc_kv_cache(config.num_layers, NUM_BLOCKS, config.num_kv_heads, BLOCK,
                              config.head_dim)


def rel(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def written_slots(ops, cache) -> np.ndarray:
    """(blocks, block_size) bool: the slots any layer's k or v was written to."""
    host = ops.to_host(cache)  # (layers, 2, blocks, kv_heads, block_size, head_dim)
    return np.any(host != 0, axis=(0, 1, 3, 5))


def test_steps_match_the_eager_forward(setup):
    ops, config, model = setup
    eager_cache, graph_cache = new_cache(ops, config), new_cache(ops, config)
    graphs = MixedGraphs(model, graph_cache, max_tokens=256, buckets=(16, 64, 128, 256))
    assert graphs.sizes == [16, 64, 128, 256]
    graphs.capture()
    # 108 tokens (bucket 128), then 48 (bucket 64, over slots the first one used: its
    # padding rows must not write)
    for prompt in (100, 40):
        step = host_step(prompt, 2048 // BLOCK)
        want = ops.to_host(run_step(ops, model, eager_cache, *step))
        got = ops.to_host(run_step(ops, model, graph_cache, *step, mixed=graphs))
        assert got.shape == want.shape == (9, config.vocab_size)
        assert rel(got, want) < 2e-2, prompt
        assert (got.argmax(1) == want.argmax(1)).mean() >= 2 / 3
        assert np.array_equal(written_slots(ops, graph_cache), written_slots(ops, eager_cache))
        assert rel(ops.to_host(graph_cache), ops.to_host(eager_cache)) < 2e-2
    assert graphs.can_run(256) and not graphs.can_run(257) and not graphs.can_run(0)


def test_sizes_end_at_the_token_budget(setup):
    ops, config, model = setup
    cache = new_cache(ops, config)
    assert MixedGraphs(model, cache, max_tokens=40, buckets=(16, 32, 64)).sizes == [16, 32, 40]
    assert MixedGraphs(model, cache, max_tokens=8192).sizes[-1] == 1152


def tiny_engine(seed: int):
    """A function making an engine over one 2-layer Qwen3-0.6B-shaped model (dummy weights)."""
    import types

    from engine.engine import LLMEngine
    from engine.model.config import EngineConfig

    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, 4096
    loaded = types.SimpleNamespace(config=config, tokenizer=None,
                                   weights=dummy_weights(config, CudaOps("bfloat16"), seed=seed))
    return lambda: LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=512,
                                          max_num_seqs=4, num_kv_blocks=128, block_size=16,
                                          max_num_batched_tokens=256), loaded_model=loaded)


def test_engine_with_mixed_graphs_generates_as_eager(monkeypatch):
    from engine.core.sampling_params import SamplingParams
    from engine.executor import runner
    from engine.llm import LLM

    make = tiny_engine(seed=3)
    prompts = [{"prompt_token_ids": [(13 * i + 7 * j) % 4096 for j in range(10 + 29 * i)]}
               for i in range(6)]
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8) for _ in range(6)]
    tokens, replays = {}, []
    for mixed in (False, True):
        monkeypatch.setattr(runner, "MIXED_GRAPHS", mixed)
        engine = make()
        graphs = engine.runner.mixed_graphs
        assert (graphs is not None) == mixed
        if graphs is not None:
            run = graphs.run
            graphs.run = lambda *a, run=run: replays.append(len(a[0])) or run(*a)
        outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
        tokens[mixed] = [o.outputs[0].token_ids for o in outs]
        engine.shutdown()
    assert replays and max(replays) > 16, replays
    assert [len(t) for t in tokens[True]] == [8] * 6
    first = [a[0] == b[0] for a, b in zip(tokens[True], tokens[False], strict=True)]
    assert sum(first) >= 5, (tokens[True], tokens[False])


def test_a_failed_capture_leaves_the_engine_running_eagerly(monkeypatch, caplog):
    """A capture the driver invalidates (another thread's or a collected object's unsafe call)
    costs the mixed-step graphs, not the engine: it starts, warns, and generates what the engine
    without them does."""
    import logging

    from engine.core.sampling_params import SamplingParams
    from engine.executor import runner
    from engine.llm import LLM

    make = tiny_engine(seed=5)
    prompts = [{"prompt_token_ids": [(11 * i + 3 * j) % 4096 for j in range(20 + 17 * i)]}
               for i in range(3)]
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6) for _ in range(3)]

    def invalidated(self):
        raise cupy.cuda.runtime.CUDARuntimeError(901)  # cudaErrorStreamCaptureInvalidated

    caplog.set_level(logging.WARNING, logger="pagedserve")
    tokens = {}
    for failing in (True, False):
        monkeypatch.setattr(runner, "MIXED_GRAPHS", failing)
        if failing:
            monkeypatch.setattr(MixedGraphs, "capture", invalidated)
        engine = make()
        assert engine.runner.mixed_graphs is None
        outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
        tokens[failing] = [o.outputs[0].token_ids for o in outs]
        engine.shutdown()
    assert "capturing mixed-step CUDA graphs failed" in caplog.text
    assert tokens[True] == tokens[False] and [len(t) for t in tokens[True]] == [6] * 3
