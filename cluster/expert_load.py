"""Expert load [L, E] and how evenly a placement spreads it over ranks: the planner's input and its measure.

Dimension letters: L layers, E experts, N workers (ranks).

Stats JSON (`moe-runtime stats --json`, read by `moe-runtime plan-placement --stats`):
    {"layers": L, "experts": E, "tokens_per_expert": [[tokens routed to expert e in layer l, ...] x L]}

A copy's predicted load is its expert's load / copies, since `Placement.owner_ranks` splits an expert's
tokens evenly (by token index) among its copies. Imbalance is the busiest rank's load over the mean rank load.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_runtime.cluster.placement import Placement
from moe_runtime.errors import ConfigError


def parse_stats(stats: dict[str, Any], source: str = "stats") -> torch.Tensor:
    """Validate a stats JSON object (format in the module docstring). Returns float64 load [L, E].

    >>> parse_stats({"layers": 1, "experts": 2, "tokens_per_expert": [[3, 1]]}).tolist()
    [[3.0, 1.0]]
    """
    if not isinstance(stats, dict) or not {"layers", "experts", "tokens_per_expert"} <= stats.keys():
        raise ConfigError(f"{source}: expected an object with keys layers, experts, tokens_per_expert")
    num_layers, num_experts, rows = stats["layers"], stats["experts"], stats["tokens_per_expert"]
    for key, value in (("layers", num_layers), ("experts", num_experts)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: {key}={value!r}; expected a positive integer")
    if not isinstance(rows, list) or len(rows) != num_layers:
        raise ConfigError(
            f"{source}: tokens_per_expert must be a list of {num_layers} rows (layers), got {rows!r:.60}"
        )
    for layer, row in enumerate(rows):
        ok = isinstance(row, list) and len(row) == num_experts
        if not ok or any(isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0 for v in row):
            raise ConfigError(
                f"{source}: tokens_per_expert[{layer}]={row!r:.80}; expected {num_experts} non-negative numbers"
            )
    return torch.tensor(rows, dtype=torch.float64).reshape(num_layers, num_experts)


def mask_loads(load: torch.Tensor, holds: torch.Tensor) -> torch.Tensor:
    """Predicted load per rank of one or more layouts given as masks (`Placement.mask()`).

    load: [L, E]; holds: bool [..., L, E, N], at least one rank per expert. Returns float64 [..., L, N].

    >>> mask_loads(torch.tensor([[6.0, 2.0]]), torch.tensor([[[True, True], [False, True]]])).tolist()
    [[3.0, 5.0]]
    """
    copies = holds.sum(dim=-1, keepdim=True)  # [..., L, E, 1]
    return (load.double()[..., None] * holds / copies).sum(dim=-2)  # [..., L, N]


def rank_loads(load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Predicted load per rank: each copy carries its expert's load / copies. load: [L, E]. Returns [L, N]."""
    return mask_loads(load, placement.mask())


def imbalance(load: torch.Tensor, placement: Placement) -> tuple[float, float]:
    """(sum_l max_r / sum_l mean_r, max_l max_r/mean_r) of the predicted rank loads; 1.0 is perfect."""
    loads = rank_loads(load, placement)  # [L, N]
    peak, mean = loads.max(dim=1).values, loads.mean(dim=1)  # [L], [L]
    total = float(peak.sum() / mean.sum()) if float(mean.sum()) > 0 else 1.0
    worst = float(torch.where(mean > 0, peak / mean.clamp_min(1e-30), 1.0).max())
    return total, worst
