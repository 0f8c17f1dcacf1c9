"""The rank view (Ray executor): where each expert runs, how the window's expert load lands on ranks, and
how long each rank's steps take.

Dimension letters: L layers, E experts, N ranks. `shares[l][e][n]` is the fraction of expert e's pairs in
layer l that rank n computes (1/copies on each rank holding a copy; `Placement.rank_shares()`).

The executor reports a `RankStats` through the telemetry hook after every step and after starting,
restarting or moving experts; `RankTelemetry` keeps what the snapshot and `/metrics` show: the current
placement, per-rank step and all-reduce times over the window and since start, and the worker restarts.
A rank's step time is mostly the same on every rank (the all-reduces line them up); its time outside the
all-reduces (step - collective) is its own work, so the busiest rank is the one with the most of it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RankStats:
    """One report of the Ray executor. Timings are empty in reports that are not about a step."""

    shares: list[list[list[float]]]  # [L][E][N] the current placement (`Placement.rank_shares()`)
    expert_bytes: tuple[int, ...] = ()  # [N] expert weight bytes each rank holds
    step_s: tuple[float, ...] = ()  # [N] wall time of this step on each rank (forward + sampling)
    collective_s: tuple[float, ...] = ()  # [N] of which in the MoE all-reduces (waiting + transfer)
    restarts: int = 0  # worker-group rebuilds since start


class RankTelemetry:
    """The rank state of one server; `Telemetry` holds it under its lock."""

    def __init__(self, window_steps: int):
        self.shares: list[list[list[float]]] | None = None  # [L][E][N]; None: no expert parallelism
        self.expert_bytes: list[int] = []  # [N]
        self.restarts = 0
        self.last_step_s: list[float] = []  # [N] the latest step
        self.total_step_s: list[float] = []  # [N] since start
        self.total_collective_s: list[float] = []  # [N] since start
        self._times: deque[tuple[tuple[float, ...], tuple[float, ...]]] = deque(maxlen=window_steps)

    def observe(self, report: RankStats) -> None:
        self.shares, self.restarts = report.shares, report.restarts
        if report.expert_bytes:
            self.expert_bytes = list(report.expert_bytes)
        if not report.step_s:
            return
        if len(report.step_s) != len(self.total_step_s):  # the first step
            self.total_step_s = [0.0] * len(report.step_s)
            self.total_collective_s = [0.0] * len(report.step_s)
            self._times.clear()
        collective = report.collective_s or (0.0,) * len(report.step_s)
        self.last_step_s = list(report.step_s)
        self.total_step_s = [t + s for t, s in zip(self.total_step_s, report.step_s, strict=True)]
        self.total_collective_s = [t + c for t, c in zip(self.total_collective_s, collective, strict=True)]
        self._times.append((report.step_s, collective))

    def mean_times(self) -> tuple[list[float], list[float]]:
        """([N] mean step seconds, [N] mean all-reduce seconds) over the window's steps."""
        if not self._times:
            return [], []
        n = len(self._times)
        steps = [sum(col) / n for col in zip(*(s for s, _ in self._times), strict=True)]
        collective = [sum(col) / n for col in zip(*(c for _, c in self._times), strict=True)]
        return steps, collective


def rank_view(window: list[list[int]], shares: list[list[list[float]]]) -> tuple[list[float], float]:
    """Load per rank and imbalance across ranks. window: [L][E] pairs; shares: [L][E][N] fraction of expert
    e's pairs that rank n computes. Returns ([N] pairs summed over layers, sum_l max_n / sum_l mean_n).

    >>> rank_view([[6, 2]], [[[1.0, 0.0], [0.5, 0.5]]])
    ([7.0, 1.0], 1.75)
    """
    num_ranks = _num_ranks(shares)
    totals, busiest, mean = [0.0] * num_ranks, 0.0, 0.0
    for row, layer_shares in zip(window, shares, strict=True):
        load = [sum(c * sh[n] for c, sh in zip(row, layer_shares, strict=True)) for n in range(num_ranks)]
        totals = [t + x for t, x in zip(totals, load, strict=True)]
        busiest += max(load, default=0.0)
        mean += sum(load) / max(num_ranks, 1)
    return totals, (busiest / mean if mean else 0.0)


def expert_copies(shares: list[list[list[float]]]) -> list[int]:
    """[N] expert copies each rank holds, over all layers.

    >>> expert_copies([[[1.0, 0.0], [0.5, 0.5]]])
    [2, 1]
    """
    return [sum(1 for layer in shares for sh in layer if sh[n] > 0) for n in range(_num_ranks(shares))]


def rank_experts(shares: list[list[list[float]]]) -> list[list[list[int]]]:
    """[N][L] the expert ids each rank holds in each layer: the placement, rank by rank.

    >>> rank_experts([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [1.0, 0.0]]])
    [[[0, 1], [1]], [[1], [0]]]
    """
    return [[[e for e, sh in enumerate(layer) if sh[n] > 0] for layer in shares] for n in range(_num_ranks(shares))]


def _num_ranks(shares: list[list[list[float]]]) -> int:
    return len(shares[0][0]) if shares and shares[0] else 0
