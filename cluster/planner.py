"""Placement planner: measured expert load [L, E] -> a balanced `Placement`. Pure functions over tensors.

Dimension letters: L layers, E experts, N workers (ranks), M nodes, G = N / M ranks per node, R redundant
copies per layer; the packing steps work on X independent rows (X = L, or L * M) of n items into P packs.

The algorithm, after EPLB (deepseek-ai/EPLB), batched over all layers at once:
  1. `balanced_packing` packs each layer's experts onto the M nodes, E / M per node, heaviest first onto the
     least-loaded node; nodes are then renumbered heaviest first (the first R % M get one more copy);
  2. `replicate_experts` spends each node's share of the R copies, one at a time, on the node's expert with
     the highest load per copy (at most G copies: one per rank of the node);
  3. `balanced_packing` places each node's copies on its G ranks, heaviest first, onto the least-loaded rank
     with a free slot and no copy of that expert (ranks get S // G or S // G + 1 of the node's S slots, so
     memory stays even); where that greedy order gets stuck, the copies are dealt out in turn instead;
  4. `refine` swaps copies between the busiest rank and another while that lowers the busiest rank's load.
With M = 1 (the default) step 1 is trivial and this is the flat planner. A copy's predicted load is its
expert's load / copies, since `Placement.owner_ranks` splits an expert's tokens evenly among its copies.
Ties break by lower expert id, then lower rank (and node): the plan is deterministic.

Extra copies do not always help (two workers holding both copies of an expert carry half its load each,
exactly as without the copy, and the extra slot may force a hot expert next to another). So each layer
keeps the first of three candidates with the lowest busiest-rank load: the plan with R copies, the plan
with none, and plain round-robin. A plan is therefore never worse than round-robin, layer by layer.

Nodes (M > 1): ranks n * G .. n * G + G - 1 form node n, as Ray's PACK strategy fills nodes. Invariant: all
copies of an expert lie on one node (every candidate keeps it; round-robin has one copy per expert), so
replication never spreads an expert's pairs, or its weights, over nodes; and node load, which is what
crosses the slower inter-node links, is balanced before rank load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_runtime.cluster.expert_load import imbalance, mask_loads
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


def replicate_experts(load: torch.Tensor, num_slots: int | torch.Tensor, max_copies: int) -> torch.Tensor:
    """Spend each row's `num_slots - n` extra copies, one at a time, on the item with the highest load per
    copy (ties: lower index), never above `max_copies` copies.

    load: [X, n]; num_slots: int or int [X], n <= num_slots <= n * max_copies. Returns int64 copies [X, n].

    >>> replicate_experts(torch.tensor([[6.0, 1, 2], [1.0, 1, 1]]), num_slots=5, max_copies=3).tolist()
    [[3, 1, 1], [2, 2, 1]]
    """
    rows, n = load.shape
    copies = torch.ones(rows, n, dtype=torch.int64)
    extra = torch.as_tensor(num_slots).expand(rows) - n  # [X]
    assert bool((extra >= 0).all() and (extra <= n * (max_copies - 1)).all())
    for step in range(int(extra.max()) if rows else 0):
        per_copy = torch.where(copies < max_copies, load / copies, -1.0)  # [X, n]
        copies[torch.arange(rows), per_copy.argmax(dim=-1)] += (step < extra).long()  # argmax: first on ties
    return copies


def balanced_packing(
    weight: torch.Tensor, capacity: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack each row's items, heaviest first (ties: lower item index), onto the least-loaded pack (ties:
    lower pack) with a free slot and no item of the same label.

    weight: [X, n]; capacity: int [X, P] slots per pack; labels: int [X, n], -1 for padding that is not
    packed (default: each item its own label). Returns held: int64 [X, P, C] labels in fill order, -1 in free
    slots (C = max capacity), and ok: bool [X], False where a row got stuck (only packs already holding
    the label had free slots; that row's held is then incomplete).

    >>> held, ok = balanced_packing(torch.tensor([[9.0, 5, 4, 3, 3, 1]]), torch.tensor([[3, 3]]))
    >>> held.tolist(), ok.tolist()
    ([[[0, 3, 5], [1, 2, 4]]], [True])
    """
    rows, n = weight.shape
    labels = torch.arange(n).expand(rows, n) if labels is None else labels
    keyed = torch.where(labels >= 0, weight.double(), -torch.inf)  # padding sorts last
    order = keyed.sort(dim=-1, descending=True, stable=True).indices  # [X, n]; stable: lower index on ties
    num_packs, depth = capacity.shape[1], int(capacity.max())
    held = torch.full((rows, num_packs, depth), -1, dtype=torch.int64)
    count = torch.zeros(rows, num_packs, dtype=torch.int64)
    load = torch.zeros(rows, num_packs, dtype=torch.float64)
    has = torch.zeros(rows, num_packs, max(int(labels.max()) + 1, 1), dtype=torch.bool)  # [X, P, labels]
    ok, r = torch.ones(rows, dtype=torch.bool), torch.arange(rows)
    for k in range(n):  # the k-th heaviest item of every row at once
        item = order[:, k]
        label, w = labels[r, item], weight[r, item].double()  # [X], [X]
        free = (count < capacity) & ~has[r, :, label.clamp_min(0)]  # [X, P]
        place = (label >= 0) & free.any(dim=-1)
        ok &= place | (label < 0)
        pack = torch.where(free, load, torch.inf).argmin(dim=-1)  # [X]; argmin: first on ties
        x, p, lab = r[place], pack[place], label[place]
        held[x, p, count[x, p]] = lab
        load[x, p] += w[place]
        has[x, p, lab] = True
        count[x, p] += 1
    return held, ok


