"""The `placement:` YAML section <-> `Placement`: build and validate a plan from config, write one back.

A section resolves layer by layer: a layer's own `explicit` entry, else `explicit["*"]`, else `strategy`
(`round_robin`: expert e on rank e % N; `contiguous`: blocks of E/N), then its own `replicas` entry, else
`replicas["*"]`, adds copies. Every error names the YAML path, the value and the allowed range.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from moe_runtime.cluster.placement import Placement
from moe_runtime.cluster.placement_memory import check_memory
from moe_runtime.config import ModelConfig, PlacementConfig, load_config
from moe_runtime.errors import ConfigError


def build_placement(
    cfg: PlacementConfig, num_layers: int, num_experts: int, where: str = "placement"
) -> Placement:
    """Resolve a `placement:` section into a plan for L layers of E experts, validating every entry.

    Raises `ConfigError` naming the YAML path for a layer, rank or expert out of range, an expert listed
    twice on one rank, or an expert no rank holds.

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
    cfg: PlacementConfig, model: ModelConfig, dtype: str = "auto", where: str = "placement",
    quantization: str = "none",
) -> Placement:
    """`build_placement` for `model`'s layers and experts, then `check_memory` against `memory_per_rank`:
    the one call an executor makes at start-up. dtype: `model.dtype` of the YAML ("auto" = the checkpoint's);
    quantization: the experts' format (`checkpoint.loader.weight_formats`).
    """
    plan = build_placement(cfg, model.num_hidden_layers, model.num_local_experts, where)
    check_memory(plan, model, cfg.memory_per_rank, dtype, where, quantization)
    return plan


def placement_to_config(plan: Placement, memory_per_rank: int | None = None) -> PlacementConfig:
    """The explicit `placement:` section for `plan`; "*" when every layer has the same layout.

    >>> placement_to_config(Placement(2, (((0,), (0, 1)),) * 2)).explicit
    {'*': {0: [0, 1], 1: [1]}}
    """
    layouts = [
        {r: plan.local_experts(r, layer) for r in range(plan.workers)} for layer in range(plan.num_layers)
    ]
    same = all(layout == layouts[0] for layout in layouts)
    explicit = {"*": layouts[0]} if same else dict(enumerate(layouts))
    return PlacementConfig(workers=plan.workers, explicit=explicit, memory_per_rank=memory_per_rank)


def placement_to_yaml(plan: Placement, memory_per_rank: int | None = None) -> str:
    """A YAML document with one `placement:` section, loadable by `load_config` and `placement_from_yaml`."""
    cfg = placement_to_config(plan, memory_per_rank)
    section = {"workers": plan.workers, "explicit": cfg.explicit}
    if memory_per_rank is not None:
        section["memory_per_rank"] = memory_per_rank
    return yaml.safe_dump({"placement": section}, sort_keys=False, default_flow_style=None)


def placement_from_yaml_text(
    text: str, num_layers: int, num_experts: int, where: str = "placement"
) -> Placement:
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


def placement_from_yaml(path: str | Path, num_layers: int, num_experts: int) -> Placement:
    """Build the plan from a YAML file's `placement:` section (the rest of the file is validated too)."""
    return build_placement(load_config(path).placement, num_layers, num_experts, f"{path}: placement")


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
