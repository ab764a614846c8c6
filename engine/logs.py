"""pagedserve's logs: one format under one logger tree ("pagedserve.*"), the start-up summary and
the stats line logged every 10 s while the engine is busy.

The engine's modules log to "pagedserve.<module>" and never configure anything; the `pagedserve`
command calls configure_logging once, which also routes uvicorn's loggers to the same handler.
"""

from __future__ import annotations

import logging
import sys
import time

FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
DATE_FORMAT = "%m-%d %H:%M:%S"
STATS_INTERVAL_S = 10.0

log = logging.getLogger("pagedserve.stats")


def configure_logging(level: str = "info") -> None:
    """One stderr handler and format for "pagedserve.*" and uvicorn's loggers.

    uvicorn's own start-up lines ("Uvicorn running on ...") are kept below `warning` unless
    level is debug: the server says "serving on URL" itself, once the model is ready.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    numeric = logging.getLevelName(level.upper())
    for name in ("pagedserve", "uvicorn"):  # uvicorn.error and uvicorn.access propagate here
        logger = logging.getLogger(name)
        logger.handlers = [handler]  # replaced, so calling this twice does not print twice
        logger.setLevel(numeric)
    quiet = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(quiet)
    logging.getLogger("uvicorn.access").setLevel(numeric)


# ----------------------------------------------------------------------------- start-up


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes:.0f} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def weights_nbytes(weights) -> int:
    """Bytes of every weight array once (a tied lm_head is the embedding)."""
    arrays = {id(a): a for a in (weights.embed, weights.norm, weights.lm_head)}
    for layer in weights.layers:
        for a in vars(layer).values():
            if a is not None:
                arrays[id(a)] = a
    return sum(int(a.nbytes) for a in arrays.values())


def startup_lines(engine, model_name: str, seconds: float) -> list[str]:
    """What the engine runs, how much memory it holds, and how long it took to be ready."""
    return [model_line(engine.model_config, model_name), *engine_lines(engine),
            f"ready in {seconds:.1f} s"]


def model_line(mc, model_name: str) -> str:
    return (f"model {model_name}: {mc.architecture}, {mc.num_layers} layers, hidden "
            f"{mc.hidden_size}, vocab {mc.vocab_size}")


def engine_lines(engine) -> list[str]:
    """Device, memory and graphs of a loaded engine (or engine core): the engine-core process
    sends these to the API process, which logs them."""
    mc, config, ops = engine.model_config, engine.config, engine.ops
    device = "cpu (numpy)" if ops.name == "numpy" else ops.name
    if ops.name == "numpy":
        device += f", {config.cpu_threads} BLAS thread{'s' * (config.cpu_threads != 1)}"
    bs = config.block_size
    kv_bytes = ops.kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim) * bs
    weights = _size(weights_nbytes(engine.model.weights))
    if config.tensor_parallel_size > 1:  # the weights are rank 0's slice; the KV cache, all ranks'
        device += f", tensor parallel over {config.tensor_parallel_size} ranks"
        weights += " per rank"
    graphs = getattr(engine.runner, "graphs", None)
    if ops.name != "cuda":
        graph_text = "none (cpu)"
    elif graphs is None:
        graph_text = "none (eager)"
    else:
        graph_text = ", ".join(str(s) for s in graphs.sizes)
    return [
        f"device {device}, dtype {ops.dtype}, weights {weights}",
        f"max_model_len {engine.max_model_len}, KV cache {engine.num_kv_blocks} blocks x {bs} "
        f"tokens = {engine.num_kv_blocks * bs} tokens, {_size(engine.num_kv_blocks * kv_bytes)}",
        f"CUDA graph batch sizes: {graph_text}",
    ]


# ----------------------------------------------------------------------------- stats


def stats_line(before, now, seconds: float) -> str:
    """The stats line between two EngineStats snapshots taken `seconds` apart."""
    seconds = max(seconds, 1e-9)
    prompt = (now.prompt_tokens_total - before.prompt_tokens_total) / seconds
    generation = (now.generation_tokens_total - before.generation_tokens_total) / seconds
    queries = now.prefix_cache_queries - before.prefix_cache_queries
    hits = now.prefix_cache_hits - before.prefix_cache_hits
    kv = 100 * now.kv_blocks_used / max(1, now.kv_blocks_total)
    line = (f"prompt {prompt:.1f} tok/s, generation {generation:.1f} tok/s, "
            f"running {now.num_running}, waiting {now.num_waiting}, KV cache {kv:.1f}% used, "
            f"prefix-cache hit rate {100 * hits / max(1, queries):.1f}%")
    drafts = now.spec_num_draft_tokens - before.spec_num_draft_tokens
    if drafts:
        accepted = now.spec_num_accepted_tokens - before.spec_num_accepted_tokens
        steps = now.spec_num_drafts - before.spec_num_drafts
        line += (f", spec acceptance {100 * accepted / drafts:.1f}%, mean accepted length "
                 f"{1 + accepted / steps:.2f}")
    return line


class StatsLogger:
    """Call on_stats(engine.get_stats()) after every step: it logs stats_line once per
    `interval` seconds. An idle engine is not stepped, so it logs only while busy; the window
    restarts when work arrives, so idle time does not dilute the rates."""

    def __init__(self, interval: float = STATS_INTERVAL_S, clock=time.monotonic):
        self.interval, self.clock = interval, clock
        self._start = None  # (stats, time) where the window began
        self._last = None  # the stats of the previous call

    def on_stats(self, stats) -> None:
        t = self.clock()
        last = self._last
        if last is None or (last.num_running == 0 and last.num_waiting == 0):
            self._start = (last or stats, t)
        elif t - self._start[1] >= self.interval:
            log.info(stats_line(self._start[0], stats, t - self._start[1]))
            self._start = (stats, t)
        self._last = stats