def refine(held: torch.Tensor, per_copy: torch.Tensor, max_rounds: int = 1000) -> torch.Tensor:
    """Per row, swap two items between the busiest pack a and another pack b while the pair's larger load
    drops below a's load: the best swap (lowest pair maximum, first in (b, item of a, item of b) order) each
    round. Keeps every pack's item count and never puts two items of one label in one pack.

    held: int [X, P, C] labels, -1 free (not modified); per_copy: [X, n] weight of one item of each label.
    Returns the refined held [X, P, C].

    >>> refine(torch.tensor([[[0, 1], [2, 3]]]), torch.tensor([[4.0, 3, 2, 1]])).tolist()
    [[[2, 1], [0, 3]]]
    """
    held = held.clone()
    rows, packs, depth = held.shape
    r, pack_ids = torch.arange(rows), torch.arange(packs)
    table = torch.cat([per_copy.new_zeros(rows, 1), per_copy.double()], dim=-1)  # [X, 1 + n]; 0: free slot
    for _ in range(max_rounds):
        w = table.gather(-1, (held + 1).flatten(1)).view(rows, packs, depth)  # [X, P, C]
        loads = w.sum(dim=-1)  # [X, P]
        a = loads.argmax(dim=-1)  # [X] busiest pack; argmax: lower pack on ties
        has = torch.zeros(rows, packs, table.shape[1], dtype=torch.bool).scatter_(-1, held + 1, True)
        ha, wa, la = held[r, a], w[r, a], loads[r, a]  # [X, C], [X, C], [X]
        x_in_b = has.gather(-1, (ha + 1)[:, None, :].expand(rows, packs, depth))  # [X, P(b), C(i)]
        y_in_a = has[r, a].gather(-1, (held + 1).flatten(1)).view(rows, packs, depth)  # [X, P(b), C(j)]
        delta = wa[:, None, :, None] - w[:, :, None, :]  # [X, P(b), C(i), C(j)]: load a gives b
        pair_max = torch.maximum(la[:, None, None, None] - delta, loads[:, :, None, None] + delta)
        valid = ((ha >= 0)[:, None, :, None] & (held >= 0)[:, :, None, :] & ~x_in_b[..., None]
                 & ~y_in_a[:, :, None, :] & (pack_ids != a[:, None])[..., None, None]
                 & (pair_max < la[:, None, None, None] - 1e-9))
        swap = valid.flatten(1).any(dim=-1)  # [X]
        if not bool(swap.any()):
            break
        best = torch.where(valid, pair_max, torch.inf).flatten(1).argmin(dim=-1)  # [X]: first on ties
        x, b, i, j = r[swap], best[swap] // depth**2, best[swap] // depth % depth, best[swap] % depth
        held[x, a[x], i], held[x, b, j] = held[x, b, j], held[x, a[x], i]
    return held


