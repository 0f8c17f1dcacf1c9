"""Expert-load and latency telemetry: the numbers placement and offloading decisions are made from.

The engine's hot path only fills its plain `Stats` dataclass (router counts `[L, E]` accumulated on the
device, engine gauges). Once per step `server/metrics.py` hands that object to `Telemetry.observe_step`,
which does the one host copy of the counts and keeps:

- a sliding window of routed (token, expert) pairs per layer and expert (`telemetry.window_steps` steps),
  and the totals since start;
- per-layer imbalance (max / mean over experts) and normalized router entropy (H(p) / log E) of the window;
- latency histograms (queue time, time to first token, time per output token) fed once per finished
  request by the server;
- expert-store counters (hits, misses, bytes moved, prefetch accuracy) when the stats carry the store's
  `OffloadStats` as `stats.offload` (offloading on; cumulative counters, copied as they are).

`snapshot()` returns an `ExpertStatsSnapshot` (JSON-able via `to_dict()`; the placement planner reads the
`tokens_per_expert` / `layers` / `experts` keys). With the Ray executor, `set_rank_shares` gives where each
expert's pairs run, and the snapshot adds the rank view: window load per rank and the imbalance across ranks.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from moe_runtime.errors import ConfigError

# Latency buckets in seconds, shared by the Prometheus histograms (bounded, fixed: no per-request labels).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RECENT = 2048  # finished requests kept for the snapshot's percentiles


def imbalance(tokens: list[int]) -> float:
    """max / mean tokens over one layer's experts: 1.0 is perfectly balanced, E is one hot expert.

    >>> imbalance([4, 4, 4, 4]), imbalance([8, 0, 0, 0]), imbalance([0, 0])
    (1.0, 4.0, 0.0)
    """
    total = sum(tokens)
    return 0.0 if total == 0 else max(tokens) * len(tokens) / total


def normalized_entropy(tokens: list[int]) -> float:
    """Entropy of one layer's routing distribution over experts divided by log(E), in [0, 1].

    >>> normalized_entropy([5, 5, 5, 5]), normalized_entropy([9, 0, 0, 0]), normalized_entropy([0, 0])
    (1.0, 0.0, 0.0)
    """
    total = sum(tokens)
    if total == 0 or len(tokens) < 2:
        return 0.0
    h = -sum(c / total * math.log(c / total) for c in tokens if c)
    return min(1.0, max(0.0, h / math.log(len(tokens))))


@dataclass
class LatencyHistogram:
    """Cumulative bucket counts for Prometheus plus the recent values for percentiles (seconds)."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; the last is +Inf
    total: float = 0.0
    count: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=_RECENT))

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.count += 1
        self.recent.append(value)

    def cumulative(self) -> list[tuple[str, int]]:
        """[(upper bound, cumulative count)] including "+Inf", as Prometheus exposes buckets."""
        out, acc = [], 0
        for bound, c in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            acc += c
            out.append((bound, acc))
        return out

    def summary(self) -> LatencySummary:
        values = sorted(self.recent)
        if not values:
            return LatencySummary()
        return LatencySummary(
            count=self.count, p50=_quantile(values, 0.5), p99=_quantile(values, 0.99),
            mean=self.total / self.count,
        )


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass
class LatencySummary:
    count: int = 0
    p50: float = 0.0
    p99: float = 0.0
    mean: float = 0.0


@dataclass
class CacheCounters:
    """Expert-store counters since start (offloading); zero when offloading is off."""

    hits: int = 0  # expert uses served by a resident slot
    misses: int = 0  # expert uses that had to fetch or compute on the host
    bytes_moved: int = 0  # expert weight bytes moved between tiers
    prefetch_guessed: int = 0  # experts the look-ahead guessed
    prefetch_used: int = 0  # guessed experts the layer then used

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.prefetch_guessed if self.prefetch_guessed else 0.0


@dataclass
class ExpertStatsSnapshot:
    """What `GetExpertStats` and `moe-runtime stats --json` return. Lists are `[L][E]` or `[L]`."""

    layers: int
    experts: int
    top_k: int
    steps: int = 0
    window_steps: int = 0
    tokens_per_expert: list[list[int]] = field(default_factory=list)  # [L][E] over the window
    total_tokens_per_expert: list[list[int]] = field(default_factory=list)  # [L][E] since start
    imbalance: list[float] = field(default_factory=list)  # [L] max / mean over the window
    entropy: list[float] = field(default_factory=list)  # [L] normalized router entropy over the window
    mean_imbalance: float = 0.0
    mean_entropy: float = 0.0
    tokens_processed: int = 0  # tokens run through the model since start (= routed pairs / L / top_k)
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    num_preemptions: int = 0
    time_to_first_token: LatencySummary = field(default_factory=LatencySummary)
    time_per_output_token: LatencySummary = field(default_factory=LatencySummary)
    queue_time: LatencySummary = field(default_factory=LatencySummary)
    cache: CacheCounters = field(default_factory=CacheCounters)
    rank_tokens: list[float] = field(default_factory=list)  # [N] pairs each rank computed over the window
    rank_expert_copies: list[int] = field(default_factory=list)  # [N] expert copies each rank holds
    rank_imbalance: float = 0.0  # sum over layers of max rank load / sum of mean rank load; 0 without ranks

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cache"]["hit_rate"] = self.cache.hit_rate
        out["cache"]["prefetch_accuracy"] = self.cache.prefetch_accuracy
        return out


