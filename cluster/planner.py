"""Placement planner: measured expert load -> a balanced `Placement`. Pure functions over tensors, no Ray, no I/O.

Dimension letters: L layers, E experts, N workers (ranks), S = E + R expert slots per layer (R redundant).

The algorithm per layer, after EPLB (deepseek-ai/EPLB): `replicate_experts` spends the R redundant slots one
at a time on the expert with the highest load per copy; `balanced_packing` places the S copies, heaviest
first, on the least-loaded rank that still has a free slot and no copy of that expert (ranks get S // N or
S // N + 1 slots, so memory stays even); `refine` then swaps copies between the busiest rank and the others
while that lowers the busiest rank's load. A copy's predicted load is its expert's load / copies, since
`Placement.owner_ranks` splits an expert's tokens evenly (by token index) among its copies.

Extra copies do not always help (two workers holding both copies of an expert carry half its load each,
exactly as without the copy, and the extra slot may force a hot expert next to another). So each layer
keeps the first of three candidates with the lowest busiest-rank load: the packing with R copies, the
packing with none, and plain round-robin. A plan is therefore never worse than round-robin, layer by layer.
Ties break by lower expert id, then lower rank: the plan is deterministic.

Stats JSON (`moe-runtime stats --json`, read by `moe-runtime plan-placement --stats`):
    {"layers": L, "experts": E, "tokens_per_expert": [[tokens routed to expert e in layer l, ...] x L]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_runtime.cluster.placement import Placement
from moe_runtime.errors import ConfigError


@dataclass(frozen=True)
class PlanReport:
    """Predicted load balance. Imbalance is sum over layers of the busiest rank's load / of the mean rank
    load: layers run one after another, so a step's MoE time follows the per-layer maxima."""

    imbalance_before: float  # baseline placement (round-robin unless given)
    imbalance_after: float  # the plan
    worst_layer_before: float  # max over layers of max/mean
    worst_layer_after: float


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


def replicate_experts(load: torch.Tensor, num_slots: int, max_copies: int) -> torch.Tensor:
    """Spend `num_slots - E` extra copies, one at a time, on the expert with the highest load per copy.

    load: [E]. Returns int64 copies [E], each in 1..max_copies, summing to num_slots.

    >>> replicate_experts(torch.tensor([6.0, 1.0, 2.0]), num_slots=5, max_copies=3).tolist()
    [3, 1, 1]
    """
    copies = torch.ones_like(load, dtype=torch.int64)
    assert load.numel() <= num_slots <= load.numel() * max_copies
    for _ in range(num_slots - load.numel()):
        per_copy = torch.where(copies < max_copies, load / copies, -1.0)
        copies[torch.argmax(per_copy)] += 1  # argmax takes the first (lowest id) on ties
    return copies


