"""Structured outputs on the GPU: the bitmask kernel against its numpy twin, and constrained
generation through the cuda engine (decode CUDA graphs included)."""

from __future__ import annotations

import json
import re
import types

import numpy as np
import pytest
from conftest import _smollm2_tokenizer, require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()
jsonschema = pytest.importorskip("jsonschema")

from engine import SamplingParams, StructuredOutputsParams  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402
from engine.model.config import EngineConfig, ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"pet": {"enum": ["cat", "dog"]},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "maxItems": 2}},
          "required": ["pet", "age", "tags"], "additionalProperties": False}


@pytest.mark.parametrize("in_stage", [False, True], ids=["copied", "filled-in-stage"])
@pytest.mark.parametrize("dtype,storage", [("float32", np.float32), ("float16", np.float16),
                                           ("bfloat16", np.uint16)])
@pytest.mark.parametrize("rows,vocab", [(1, 31), (3, 4096), (7, 49152), (64, 151936)])
def test_apply_token_bitmask_matches_numpy(dtype, storage, rows, vocab, in_stage):
    rng = np.random.default_rng(vocab + rows)
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    bitmask = rng.integers(-2**31, 2**31, (rows, -(-vocab // 32)), dtype=np.int64).astype(np.int32)
    bitmask[0] = -1  # an unconstrained row stays untouched
    want = NumpyOps().apply_token_bitmask(logits.copy(), bitmask)
    ops = CudaOps("bfloat16")
    if storage is np.uint16:  # bf16 as its upper 16 bits (exact for these values' sign / -inf)
        dev = cupy.asarray((logits.view(np.uint32) >> 16).astype(np.uint16))
    else:
        dev = cupy.asarray(logits.astype(storage))
    if in_stage:  # the runner's way: filled in the pinned stage, uploaded without a copy
        stage = ops.bitmask_buffer(*bitmask.shape)
        stage[...] = bitmask
        ops.apply_token_bitmask(dev, stage)
        ops.bitmask_buffer(*bitmask.shape)[...] = 0  # the next fill waits for that upload
    else:
        ops.apply_token_bitmask(dev, bitmask)
    got = cupy.asnumpy(dev)
    got = (got.astype(np.uint32) << 16).view(np.float32) if storage is np.uint16 else \
        got.astype(np.float32)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    kept = ~np.isneginf(want)
    if storage is np.float16:  # kept logits pass through unchanged: fp16-rounded, subnormals too
        want = want.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-2, atol=1e-7)


def _engine(enforce_eager: bool, async_scheduling: bool = True) -> LLMEngine:
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, 49152
    config.eos_token_ids = [2]  # SmolLM2's <|im_end|>: the preset's id is outside this vocab
    loaded = types.SimpleNamespace(config=config, tokenizer=_smollm2_tokenizer(),
                                   weights=dummy_weights(config, CudaOps("bfloat16"), seed=3))
    return LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256,
                                  max_num_seqs=64, num_kv_blocks=512,
                                  enforce_eager=enforce_eager,
                                  async_scheduling=async_scheduling), loaded_model=loaded)


