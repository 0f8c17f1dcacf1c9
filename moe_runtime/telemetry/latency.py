"""Request latencies (queue time, time to first token, time per output token): cumulative Prometheus
buckets plus the recent values the snapshot's percentiles are taken from. All values in seconds."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Shared by the Prometheus histograms (bounded, fixed: no per-request labels).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RECENT = 2048  # finished requests kept for the snapshot's percentiles


@dataclass
class LatencySummary:
    count: int = 0
    p50: float = 0.0
    p99: float = 0.0
    mean: float = 0.0


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
