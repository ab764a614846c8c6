"""Prometheus metrics for one app: engine gauges and counters, request latencies, batch sizes.

Each app owns its CollectorRegistry, so two apps in one process (tests) never share numbers.
Engine-wide numbers come from the engine's own cumulative stats, read at scrape time from the last
EngineStats the engine-core process sent (set by AsyncEngine on the event loop); per-request
numbers are observed when a request ends.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# EngineStats field -> (metric name, help); the counters' exposed names gain a `_total` suffix.
_GAUGES = {
    "num_running": ("pagedserve_num_requests_running", "Sequences in the running batch."),
    "num_waiting": ("pagedserve_num_requests_waiting", "Sequences waiting to be scheduled "
                    "(n > 1: one per request until its prompt is computed; "
                    "--max-waiting-requests counts requests)."),
    "kv_blocks_used": ("pagedserve_kv_blocks_used", "KV-cache blocks held by live sequences."),
    "kv_blocks_total": ("pagedserve_kv_blocks_total", "KV-cache blocks in the pool."),
}
_COUNTERS = {
    "prefix_cache_queries": ("pagedserve_prefix_cache_queries", "Prompt blocks looked up."),
    "prefix_cache_hits": ("pagedserve_prefix_cache_hits", "Prompt blocks found in the cache."),
    "num_preemptions": ("pagedserve_preemptions", "Sequences preempted for lack of blocks."),
    "prompt_tokens_total": ("pagedserve_prompt_tokens",
                            "Prompt tokens computed (prefix-cache hits excluded)."),
    "generation_tokens_total": ("pagedserve_generation_tokens", "Tokens generated."),
    "num_steps": ("pagedserve_engine_steps", "Engine steps (model forward passes)."),
    "spec_num_drafts": ("pagedserve_spec_decode_num_drafts",
                        "Speculative decoding: sequence-steps that verified drafts."),
    "spec_num_draft_tokens": ("pagedserve_spec_decode_num_draft_tokens",
                              "Speculative decoding: draft tokens verified."),
    "spec_num_accepted_tokens": ("pagedserve_spec_decode_num_accepted_tokens",
                                 "Speculative decoding: draft tokens accepted."),
}


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.stats = None  # the core's last EngineStats, set by AsyncEngine on the event loop
        # Data parallel: each core's last EngineStats (None before its first); `stats` sums them.
        self.core_stats: list | None = None
        self.max_running = 0
        r = self.registry
        self.finished = Counter("pagedserve_requests_finished", "Requests ended, by finish reason "
                                "(stop, length, abort, error; n > 1: the first completion's).",
                                ["finish_reason"], registry=r)
        for reason in ("stop", "length", "abort", "error"):
            self.finished.labels(reason)  # exported at 0 from the start, so rates work at once
        self.ttft = Histogram("pagedserve_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pagedserve_time_per_output_token_seconds",
                              "Mean time between output tokens of a request, after the first.",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("pagedserve_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("pagedserve_batch_size", "Requests that advanced in one "
                                    "engine step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                                    registry=r)
        self.constrained_requests = Counter(
            "pagedserve_structured_output_requests", "Requests whose output a grammar constrains "
            "(response_format, structured_outputs, or a forced tool call).", registry=r)
        self.grammar_compile_seconds = Histogram(
            "pagedserve_grammar_compile_seconds", "Time to compile a grammar or JSON schema "
            "(cache misses only).", buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                             0.1, 0.25, 0.5, 1, 2.5), registry=r)
        r.register(_StatsCollector(self))

    def on_step(self, num_outputs: int, stats) -> None:
        self.stats = stats
        self.max_running = max(self.max_running, stats.num_running, num_outputs)
        if num_outputs:
            self.batch_size.observe(num_outputs)

    def on_finished(self, output) -> None:
        """Observe a finished RequestOutput: its reason and its latencies. A request counts
        once whatever its n, as an aborted one does, under its first completion's reason."""
        first = output.outputs[0].finish_reason if output.outputs else None
        self.finished.labels(first or "abort").inc()
        m = output.metrics
        if m is None or m.finished_time is None:
            return
        self.e2e.observe(max(0.0, m.finished_time - m.arrival_time))
        if m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
            num_tokens = max(len(c.token_ids) for c in output.outputs) if output.outputs else 0
            # tokens that all came at once (beam search's, at its end) have no time between
            if num_tokens > 1 and m.finished_time > m.first_token_time:
                self.tpot.observe(max(0.0, m.finished_time - m.first_token_time)
                                  / (num_tokens - 1))

    def on_aborted(self, output) -> None:
        """A request ended by its client (or the shutdown): its reason, and its time to first
        token when it had one (its end-to-end and per-token times were cut short: not
        observed)."""
        self.finished.labels("abort").inc()
        m = output.metrics
        if m is not None and m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))

    def on_ended(self, reason: str, count: int = 1) -> None:
        """A request that ended outside the engine's outputs (client gone, engine fault)."""
        self.finished.labels(reason).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector:
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def describe(self):
        return []  # names are fixed and unique; nothing to check at registration

    def collect(self):
        stats = self.metrics.stats
        if stats is None:
            return
        for field, (name, doc) in _GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=getattr(stats, field, 0))
        yield GaugeMetricFamily("pagedserve_max_num_requests_running",
                                "Most sequences seen running at once since start.",
                                value=self.metrics.max_running)
        for field, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=getattr(stats, field, 0))
        if self.metrics.core_stats is not None:
            yield from _per_core(self.metrics.core_stats)
        drafts, accepted = stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens
        if drafts:
            yield GaugeMetricFamily("pagedserve_spec_decode_acceptance_rate",
                                    "Draft tokens accepted / verified, since start.",
                                    value=accepted / drafts)
            yield GaugeMetricFamily("pagedserve_spec_decode_mean_accepted_length",
                                    "Tokens per verifying sequence-step (accepted drafts + 1), "
                                    "since start.", value=1 + accepted / stats.spec_num_drafts)


def _per_core(core_stats: list):
    """The data-parallel cores' gauges apart, labelled core="i" (the sums are above)."""
    for field, (name, doc) in _GAUGES.items():
        family = GaugeMetricFamily(name.replace("pagedserve_", "pagedserve_core_", 1),
                                   f"{doc} Per data-parallel engine core.", labels=["core"])
        for i, stats in enumerate(core_stats):
            if stats is not None:
                family.add_metric([str(i)], getattr(stats, field))
        yield family