class ExpertLoadWindow:
    """Routed (token, expert) pairs per layer and expert: the last `window` steps, and since start."""

    def __init__(self, num_layers: int, num_experts: int, window: int):
        if window <= 0:
            raise ConfigError(f"telemetry.window_steps={window}: must be > 0")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.steps: deque[list[list[int]]] = deque(maxlen=window)
        self.window = [[0] * num_experts for _ in range(num_layers)]  # [L][E] sum over `steps`
        self.total = [[0] * num_experts for _ in range(num_layers)]  # [L][E] since start

    def add(self, counts: list[list[int]]) -> None:
        """counts: one step's [L][E] routed pairs."""
        if len(counts) != self.num_layers or any(len(row) != self.num_experts for row in counts):
            shape = (len(counts), len(counts[0]) if counts else 0)
            raise ValueError(f"router counts of shape {shape}; expected [{self.num_layers}, {self.num_experts}]")
        if len(self.steps) == self.steps.maxlen:
            _add_into(self.window, self.steps[0], -1)
        self.steps.append(counts)
        _add_into(self.window, counts, 1)
        _add_into(self.total, counts, 1)


def rank_view(window: list[list[int]], shares: list[list[list[float]]]) -> tuple[list[float], float]:
    """Load per rank and imbalance across ranks. window: [L][E] pairs; shares: [L][E][N] fraction of expert
    e's pairs that rank n computes. Returns ([N] pairs summed over layers, sum_l max_n / sum_l mean_n).

    >>> rank_view([[6, 2]], [[[1.0, 0.0], [0.5, 0.5]]])
    ([7.0, 1.0], 1.75)
    """
    num_ranks = len(shares[0][0]) if shares and shares[0] else 0
    totals, busiest, mean = [0.0] * num_ranks, 0.0, 0.0
    for row, layer_shares in zip(window, shares, strict=True):
        load = [sum(c * sh[n] for c, sh in zip(row, layer_shares, strict=True)) for n in range(num_ranks)]
        totals = [t + x for t, x in zip(totals, load, strict=True)]
        busiest += max(load, default=0.0)
        mean += sum(load) / max(num_ranks, 1)
    return totals, (busiest / mean if mean else 0.0)


def _add_into(acc: list[list[int]], counts: list[list[int]], sign: int) -> None:
    for acc_row, row in zip(acc, counts, strict=True):
        for e, c in enumerate(row):
            acc_row[e] += sign * c


_CACHE_FIELDS = ("hits", "misses", "bytes_moved", "prefetch_guessed", "prefetch_used")


def _counts_as_lists(counts: Any) -> list[list[int]]:
    """A torch tensor (on any device: the one host copy per step), numpy array or nested list -> [L][E]."""
    if hasattr(counts, "tolist"):
        counts = counts.tolist()
    return [[int(c) for c in row] for row in counts]


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
        self.last_stats: Any = None  # the engine's latest Stats object (gauges read from it)
        self.cache = CacheCounters()
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
        once per step) and gauges (always the latest)."""
        steps = int(getattr(stats, "steps", 0) or 0)
        new_step = steps > self._last_step  # the engine may hand the same step's stats again
        counts = getattr(stats, "router_counts", None) if new_step else None
        rows = _counts_as_lists(counts) if counts is not None else None
        with self._lock:
            if rows is not None:
                self._load.add(rows)
            if new_step:
                self.tokens_computed += int(getattr(stats, "step_num_tokens", 0) or 0)
                self._last_step = steps
            self.last_stats = stats
            offload = getattr(stats, "offload", None)
            if offload is not None:
                self.cache = CacheCounters(**{f: int(getattr(offload, f, 0)) for f in _CACHE_FIELDS})

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
            snap = ExpertStatsSnapshot(
                layers=self.num_layers, experts=self.num_experts, top_k=self.top_k,
                window_steps=len(self._load.steps),
                tokens_per_expert=window, total_tokens_per_expert=total,
                imbalance=[imbalance(row) for row in window],
                entropy=[normalized_entropy(row) for row in window],
                tokens_processed=sum(total[0]) // self.top_k if total else 0,
                time_to_first_token=self.ttft.summary(), time_per_output_token=self.tpot.summary(),
                queue_time=self.queue_time.summary(), cache=CacheCounters(**asdict(self.cache)),
            )
        if shares is not None:
            snap.rank_tokens, snap.rank_imbalance = rank_view(window, shares)
            snap.rank_expert_copies = [sum(1 for layer in shares for sh in layer if sh[n] > 0)
                                       for n in range(len(snap.rank_tokens))]
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