def rebalance_hierarchical(
    load: torch.Tensor, redundant: int, num_groups: int, num_nodes: int, workers: int
) -> torch.Tensor:
    """Steps 1-4 of the module docstring for all layers: groups of E / num_groups consecutive experts go to
    nodes whole (num_groups / M per node), then each node's experts are replicated and packed on its ranks.

    load: float64 [L, E]; redundant: R extra copies per layer, at most E * (G - 1); num_groups divides E and
    is a multiple of M = num_nodes, which divides N = workers. Returns bool [L, E, N]: rank n holds (l, e).
    Every group's experts, with all their copies, end up on one node, E / M experts per node.

    >>> holds = rebalance_hierarchical(torch.tensor([[6.0, 1, 1, 2]]), 2, 4, 2, 4)  # nodes {0, 1}, {2, 3}
    >>> holds.nonzero()[:, 1:].tolist()  # (expert, rank): expert 0 twice on node 0, expert 3 twice on node 1
    [[0, 0], [0, 1], [1, 2], [2, 0], [3, 2], [3, 3]]
    """
    layers, num_experts = load.shape
    assert num_experts % num_groups == 0 and num_groups % num_nodes == 0 and workers % num_nodes == 0
    per_rank_node, per_node = workers // num_nodes, num_experts // num_nodes  # G, E / M
    group_size = num_experts // num_groups
    # 1. groups -> nodes, heaviest node first
    group_load = load.unflatten(-1, (num_groups, group_size)).sum(dim=-1)  # [L, groups]
    groups, _ = balanced_packing(group_load, torch.full((layers, num_nodes), num_groups // num_nodes))
    node_load = group_load.gather(-1, groups.flatten(1)).view(layers, num_nodes, -1).sum(dim=-1)  # [L, M]
    order = node_load.sort(dim=-1, descending=True, stable=True).indices  # [L, M]
    groups = groups.gather(1, order[..., None].expand_as(groups))  # [L, M, groups per node]
    experts = (groups[..., None] * group_size + torch.arange(group_size)).flatten(2).sort(dim=-1).values
    # 2. replicate within each node: row l * M + m is node m of layer l
    local = load.gather(-1, experts.flatten(1)).view(layers * num_nodes, per_node)  # [L*M, E/M]
    extra = (redundant // num_nodes + (torch.arange(num_nodes) < redundant % num_nodes)).repeat(layers)
    copies = replicate_experts(local, per_node + extra, per_rank_node)  # [L*M, E/M]
    # 3-4. pack each node's copies on its G ranks, then refine
    held = _pack_copies(local, copies, per_rank_node)  # [L*M, G, C] node-local expert index
    mask = torch.zeros(*held.shape[:2], per_node + 1, dtype=torch.bool).scatter_(-1, held + 1, True)[..., 1:]
    mask = mask.reshape(layers, num_nodes, per_rank_node, per_node).transpose(2, 3)  # [L, M, E/M, G]
    holds = torch.zeros(layers, num_nodes, num_experts, per_rank_node, dtype=torch.bool)
    holds.scatter_(2, experts[..., None].expand_as(mask), mask)  # [L, M, E, G]
    return holds.transpose(1, 2).reshape(layers, num_experts, workers)  # rank = node * G + local rank


def _pack_copies(load: torch.Tensor, copies: torch.Tensor, packs: int) -> torch.Tensor:
    """Greedy packing (or, where stuck, copies dealt in turn: copy s on pack s % P), refined.

    load: [X, n]; copies: int [X, n], each <= P. Returns int64 held [X, P, C] item indices, -1 free.
    """
    total = copies.sum(dim=-1, keepdim=True)  # [X, 1]
    slot = torch.arange(int(total.max())).expand(load.shape[0], -1)  # [X, S]
    labels = torch.searchsorted(copies.cumsum(dim=-1), slot.contiguous(), right=True)  # copy s -> item
    labels = torch.where(slot < total, labels, -1)  # [X, S], items in ascending id order
    per_copy = load / copies  # [X, n]
    capacity = total // packs + (torch.arange(packs) < total % packs)  # [X, P]
    held, ok = balanced_packing(per_copy.gather(-1, labels.clamp_min(0)), capacity, labels)
    dealt = torch.full_like(held, -1)
    x, s = (labels >= 0).nonzero(as_tuple=True)
    dealt[x, s % packs, s // packs] = labels[x, s]  # an item's copies are consecutive: distinct packs
    return refine(torch.where(ok[:, None, None], held, dealt), per_copy)


def round_robin(num_layers: int, num_experts: int, workers: int) -> Placement:
    """One copy per expert, expert e on rank e % N (the `strategy: round_robin` layout)."""
    layer = tuple((e % workers,) for e in range(num_experts))
    return Placement(workers, (layer,) * num_layers)


def plan_placement(
    load: torch.Tensor,
    workers: int,
    redundant: int = 0,
    baseline: Placement | None = None,
    num_nodes: int = 1,
) -> tuple[Placement, PlanReport]:
    """Plan a placement of E experts per layer on N ranks (in M nodes) with R redundant copies per layer.

    load: [L, E] tokens (or any non-negative weight) per expert; workers: N; redundant: R, at most
    E * (N / M - 1) (an expert has at most one copy per rank, all on one node); baseline: the placement
    to compare against (default round-robin); num_nodes: M, dividing N and E (1: flat).
    Returns the plan and its predicted report.

    >>> plan, report = plan_placement(torch.tensor([[8.0, 1.0, 1.0, 2.0]]), workers=2, redundant=2)
    >>> plan.ranks, round(report.imbalance_before, 2), report.imbalance_after
    ((((0, 1), (0,), (1,), (0, 1)),), 1.5, 1.0)
    >>> plan_placement(torch.tensor([[8.0, 1, 1, 2]]), workers=4, redundant=2, num_nodes=2)[0].ranks
    (((0, 1), (2,), (0,), (2, 3)),)
    """
    if load.dim() != 2 or load.numel() == 0 or bool((load < 0).any()) or not bool(load.isfinite().all()):
        raise ConfigError(f"load: expected finite non-negative [L, E], got shape {list(load.shape)}")
    num_layers, num_experts = load.shape
    if workers <= 0:
        raise ConfigError(f"workers={workers}: expected a positive integer")
    common = math.gcd(workers, num_experts)
    if num_nodes <= 0 or common % num_nodes:
        allowed = [d for d in range(1, common + 1) if common % d == 0]
        raise ConfigError(f"num_nodes={num_nodes}: nodes must split the {workers} workers and the "
                          f"{num_experts} experts evenly; allowed: {allowed} (1 plans without nodes)")
    limit = num_experts * (workers // num_nodes - 1)
    if not 0 <= redundant <= limit:
        raise ConfigError(
            f"redundant={redundant}: allowed 0..{limit} (E={num_experts} experts, at most one copy per rank "
            f"on {workers // num_nodes} workers{' per node' if num_nodes > 1 else ''})"
        )
    load = load.double()
    plain = round_robin(num_layers, num_experts, workers)
    # candidates: R copies, none (skipped when R = 0), round-robin; every expert is a group of its own
    candidates = [rebalance_hierarchical(load, r, num_experts, num_nodes, workers)
                  for r in dict.fromkeys((redundant, 0))]
    candidates.append(plain.mask())
    holds = torch.stack(candidates)  # [candidates, L, E, N]
    peaks = mask_loads(load, holds).amax(dim=-1).round(decimals=9)  # [candidates, L]
    best = peaks.argmin(dim=0)  # [L]: the first with the lowest peak
    plan = Placement.from_mask(holds[best, torch.arange(num_layers)])
    before = imbalance(load, baseline or plain)
    after = imbalance(load, plan)
    return plan, PlanReport(before[0], after[0], before[1], after[1])
