"""Prometheus export. The engine's `on_step` hook hands each stats snapshot to `Telemetry.observe_step`;
`TelemetryCollector` turns the telemetry state into metric families at scrape time; `MetricsServer` serves
`/metrics` on its own registry (no prometheus_client global state) and port.

Every name starts with `moe_runtime_`. Labels are bounded: `layer` (L values), `reason` (finish reasons and
gRPC status names); per-(layer, expert) series only when `telemetry.per_expert_metrics` is on. The collector
emits no `*_created` series.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from moe_runtime.telemetry import Telemetry

log = logging.getLogger(__name__)
P = "moe_runtime_"


class TelemetryCollector(Collector):
    def __init__(self, telemetry: Telemetry, per_expert: bool = False):
        self.telemetry = telemetry
        self.per_expert = per_expert

    def collect(self) -> Iterator[Metric]:
        t = self.telemetry
        snap = t.snapshot()
        stats = t.last_stats
        yield from _engine_families(stats, snap)
        per_layer = [
            (CounterMetricFamily(P + "router_tokens", "Routed (token, expert) pairs per MoE layer since start",
                                 labels=["layer"]), [sum(row) for row in snap.total_tokens_per_expert]),
            (GaugeMetricFamily(P + "expert_imbalance", "max/mean tokens per expert over the window (1 = balanced)",
                               labels=["layer"]), snap.imbalance),
            (GaugeMetricFamily(P + "router_entropy", "Router entropy / log(E) over the window (1 = uniform)",
                               labels=["layer"]), snap.entropy),
        ]
        for family, values in per_layer:
            for layer, v in enumerate(values):
                family.add_metric([str(layer)], v)
            yield family
        if self.per_expert:
            total = CounterMetricFamily(P + "expert_tokens", "Tokens routed to each expert since start",
                                        labels=["layer", "expert"])
            window = GaugeMetricFamily(P + "expert_window_tokens", "Tokens routed to each expert over the window",
                                       labels=["layer", "expert"])
            for layer, (trow, wrow) in enumerate(zip(snap.total_tokens_per_expert, snap.tokens_per_expert,
                                                     strict=True)):
                for e, (tv, wv) in enumerate(zip(trow, wrow, strict=True)):
                    total.add_metric([str(layer), str(e)], tv)
                    window.add_metric([str(layer), str(e)], wv)
            yield total
            yield window
        yield CounterMetricFamily(P + "tokens_computed", "Tokens run through the model since start",
                                  value=t.tokens_computed)
        docs = {"ttft": ("time_to_first_token_seconds", "Arrival to first output token"),
                "tpot": ("time_per_output_token_seconds", "Mean time per output token after the first"),
                "queue_time": ("queue_time_seconds", "Arrival to first scheduled step")}
        for key, (buckets, total_s) in t.histograms().items():
            name, doc = docs[key]
            yield HistogramMetricFamily(P + name, doc, buckets=buckets, sum_value=total_s)
        finished = CounterMetricFamily(P + "requests_finished", "Finished requests by finish reason or gRPC status",
                                       labels=["reason"])
        for reason, n in sorted(t.finished_counts().items()):
            finished.add_metric([reason], n)
        yield finished
        cache = snap.cache  # the engine's `OffloadStats` as it is; zeros without offloading
        yield CounterMetricFamily(P + "expert_cache_hits", "Expert-store lookups served by a resident slot",
                                  value=cache.hits)
        yield CounterMetricFamily(P + "expert_cache_misses", "Expert-store lookups that had to fetch",
                                  value=cache.misses)
        yield CounterMetricFamily(P + "expert_cache_bytes_moved", "Expert weight bytes moved between tiers",
                                  value=cache.bytes_moved)
        yield CounterMetricFamily(P + "expert_prefetch_guessed", "Experts guessed by the look-ahead prefetch",
                                  value=cache.prefetch_guessed)
        yield CounterMetricFamily(P + "expert_prefetch_used", "Prefetch guesses the layer then used",
                                  value=cache.prefetch_used)


def _engine_families(stats: Any, snap: Any) -> Iterator[Metric]:
    def get(name: str) -> float:
        return float(getattr(stats, name, 0) or 0) if stats is not None else 0.0

    gauges = (("requests_running", "Requests in the running batch", "num_running"),
              ("requests_waiting", "Requests waiting to be scheduled (queue length)", "num_waiting"),
              ("kv_blocks_total", "KV cache blocks in all", "kv_blocks_total"),
              ("kv_blocks_used", "KV cache blocks held by requests", "kv_blocks_used"),
              ("kv_blocks_free", "KV cache blocks free", "kv_blocks_free"),
              ("step_latency_seconds", "Wall time of the last engine step", "step_latency_s"))
    for name, doc, attr in gauges:
        yield GaugeMetricFamily(P + name, doc, value=get(attr))
    counters = (("preemptions", "Requests preempted (recomputed) since start", "num_preemptions"),
                ("steps", "Engine steps since start", "steps"),
                ("prompt_tokens", "Prompt tokens computed since start (recompute included)", "num_prompt_tokens"),
                ("generation_tokens", "Tokens sampled since start", "num_generated_tokens"))
    for name, doc, attr in counters:
        yield CounterMetricFamily(P + name, doc, value=get(attr))


class MetricsServer:
    """`/metrics` over HTTP on (host, port); port 0 picks a free port (see `.port`)."""

    def __init__(self, telemetry: Telemetry, per_expert: bool = False):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TelemetryCollector(telemetry, per_expert))
        self._httpd = None
        self.port: int | None = None

    def start(self, host: str, port: int) -> int:
        self._httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._httpd.server_port
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
