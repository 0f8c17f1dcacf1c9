"""`Telemetry`: the one owner of a server's telemetry state, fed once per engine step and once per
finished request, read by the Prometheus collector and `GetExpertStats` through `snapshot()`."""

from __future__ import annotations

import threading
from typing import Any

from moe_runtime.offload.stats import OffloadStats
from moe_runtime.telemetry.latency import LatencyHistogram
from moe_runtime.telemetry.load import ExpertLoadWindow, counts_as_lists, imbalance, normalized_entropy
from moe_runtime.telemetry.ranks import expert_copies, rank_view
from moe_runtime.telemetry.snapshot import ExpertStatsSnapshot


class Telemetry:
    """Owns the telemetry state of one server. Thread-safe: the Prometheus scrape thread reads it."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, window_steps: int = 256):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self._lock = threading.Lock()
        self._load = ExpertLoadWindow(num_layers, num_experts, window_steps)
        self.ttft = LatencyHistogram()
        self.tpot = LatencyHistogram()
        self.queue_time = LatencyHistogram()
        self.finished: dict[str, int] = {}  # finish reason or error status -> requests (bounded keys)
        self.last_stats: Any = None  # the engine's latest Stats object (gauges and `offload` read from it)
        self._last_step = 0  # `steps` of the last stats observed
        self.tokens_computed = 0  # sum of the observed steps' step_num_tokens (tokens run through the model)
        self._rank_shares: list[list[list[float]]] | None = None  # [L][E][N]; None: no expert parallelism

    def set_rank_shares(self, shares: list[list[list[float]]] | None) -> None:
        """Where each expert's pairs run: shares[l][e][n] is the fraction rank n computes (1/copies on each
        rank holding a copy; `Placement.rank_shares()`). None: a local executor (no rank view)."""
        with self._lock:
            self._rank_shares = shares

    # -- feeding ------------------------------------------------------------------------------------------
    def observe_step(self, stats: Any) -> None:
        """Take one engine `Stats` (from `engine.make_stats()`): router counts [L, E] of its step (counted
        once per step) and gauges and expert-store counters (always the latest)."""
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
                        total_s: float | None = None, num_output_tokens: int = 0) -> None:
        """One finished request: status is its finish reason ("stop", "length", ...) or an error code name."""
        with self._lock:
            self.finished[status] = self.finished.get(status, 0) + 1
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
            shares = self._rank_shares
            # The engine's `OffloadStats` as it is: already a per-step copy (`ExpertStore.stats`).
            offload = getattr(stats, "offload", None)
            snap = ExpertStatsSnapshot(
                layers=self.num_layers, experts=self.num_experts, top_k=self.top_k,
                window_steps=len(self._load.steps),
                tokens_per_expert=window, total_tokens_per_expert=total,
                imbalance=[imbalance(row) for row in window],
                entropy=[normalized_entropy(row) for row in window],
                tokens_processed=sum(total[0]) // self.top_k if total else 0,
                time_to_first_token=self.ttft.summary(), time_per_output_token=self.tpot.summary(),
                queue_time=self.queue_time.summary(), cache=offload if offload is not None else OffloadStats(),
            )
        if shares is not None:
            snap.rank_tokens, snap.rank_imbalance = rank_view(window, shares)
            snap.rank_expert_copies = expert_copies(shares)
        if snap.layers:
            snap.mean_imbalance = sum(snap.imbalance) / snap.layers
            snap.mean_entropy = sum(snap.entropy) / snap.layers
        if stats is not None:
            snap.steps = int(getattr(stats, "steps", 0))
            snap.num_running = int(getattr(stats, "num_running", 0))
            snap.num_waiting = int(getattr(stats, "num_waiting", 0))
            snap.kv_blocks_total = int(getattr(stats, "kv_blocks_total", 0))
            snap.kv_blocks_used = int(getattr(stats, "kv_blocks_used", 0))
            snap.num_preemptions = int(getattr(stats, "num_preemptions", 0))
        return snap

    def histograms(self) -> dict[str, tuple[list[tuple[str, int]], float]]:
        """name -> (cumulative buckets, sum) for the Prometheus exporter."""
        with self._lock:
            return {name: (h.cumulative(), h.total) for name, h in
                    (("ttft", self.ttft), ("tpot", self.tpot), ("queue_time", self.queue_time))}

    def finished_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.finished)
