"""The Transformer on the cuda backend (bf16) against numpy (fp32) on the same rounded weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.executor.ops import AttentionMetadata  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402
from engine.executor.transformer import Transformer  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402
from engine.model.weights import ModelWeights  # noqa: E402


def round_bf16(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(
        0xFFFF0000)
    return bits.view(np.float32)


def map_weights(w: ModelWeights, fn) -> ModelWeights:
    def conv(obj):
        return None if obj is None else fn(obj)

    layers = [dataclasses.replace(
        layer, **{f.name: conv(getattr(layer, f.name)) for f in dataclasses.fields(layer)})
        for layer in w.layers]
    embed = fn(w.embed)
    lm_head = embed if w.lm_head is w.embed else fn(w.lm_head)
    return ModelWeights(embed=embed, layers=layers, norm=fn(w.norm), lm_head=lm_head)


def step_meta(prompt_lens, ctx, num_new, block_size, tables):
    slots, positions = [], []
    for s, (c, n) in enumerate(zip(ctx, num_new, strict=True)):
        pos = np.arange(c - n, c)
        positions.append(pos)
        slots.append(tables[s, pos // block_size] * block_size + pos % block_size)
    qsl = np.concatenate([[0], np.cumsum(num_new)]).astype(np.int32)
    meta = AttentionMetadata(np.concatenate(slots).astype(np.int32), qsl,
                             np.array(ctx, np.int32), tables, max(num_new), max(ctx))
    return meta, np.concatenate(positions).astype(np.int32), (qsl[1:] - 1).astype(np.int32)


@pytest.mark.parametrize("preset,vocab,short", [("qwen3-0.6b", None, True),
                                                ("llama3-8b", 32000, True),
                                                ("llama3-8b", 32000, False)])
def test_model_bf16_matches_numpy(preset, vocab, short, monkeypatch):
    """short False: no short-context (cluster) decode plans, so that Llama's decode steps take
    the RoPE fold (RoPE and the KV write in the decode kernel), which the test asserts."""
    from engine.executor.ops import cuda_attention

    if not short:
        monkeypatch.setattr(cuda_attention, "SHORT_DECODE_CONTEXT", 0)
    config = ModelConfig.from_preset(preset)
    config.num_layers = 2
    config.vocab_size = vocab or config.vocab_size
    host = map_weights(dummy_weights(config, NumpyOps(), seed=1), round_bf16)
    ref_ops, ops = NumpyOps(), CudaOps("bfloat16")
    ref = Transformer(config, host, ref_ops, 512)
    dev = Transformer(config, map_weights(host, ops.from_host), ops, 512)
    block_size, prompt_lens = 16, [37, 20]
    tables = np.arange(2 * 32, dtype=np.int32).reshape(2, 32)
    args = (2, 64, config.num_kv_heads, block_size, config.head_dim)
    cache_ref, cache_dev = ref_ops.alloc_kv_cache(*args), ops.alloc_kv_cache(*args)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, sum(prompt_lens)).astype(np.int32)
    ctx, num_new = list(prompt_lens), list(prompt_lens)
    agree, errors = [], []
    for _ in range(33):  # the prefill, then 32 decode steps
        meta, positions, last = step_meta(prompt_lens, ctx, num_new, block_size, tables)
        want = ref.forward(ids, positions, cache_ref, meta, last)
        dmeta = ops.prepare_metadata(meta)
        if not short and meta.max_query_len == 1:
            assert dev.rope_in_attention(dmeta)
        got = ops.to_host(dev.forward(ids, positions, cache_dev, dmeta, last))
        assert np.isfinite(got).all()
        errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
        agree.append(np.mean(got.argmax(-1) == want.argmax(-1)))
        ids = want.argmax(-1).astype(np.int32)  # both sides continue with numpy's tokens
        ctx = [c + 1 for c in ctx]
        num_new = [1, 1]
    assert max(errors) < 2e-2, errors
    assert np.mean(agree) > 0.7, agree


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama3-8b"])
@pytest.mark.parametrize("short_context", [512, 41, 0])
def test_decode_graph_matches_eager(short_context, preset, monkeypatch):
    """Replayed against eager: the short-context graph while every context fits
    SHORT_DECODE_CONTEXT (512; the longest context here is 41), the split graph past it (41:
    contexts 41, 8, 20 fit, then one of 42 does not), none when they are off (0). Llama's split
    graphs take the RoPE fold, with a padding row (3 sequences in the graph of 4)."""
    from engine.executor.cuda_graph import DecodeGraphs
    from engine.executor.ops import cuda_attention

    monkeypatch.setattr(cuda_attention, "SHORT_DECODE_CONTEXT", short_context)
    # GEMMs on cuBLAS's own choices: tuned plans are per row count (cuda_gemm_tune), and the eager
    # step's 3 rows and the graph's 4 may take algorithms whose bf16 roundings, through two
    # layers, differ beyond this tolerance (session 35, H100); test_cuda_gemm_tune holds them
    monkeypatch.setenv("PAGEDSERVE_GEMM_TUNE", "0")

    config = ModelConfig.from_preset(preset)
    config.num_layers, config.vocab_size = 2, 4096
    ops = CudaOps("bfloat16")
    model = Transformer(config, dummy_weights(config, ops, seed=2), ops, 512)
    block_size, batch = 16, 3
    tables = np.arange(batch * 8, dtype=np.int32).reshape(batch, 8)
    cache = ops.alloc_kv_cache(2, batch * 8, config.num_kv_heads, block_size, config.head_dim)
    rng = np.random.default_rng(0)
    # fill the caches with a prefill, then compare one decode step eager vs replayed
    prompt = [40, 7, 19]
    ids = rng.integers(0, config.vocab_size, sum(prompt)).astype(np.int32)
    meta, positions, last = step_meta(prompt, prompt, prompt, block_size, tables)
    model.forward(ids, positions, cache, ops.prepare_metadata(meta), last)
    graphs = DecodeGraphs(model, cache, max_num_seqs=4, max_blocks_per_seq=8)
    graphs.capture()
    assert sorted(graphs.short_graphs) == cuda_attention.short_graph_sizes(graphs.sizes)
    assert bool(graphs.short_graphs) == (short_context > 0 and (
        cuda_attention.SHORT_DECODE_CLUSTER == 1
        or int(cupy.cuda.Device().compute_capability) >= 90))
    for step in range(2):  # contexts 41, 8, 20; then 42, 9, 21
        ctx = [p + 1 + step for p in prompt]
        meta, positions, last = step_meta([c - 1 for c in ctx], ctx, [1] * batch, block_size,
                                          tables)
        short = short_context >= max(ctx) and bool(graphs.short_graphs)
        size, chosen = graphs.pick(meta.context_lens)
        assert size == 4 and chosen is (graphs.short_graphs if short else graphs.graphs)[4]
        plan = next(iter(chosen[2].work.values()))
        if short:  # the splits are one cluster's blocks (or one split where there are none)
            assert plan.decode_cluster == cuda_attention.SHORT_DECODE_CLUSTER == plan.num_splits
        else:
            assert plan.decode_cluster == 1 and plan.num_splits > 1
            assert model.rope_in_attention(chosen[2]) == (preset == "llama3-8b")
        ids = rng.integers(0, config.vocab_size, batch).astype(np.int32)
        replayed = ops.to_host(graphs.run(ids, positions, meta))
        eager = ops.to_host(model.forward(ids, positions, cache, ops.prepare_metadata(meta),
                                          last))
        assert np.isfinite(replayed).all()
        np.testing.assert_allclose(replayed, eager, rtol=2e-2, atol=2e-3)


def test_decode_graph_capture_waits_for_default_stream():
    """The capture stream does not wait for the default stream by itself: capture must, or its
    warm-up forward reads slot_mapping before fill(-1) lands and stores k/v at whatever slots
    the recycled pool memory held (in kernel_check, an illegal address)."""
    from engine.executor.cuda_graph import DecodeGraphs

    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 1, 1024
    ops = CudaOps("bfloat16")
    model = Transformer(config, dummy_weights(config, ops, seed=3), ops, 256)
    n, max_blocks = 4, 8
    cache = ops.alloc_kv_cache(1, 16, config.num_kv_heads, 16, config.head_dim)
    cupy.cuda.Device().synchronize()
    # Garbage where DecodeGraphs' input buffer will land: every slot, length and table says 5.
    stale = cupy.full(4 * n + n * max_blocks, 5, cupy.int32)
    cupy.cuda.Device().synchronize()
    del stale
    spin = cupy.RawKernel(r"""extern "C" __global__ void spin(long long cycles) {
        const long long t = clock64(); while (clock64() - t < cycles) {} }""", "spin")
    spin((1,), (1,), (np.int64(200_000_000),))  # ~0.1 s on the default stream: the fill waits
    graphs = DecodeGraphs(model, cache, max_num_seqs=n, max_blocks_per_seq=max_blocks)
    graphs.capture()
    cupy.cuda.Device().synchronize()
    assert not cupy.any(cache), "the capture's warm-up stored k/v into the cache"
