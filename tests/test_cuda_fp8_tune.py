"""cuda_fp8_tune.Fp8Tuner (PAGEDSERVE_FP8_TUNE=1) and cuBLASLt's FP8 fast accumulation
(PAGEDSERVE_FP8_FAST_ACCUM=1): every candidate the tuner may pick computes the FP8 twin
(engine/model/fp8.py) within cuBLASLt's summation slack, a tuned plan replays in a CUDA graph as it
ran eagerly, a shape first met inside a capture runs the heuristic's plan untimed, a bucket's plan
serves the row counts below it, fast accumulation stays within FP8's error, and an engine with
tuning on serves through its decode graphs (GPU only)."""

from __future__ import annotations

import types

import numpy as np
import pytest
from conftest import capture_and_replay, require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from test_cuda_fp8 import (  # noqa: E402
    LT_SLACK,
    ROUND,
    activations,
    assert_product_close,
    twin_product,
    upload,
)

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor.ops import cuda_fp8, cuda_fp8_tune  # noqa: E402
from engine.executor.ops.cuda_blas import Gemm  # noqa: E402
from engine.executor.ops.cuda_fp8_splitk import MAX_M  # noqa: E402
from engine.executor.ops.cuda_fp8_tune import CANDIDATES, Fp8Tuner, bucket  # noqa: E402
from engine.executor.ops.cuda_ops import CudaOps  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.model import fp8  # noqa: E402
from engine.model.config import EngineConfig, ModelConfig  # noqa: E402
from engine.model.loader import dummy_weights  # noqa: E402

NAN = {"float16": 0x7E00, "bfloat16": 0x7FC0}
# Fast accumulation skips the periodic promotion of partial sums to fp32: held to 2^-7 of the sum
# of |terms| per output (the default path: 2^-9, LT_SLACK) and 1% in the Frobenius norm.
FAST_SLACK, FAST_REL = 2.0**-7, 0.01


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ops(request):
    return CudaOps(request.param)


@pytest.fixture(autouse=True)
def quick_search(monkeypatch):
    monkeypatch.setattr(cuda_fp8_tune, "VARIANT_SECONDS", 0.3)


@pytest.fixture
def lt(ops):
    lt = cuda_fp8.fp8_gemm(ops._gemm)
    saved = lt.tuner, lt.fast_accum, lt.plans
    lt.tuner, lt.fast_accum, lt.plans = Fp8Tuner(lt), False, {}
    yield lt
    lt.tuner, lt.fast_accum, lt.plans = saved


