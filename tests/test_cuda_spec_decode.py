"""Speculative decoding on the GPU: verify steps (1 + k query tokens per sequence, eagerly through
the prefill attention or as 1 + k decode rows replaying a decode CUDA graph; k + 1 sampled rows,
rollback) between overlapped decode-graph steps give the tokens plain decoding gives, on a model
whose greedy margins survive bf16."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_gpu
from test_spec_decode import OracleProposer, assert_same, copy_heavy, drive, ids, spec

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from test_cuda_overlap import _wide_margin_model  # noqa: E402

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.model.config import EngineConfig  # noqa: E402

# NOTE: bf16 logits change in the last bits with the batch's shape (GEMM tiling), so the two
# runs' summed logprobs differ: by 0.10 on a sum of -57 over ~40 sampled tokens on the H200
# (2026-12-03), about 2e-3 relative. The tokens must be equal; a wrong position or context
# would move a sum by several units per token.
BF16_LOGPROB_TOL = 0.3

@pytest.fixture(scope="module")
def loaded():
    return _wide_margin_model()


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_spec_equals_plain_on_cuda(loaded, eager):
    rng = np.random.default_rng(0)
    vocab = loaded.config.vocab_size
    requests = {f"r{i}": (ids(p), SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i,
                                                 max_tokens=int(rng.integers(8, 40)),
                                                 ignore_eos=True))
                for i, p in enumerate(copy_heavy(rng, 12, vocab))}

    def make(**fields):
        return LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", enforce_eager=eager,
                                      max_num_seqs=8, num_kv_blocks=256, **fields),
                         loaded_model=loaded)

    want = drive(make(), requests)
    engine = make(speculative_config=spec(k=4, disable_by_batch_size=4))
    engine.core.spec.proposer = OracleProposer(want, 4, seed=0)
    assert_same(drive(engine, requests), want, logprob_tol=BF16_LOGPROB_TOL)
    assert all(engine.core.spec.accepted_hist)
    verified_in_graphs = engine.core.runner.num_graph_verify_steps
    assert verified_in_graphs == 0 if eager else verified_in_graphs > 0


def test_graph_verify_equals_eager_verify_and_plain_greedy(loaded):
    """Greedy, contexts long enough that the decode kernel splits them (rows attend to up to
    ~700 keys), batches of 1..4 verifying sequences: graph verify == eager verify == plain."""
    rng = np.random.default_rng(1)
    vocab = loaded.config.vocab_size
    prompts = copy_heavy(rng, 6, vocab)
    prompts[0] = (rng.integers(3, vocab, 40).tolist() * 16)[:640]
    prompts[1] = rng.integers(3, vocab, 300).tolist()
    requests = {f"r{i}": (ids(p), SamplingParams(temperature=0.0, max_tokens=int(n),
                                                 ignore_eos=True))
                for i, (p, n) in enumerate(zip(prompts, rng.integers(20, 60, 6), strict=True))}

    def make(eager, **fields):
        return LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", enforce_eager=eager,
                                      max_num_seqs=8, num_kv_blocks=512, max_model_len=1024,
                                      **fields), loaded_model=loaded)

    want = drive(make(False), requests)
    got = {}
    for eager in (True, False):
        engine = make(eager, speculative_config=spec(k=4, disable_by_batch_size=4))
        engine.core.spec.proposer = OracleProposer(want, 4, seed=2)
        got[eager] = drive(engine, requests)
        assert_same(got[eager], want, logprob_tol=BF16_LOGPROB_TOL)
        runner = engine.core.runner
        assert (runner.num_graph_verify_steps > 0) != eager
        assert engine.get_stats().spec_num_accepted_tokens > 0
    assert_same(got[False], got[True], logprob_tol=BF16_LOGPROB_TOL)
