"""Expert placement: which ranks hold a copy of each (layer, expert), and which copy computes each pair.

Dimension letters: L layers, E experts per layer, N workers (ranks), T tokens, k experts per token.

A `Placement` is pure data: for every layer and expert, the sorted ranks holding a copy (a replica). On a rank,
a layer's local experts take slots 0, 1, ... in expert-id order; `slot_map(rank, layer)[e]` is expert e's
slot there, or -1 (the `slot_map` contract of `kernels.fused_moe`). It is built from YAML by
`placement_config`, planned from measured load by `planner`, and priced in bytes by `placement_memory`.

Replicated experts: the (token, expert) pairs of an expert with c replicas are split by token index: the pair
of token t (its row in the step's flat batch, the same on every rank) goes to replica `t % c`, replicas
ordered by rank. Every rank computes the same split from the routing alone, with no communication, and
each pair is computed exactly once. For example, with expert 5 on ranks (1, 3), tokens 0, 2, 4 run on rank 1
and tokens 1, 3 on rank 3 (see `owner_ranks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Placement:
    """Ranks holding each (layer, expert): `ranks[l][e]` is a sorted, non-empty tuple of distinct ranks."""

    workers: int  # N
    ranks: tuple[tuple[tuple[int, ...], ...], ...]  # [L][E] -> ranks holding a copy

    def __post_init__(self) -> None:
        assert all(len(layer) == len(self.ranks[0]) for layer in self.ranks), "every layer has E experts"
        assert all(reps and list(reps) == sorted(set(reps)) for layer in self.ranks for reps in layer)

    @classmethod
    def from_mask(cls, holds: torch.Tensor) -> Placement:
        """The plan whose rank n holds a copy of (layer l, expert e) where `holds[l, e, n]`.

        holds: bool [L, E, N], at least one True per (l, e).

        >>> Placement.from_mask(torch.tensor([[[True, False], [True, True]]])).ranks
        (((0,), (0, 1)),)
        """
        assert holds.dim() == 3 and bool(holds.any(dim=-1).all()), "every expert needs a rank"
        rows = holds.bool().tolist()  # [L][E][N]
        return cls(holds.shape[-1], tuple(
            tuple(tuple(n for n, held in enumerate(row) if held) for row in layer) for layer in rows))

    @property
    def num_layers(self) -> int:
        return len(self.ranks)

    @property
    def num_experts(self) -> int:
        return len(self.ranks[0])

    def local_experts(self, rank: int, layer: int) -> list[int]:
        """Expert ids rank `rank` holds in `layer`, in slot order (ascending id)."""
        return [e for e, reps in enumerate(self.ranks[layer]) if rank in reps]

    def slot_map(self, rank: int, layer: int) -> torch.Tensor:
        """Expert id -> local slot on `rank`, -1 where the expert is not held. Returns int64 [E].

        >>> p = Placement(2, (((0,), (1,), (0, 1)),))
        >>> p.slot_map(0, 0).tolist(), p.slot_map(1, 0).tolist()
        ([0, -1, 1], [-1, 0, 1])
        """
        slots = torch.full((self.num_experts,), -1, dtype=torch.int64)
        local = self.local_experts(rank, layer)
        slots[local] = torch.arange(len(local))
        return slots

    def mask(self) -> torch.Tensor:
        """Whether rank n holds a copy of (layer l, expert e). Returns bool [L, E, N] (`from_mask`'s input).

        >>> Placement(2, (((0,), (0, 1)),)).mask().int().tolist()
        [[[1, 0], [1, 1]]]
        """
        return self._holds.clone()

    def replica_counts(self) -> torch.Tensor:
        """Copies of each expert. Returns int64 [L, E]."""
        return self._holds.sum(dim=-1)

    def experts_per_rank(self) -> torch.Tensor:
        """Expert copies each rank holds per layer. Returns int64 [L, N]."""
        return self._holds.sum(dim=1)

    def rank_shares(self) -> list[list[list[float]]]:
        """[L][E][N]: the fraction of expert e's pairs rank n computes (1/copies on each copy's rank), for
        telemetry's rank view. `owner_ranks` splits by token index, so this is exact up to rounding."""
        return [[[1 / len(reps) if n in reps else 0.0 for n in range(self.workers)] for reps in layer]
                for layer in self.ranks]

    def owner_ranks(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """The rank that computes each (token, expert) pair: replica `t % c` of the expert's c replicas.

        topk_ids: int [T, k] routed expert ids (row t is token t of the step's flat batch).
        Returns int64 [T, k] ranks, on topk_ids' device.

        >>> p = Placement(4, (((0,), (1, 3)),))
        >>> p.owner_ranks(0, torch.tensor([[1, 0], [1, 0], [0, 1]])).tolist()
        [[1, 0], [3, 0], [0, 1]]
        """
        ids = topk_ids.long()
        table = self._replica_table[layer].to(ids.device)  # [E, N], padded with -1
        count = self._replica_count[layer].to(ids.device)[ids]  # [T, k]
        token = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)  # [T, 1]
        return table[ids, token % count]  # [T, k]

    def local_slots(self, rank: int, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """Slot of each (token, expert) pair that `rank` computes, -1 for pairs computed elsewhere.

        topk_ids: int [T, k]. Returns int64 [T, k]. Over all ranks every pair gets exactly one slot >= 0.
        """
        ids = topk_ids.long()
        slots = self.slot_map(rank, layer).to(ids.device)[ids]  # [T, k]
        return torch.where(self.owner_ranks(layer, ids) == rank, slots, torch.full_like(slots, -1))

    @cached_property
    def _replica_table(self) -> torch.Tensor:  # int64 [L, E, N]: replica ranks in order, then -1
        pad = [-1] * self.workers
        return torch.tensor([[[*reps, *pad[len(reps):]] for reps in layer] for layer in self.ranks],
                            dtype=torch.int64).view(self.num_layers, self.num_experts, self.workers)

    @cached_property
    def _holds(self) -> torch.Tensor:  # bool [L, E, N]
        holds = torch.zeros(self.num_layers, self.num_experts, self.workers + 1, dtype=torch.bool)
        return holds.scatter_(-1, self._replica_table + 1, True)[..., 1:]  # column 0 takes the -1 padding

    @cached_property
    def _replica_count(self) -> torch.Tensor:  # int64 [L, E]
        return self.replica_counts()
