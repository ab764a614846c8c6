"""The engine on the GPU with decode CUDA graphs, against the same engine run eagerly."""

from __future__ import annotations

import types

import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor import runner  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.model.config import EngineConfig, ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402


def _generate(enforce_eager: bool, loaded) -> tuple[list[list[int]], int]:
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256,
                                    max_num_seqs=4, num_kv_blocks=96, block_size=16,
                                    enforce_eager=enforce_eager), loaded_model=loaded)
    return _run(engine)


def _run(engine):
    replays = []
    graphs = engine.runner.graphs
    assert (graphs is None) == engine.config.enforce_eager
    if graphs is not None:
        run = graphs.run
        graphs.run = lambda *a: replays.append(len(a[2].context_lens)) or run(*a)
    # 6 prompts, 4 at a time: mixed prefill + decode steps run eagerly, decode-only ones replay;
    # unequal lengths shrink the batch, so padded graph sizes run too.
    prompts = [{"prompt_token_ids": [(13 * i + 7 * j) % 4096 for j in range(10 + 9 * i)]}
               for i in range(6)]
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12 + 5 * i)
              for i in range(6)]
    outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], replays


def _tiny_qwen3():
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, 4096
    return types.SimpleNamespace(config=config, tokenizer=None,
                                 weights=dummy_weights(config, CudaOps("bfloat16"), seed=3))


@pytest.mark.skipif(not runner.DECODE_GRAPHS, reason="PAGEDSERVE_DECODE_GRAPHS=0")
def test_graph_tokens_match_eager():
    loaded = _tiny_qwen3()
    eager, _ = _generate(True, loaded)
    graph, replays = _generate(False, loaded)
    assert len(replays) > 20 and {1, 2, 3, 4} <= set(replays), replays
    assert [len(t) for t in graph] == [12 + 5 * i for i in range(6)]
    assert graph == eager


@pytest.mark.skipif(not runner.DECODE_GRAPHS, reason="PAGEDSERVE_DECODE_GRAPHS=0")
def test_graphs_at_full_batch_with_a_long_max_model_len():
    """256 decodes at once, graphs captured for a 40k-token max_model_len (many context splits
    at small sizes, none at 256): the largest graph is the first captured."""
    loaded = _tiny_qwen3()
    tokens = {}
    for eager in (True, False):
        engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=256,
                                        num_kv_blocks=4096, enforce_eager=eager),
                           loaded_model=loaded)
        assert engine.max_model_len == 40960
        prompts = [{"prompt_token_ids": [(31 * i + 7 * j) % 4096 for j in range(8 + i % 40)]}
                   for i in range(256)]
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6)
        outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
        tokens[eager] = [o.outputs[0].token_ids for o in outs]
    assert all(len(t) == 6 for t in tokens[False])
    assert tokens[False] == tokens[True]


@pytest.mark.skipif(not runner.DECODE_GRAPHS, reason="PAGEDSERVE_DECODE_GRAPHS=0")
def test_longest_first_decode_order_keeps_the_tokens(monkeypatch):
    """PAGEDSERVE_DECODE_ORDER=longest: the graphs' decode grid reads each step's order from the
    upload, eager steps' plans sort their decode rows; tokens as in batch order."""
    from engine.executor.ops import cuda_attention

    loaded = _tiny_qwen3()
    eager, _ = _generate(True, loaded)
    monkeypatch.setattr(cuda_attention, "DECODE_ORDER", "longest")
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256,
                                    max_num_seqs=4, num_kv_blocks=96, block_size=16),
                       loaded_model=loaded)
    graphs = engine.runner.graphs
    assert graphs.ordered
    orders = []
    run = graphs.run

    def watched(*a):
        out = run(*a)
        b = len(a[2].context_lens)
        orders.append((list(a[2].context_lens), cupy.asnumpy(graphs.order[:b]).tolist()))
        return out

    graphs.run = watched
    graph, _ = _run(engine)
    assert graph == eager
    assert orders and all(
        sorted(order) == list(range(len(ctx)))
        and [ctx[i] for i in order] == sorted(ctx, reverse=True) for ctx, order in orders)
    assert any(order != sorted(order) for _, order in orders)  # some step was reordered
    ordered_eager, _ = _generate(True, loaded)
    assert ordered_eager == eager
