"""The prefill attention kernels (v1 attention_prefill.cu; v2 attention_prefill_gqa.cu as the
engine picks it, and each compiled variant) against the numpy twin: long prompts, chunked prefill
over a cached prefix, several sequences and decodes in one launch, GQA 1:1 .. 16:1, block sizes 16
and 32, head_dim 64 and 128, fp16 and bf16 (GPU only). Last in the file, the wgmma kernel
(attention_prefill_sm90.cu; Hopper only): a fault there cannot hide the others' results."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_device_memory")]
cupy = require_gpu()

from engine.executor.ops import AttentionMetadata  # noqa: E402
from engine.executor.ops import cuda_prefill as cpf  # noqa: E402
from engine.executor.ops.cuda_kernels import PREFILL_CONFIGS, SM90_CONFIGS  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.executor.ops.numpy_ops import NumpyOps  # noqa: E402

TOL = {"float16": 2e-3, "bfloat16": 1e-2}  # relative L2 error vs the fp32 reference
REF = NumpyOps()
KERNELS = [("v1", None), ("v2", None)] + [("v2", c) for c in PREFILL_CONFIGS]
HOPPER = cupy.cuda.Device().compute_capability == "90"

CASES = {  # name -> (num_heads, num_kv_heads, head_dim, block_size, num_new, context_lens)
    "long 4:1 bs16": (8, 2, 128, 16, [1030], [1030]),
    "chunked 4:1 bs32 with a decode": (8, 2, 128, 32, [300, 1, 517], [1500, 700, 517]),
    "1:1 bs16 several": (4, 4, 128, 16, [257, 64, 2], [257, 300, 2]),
    "8:1 hd64 bs32": (16, 2, 64, 32, [190, 70], [400, 70]),
    "3:1 hd128 bs16 chunk": (6, 2, 128, 16, [130], [999]),
    "16:1 hd64 bs16": (16, 1, 64, 16, [100, 9], [100, 33]),
    # sm90's other cache shapes: blocks of 8 keys (TMA boxes of 8 rows), a block wider than its
    # key tile (boxes of 128 inside one), and 12 (no multiple of 8: its cp.async gather)
    "2:1 hd64 bs8": (4, 2, 64, 8, [130, 3], [130, 50]),
    "4:1 bs256 chunk": (8, 2, 128, 256, [600], [700]),
    "4:1 bs12 chunked": (8, 2, 128, 12, [300, 2], [340, 90]),
}


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)



@pytest.fixture
def restore_kernel():
    saved = cpf.PREFILL_KERNEL, cpf.PREFILL_CONFIG
    yield
    cpf.PREFILL_KERNEL, cpf.PREFILL_CONFIG = saved


def batch(rng, num_new, ctx, block_size):
    """Metadata whose sequences own shuffled blocks (the gather must follow the table)."""
    nb = [-(-c // block_size) for c in ctx]
    perm = rng.permutation(sum(nb) + 2).astype(np.int32)
    tables = np.full((len(ctx), max(nb) + 1), -1, np.int32)  # a padded table column
    used = 0
    for s, k in enumerate(nb):
        tables[s, :k] = perm[used : used + k]
        used += k
    qsl = np.concatenate([[0], np.cumsum(num_new)]).astype(np.int32)
    meta = AttentionMetadata(np.full(int(qsl[-1]), -1, np.int32), qsl, np.array(ctx, np.int32),
                             tables, max(num_new), max(ctx))
    return meta, sum(nb) + 2


def check_kernels(ops, case, kernels):
    """Every (kernel, config) of `kernels` on CASES[case] against the numpy twin."""
    nh, nkv, hd, bs, num_new, ctx = CASES[case]
    rng = np.random.default_rng(len(case))
    meta, num_blocks = batch(rng, num_new, ctx, bs)
    cache_h = rng.standard_normal((2, num_blocks, nkv, bs, hd)).astype(np.float32)
    # Slots no sequence wrote hold NaN (a freed block keeps what an earlier request left, which
    # may be anything): a kernel must not let them reach a row, even times a zero weight.
    written = np.zeros((num_blocks, bs), bool)
    for s, c in enumerate(ctx):
        for pos in range(c):
            written[meta.block_tables[s, pos // bs], pos % bs] = True
    cache_h[:, np.broadcast_to(~written[:, None], (num_blocks, nkv, bs))] = np.nan
    cache = ops.from_host(cache_h)
    qkv = ops.from_host(rng.standard_normal((sum(num_new), (nh + 2 * nkv) * hd)).astype(
        np.float32))
    cache_h, qkv_h = ops.to_host(cache), ops.to_host(qkv)
    want = REF.attention(qkv_h, cache_h[0], cache_h[1], meta, nh, nkv, hd**-0.5)
    for kernel, config in kernels:
        cpf.PREFILL_KERNEL, cpf.PREFILL_CONFIG = kernel, config
        dmeta = ops.prepare_metadata(meta)
        got = ops.to_host(ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5))
        plan = dmeta.work[nh // nkv]
        picked = plan.prefill_config
        assert plan.prefill_kernel == kernel
        if kernel == "sm90":
            assert picked == (config or SM90_CONFIGS[0])
        else:
            assert picked == config if config or kernel == "v1" else picked in PREFILL_CONFIGS
        assert np.isfinite(got).all(), f"{kernel} {config}: NaN/inf (a row left unwritten)"
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < TOL[ops.dtype], f"{kernel} {config}: relative error {err:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_kernels_match_the_twin(ops, case, restore_kernel):
    check_kernels(ops, case, KERNELS)


def test_prefill_items_cover_every_new_token_once_longest_first():
    qsl = np.array([0, 100, 101, 141, 400], np.int32)  # 100 new, a decode, 40, 259
    ctx = np.array([100, 50, 1000, 259], np.int32)
    items = cpf.prefill_items(qsl, 32, ctx)
    assert (items[:, 2] <= 32).all() and (items[:, 2] > 0).all()
    for s, n in [(0, 100), (2, 40), (3, 259)]:
        mine = items[items[:, 0] == s]
        covered = np.concatenate([np.arange(a, a + c) for _, a, c in mine])
        np.testing.assert_array_equal(np.sort(covered), np.arange(n))
    assert 1 not in items[:, 0]
    num_new = np.diff(qsl)
    last_key = ctx[items[:, 0]] - num_new[items[:, 0]] + items[:, 1] + items[:, 2]
    assert (np.diff(last_key) <= 0).all() and last_key[0] == 1000


def test_prefill_plan_picks_by_the_tail_and_falls_back_to_v1(restore_kernel, monkeypatch):
    monkeypatch.setattr(cpf, "_num_sms", lambda: 132)
    cpf.PREFILL_KERNEL = "v2"
    one = np.array([0, 2048], np.int32)
    # Qwen3 heads (2:1): 256-row blocks make 128 blocks for 132 SMs, the longest 16x the shortest
    assert cpf.prefill_plan(one, [2048], 8, 2)[:2] == ("v2", (1, 8, 64))
    _, config, items = cpf.prefill_plan(one, [2048], 8, 4)  # Llama-3 heads (4:1)
    assert config == (2, 8, 64) and (items[:, 2] == 64).all() and len(items) == 32
    assert cpf.prefill_plan(np.array([0, 8192], np.int32), [8192], 8, 2)[1] == (2, 8, 64)
    assert cpf.prefill_plan(one, [2048], 1, 257)[:2] == ("v1", None)  # wider than any v2 block
    cpf.PREFILL_CONFIG = (1, 4, 64)
    assert cpf.prefill_plan(one, [2048], 8, 3)[2][:, 2].max() == 21  # forced: 64 rows / 3 heads
    assert cpf.prefill_plan(one, [2048], 1, 65)[:2] == ("v1", None)
    cpf.PREFILL_KERNEL, cpf.PREFILL_CONFIG = "v1", None
    name, config, items = cpf.prefill_plan(one, [2048], 8, 4)
    assert (name, config) == ("v1", None) and (items[:, 2] == cpf.PREFILL_M).all()
    cpf.PREFILL_KERNEL = "sm90"  # 128-row blocks: 32 tokens of a 4:1 group, 128 of 1:1
    monkeypatch.setattr(cpf, "_sm90_ready", lambda: True)
    name, config, items = cpf.prefill_plan(one, [2048], 8, 4)
    assert (name, config) == ("sm90", SM90_CONFIGS[0]) and (items[:, 2] == 32).all()
    assert (cpf.prefill_plan(one, [2048], 8, 1)[2][:, 2] == 128).all()
    assert cpf.prefill_plan(one, [2048], 1, 129)[0] == "v2"  # wider than sm90's 128 rows
    monkeypatch.setattr(cpf, "_sm90_ready", lambda: False)  # not Hopper: v2 takes its place
    assert cpf.prefill_plan(one, [2048], 8, 4)[0] == "v2"
    cpf.PREFILL_KERNEL = "auto"  # the default: sm90 on Hopper, else v2
    assert cpf.prefill_plan(one, [2048], 8, 4)[0] == "v2"
    monkeypatch.setattr(cpf, "_sm90_ready", lambda: True)
    assert cpf.prefill_plan(one, [2048], 8, 4)[:2] == ("sm90", SM90_CONFIGS[0])


@pytest.mark.skipif(not HOPPER, reason="wgmma needs an sm_90 GPU")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm90_prefill_matches_the_twin(dtype, case, restore_kernel):
    # its own CudaOps, not the module's `ops`: pytest groups a module fixture's tests by its
    # parameter, which would run these before the bfloat16 ones above
    check_kernels(CudaOps(dtype), case, [("sm90", c) for c in SM90_CONFIGS if
                                         dtype == "bfloat16" or c == SM90_CONFIGS[0]])
