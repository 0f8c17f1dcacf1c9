"""Prometheus export. The engine's `on_step` hook hands each stats snapshot to `Telemetry.observe_step`;
`TelemetryCollector` turns the telemetry state into metric families at scrape time; `MetricsServer` serves
`/metrics` on its own registry (no prometheus_client global state) and port.

Every name starts with `moe_runtime_`. Labels are bounded: `layer` (L values), `reason` (finish reasons and
gRPC status names), `rank` (N workers, Ray executor only), `kind` (prompt, generated: the cost per million
tokens, exported only with `telemetry.cost.usd_per_hour` and while its window holds completed requests); per-(layer, expert) series, and the placement as
one `expert_placement{layer, expert, rank}` series per expert copy, only when `telemetry.per_expert_metrics`
is on. The collector emits no `*_created` series.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from moe_runtime.telemetry import Telemetry

log = logging.getLogger(__name__)
P = "moe_runtime_"


class TelemetryCollector(Collector):
    """`serving`: whether the server accepts generation requests now (its health is SERVING); None leaves
    `moe_runtime_serving` out (a collector over telemetry alone, as the unit tests build)."""

    def __init__(self, telemetry: Telemetry, per_expert: bool = False, serving: Callable[[], bool] | None = None):
        self.telemetry = telemetry
        self.per_expert = per_expert
        self.serving = serving

    def collect(self) -> Iterator[Metric]:
        t = self.telemetry
        snap = t.snapshot()
        stats = t.last_stats
        if self.serving is not None:
            yield GaugeMetricFamily(P + "serving", "1 while the server accepts generation requests (health SERVING); "
                                    "0 while loading, draining, rebuilding after a lost worker, or with a dead engine",
                                    value=1.0 if self.serving() else 0.0)
        yield from _engine_families(stats, snap)
        yield from _cost_families(snap.cost)
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
        if snap.rank_tokens:  # the Ray executor
            yield from _rank_families(t, snap, self.per_expert)


def _rank_families(t: Telemetry, snap: Any, per_expert: bool) -> Iterator[Metric]:
    """Per-rank load, placement, timings and restarts (Ray executor)."""
    last, total, collective = t.rank_times()
    per_rank = (
        (GaugeMetricFamily, "rank_window_tokens", "Routed pairs each rank computed over the window, all layers",
         snap.rank_tokens),
        (GaugeMetricFamily, "rank_expert_copies", "Expert copies each rank holds, all layers",
         snap.rank_expert_copies),
        (GaugeMetricFamily, "rank_expert_bytes", "Expert weight bytes each rank holds", snap.rank_expert_bytes),
        (GaugeMetricFamily, "rank_step_latency_seconds", "Wall time of the last step on each rank", last),
        (CounterMetricFamily, "rank_step_seconds", "Wall time of steps on each rank since start", total),
        (CounterMetricFamily, "rank_collective_seconds",
         "Of the step time, seconds in the MoE all-reduces (waiting for the other ranks + transfer)", collective),
    )
    for kind, name, doc, values in per_rank:
        family = kind(P + name, doc, labels=["rank"])
        for rank, v in enumerate(values):
            family.add_metric([str(rank)], v)
        yield family
    yield GaugeMetricFamily(P + "rank_imbalance", "Sum over layers of the busiest rank's window load / the mean "
                            "rank's (1 = balanced)", value=snap.rank_imbalance)
    yield CounterMetricFamily(P + "worker_restarts", "Worker-group rebuilds after a lost Ray worker",
                              value=snap.worker_restarts)
    if per_expert:
        held = [(layer, e, rank) for rank, layers in enumerate(snap.rank_experts)
                for layer, experts in enumerate(layers) for e in experts]
        copies = Counter((layer, e) for layer, e, _ in held)
        placement = GaugeMetricFamily(P + "expert_placement", "Share of the expert's pairs this rank computes "
                                      "(1/copies), one series per copy", labels=["layer", "expert", "rank"])
        for layer, e, rank in sorted(held):
            placement.add_metric([str(layer), str(e), str(rank)], 1 / copies[layer, e])
        yield placement


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
    # Prefix caching (cache.prefix_caching) and speculative decoding (speculative.method): the engine's own
    # counters since start; zeros when the feature is off. Hit rate = hits / queries, acceptance rate =
    # accepted / proposed: ratios of rates on the dashboard.
    engine_counters = (
        ("prefix_cache_queries", "Prompt tokens of admitted requests looked up in the prefix cache",
         "prefix_cache_queries"),
        ("prefix_cache_hits", "Prompt tokens found in the prefix cache (their KV not computed again)",
         "prefix_cache_hits"),
        ("spec_proposed_tokens", "Speculative decoding: proposed tokens the model verified", "spec_proposed_tokens"),
        ("spec_accepted_tokens", "Speculative decoding: proposed tokens accepted (each saves a decode step)",
         "spec_accepted_tokens"),
        ("spec_verifications", "Speculative decoding: request-steps that verified proposals", "spec_verifications"),
    )
    for name, doc, attr in engine_counters:
        yield CounterMetricFamily(P + name, doc, value=get(attr))


def _cost_families(cost: Any) -> Iterator[Metric]:
    """USD per million tokens over the cost window (telemetry/cost.py): the machine's price over the prompt
    tokens, and over the generated tokens, of the requests completed in it. No series for a kind the window
    has no tokens of (undefined), none at all without a price."""
    if not cost.configured:
        return
    family = GaugeMetricFamily(P + "cost_usd_per_million_tokens", "Machine price (telemetry.cost.usd_per_hour) "
                               "over the tokens of this kind completed in the window: USD per million tokens",
                               labels=["kind"])
    for kind, value in (("prompt", cost.usd_per_million_prompt_tokens),
                        ("generated", cost.usd_per_million_generated_tokens)):
        if value is not None:
            family.add_metric([kind], value)
    yield family
    yield GaugeMetricFamily(P + "cost_usd_per_hour", "The machine's price the cost is computed from "
                            "(telemetry.cost.usd_per_hour)", value=cost.usd_per_hour)


class MetricsServer:
    """`/metrics` over HTTP on (host, port); port 0 picks a free port (see `.port`)."""

    def __init__(self, telemetry: Telemetry, per_expert: bool = False, serving: Callable[[], bool] | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TelemetryCollector(telemetry, per_expert, serving))
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
