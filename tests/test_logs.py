"""The start-up summary, the periodic stats line, and the BLAS thread count the engine sets."""

import logging

import pytest

from engine.engine import EngineStats
from engine.logs import StatsLogger, startup_lines, stats_line, weights_nbytes


def _stats(**fields) -> EngineStats:
    base = dict(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=200,
                prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
                prompt_tokens_total=0, generation_tokens_total=0, num_steps=0,
                num_chunked_prefill_steps=0, num_mixed_steps=0)
    return EngineStats(**{**base, **fields})


def test_stats_line_is_rates_over_the_window():
    before = _stats(prompt_tokens_total=100, generation_tokens_total=40,
                    prefix_cache_queries=10, prefix_cache_hits=2)
    now = _stats(prompt_tokens_total=600, generation_tokens_total=240, num_running=3,
                 num_waiting=2, kv_blocks_used=50, prefix_cache_queries=20, prefix_cache_hits=8)
    assert stats_line(before, now, 10.0) == (
        "prompt 50.0 tok/s, generation 20.0 tok/s, running 3, waiting 2, KV cache 25.0% used, "
        "prefix-cache hit rate 60.0%")
    spec = _stats(spec_num_drafts=4, spec_num_draft_tokens=16, spec_num_accepted_tokens=8)
    assert stats_line(before, spec, 1.0).endswith(
        ", spec acceptance 50.0%, mean accepted length 3.00")


def test_stats_logger_logs_every_interval_while_busy(caplog):
    clock = [0.0]
    logger = StatsLogger(interval=10.0, clock=lambda: clock[0])
    caplog.set_level(logging.INFO, "pagedserve.stats")

    def step(t, **fields):
        clock[0] = t
        logger.on_stats(_stats(**fields))

    step(0)  # the engine is ready, idle
    step(500, num_running=1, generation_tokens_total=1)  # work arrives after a long idle time
    step(505, num_running=1, generation_tokens_total=50)
    assert not caplog.records
    step(510, num_running=1, generation_tokens_total=101)
    assert [r.getMessage().split(",")[1] for r in caplog.records] == [" generation 10.1 tok/s"]
    step(515, generation_tokens_total=150)  # finished, idle: nothing more until work comes
    step(900, num_running=1, generation_tokens_total=151)
    assert len(caplog.records) == 1


def test_startup_lines_name_what_runs(make_engine):
    engine = make_engine(max_model_len=128, num_kv_blocks=32, block_size=16)
    lines = startup_lines(engine, "tiny", 1.25)
    text = "\n".join(lines)
    assert lines[0].startswith("model tiny: LlamaForCausalLM, 2 layers, hidden 64, vocab 512")
    assert "device cpu (numpy), 1 BLAS thread, dtype float32" in text
    # 32 blocks x 16 tokens x 2 (k, v) x 2 layers x 2 kv heads x 16 dims x 4 bytes = 256 KiB
    assert "max_model_len 128, KV cache 32 blocks x 16 tokens = 512 tokens, 256.0 KiB" in text
    assert "CUDA graph batch sizes: none (cpu)" in text and lines[-1] == "ready in 1.2 s"
    w = engine.model.weights
    untied = sum(a.nbytes for a in (w.embed, w.lm_head, w.norm))
    assert weights_nbytes(w) == untied + sum(
        a.nbytes for layer in w.layers for a in vars(layer).values() if a is not None)


def test_engine_sets_its_blas_threads(make_engine):
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return {m["num_threads"] for m in threadpoolctl.threadpool_info()
                if m["user_api"] == "blas"}

    try:
        make_engine(cpu_threads=2)
        assert blas_threads() == {2}
    finally:
        make_engine()  # the default, 1: the rest of the suite runs as before
    assert blas_threads() == {1}
    with pytest.raises(ValueError, match="cpu_threads must be >= 1"):
        make_engine(cpu_threads=0)
