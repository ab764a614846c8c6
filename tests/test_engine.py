"""LLMEngine end to end on a tiny random model (numpy): batching, caching, limits, abort."""

from pathlib import Path

import numpy as np
import pytest
from conftest import step_to_end

from engine.core.sampling_params import SamplingParams
from engine.model.config import EngineConfig


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def ids(tokens):
    return {"prompt_token_ids": list(tokens)}


def test_batching_changes_nothing(make_engine, run_engine):
    """Chunked prefill, mixed batches and preemption give exactly the tokens of a lone run."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 301, 24)
    lengths[:3] = [1, 300, 17]
    requests = {
        f"r{i}": (ids(rng.integers(3, 512, n)), greedy(int(rng.integers(8, 17))))
        for i, n in enumerate(lengths)
    }
    engine = make_engine(max_num_batched_tokens=64, num_kv_blocks=40, max_num_seqs=16)
    batched, _ = run_engine(engine, requests)
    stats = engine.get_stats()
    assert stats.num_chunked_prefill_steps > 0
    assert stats.num_mixed_steps > 0
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_used == 0
    assert stats.generation_tokens_total >= sum(p.max_tokens for _, p in requests.values())

    for request_id, (prompt, params) in requests.items():
        alone, _ = run_engine(make_engine(enable_prefix_caching=False),
                              {request_id: (prompt, params)})
        got = batched[request_id].outputs[0]
        want = alone[request_id].outputs[0]
        assert got.token_ids == want.token_ids, request_id
        assert len(got.token_ids) == params.max_tokens
        assert got.finish_reason == "length"
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-3)


def test_prefix_cache_reuses_blocks_and_keeps_output(make_engine, run_engine):
    rng = np.random.default_rng(1)
    shared = rng.integers(3, 512, 200).tolist()
    first, second = shared + [5, 6, 7], shared + [8, 9]
    engine = make_engine(max_num_batched_tokens=512)
    run_engine(engine, {"a": (ids(first), greedy(4))})
    before = engine.get_stats()
    assert before.prompt_tokens_total == len(first)
    out, _ = run_engine(engine, {"b": (ids(second), greedy(8))})
    after = engine.get_stats()
    computed = after.prompt_tokens_total - before.prompt_tokens_total
    assert after.prefix_cache_hits - before.prefix_cache_hits == 200 // 16
    assert computed == len(second) - (200 // 16) * 16

    alone, _ = run_engine(make_engine(enable_prefix_caching=False), {"b": (ids(second), greedy(8))})
    assert out["b"].outputs[0].token_ids == alone["b"].outputs[0].token_ids


def run_checked(engine, requests: dict, unfork: bool = False) -> dict:
    """Run to the end, checking the block manager's books after every step. unfork=True queues
    a request's n sequences independently, as the engine did before forks: the reference."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
        if unfork:
            first = engine.core.requests[request_id].seqs[0]
            for child in first.forks:
                engine.scheduler.add(child)
            first.forks = []
    return step_to_end(engine)


@pytest.mark.parametrize("caching", [True, False])
def test_n_sequences_fork_from_one_computed_prompt(make_engine, caching):
    engine = make_engine(enable_prefix_caching=caching, block_size=16)
    prompt = ids(range(3, 203))  # 200 tokens: 12 full blocks and a tail of 8
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True,
                            logprobs=1)
    engine.add_request("n", prompt, params)
    engine.step()  # the whole prompt, once, and the first token of all four
    stats = engine.get_stats()
    assert stats.prompt_tokens_total == 200
    assert stats.kv_blocks_used == 12 + 4  # shared full blocks + a tail each
    assert stats.num_running == 4
    engine.block_manager.check_invariants(engine.scheduler.running)
    run_checked(engine, {})
    assert engine.get_stats().prompt_tokens_total == 200
    # Forked or computed four times, the seeded outputs are the same.
    forked = run_checked(make_engine(enable_prefix_caching=caching), {"n": (prompt, params)})
    alone = run_checked(make_engine(enable_prefix_caching=caching), {"n": (prompt, params)},
                        unfork=True)
    for f, a in zip(forked["n"].outputs, alone["n"].outputs, strict=True):
        assert f.index == a.index and f.token_ids == a.token_ids and len(f.token_ids) == 5
        assert f.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-4)
    assert len({tuple(o.token_ids) for o in forked["n"].outputs}) > 1  # distinct seeds


def test_forks_without_room_wait_and_still_match(make_engine):
    """A KV pool of 4 blocks: not every sibling finds room to fork at once; the ones that wait
    recompute later, and the outputs do not change."""
    prompt = ids(range(3, 40))
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    small_engine = make_engine(num_kv_blocks=4, max_model_len=64)
    small = run_checked(small_engine, {"n": (prompt, params)})
    assert small_engine.get_stats().prompt_tokens_total > len(prompt)  # some waited, recomputed
    big = run_checked(make_engine(), {"n": (prompt, params)})
    assert [o.token_ids for o in small["n"].outputs] == [o.token_ids for o in big["n"].outputs]


def test_abort_before_the_fork_frees_every_block(make_engine):
    engine = make_engine(max_num_batched_tokens=16)  # the prompt takes several steps
    engine.add_request("n", ids(range(3, 60)), SamplingParams(n=3, max_tokens=4))
    engine.step()
    engine.abort("n")
    [out] = engine.step()
    assert out.finished and [o.finish_reason for o in out.outputs] == ["abort"] * 3
    assert engine.get_stats().kv_blocks_used == 0 and not engine.has_unfinished_requests()