def operands(ops, m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    qw = ops.quantize_fp8(upload(ops, rng.standard_normal((n, k)) * 0.05)[0])
    q, s = cuda_fp8.quantize_rows(upload(ops, activations(rng, m, k))[0], ops.ctype)
    return q, s, qw


def outer_plan_or_skip(lt, m, n, k, dtype):
    plan = lt.plans.get((m, n, k, dtype))
    if plan is None or plan[0] != "outer":
        pytest.skip("this cuBLASLt has no outer-vector FP8 scaling (nothing to tune)")
    return plan


def nan_out(ops, m, n):
    out = cupy.empty((m, n), ops.storage)
    out.view(cupy.uint16).fill(NAN[ops.dtype])  # NaN until written
    return out


@pytest.mark.parametrize("m, n, k", [(16, 1024, 512), (144, 2048, 1024), (256, 1536, 4096)])
def test_tunes_once_and_matches_twin(ops, lt, m, n, k):
    q, s, qw = operands(ops, m, n, k)
    y = cuda_fp8.matmul(ops, q, s, qw, use_gemv=False)
    outer_plan_or_skip(lt, m, n, k, ops.dtype)
    key = (bucket(m), n, k, ops.dtype, False)
    assert key in lt.tuner.plans and lt.tuner.timings[key]
    assert_product_close(ops, y, q, s, qw, LT_SLACK)
    plan = lt.tuner.plans[key]
    again = cuda_fp8.matmul(ops, q, s, qw, use_gemv=False)
    assert lt.tuner.plans[key] is plan and cupy.array_equal(again, y)  # no re-tuning


@pytest.mark.parametrize("m, n, k", [(48, 2048, 1024), (256, 1024, 2048)])
def test_every_candidate_matches_twin(ops, lt, m, n, k):
    """Whatever timing picks (another tile, split K, cluster, a split-K batch with its summing
    epilogue), the product is the twin's."""
    q, s, qw = operands(ops, m, n, k, seed=1)
    lt.tuner = None
    cuda_fp8.matmul(ops, q, s, qw, use_gemv=False)
    first = outer_plan_or_skip(lt, m, n, k, ops.dtype)
    lt.tuner = Fp8Tuner(lt)
    pool = lt.tuner.candidates(first, m, n, k, ops.dtype)
    assert pool, "no candidate besides the heuristic's first: tuning can change nothing"
    batches = lt.tuner.splitk.candidates(m, n, k)
    assert bool(batches) == (m <= MAX_M), batches  # split-K batches at decode sizes only
    key = (m, n, k, ops.dtype, False)
    want, slack = twin_product(q, s, qw, LT_SLACK)
    for plan in [("outer", h) for h in pool[:CANDIDATES]] + batches:
        lt.tuner.plans[key] = plan
        out = nan_out(ops, m, n)
        assert lt(q, s, qw.data, qw.scale, out, ops.dtype, None) == plan[0]
        got = ops.to_host(out).astype(np.float64)
        bad = ~(np.abs(got - want) <= ROUND[ops.dtype] * np.abs(want) + slack + 1e-30)  # NaN: bad
        assert not bad.any(), (lt.tuner.describe(plan), got[bad][:5], want[bad][:5])


@pytest.mark.parametrize("kind", ["variant", "splitk"])
def test_captured_plan_replays_the_eager_result(ops, lt, kind):
    m, n, k = 96, 2048, 1024
    q, s, qw = operands(ops, m, n, k)
    lt.tuner = None
    cuda_fp8.matmul(ops, q, s, qw, use_gemv=False)
    first = outer_plan_or_skip(lt, m, n, k, ops.dtype)
    lt.tuner = Fp8Tuner(lt)
    if kind == "splitk":
        plan = lt.tuner.splitk.candidates(m, n, k)[-1]
    else:  # not the heuristic's first algorithm
        plan = ("outer", (lt.tuner.candidates(first, m, n, k, ops.dtype) or [first[1]])[-1])
    lt.tuner.plans[(m, n, k, ops.dtype, False)] = plan
    eager = nan_out(ops, m, n)
    lt(q, s, qw.data, qw.scale, eager, ops.dtype, None)
    captured = nan_out(ops, m, n)
    capture_and_replay(lambda: lt(q, s, qw.data, qw.scale, captured, ops.dtype, None))
    assert cupy.array_equal(captured, eager)


def test_shape_first_met_in_a_capture_runs_the_heuristic_untimed(ops, lt):
    m, n, k = 80, 1024, 1024
    q, s, qw = operands(ops, m, n, k)
    tuner, lt.tuner = lt.tuner, None
    want = cuda_fp8.matmul(ops, q, s, qw, use_gemv=False)
    outer_plan_or_skip(lt, m, n, k, ops.dtype)
    lt.tuner = tuner
    got = nan_out(ops, m, n)
    capture_and_replay(lambda: lt(q, s, qw.data, qw.scale, got, ops.dtype, None))
    assert not tuner.plans and not tuner.timings
    assert cupy.array_equal(got, want)


def test_plan_of_a_bucket_serves_its_smaller_row_counts(ops, lt):
    n, k = 2048, 1024
    q, s, qw = operands(ops, 144, n, k)
    cuda_fp8.matmul(ops, q, s, qw, use_gemv=False)  # tunes bucket 144
    first = outer_plan_or_skip(lt, 144, n, k, ops.dtype)
    key = (144, n, k, ops.dtype, False)
    assert list(lt.tuner.plans) == [key]
    pool = lt.tuner.candidates(first, 144, n, k, ops.dtype)
    lt.tuner.plans[key] = ("outer", pool[-1])  # whatever timing chose: not the heuristic's
    q2, s2 = q[:140], s[:140]
    y = cuda_fp8.matmul(ops, q2, s2, qw, use_gemv=False)
    assert (140, n, k, ops.dtype, False) in lt.tuner._valid  # asked cuBLASLt, not re-tuned
    assert list(lt.tuner.plans) == [key]
    assert_product_close(ops, y, q2, s2, qw, LT_SLACK)


def test_large_rows_share_one_plan(ops, lt, monkeypatch):
    """PAGEDSERVE_FP8_TUNE_LARGE: every M above TUNE_MAX_M runs the plan tuned at the first."""
    monkeypatch.setattr(cuda_fp8_tune, "TUNE_MAX_M", 64)
    monkeypatch.setattr(cuda_fp8_tune, "TUNE_LARGE", True)
    n, k = 1024, 2048
    q, s, qw = operands(ops, 100, n, k)
    cuda_fp8.matmul(ops, q, s, qw, use_gemv=False)
    first = outer_plan_or_skip(lt, 100, n, k, ops.dtype)
    key = (cuda_fp8_tune.LARGE, n, k, ops.dtype, False)
    assert list(lt.tuner.plans) == [key] and lt.tuner.timings[key]
    lt.tuner.plans[key] = ("outer", lt.tuner.candidates(first, 100, n, k, ops.dtype)[-1])
    q2, s2 = q[:72], s[:72]
    y = cuda_fp8.matmul(ops, q2, s2, qw, use_gemv=False)
    assert (72, n, k, ops.dtype, False) in lt.tuner._valid and list(lt.tuner.plans) == [key]
    assert_product_close(ops, y, q2, s2, qw, LT_SLACK)


@pytest.mark.parametrize("tuned", [False, True])
@pytest.mark.parametrize("m, n, k", [(64, 1024, 4096), (128, 1024, 14336)])
def test_fast_accumulation_within_fp8_error(ops, lt, m, n, k, tuned):
    lt.fast_accum = True
    if not tuned:
        lt.tuner = None
    q, s, qw = operands(ops, m, n, k, seed=2)
    y = cuda_fp8.matmul(ops, q, s, qw, use_gemv=False)
    got = ops.to_host(y).astype(np.float64)
    dx, dw = fp8.decode(cupy.asnumpy(q)).astype(np.float64), fp8.decode(cupy.asnumpy(qw.data))
    scale = cupy.asnumpy(s)[:, None] * cupy.asnumpy(qw.scale)[None, :]
    want, terms = (dx @ dw.T) * scale, (np.abs(dx) @ np.abs(dw).T) * scale
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < FAST_REL
    bad = np.abs(got - want) > ROUND[ops.dtype] * np.abs(want) + FAST_SLACK * terms + 1e-30
    assert not bad.any(), (got[bad][:5], want[bad][:5])


def test_tuning_and_fast_accumulation_are_on_by_default(monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_FP8_TUNE", raising=False)
    monkeypatch.delenv("PAGEDSERVE_FP8_FAST_ACCUM", raising=False)
    gemm = Gemm()
    lt = cuda_fp8.fp8_gemm(gemm)
    assert isinstance(lt.tuner, Fp8Tuner) and lt.fast_accum
    monkeypatch.setenv("PAGEDSERVE_FP8_TUNE", "0")
    monkeypatch.setenv("PAGEDSERVE_FP8_FAST_ACCUM", "0")
    other = Gemm()
    lt = cuda_fp8.fp8_gemm(other)
    assert lt.tuner is None and not lt.fast_accum


def test_a_tuned_plan_failing_at_run_time_falls_back_to_the_heuristic(ops, lt, caplog):
    """A tuned plan that cuBLASLt refuses when it runs (a split-K plan here, whose run answers a
    failing status without queuing anything): the product still comes, from the heuristic's
    plan, within the twin's slack; a warning names it; the bucket forgets the tuned plan."""
    m, n, k = 16, 1024, 512
    q, s, qw = operands(ops, m, n, k, seed=3)
    cuda_fp8.matmul(ops, q, s, qw, use_gemv=False)  # tunes the bucket
    base = outer_plan_or_skip(lt, m, n, k, ops.dtype)
    key = (bucket(m), n, k, ops.dtype, False)
    failed = []
    lt.tuner.plans[key] = ("splitk", base[1], 2)
    lt.tuner.splitk = types.SimpleNamespace(run=lambda plan, *args: failed.append(plan) or 13)
    out = nan_out(ops, m, n)
    with caplog.at_level("WARNING", logger="pagedserve"):
        assert lt(q, s, qw.data, qw.scale, out, ops.dtype, None) == "outer"
    assert len(failed) == 1 and "tuned splitk plan failed (cuBLAS status 13)" in caplog.text
    assert_product_close(ops, out, q, s, qw, LT_SLACK)
    assert lt.tuner.plans[key] is None
    again = nan_out(ops, m, n)
    assert lt(q, s, qw.data, qw.scale, again, ops.dtype, None) == "outer" and len(failed) == 1
    assert cupy.array_equal(again, out)


def test_fp8_gemm_goes_with_its_gemm():
    """The cuBLASLt FP8 GEMM lives on its Gemm (gemm.fp8): once the Gemm is dropped, the
    collector frees both (a dict keyed weakly by the Gemm held them forever: its value, the
    Fp8Gemm, refers to the key)."""
    import gc
    import weakref

    gemm = Gemm()
    lt = weakref.ref(cuda_fp8.fp8_gemm(gemm))
    assert cuda_fp8.fp8_gemm(gemm) is lt() is gemm.fp8
    freed = weakref.ref(gemm)
    del gemm
    gc.collect()
    assert freed() is None and lt() is None


def test_engine_with_tuning_serves_through_its_graphs(monkeypatch):
    """A 2-layer Qwen3-0.6B-shaped FP8 model with tuning on: the decode graphs' warm-up tunes
    their cuBLASLt sizes before capture, and every request completes."""
    monkeypatch.setenv("PAGEDSERVE_FP8_TUNE", "1")
    monkeypatch.setattr(cuda_fp8_tune, "VARIANT_SECONDS", 0.2)
    monkeypatch.setattr(fp8, "LM_HEAD", False)
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.num_layers, config.vocab_size = 2, 4096
    ops = CudaOps("bfloat16")
    loaded = types.SimpleNamespace(config=config, tokenizer=None,
                                   weights=dummy_weights(config, ops, seed=3, quantization="fp8"))
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256,
                                    max_num_seqs=16, num_kv_blocks=256), loaded_model=loaded)
    prompts = [{"prompt_token_ids": [(13 * i + 7 * j) % 4096 for j in range(10 + 9 * i)]}
               for i in range(12)]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=10)
    outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
    lt = engine.runner.ops._gemm.fp8  # the engine's own ops' cuBLASLt FP8 GEMM
    tuned = list(lt.tuner.plans) if lt is not None and lt.tuner is not None else []
    engine.shutdown()
    assert all(len(o.outputs[0].token_ids) == 10 for o in outs)
    assert any(key[0] == 16 for key in tuned), tuned  # the 16-row graph's products
