"""Programmatic dependent launch (cuda_kernels.launch with pdl=True): the ctypes launch passes
every argument kind, and decode forwards (eager and replayed from CUDA graphs) give bit-identical
logits with PDL on and off: a kernel reading its predecessor's output before it is complete
would show up here as a difference.

    python -m pytest -q -m gpu tests/test_cuda_pdl.py
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.executor.cuda_graph import DecodeGraphs  # noqa: E402
from engine.executor.ops import AttentionMetadata, cuda_kernels  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.transformer import Transformer  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402


@pytest.fixture(scope="module")
def ops():
    return CudaOps("bfloat16")


@pytest.fixture
def pdl():
    """Sets cuda_kernels.PDL for the test; restores it after."""
    saved = cuda_kernels.PDL
    yield lambda on: setattr(cuda_kernels, "PDL", on)
    cuda_kernels.PDL = saved


def test_launch_passes_pointers_scalars_and_shared_memory(ops, pdl):
    from engine.executor.ops import cuda_gemv

    rng = np.random.default_rng(0)
    x = ops.from_host(rng.standard_normal((3, 64)).astype(np.float32))
    w = ops.from_host(rng.standard_normal((40, 64)).astype(np.float32))
    res = ops.from_host(rng.standard_normal((3, 64)).astype(np.float32))
    norm_w = ops.from_host(rng.standard_normal(64).astype(np.float32))
    ids = cupy.asarray(np.array([2, 0, 2], np.int32))
    assert cuda_kernels._launch_ex() is not None, "no PDL on this GPU / driver (sm_90+ wanted)"
    # norm_gemv: pointers, a null pointer (np.uint64), ints, a float and dynamic shared memory
    for residual in (res, None):
        pdl(False)
        y0, r0 = cuda_gemv.norm_gemv(x, residual, norm_w, w, 1e-6, ops.ctype)
        pdl(True)
        with cuda_kernels.programmatic_launches():
            y, r = cuda_gemv.norm_gemv(x, residual, norm_w, w, 1e-6, ops.ctype)
        np.testing.assert_array_equal(ops.to_host(y), ops.to_host(y0))
        np.testing.assert_array_equal(ops.to_host(r), ops.to_host(r0))
    with cuda_kernels.programmatic_launches():
        gathered = ops.embedding(ids, x)
        with pytest.raises(TypeError, match="numpy scalar"):
            cuda_kernels.launch(cuda_kernels.kernel("gather.cu", "gather_rows_kernel", ops.ctype),
                                (1,), (32,), (x, x, ids, 4), pdl=True)
    np.testing.assert_array_equal(ops.to_host(gathered), ops.to_host(x)[[2, 0, 2]])


def _model(ops, preset, layers=3):
    config = ModelConfig.from_preset(preset)
    config.num_layers, config.vocab_size = layers, 4096
    return Transformer(config, dummy_weights(config, ops, seed=1), ops, 2048)


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama3-8b"])
def test_decode_logits_equal_with_and_without_pdl(ops, pdl, preset):
    model = _model(ops, preset, layers=2 if preset == "llama3-8b" else 3)
    c = model.config
    rng = np.random.default_rng(1)
    bs, nb = 16, 40
    cache = ops.alloc_kv_cache(c.num_layers, 8 * nb, c.num_kv_heads, bs, c.head_dim)
    cache[:] = ops.from_host(rng.standard_normal(cache.shape).astype(np.float32) * 0.5)
    results = {}
    for batch in (1, 2, 4, 8):  # GEMV at M = 1, 2, 4; cuBLAS beside PDL kernels at 8
        ctx = rng.integers(100, nb * bs - 1, batch)
        tables = (np.arange(batch)[:, None] * nb + np.arange(nb)).astype(np.int32)
        meta = AttentionMetadata((tables[np.arange(batch), ctx // bs] * bs + ctx % bs)
                                 .astype(np.int32), np.arange(batch + 1, dtype=np.int32),
                                 (ctx + 1).astype(np.int32), tables, 1, int(ctx.max()) + 1)
        ids = rng.integers(0, c.vocab_size, batch).astype(np.int32)
        for on in (False, True):
            pdl(on)
            with cuda_kernels.programmatic_launches():  # eager PDL too (graphs capture in it)
                eager = model.forward(ops.from_host(ids), ops.from_host(ctx.astype(np.int32)),
                                      cache, ops.prepare_metadata(meta), None)
            graphs = DecodeGraphs(model, cache, max_num_seqs=8, max_blocks_per_seq=nb)
            graphs.capture()
            replayed = [graphs.run(ids, ctx.astype(np.int32), meta) for _ in range(3)]
            results[batch, on] = [cupy.asnumpy(x).view(np.uint16) for x in (eager, *replayed)]
            del graphs
            assert cuda_kernels.PDL == on  # no launch fell back to a plain one
        for got, want in zip(results[batch, True], results[batch, False], strict=True):
            np.testing.assert_array_equal(got, want)
