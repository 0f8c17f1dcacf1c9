"""Expert placement: which ranks hold a copy of each (layer, expert), built from YAML or from the planner.

Dimension letters: L layers, E experts per layer, N workers (ranks), T tokens, k experts per token.

A `Placement` is pure data: for every layer and expert, the sorted ranks holding a copy (a replica). On a rank,
a layer's local experts take slots 0, 1, ... in expert-id order; `slot_map(rank, layer)[e]` is expert e's
slot there, or -1 (the `slot_map` contract of `kernels.fused_moe`).

Replicated experts: the (token, expert) pairs of an expert with c replicas are split by token index: the pair
of token t (its row in the step's flat batch, the same on every rank) goes to replica `t % c`, replicas
ordered by rank. Every rank computes the same split from the routing alone, with no communication, and
each pair is computed exactly once. For example, with expert 5 on ranks (1, 3), tokens 0, 2, 4 run on rank 1
and tokens 1, 3 on rank 3 (see `owner_ranks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from moe_runtime.config import ModelConfig, PlacementConfig, load_config
from moe_runtime.errors import ConfigError

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Placement:
    """Ranks holding each (layer, expert): `ranks[l][e]` is a sorted, non-empty tuple of distinct ranks."""

    workers: int  # N
    ranks: tuple[tuple[tuple[int, ...], ...], ...]  # [L][E] -> ranks holding a copy

    def __post_init__(self) -> None:
        assert all(len(layer) == len(self.ranks[0]) for layer in self.ranks), "every layer has E experts"
        assert all(reps and list(reps) == sorted(set(reps)) for layer in self.ranks for reps in layer)

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

    def replica_counts(self) -> torch.Tensor:
        """Copies of each expert. Returns int64 [L, E]."""
        return torch.tensor([[len(reps) for reps in layer] for layer in self.ranks], dtype=torch.int64)

    def experts_per_rank(self) -> torch.Tensor:
        """Expert copies each rank holds per layer. Returns int64 [L, N]."""
        counts = torch.zeros(self.num_layers, self.workers, dtype=torch.int64)
        for layer, experts in enumerate(self.ranks):
            for reps in experts:
                counts[layer, list(reps)] += 1
        return counts

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

    @cached_property
    def _replica_table(self) -> torch.Tensor:  # int64 [L, E, N]: replica ranks in order, then -1
        table = torch.full((self.num_layers, self.num_experts, self.workers), -1, dtype=torch.int64)
        for layer, experts in enumerate(self.ranks):
            for e, reps in enumerate(experts):
                table[layer, e, : len(reps)] = torch.tensor(reps)
        return table

    @cached_property
    def _replica_count(self) -> torch.Tensor:  # int64 [L, E]
        return self.replica_counts()

    def local_slots(self, rank: int, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """Slot of each (token, expert) pair that `rank` computes, -1 for pairs computed elsewhere.

        topk_ids: int [T, k]. Returns int64 [T, k]. Over all ranks every pair gets exactly one slot >= 0.
        """
        ids = topk_ids.long()
        slots = self.slot_map(rank, layer).to(ids.device)[ids]  # [T, k]
        return torch.where(self.owner_ranks(layer, ids) == rank, slots, torch.full_like(slots, -1))

    # ----------------------------------------------------------------------------------------------------
    # YAML
    # ----------------------------------------------------------------------------------------------------
    def to_config(self, memory_per_rank: int | None = None) -> PlacementConfig:
        """The explicit `placement:` section for this plan; "*" when every layer has the same layout."""
        layouts = [
            {r: self.local_experts(r, layer) for r in range(self.workers)} for layer in range(self.num_layers)
        ]
        same = all(layout == layouts[0] for layout in layouts)
        explicit = {"*": layouts[0]} if same else dict(enumerate(layouts))
        return PlacementConfig(workers=self.workers, explicit=explicit, memory_per_rank=memory_per_rank)

    def to_yaml(self, memory_per_rank: int | None = None) -> str:
        """A YAML document with one `placement:` section, loadable by `load_config` and `from_yaml`."""
        cfg = self.to_config(memory_per_rank)
        section = {"workers": self.workers, "explicit": cfg.explicit}
        if memory_per_rank is not None:
            section["memory_per_rank"] = memory_per_rank
        return yaml.safe_dump({"placement": section}, sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml_text(cls, text: str, num_layers: int, num_experts: int, where: str = "placement") -> Placement:
        """Build the plan from a YAML document's `placement:` section (what `ApplyPlacement` receives)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("placement"), dict):
            raise ConfigError(f"{where}: expected a YAML mapping with a `placement:` section "
                              "(as `moe-runtime plan-placement -o` writes)")
        try:
            cfg = PlacementConfig.model_validate(data["placement"])
        except ValidationError as e:
            raise ConfigError(f"{where}: " + "; ".join(
                f"placement.{'.'.join(map(str, err['loc']))}={err.get('input')!r}: {err['msg']}"
                for err in e.errors())) from None
        return build_placement(cfg, num_layers, num_experts, f"{where}: placement")

    @classmethod
    def from_yaml(cls, path: str | Path, num_layers: int, num_experts: int) -> Placement:
        """Build the plan from a YAML file's `placement:` section (the rest of the file is validated too)."""
        return build_placement(load_config(path).placement, num_layers, num_experts, f"{path}: placement")