def balanced_packing(load: torch.Tensor, copies: torch.Tensor, workers: int) -> list[list[int]] | None:
    """Place every copy on a rank: heaviest copy first, onto the least-loaded rank with a free slot and no
    copy of that expert. Rank r has S // N slots, plus one when r < S % N.

    load: [E]; copies: int [E]. Returns rank -> held experts, or None when the greedy order gets stuck (the
    only ranks with free slots already hold that expert).
    """
    num_slots = int(copies.sum())
    capacity = [num_slots // workers + (r < num_slots % workers) for r in range(workers)]
    items = [(float(load[e] / copies[e]), e) for e in range(load.numel()) for _ in range(int(copies[e]))]
    items.sort(key=lambda item: (-item[0], item[1]))
    held: list[list[int]] = [[] for _ in range(workers)]
    rank_load = [0.0] * workers
    for weight, e in items:
        free = [r for r in range(workers) if len(held[r]) < capacity[r] and e not in held[r]]
        if not free:
            return None
        r = min(free, key=lambda r: (rank_load[r], r))
        held[r].append(e)
        rank_load[r] += weight
    return held


def refine(held: list[list[int]], per_copy: torch.Tensor, max_rounds: int = 1000) -> list[list[int]]:
    """Swap copies between the busiest rank and another while the pair's larger load drops below the
    busiest rank's load. Keeps every rank's slot count and never puts two copies of an expert on one rank.

    held: rank -> experts (not modified); per_copy: [E] load of one copy. Returns the refined layout.
    """
    held = [list(experts) for experts in held]
    weight = per_copy.tolist()
    for _ in range(max_rounds):
        loads = [sum(weight[e] for e in experts) for experts in held]
        a = max(range(len(held)), key=lambda r: (loads[r], -r))
        best = None  # (new max of the pair, b, i, j)
        for b in range(len(held)):
            for i, x in enumerate(held[a]):
                for j, y in enumerate(held[b]):
                    if b == a or x in held[b] or y in held[a]:
                        continue
                    delta = weight[x] - weight[y]
                    pair_max = max(loads[a] - delta, loads[b] + delta)
                    if pair_max < loads[a] - 1e-9 and (best is None or pair_max < best[0]):
                        best = (pair_max, b, i, j)
        if best is None:
            break
        _, b, i, j = best
        held[a][i], held[b][j] = held[b][j], held[a][i]
    return held


def rank_loads(load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Predicted load per rank: each copy carries its expert's load / copies. load: [L, E]. Returns [L, N]."""
    per_copy = load.double() / placement.replica_counts()  # [L, E]
    out = torch.zeros(placement.num_layers, placement.workers, dtype=torch.float64)
    for layer, experts in enumerate(placement.ranks):
        for e, reps in enumerate(experts):
            out[layer, list(reps)] += per_copy[layer, e]
    return out


def imbalance(load: torch.Tensor, placement: Placement) -> tuple[float, float]:
    """(sum_l max_r / sum_l mean_r, max_l max_r/mean_r) of the predicted rank loads; 1.0 is perfect."""
    loads = rank_loads(load, placement)  # [L, N]
    peak, mean = loads.max(dim=1).values, loads.mean(dim=1)  # [L], [L]
    total = float(peak.sum() / mean.sum()) if float(mean.sum()) > 0 else 1.0
    worst = float(torch.where(mean > 0, peak / mean.clamp_min(1e-30), 1.0).max())
    return total, worst


def round_robin(num_layers: int, num_experts: int, workers: int) -> Placement:
    """One copy per expert, expert e on rank e % N (the `strategy: round_robin` layout)."""
    layer = tuple((e % workers,) for e in range(num_experts))
    return Placement(workers, (layer,) * num_layers)


def plan_placement(
    load: torch.Tensor, workers: int, redundant: int = 0, baseline: Placement | None = None
) -> tuple[Placement, PlanReport]:
    """Plan a placement of E experts per layer on N ranks with R redundant copies per layer.

    load: [L, E] tokens (or any non-negative weight) per expert; workers: N; redundant: R, with
    R <= E * (N - 1) (an expert has at most one copy per rank). baseline: the placement to compare against
    (default round-robin). Returns the plan and its predicted report.

    >>> plan, report = plan_placement(torch.tensor([[8.0, 1.0, 1.0, 2.0]]), workers=2, redundant=2)
    >>> plan.ranks, round(report.imbalance_before, 2), report.imbalance_after
    ((((0, 1), (0,), (1,), (0, 1)),), 1.5, 1.0)
    """
    if load.dim() != 2 or load.numel() == 0 or bool((load < 0).any()) or not bool(load.isfinite().all()):
        raise ConfigError(f"load: expected finite non-negative [L, E], got shape {list(load.shape)}")
    num_layers, num_experts = load.shape
    if workers <= 0:
        raise ConfigError(f"workers={workers}: expected a positive integer")
    if not 0 <= redundant <= num_experts * (workers - 1):
        raise ConfigError(
            f"redundant={redundant}: allowed 0..{num_experts * (workers - 1)} "
            f"(E={num_experts} experts, at most one copy per rank on {workers} workers)"
        )
    load = load.double()
    plain = round_robin(num_layers, num_experts, workers)
    layers = []
    for layer in range(num_layers):
        row = load[layer]  # [E]
        candidates = [  # the first with the lowest busiest-rank load wins: use the R copies unless they hurt
            _pack(row, replicate_experts(row, num_experts + redundant, workers), workers),
            _pack(row, torch.ones(num_experts, dtype=torch.int64), workers),
            plain.ranks[layer],
        ]
        peaks = [float(rank_loads(row[None], Placement(workers, (ranks,))).max()) for ranks in candidates]
        layers.append(candidates[min(range(len(candidates)), key=lambda i: (round(peaks[i], 9), i))])
    plan = Placement(workers, tuple(layers))
    before = imbalance(load, baseline or plain)
    after = imbalance(load, plan)
    return plan, PlanReport(before[0], after[0], before[1], after[1])


def _pack(load: torch.Tensor, copies: torch.Tensor, workers: int) -> tuple[tuple[int, ...], ...]:
    """Greedy packing (or the interleaved fallback), refined. load: [E]; copies: [E]. Returns [E] -> ranks."""
    held = balanced_packing(load, copies, workers) or _interleave(copies, workers)
    held = refine(held, load / copies)
    ranks: list[list[int]] = [[] for _ in range(load.numel())]
    for r, experts in enumerate(held):
        for e in experts:
            ranks[e].append(r)
    return tuple(tuple(sorted(reps)) for reps in ranks)


def _interleave(copies: torch.Tensor, workers: int) -> list[list[int]]:
    """Fallback layout: copies listed expert by expert, copy i on rank i % N (distinct ranks per expert)."""
    held: list[list[int]] = [[] for _ in range(workers)]
    flat = [e for e in range(copies.numel()) for _ in range(int(copies[e]))]
    for i, e in enumerate(flat):
        held[i % workers].append(e)
    return held
