"""Expert load: routed (token, expert) pairs per layer and expert over a sliding window of steps and since
start, and the two per-layer measures of how evenly the router spreads them (imbalance, normalized entropy).

Dimension letters: L layers, E experts. Counts are plain `[L][E]` lists of ints on the host.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from moe_runtime.errors import ConfigError


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


def counts_as_lists(counts: Any) -> list[list[int]]:
    """A torch tensor (on any device: the one host copy per step), numpy array or nested list -> [L][E].

    >>> counts_as_lists([[1.0, 2.0], [3, 0]])
    [[1, 2], [3, 0]]
    """
    if hasattr(counts, "tolist"):
        counts = counts.tolist()
    return [[int(c) for c in row] for row in counts]


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


def _add_into(acc: list[list[int]], counts: list[list[int]], sign: int) -> None:
    for acc_row, row in zip(acc, counts, strict=True):
        for e, c in enumerate(row):
            acc_row[e] += sign * c