# --------------------------------------------------------------------------------------------------------
# From config
# --------------------------------------------------------------------------------------------------------
def build_placement(
    cfg: PlacementConfig, num_layers: int, num_experts: int, where: str = "placement"
) -> Placement:
    """Resolve a `placement:` section into a plan for L layers of E experts, validating every entry.

    Each layer takes its own `explicit` entry, else `explicit["*"]`, else `strategy`; then its own `replicas`
    entry, else `replicas["*"]`, adds copies. Raises `ConfigError` naming the YAML path for a layer,
    rank or expert out of range, an expert listed twice on one rank, or an expert no rank holds.

    >>> cfg = PlacementConfig(workers=2, strategy="contiguous", replicas={"*": {0: [1]}})
    >>> build_placement(cfg, num_layers=1, num_experts=4).ranks
    (((0, 1), (0,), (1,), (1,)),)
    """
    n = cfg.workers
    for key in (*cfg.explicit, *cfg.replicas):
        if key != "*" and not 0 <= key < num_layers:
            section = "explicit" if key in cfg.explicit else "replicas"
            raise ConfigError(
                f"{where}.{section}.{key}: layer {key} out of range; allowed: 0..{num_layers - 1} or '*'"
            )
    layers = []
    for layer in range(num_layers):
        key = layer if layer in cfg.explicit else "*"
        held: list[set[int]] = [set() for _ in range(num_experts)]  # [E] -> ranks
        if key in cfg.explicit:
            for rank, experts in cfg.explicit[key].items():
                path = f"{where}.explicit.{key}.{rank}"
                _check_rank(rank, n, path)
                for e in experts:
                    _add(held, e, rank, num_experts, path)
        else:
            for e in range(num_experts):
                held[e].add(e % n if cfg.strategy == "round_robin" else e * n // num_experts)
        rkey = layer if layer in cfg.replicas else "*"
        for e, ranks in cfg.replicas.get(rkey, {}).items():
            path = f"{where}.replicas.{rkey}.{e}"
            for rank in ranks:
                _check_rank(rank, n, path)
                _add(held, e, rank, num_experts, path)
        missing = [e for e in range(num_experts) if not held[e]]
        if missing:
            raise ConfigError(
                f"{where}.explicit.{key}: layer {layer} places no copy of expert(s) {missing}; "
                f"every expert 0..{num_experts - 1} needs a rank"
            )
        layers.append(tuple(tuple(sorted(ranks)) for ranks in held))
    return Placement(n, tuple(layers))


def resolve_placement(
    cfg: PlacementConfig, model: ModelConfig, dtype: str = "auto", where: str = "placement"
) -> Placement:
    """`build_placement` for `model`'s layers and experts, then `check_memory` against `memory_per_rank`:
    the one call an executor makes at start-up. dtype: `model.dtype` of the YAML ("auto" = the checkpoint's).
    """
    plan = build_placement(cfg, model.num_hidden_layers, model.num_local_experts, where)
    check_memory(plan, model, cfg.memory_per_rank, dtype, where)
    return plan


def _check_rank(rank: int, workers: int, path: str) -> None:
    if not 0 <= rank < workers:
        raise ConfigError(
            f"{path}: rank {rank} out of range; allowed: 0..{workers - 1} (placement.workers={workers})"
        )


def _add(held: list[set[int]], expert: int, rank: int, num_experts: int, path: str) -> None:
    if not 0 <= expert < len(held):
        raise ConfigError(f"{path}: expert {expert} out of range; allowed: 0..{num_experts - 1}")
    if rank in held[expert]:
        raise ConfigError(f"{path}: duplicate slot: expert {expert} is already on rank {rank} in this layer")
    held[expert].add(rank)


# --------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------
def expert_bytes(model: ModelConfig, dtype: str) -> int:
    """Bytes of one expert's weights: w1 and w3 [I, H] plus w2 [H, I]."""
    return 3 * model.hidden_size * model.intermediate_size * _dtype_bytes(model, dtype)


def shared_bytes(model: ModelConfig, dtype: str) -> int:
    """Bytes of the weights every rank replicates: embeddings, attention, norms, routers, lm_head."""
    h, e = model.hidden_size, model.num_local_experts
    q = model.num_attention_heads * model.head_dim
    kv = model.num_key_value_heads * model.head_dim
    per_layer = 2 * h * q + 2 * h * kv + e * h + 2 * h  # q, o, k, v, router, two norms
    embed = model.vocab_size * h * (1 if model.tie_word_embeddings else 2)
    return (model.num_hidden_layers * per_layer + embed + h) * _dtype_bytes(model, dtype)


def rank_bytes(placement: Placement, model: ModelConfig, dtype: str = "auto") -> list[int]:
    """Weight bytes each rank holds under `placement`: shared weights plus its expert copies. Returns [N]."""
    copies = placement.experts_per_rank().sum(dim=0).tolist()  # [N] over all layers
    shared, expert = shared_bytes(model, dtype), expert_bytes(model, dtype)
    return [shared + c * expert for c in copies]


def check_memory(
    placement: Placement,
    model: ModelConfig,
    budget: int | None,
    dtype: str = "auto",
    where: str = "placement",
) -> None:
    """Raise `ConfigError` when a rank's weights exceed `budget` bytes (`placement.memory_per_rank`)."""
    if budget is None:
        return
    expert = expert_bytes(model, dtype)
    for rank, used in enumerate(rank_bytes(placement, model, dtype)):
        if used > budget:
            raise ConfigError(
                f"{where}.memory_per_rank={budget} ({budget / 2**30:.1f} GiB): rank {rank} needs {used} bytes ({used / 2**30:.1f} GiB: "
                f"{(used - shared_bytes(model, dtype)) // expert} expert copies of {expert} bytes plus "
                f"{shared_bytes(model, dtype)} shared); raise the budget, add workers or move experts off rank {rank}"
            )


def _dtype_bytes(model: ModelConfig, dtype: str) -> int:
    name = model.torch_dtype if dtype == "auto" else dtype
    if name not in _DTYPE_BYTES:
        raise ConfigError(
            f"dtype={dtype!r} is not supported; allowed: ['auto', {', '.join(map(repr, _DTYPE_BYTES))}]"
        )
    return _DTYPE_BYTES[name]
