"""The engine on the GPU with decode CUDA graphs, against the same engine run eagerly."""

from __future__ import annotations

import types

import pytest

cupy = pytest.importorskip("cupy")
try:
    _NUM_GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _NUM_GPUS = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_NUM_GPUS == 0, reason="no NVIDIA GPU")]

from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.loader import dummy_weights  # noqa: E402
from engine.ops.cuda_ops import CudaOps  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def _generate(enforce_eager: bool, loaded) -> tuple[list[list[int]], int]:
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256,
                                    max_num_seqs=4, num_kv_blocks=96, block_size=16,
                                    enforce_eager=enforce_eager), loaded_model=loaded)
    replays = []
    graphs = engine.runner.graphs
    assert (graphs is None) == enforce_eager
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


def test_graph_tokens_match_eager():
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, 4096
    loaded = types.SimpleNamespace(config=config, tokenizer=None,
                                   weights=dummy_weights(config, CudaOps("bfloat16"), seed=3))
    eager, _ = _generate(True, loaded)
    graph, replays = _generate(False, loaded)
    assert len(replays) > 20 and {1, 2, 3, 4} <= set(replays), replays
    assert [len(t) for t in graph] == [12 + 5 * i for i in range(6)]
    assert graph == eager
