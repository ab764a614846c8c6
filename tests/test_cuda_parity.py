"""Prompt logprobs and beam search on the GPU (bf16, async scheduling and decode graphs on):
the prompt rows' scores against a greedy run's own logprobs, and beams on shared blocks with the
block manager's invariants held every step."""

from __future__ import annotations

import types

import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.model.config import EngineConfig, ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402

PROMPT = {"prompt_token_ids": [(13 * j + 5) % 4096 for j in range(40)]}


@pytest.fixture(scope="module")
def loaded():
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, 4096
    return types.SimpleNamespace(config=config, tokenizer=None,
                                 weights=dummy_weights(config, CudaOps("bfloat16"), seed=3))


def _engine(loaded, **fields):
    fields = dict(device="cuda", dtype="bfloat16", max_model_len=256, max_num_seqs=8,
                  num_kv_blocks=64, block_size=16, **fields)
    return LLMEngine(EngineConfig(**fields), loaded_model=loaded)


def _run(engine, prompt, params, check_blocks=False):
    engine.add_request("r", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
        if check_blocks:
            s = engine.scheduler
            engine.block_manager.check_invariants(
                [q for q in (*s.running, *s.waiting) if not q.is_finished])
    assert engine.block_manager.num_used_blocks == 0
    return final


@pytest.mark.parametrize("chunk", [16, 4096])
def test_prompt_logprobs_score_what_greedy_generated(loaded, chunk):
    gen = _run(_engine(loaded), PROMPT, SamplingParams(temperature=0, max_tokens=8,
                                                      ignore_eos=True, logprobs=0))
    out = gen.outputs[0]
    ids = PROMPT["prompt_token_ids"] + out.token_ids
    scored = _run(_engine(loaded, max_num_batched_tokens=chunk), {"prompt_token_ids": ids},
                  SamplingParams(prompt_logprobs=3, max_tokens=1))
    n = len(PROMPT["prompt_token_ids"])
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == len(ids)
    got = [scored.prompt_logprobs[n + i][t] for i, t in enumerate(out.token_ids)]
    want = [d[t] for d, t in zip(out.logprobs, out.token_ids, strict=True)]
    assert got == pytest.approx(want, abs=0.05)  # bf16: a prefill and decodes round apart


def test_beam_search_on_shared_blocks(loaded):
    params = SamplingParams(n=2, best_of=4, use_beam_search=True, max_tokens=20,
                            ignore_eos=True)
    out = _run(_engine(loaded), PROMPT, params, check_blocks=True)
    assert [len(c.token_ids) for c in out.outputs] == [20, 20]
    assert out.outputs[0].token_ids != out.outputs[1].token_ids
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob
