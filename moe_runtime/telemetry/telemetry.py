"""`Telemetry`: the one owner of a server's telemetry state, fed once per engine step and once per
finished request, read by the Prometheus collector and `GetExpertStats` through `snapshot()`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from moe_runtime.offload.stats import OffloadStats
from moe_runtime.telemetry.cost import CostWindow
from moe_runtime.telemetry.latency import LatencyHistogram
from moe_runtime.telemetry.load import ExpertLoadWindow, counts_as_lists, imbalance, normalized_entropy
from moe_runtime.telemetry.ranks import RankStats, RankTelemetry, expert_copies, rank_experts, rank_view
from moe_runtime.telemetry.snapshot import (
    CostSummary,
    ExpertStatsSnapshot,
    PrefixCacheSummary,
    SpeculativeSummary,
)

# Finish reasons of a request that completed: the requests whose tokens the cost is spread over (an aborted
# or failed request's machine time is paid for by the ones that completed, as in a benchmark's report).
COMPLETED = ("stop", "length", "eos")


class Telemetry:
    """Owns the telemetry state of one server. Thread-safe: the Prometheus scrape thread reads it."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, window_steps: int = 256,
                 usd_per_hour: float | None = None, cost_window_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self._lock = threading.Lock()
        self._clock = clock
        # `telemetry.cost`: the machine's price over the completed requests' tokens (telemetry/cost.py)
        self._cost = None if usd_per_hour is None else CostWindow(usd_per_hour, cost_window_s, clock())
        self._load = ExpertLoadWindow(num_layers, num_experts, window_steps)
        self.ttft = LatencyHistogram()
        self.tpot = LatencyHistogram()
        self.queue_time = LatencyHistogram()
        self.finished: dict[str, int] = {}  # finish reason or error status -> requests (bounded keys)
        self.last_stats: Any = None  # the engine's latest Stats object (gauges and `offload` read from it)
        self._last_step = 0  # `steps` of the last stats observed
        self.tokens_computed = 0  # sum of the observed steps' step_num_tokens (tokens run through the model)
        self._ranks = RankTelemetry(window_steps)  # the Ray executor's ranks; empty with the local one

    def set_rank_shares(self, shares: list[list[list[float]]] | None) -> None:
        """Where each expert's pairs run: shares[l][e][n] is the fraction rank n computes (1/copies on each
        rank holding a copy; `Placement.rank_shares()`). None: a local executor (no rank view). The Ray
        executor's `RankStats` carry the same after every change; this is for callers that move experts."""
        with self._lock:
            self._ranks.shares = shares

    # -- feeding ------------------------------------------------------------------------------------------
    def observe_step(self, stats: Any) -> None:
        """Take one engine `Stats` (from `engine.make_stats()`): router counts [L, E] of its step (counted
        once per step) and gauges and expert-store counters (always the latest). The Ray executor hands its
        `RankStats` to the same hook (the one the server gives the engine): placement, timings, restarts."""
        if isinstance(stats, RankStats):
            with self._lock:
                self._ranks.observe(stats)
            return
        steps = int(getattr(stats, "steps", 0) or 0)
        new_step = steps > self._last_step  # the engine may hand the same step's stats again
        counts = getattr(stats, "router_counts", None) if new_step else None
        rows = counts_as_lists(counts) if counts is not None else None
        with self._lock:
            if rows is not None:
                self._load.add(rows)
            if new_step:
                self.tokens_computed += int(getattr(stats, "step_num_tokens", 0) or 0)
                self._last_step = steps
            self.last_stats = stats

    def observe_request(self, status: str, queue_s: float | None = None, ttft_s: float | None = None,
                        total_s: float | None = None, num_output_tokens: int = 0, num_prompt_tokens: int = 0) -> None:
        """One finished request: status is its finish reason ("stop", "length", ...) or an error code name;
        the token counts are its usage (a completed request's go into the cost window)."""
        with self._lock:
            self.finished[status] = self.finished.get(status, 0) + 1
            if self._cost is not None and status in COMPLETED:
                self._cost.add(num_prompt_tokens, num_output_tokens, self._clock())
            if queue_s is not None:
                self.queue_time.observe(max(0.0, queue_s))
            if ttft_s is not None:
                self.ttft.observe(max(0.0, ttft_s))
                if total_s is not None and num_output_tokens > 1:
                    self.tpot.observe(max(0.0, (total_s - ttft_s) / (num_output_tokens - 1)))

    # -- reading ------------------------------------------------------------------------------------------
    def snapshot(self) -> ExpertStatsSnapshot:
        with self._lock:
            window = [list(row) for row in self._load.window]
            total = [list(row) for row in self._load.total]
            stats = self.last_stats
            ranks = self._ranks
            shares = ranks.shares
            rank_step_s, rank_collective_s = ranks.mean_times()
            rank_expert_bytes, restarts = list(ranks.expert_bytes), ranks.restarts
            # The engine's `OffloadStats` as it is: already a per-step copy (`ExpertStore.stats`).
            offload = getattr(stats, "offload", None)
            snap = ExpertStatsSnapshot(
                layers=self.num_layers, experts=self.num_experts, top_k=self.top_k,
                window_steps=len(self._load.steps),
                tokens_per_expert=window, total_tokens_per_expert=total,
                imbalance=[imbalance(row) for row in window],
                entropy=[normalized_entropy(row) for row in window],
                tokens_processed=max(map(sum, total)) // self.top_k if total else 0,  # dense layers route none
                time_to_first_token=self.ttft.summary(), time_per_output_token=self.tpot.summary(),
                queue_time=self.queue_time.summary(), cache=offload if offload is not None else OffloadStats(),
            )
        if shares is not None:
            snap.rank_tokens, snap.rank_imbalance = rank_view(window, shares)
            snap.rank_expert_copies = expert_copies(shares)
            snap.rank_experts = rank_experts(shares)
            snap.rank_step_s, snap.rank_collective_s = rank_step_s, rank_collective_s
            snap.rank_expert_bytes, snap.worker_restarts = rank_expert_bytes, restarts
        routed = [l for l, row in enumerate(window) if any(row)]  # not dense layers (Qwen-MoE), nor idle ones
        if routed:
            snap.mean_imbalance = sum(snap.imbalance[l] for l in routed) / len(routed)
            snap.mean_entropy = sum(snap.entropy[l] for l in routed) / len(routed)
        snap.cost = self.cost_summary()
        if stats is not None:
            snap.prefix_cache = _prefix_cache(stats)
            snap.speculative = _speculative(stats)
            snap.steps = int(getattr(stats, "steps", 0))
            snap.num_running = int(getattr(stats, "num_running", 0))
            snap.num_waiting = int(getattr(stats, "num_waiting", 0))
            snap.kv_blocks_total = int(getattr(stats, "kv_blocks_total", 0))
            snap.kv_blocks_used = int(getattr(stats, "kv_blocks_used", 0))
            snap.num_preemptions = int(getattr(stats, "num_preemptions", 0))
        return snap

    def cost_summary(self) -> CostSummary:
        """The cost per million tokens over the window now; `configured` False without a price."""
        with self._lock:
            if self._cost is None:
                return CostSummary()
            now = self._clock()
            prompt, generated = self._cost.tokens(now)
            per_million = self._cost.usd_per_million(now)
            return CostSummary(configured=True, usd_per_hour=self._cost.usd_per_hour, window_s=self._cost.span_s(now),
                               prompt_tokens=prompt, generated_tokens=generated,
                               usd_per_million_prompt_tokens=per_million["prompt"],
                               usd_per_million_generated_tokens=per_million["generated"])

    def histograms(self) -> dict[str, tuple[list[tuple[str, int]], float]]:
        """name -> (cumulative buckets, sum) for the Prometheus exporter."""
        with self._lock:
            return {name: (h.cumulative(), h.total) for name, h in
                    (("ttft", self.ttft), ("tpot", self.tpot), ("queue_time", self.queue_time))}

    def finished_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.finished)

    def rank_times(self) -> tuple[list[float], list[float], list[float]]:
        """[N] seconds per rank: the last step, all steps since start, all-reduces since start (Prometheus)."""
        with self._lock:
            r = self._ranks
            return list(r.last_step_s), list(r.total_step_s), list(r.total_collective_s)


def _prefix_cache(stats: Any) -> PrefixCacheSummary:
    queries = int(getattr(stats, "prefix_cache_queries", 0) or 0)
    hits = int(getattr(stats, "prefix_cache_hits", 0) or 0)
    return PrefixCacheSummary(queries=queries, hits=hits, hit_rate=hits / queries if queries else 0.0)


def _speculative(stats: Any) -> SpeculativeSummary:
    proposed = int(getattr(stats, "spec_proposed_tokens", 0) or 0)
    accepted = int(getattr(stats, "spec_accepted_tokens", 0) or 0)
    verifications = int(getattr(stats, "spec_verifications", 0) or 0)
    return SpeculativeSummary(proposed_tokens=proposed, accepted_tokens=accepted, verifications=verifications,
                              acceptance_rate=accepted / proposed if proposed else 0.0,
                              tokens_per_verification=1 + accepted / verifications if verifications else 0.0)
