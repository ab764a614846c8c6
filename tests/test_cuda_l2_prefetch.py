"""The L2 prefetch (cuda_prefetch.py, cuda/prefetch.cu) on the GPU: a decode forward with it on
gives the same logits bit for bit as with it off, eager under PDL and replayed from CUDA graphs
(the prefetch kernel sits between the qkv GEMV and the RoPE kernel that reads its output: a
broken chain would show here), and it launches once a layer, on bf16 and on FP8 weights."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.executor.cuda_graph import DecodeGraphs  # noqa: E402
from engine.executor.ops import AttentionMetadata, cuda_kernels, cuda_prefetch  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.transformer import Transformer  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402


@pytest.fixture(scope="module")
def ops():
    return CudaOps("bfloat16")


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_decode_logits_equal_with_and_without_prefetch(ops, monkeypatch, quantization):
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 3, 4096
    model = Transformer(config, dummy_weights(config, ops, seed=1, quantization=quantization),
                        ops, 2048)
    rng = np.random.default_rng(2)
    bs, nb = 16, 40
    cache = ops.alloc_kv_cache(config.num_layers, 2 * nb, config.num_kv_heads, bs,
                               config.head_dim)
    cache[:] = ops.from_host(rng.standard_normal(cache.shape).astype(np.float32) * 0.5)
    ctx = np.array([300, 517], np.int32)
    tables = (np.arange(2)[:, None] * nb + np.arange(nb)).astype(np.int32)
    meta = AttentionMetadata((tables[np.arange(2), ctx // bs] * bs + ctx % bs).astype(np.int32),
                             np.arange(3, dtype=np.int32), ctx + 1, tables, 1, int(ctx.max()) + 1)
    ids = np.array([11, 4000], np.int32)
    launches = []
    original = cuda_prefetch.kernel

    def recording(file, name, ctype="float"):
        launches.append(name)
        return original(file, name, ctype)

    monkeypatch.setattr(cuda_prefetch, "kernel", recording)
    results = {}
    for max_bytes in (0, 24 << 20, 1 << 20):  # off, all of a layer's o/gate_up/down, a part
        monkeypatch.setattr(cuda_prefetch, "PREFETCH_MAX_BYTES", max_bytes)
        launches.clear()
        with cuda_kernels.programmatic_launches():
            eager = model.forward(ops.from_host(ids), ops.from_host(ctx), cache,
                                  ops.prepare_metadata(meta), None)
        assert launches == ([] if max_bytes == 0 else ["l2_prefetch_kernel"] * 3)
        graphs = DecodeGraphs(model, cache, max_num_seqs=2, max_blocks_per_seq=nb)
        graphs.capture()
        replayed = [graphs.run(ids, ctx, meta) for _ in range(3)]
        results[max_bytes] = [cupy.asnumpy(x).view(np.uint16) for x in (eager, *replayed)]
        del graphs
    for max_bytes in (24 << 20, 1 << 20):
        for got, want in zip(results[max_bytes], results[0], strict=True):
            np.testing.assert_array_equal(got, want)