def test_oversize_prompt_rejected_with_both_numbers(make_engine):
    engine = make_engine(max_model_len=128)
    with pytest.raises(ValueError, match=r"200.*128"):
        engine.add_request("long", ids(range(3, 203)))
    # A max_model_len the KV cache cannot hold is refused at start-up, naming both sizes ...
    with pytest.raises(ValueError, match=r"max_model_len \(256\).*4 blocks x 16 = 64 tokens"):
        make_engine(max_model_len=256, num_kv_blocks=4)
    # ... and when max_model_len was not given, it shrinks to what the cache holds.
    engine = make_engine(num_kv_blocks=4)
    assert engine.max_model_len == 64
    with pytest.raises(ValueError, match=r"100.*64"):
        engine.add_request("big", ids(range(3, 103)), greedy(8))
    assert not engine.has_unfinished_requests()
    engine.add_request("big", ids(range(3, 40)), greedy(8))  # the id was not taken by the failure


def test_max_tokens_none_runs_to_max_model_len(make_engine, run_engine):
    engine = make_engine(max_model_len=64)
    out, _ = run_engine(engine, {"r": (ids(range(3, 53)), greedy(None))})
    o = out["r"].outputs[0]
    assert len(o.token_ids) == 64 - 50
    assert o.finish_reason == "length"


def test_abort_mid_generation_frees_every_block(make_engine):
    engine = make_engine(max_num_batched_tokens=64)
    for i in range(3):
        engine.add_request(f"r{i}", ids(range(3, 60 + i)), greedy(100))
    for _ in range(5):
        engine.step()
    assert engine.get_stats().kv_blocks_used > 0
    engine.abort("r1")
    engine.abort("missing")  # unknown ids are ignored
    outs = {o.request_id: o for o in engine.step()}
    assert outs["r1"].finished and outs["r1"].outputs[0].finish_reason == "abort"
    assert not outs["r0"].finished
    engine.abort("r0")
    engine.abort("r2")
    finals = {o.request_id: o for o in engine.step()}
    assert {"r0", "r2"} <= finals.keys()
    assert all(finals[r].outputs[0].finish_reason == "abort" for r in ("r0", "r2"))
    assert not engine.has_unfinished_requests()
    stats = engine.get_stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    engine.block_manager.check_invariants([])


def test_bad_requests_raise_naming_the_field(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\].*600"):
        engine.add_request("a", ids([5, 600]))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request("a", ids([5, -1]))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", ids([]))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("a", "text, but the model has no tokenizer")
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("a", ids([5]), SamplingParams(logit_bias={9999: 1.0}))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("a", ids([5]), SamplingParams(stop_token_ids=[512]))
    engine.add_request("a", ids([5]))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("a", ids([6]))


def test_streaming_deltas_add_up_to_the_final_output(make_engine, run_engine):
    engine = make_engine(text=True)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True, logprobs=1)
    final, history = run_engine(engine, {"s": ("The capital of France is", params)})
    steps = [o.outputs[0] for o in history["s"]]
    assert "".join(s.delta_text for s in steps) == final["s"].outputs[0].text
    assert sum((s.delta_token_ids for s in steps), []) == final["s"].outputs[0].token_ids
    assert sum((s.delta_logprobs for s in steps), []) == final["s"].outputs[0].logprobs
    assert final["s"].prompt == "The capital of France is"
    tok = engine.tokenizer
    assert final["s"].prompt_token_ids == tok.encode("The capital of France is")
    assert final["s"].outputs[0].text == tok.decode(final["s"].outputs[0].token_ids)
    m = final["s"].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_auto_dtype_follows_the_checkpoint():
    from engine.engine import auto_dtype
    from engine.model.loader import checkpoint_dtype

    golden = Path(__file__).parent / "data" / "golden"
    assert checkpoint_dtype(str(golden / "qwen3")) == "bfloat16"
    assert checkpoint_dtype(str(golden / "llama")) == "float32"
    assert checkpoint_dtype("qwen3-0.6b") == "bfloat16"
    assert checkpoint_dtype(None) == "float32"  # the default GGUF, dequantized
    assert auto_dtype("cuda", "float16") == "float16"
    assert auto_dtype("cuda", "bfloat16") == "bfloat16"
    assert auto_dtype("cuda", "float32") == "bfloat16"
    assert auto_dtype("numpy", "float16") == "float32"


def test_float32_on_cuda_is_refused_by_name():
    from engine.engine import LLMEngine

    with pytest.raises(ValueError, match="float32"):
        LLMEngine(EngineConfig(device="cuda", dtype="float32", model="qwen3-0.6b",
                               load_format="dummy"))


def test_a_max_model_len_the_cache_cannot_hold_fails_before_the_model_is_built(make_engine,
                                                                               monkeypatch):
    """max_model_len 10**8 on the cpu backend (whose pool is capped at 1 GiB): the KV check
    answers at once, before RoPE's tables of that many positions are built (20 s at 10**7);
    left to its default, max_model_len is lowered to what the cache holds, and the tables are
    built at that length."""
    from engine.executor import transformer

    built = []
    real = transformer.rope_cos_sin

    def counted(config, max_positions):
        built.append(max_positions)
        return real(config, max_positions)

    monkeypatch.setattr(transformer, "rope_cos_sin", counted)
    with pytest.raises(ValueError, match="more than the KV cache holds"):
        make_engine(max_model_len=10**8)
    assert built == []
    make_engine(num_kv_blocks=8, block_size=16)  # the tiny model's 1,024 positions, lowered
    assert built == [8 * 16]