def _texts(engine, params) -> list[str]:
    engine.add_request("r", "Describe a pet:", params)
    final = None
    while engine.has_unfinished_requests():
        final = [o for o in engine.step() if o.finished] or final
    return [c.text for c in final[0].outputs]


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_constrained_generation_on_the_gpu(enforce_eager):
    engine = _engine(enforce_eager)
    json_params = SamplingParams(n=48, temperature=1.0, seed=5, max_tokens=48,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    for text in _texts(engine, json_params):
        jsonschema.validate(json.loads(text), SCHEMA)
    regex = SamplingParams(n=16, temperature=1.0, seed=6, max_tokens=16,
                           structured_outputs=StructuredOutputsParams(regex="[a-z]{3}-[0-9]{2}"))
    assert all(re.fullmatch("[a-z]{3}-[0-9]{2}", t) for t in _texts(engine, regex))
    assert engine.get_stats().kv_blocks_used == 0


def test_graphs_eager_and_synchronous_agree_under_a_grammar():
    """Overlapped steps read the step in flight before filling a constrained row's mask: the
    same outputs as the synchronous loop, with and without decode graphs."""
    params = SamplingParams(n=4, temperature=0.0, max_tokens=48,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    want = _texts(_engine(True, async_scheduling=False), params)
    assert _texts(_engine(False), params) == want
    assert _texts(_engine(True), params) == want
    assert _texts(_engine(False, async_scheduling=False), params) == want


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_special_token_text_and_starved_rows_on_the_gpu(enforce_eager):
    """A grammar forcing a special token's text writes it in ordinary tokens; bad_words that
    ban all a grammar allows end the request naming them (the cuda sampler's logprob of an
    all -inf row is no finite number either)."""
    engine = _engine(enforce_eager)
    so = StructuredOutputsParams(regex=r"<\|im_end\|>x")
    assert _texts(engine, SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=24,
                                         structured_outputs=so)) == ["<|im_end|>x"] * 2
    engine.add_request("b", "Describe a pet:", SamplingParams(
        max_tokens=4, bad_words=["a"], structured_outputs=StructuredOutputsParams(regex="7a")))
    final = None
    while engine.has_unfinished_requests():
        final = [o for o in engine.step() if o.finished] or final
    [c] = final[0].outputs
    assert c.finish_reason == "error" and c.error.startswith(
        "no token was left to sample after 1 output tokens: bad_words exclude"), c.error
    assert engine.get_stats().kv_blocks_used == 0


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_a_first_token_may_defer_the_grammar_on_the_gpu(enforce_eager):
    """structured_outputs_deferred_by through the cuda engine: the id the bias
    favours is let through as the first token only, the next (free) ends the wait, then the
    grammar holds; against it, the grammar from the first token, as without the id."""
    opener = _smollm2_tokenizer().encode("</think>", add_special_tokens=False)[0]
    engine = _engine(enforce_eager)

    def run(bias, deferred):
        params = SamplingParams(n=2, temperature=0.0, max_tokens=64, logit_bias={opener: bias},
                                structured_outputs=StructuredOutputsParams(json=SCHEMA))
        if deferred:
            params.structured_outputs_after = [opener, opener]
            params.structured_outputs_deferred_by = opener
        engine.add_request("r", "Describe a pet:", params)
        final = None
        while engine.has_unfinished_requests():
            final = [o for o in engine.step() if o.finished] or final
        return [c.token_ids for c in final[0].outputs]

    against = run(-100.0, deferred=False)
    assert run(-100.0, deferred=True) == against and opener not in against[0]
    for ids in run(100.0, deferred=True):
        assert ids[:2] == [opener, opener], ids
        jsonschema.validate(json.loads(engine.tokenizer.decode(ids[2:])), SCHEMA)
    assert engine.get_stats().kv_blocks_used == 0


def test_bench_path_synthetic_vocabulary_at_qwen3_shapes():
    """What `bench_throughput.py --structured` runs: dummy weights, the synthetic vocabulary."""
    from tools.structured_workload import SCHEMA as LONG
    from tools.structured_workload import synthetic_grammar_compiler, synthetic_tokens

    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers = 2
    loaded = types.SimpleNamespace(config=config, tokenizer=None,
                                   weights=dummy_weights(config, CudaOps("bfloat16"), seed=3))
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256,
                                    max_num_seqs=8, num_kv_blocks=64), loaded_model=loaded)
    eos = list(config.eos_token_ids)
    engine.core.grammars = synthetic_grammar_compiler(config.vocab_size, eos)
    params = SamplingParams(n=8, temperature=0.0, ignore_eos=True, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(json=LONG))
    engine.add_request("r", {"prompt_token_ids": list(range(100, 130))}, params)
    final = None
    while engine.has_unfinished_requests():
        final = [o for o in engine.step() if o.finished] or final
    tokens = synthetic_tokens(config.vocab_size, eos)
    for c in final[0].outputs:
        assert c.finish_reason == "length" and len(c.token_ids) == 40
        assert b"".join(tokens[t] for t in c.token_ids).startswith(b'{"rows": [{"id": ')
