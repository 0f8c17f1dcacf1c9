"""Placement (cluster/placement.py, placement_config.py, placement_memory.py): strategies, explicit layouts,
replicas, the validation matrix, YAML round trip, memory, the mask form, pair split."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch
import yaml

from moe_runtime.checkpoint.layout import expert_bytes, shared_bytes
from moe_runtime.cluster import placement, placement_config, placement_memory
from moe_runtime.cluster.placement import Placement
from moe_runtime.cluster.placement_config import (
    build_placement,
    placement_from_yaml,
    placement_from_yaml_text,
    placement_to_yaml,
    resolve_placement,
)
from moe_runtime.cluster.placement_memory import check_memory, rank_bytes
from moe_runtime.config import ModelConfig, PlacementConfig, load_config
from moe_runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MIXTRAL = ROOT / "configs" / "models" / "mixtral-8x7b-v0.1" / "config.json"  # the published config, no weights
EXAMPLES = sorted((ROOT / "configs" / "placement").glob("*.yaml"))


@pytest.fixture(scope="module")
def mixtral() -> ModelConfig:
    return ModelConfig.from_hf(json.loads(MIXTRAL.read_text()), str(MIXTRAL))


@pytest.mark.parametrize("module", (placement, placement_config, placement_memory), ids=lambda m: m.__name__)
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


# (section, num_layers, num_experts, expected ranks of layer 0 and of the last layer)
LAYOUTS = (
    ({"workers": 3, "strategy": "round_robin"}, 2, 4, ((0,), (1,), (2,), (0,))),
    ({"workers": 2, "strategy": "contiguous"}, 2, 5, ((0,), (0,), (0,), (1,), (1,))),
    ({"workers": 4, "strategy": "contiguous"}, 1, 8, ((0,), (0,), (1,), (1,), (2,), (2,), (3,), (3,))),
    ({"workers": 2, "replicas": {"*": {1: [0]}}}, 2, 2, ((0,), (0, 1))),
    ({"workers": 2, "explicit": {"*": {0: [1], 1: [0, 1]}}}, 2, 2, ((1,), (0, 1))),
)


@pytest.mark.parametrize("section, num_layers, num_experts, expected", LAYOUTS)
def test_layouts(section, num_layers, num_experts, expected):
    plan = build_placement(PlacementConfig(**section), num_layers, num_experts)
    assert plan.ranks == (expected,) * num_layers


def test_layer_entries_override_star():
    cfg = PlacementConfig(
        workers=2,
        explicit={"*": {0: [0, 1], 1: [2, 3]}, 1: {0: [3, 2, 0], 1: [1]}},
        replicas={"*": {0: [1]}, 2: {3: [0]}},
    )
    plan = build_placement(cfg, num_layers=3, num_experts=4)
    assert plan.ranks[0] == ((0, 1), (0,), (1,), (1,))
    assert plan.ranks[1] == ((0, 1), (1,), (0,), (0,))
    assert plan.ranks[2] == ((0,), (0,), (1,), (0, 1))  # a layer's own replicas entry replaces "*"
    assert plan.local_experts(0, 1) == [0, 2, 3]  # slot order is expert id, not the YAML's order


# (section, num_experts, message fragments): every rejected YAML names its path, the value and the range
INVALID = (
    ({"workers": 2, "explicit": {"*": {0: [0, 1], 1: [2]}}}, 4, ("placement.explicit.*", "expert(s) [3]")),
    (
        {"workers": 2, "explicit": {"*": {0: [0, 1], 2: [2, 3]}}},
        4,
        ("placement.explicit.*.2", "rank 2", "0..1"),
    ),
    (
        {"workers": 2, "explicit": {"*": {0: [0, 1], 1: [2, 9]}}},
        4,
        ("placement.explicit.*.1", "expert 9", "0..3"),
    ),
    ({"workers": 2, "explicit": {5: {0: [0, 1], 1: [2, 3]}}}, 4, ("placement.explicit.5", "layer 5", "0..1")),
    (
        {"workers": 2, "explicit": {0: {0: [0, 1, 1], 1: [2, 3]}}},
        4,
        ("placement.explicit.0.0", "duplicate slot"),
    ),
    ({"workers": 2, "replicas": {"*": {0: [0]}}}, 4, ("placement.replicas.*.0", "duplicate slot", "rank 0")),
    ({"workers": 2, "replicas": {1: {0: [3]}}}, 4, ("placement.replicas.1.0", "rank 3", "0..1")),
    ({"workers": 2, "replicas": {"*": {4: [1]}}}, 4, ("placement.replicas.*.4", "expert 4", "0..3")),
    ({"workers": 2, "replicas": {-1: {0: [1]}}}, 4, ("placement.replicas.-1", "layer -1")),
)


@pytest.mark.parametrize("section, num_experts, fragments", INVALID)
def test_validation_names_the_yaml_path(section, num_experts, fragments):
    with pytest.raises(ConfigError) as info:
        build_placement(PlacementConfig(**section), num_layers=2, num_experts=num_experts)
    for fragment in fragments:
        assert fragment in str(info.value)


# (override, message fragments): type errors are caught when the YAML loads
INVALID_TYPES = (
    ("placement.strategy=random", ("placement.strategy", "round_robin", "contiguous")),
    ("placement.workers=0", ("placement.workers",)),
    ("placement.memory_per_rank=lots", ("placement.memory_per_rank", "24GiB")),
    ("placement.explicit={x: {0: [1]}}", ("placement.explicit.x",)),
    ("placement.ranks=3", ("placement.ranks", "unknown key", "explicit")),
)


@pytest.mark.parametrize("override, fragments", INVALID_TYPES)
def test_config_rejects(override, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text, expected", (("24GiB", 24 * 2**30), ("512MiB", 512 * 2**20), ("80GB", 80 * 10**9))
)
def test_memory_units(text, expected):
    assert PlacementConfig(memory_per_rank=text).memory_per_rank == expected


def test_mixtral_sizes(mixtral):
    assert expert_bytes(mixtral, "auto") == 3 * 4096 * 14336 * 2  # bf16, 336 MiB
    total = shared_bytes(mixtral, "auto") + 32 * 8 * expert_bytes(mixtral, "auto")
    assert 46.6e9 < total / 2 < 46.8e9  # Mixtral-8x7B: 46.7B parameters
    assert expert_bytes(mixtral, "float32") == 2 * expert_bytes(mixtral, "bfloat16")


def test_memory_budget(mixtral):
    plan = build_placement(PlacementConfig(workers=4, replicas={"*": {0: [2]}}), 32, 8)
    used = rank_bytes(plan, mixtral)
    assert used[2] - used[1] == 32 * expert_bytes(mixtral, "auto")
    check_memory(plan, mixtral, budget=max(used))
    with pytest.raises(ConfigError, match=r"placement.memory_per_rank=.*rank 2 needs .* 96 expert copies"):
        check_memory(plan, mixtral, budget=max(used) - 1)


def test_memory_budget_with_8bit_experts(mixtral):
    """int8 experts: one byte per weight plus an fp32 scale per row, so a Mixtral-8x7B placement on 4 ranks
    that needs ~26 GiB a rank in bf16 fits in 16 GiB a rank; the error names the format."""
    plan = build_placement(PlacementConfig(workers=4), 32, 8)
    int8 = expert_bytes(mixtral, "auto", "int8")
    assert int8 == 3 * 4096 * 14336 + 4 * (2 * 14336 + 4096)  # values + scales of w13 [2I, D] and w2 [D, I]
    sixteen, eight = rank_bytes(plan, mixtral), rank_bytes(plan, mixtral, quantization="int8")
    assert [a - b for a, b in zip(sixteen, eight, strict=True)] == [64 * (expert_bytes(mixtral, "auto") - int8)] * 4
    assert max(sixteen) > 16 * 2**30 > max(eight)
    check_memory(plan, mixtral, budget=16 * 2**30, quantization="int8")
    with pytest.raises(ConfigError, match=rf"64 expert copies of {int8} bytes in int8 plus"):
        check_memory(plan, mixtral, budget=max(eight) - 1, quantization="int8")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load_and_fit(path, mixtral):
    cfg = load_config(path)
    plan = resolve_placement(cfg.placement, mixtral)
    assert plan.workers == cfg.placement.workers
    assert (plan.replica_counts() >= 1).all()


def test_examples_cover_2_4_8_workers():
    assert {load_config(p).placement.workers for p in EXAMPLES} == {2, 4, 8}


@pytest.mark.parametrize("same_layers", (True, False))
def test_yaml_round_trip(tmp_path, same_layers):
    layer0 = ((0, 2), (1,), (2,), (0,), (1, 2))
    layer1 = layer0 if same_layers else ((1,), (0,), (2,), (0, 1, 2), (2,))
    plan = Placement(3, (layer0, layer1))
    path = tmp_path / "placement.yaml"
    path.write_text(placement_to_yaml(plan, memory_per_rank=2**30))
    assert placement_from_yaml(path, num_layers=2, num_experts=5) == plan
    assert placement_from_yaml_text(path.read_text(), num_layers=2, num_experts=5) == plan
    section = yaml.safe_load(path.read_text())["placement"]
    assert list(section["explicit"]) == (["*"] if same_layers else [0, 1])
    assert load_config(path).placement.memory_per_rank == 2**30


PLAN = Placement(3, (((0,), (1, 2), (0, 1, 2), (2,)), ((1,), (0,), (2,), (0, 1))))


def test_slot_map_and_local_experts():
    assert [PLAN.local_experts(r, 0) for r in range(3)] == [[0, 2], [1, 2], [1, 2, 3]]
    assert PLAN.slot_map(0, 0).tolist() == [0, -1, 1, -1]
    assert PLAN.slot_map(2, 0).tolist() == [-1, 0, 1, 2]
    assert PLAN.slot_map(1, 1).tolist() == [0, -1, -1, 1]
    assert PLAN.slot_map(0, 0).dtype == torch.int64
    assert PLAN.experts_per_rank().tolist() == [[2, 2, 3], [2, 2, 1]]


def test_mask_round_trip():
    mask = PLAN.mask()  # [L, E, N]
    assert Placement.from_mask(mask) == PLAN
    assert mask[0, 1].tolist() == [False, True, True] and mask[1, 3].tolist() == [True, True, False]
    assert (mask.sum(dim=-1) == PLAN.replica_counts()).all()
    assert (mask.sum(dim=1) == PLAN.experts_per_rank()).all()


def test_pairs_split_by_token_index():
    topk_ids = torch.tensor([[2, 1], [2, 3], [2, 1], [0, 2]])  # [T=4, k=2]
    # expert 2 has replicas (0, 1, 2): tokens 0..3 -> ranks 0, 1, 2, 0; expert 1 (1, 2): tokens 0, 2 -> 1, 1
    assert PLAN.owner_ranks(0, topk_ids).tolist() == [[0, 1], [1, 2], [2, 1], [0, 0]]


@pytest.mark.parametrize("seed", range(3))
def test_every_pair_computed_exactly_once(seed):
    g = torch.Generator().manual_seed(seed)
    topk_ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(33)])  # [33, 2]
    for layer in range(PLAN.num_layers):
        slots = torch.stack([PLAN.local_slots(r, layer, topk_ids) for r in range(3)])  # [N, T, k]
        assert ((slots >= 0).sum(dim=0) == 1).all()
        for r in range(3):
            here = slots[r] >= 0
            local = torch.tensor(PLAN.local_experts(r, layer))
            assert (local[slots[r][here]] == topk_ids[here]).all()  # the slot holds the routed expert


def test_ray_preset_and_deploy_config(mixtral):
    """The deploy config (both deploy paths serve cluster/deploy/serve.yaml; test_deploy_schemas checks
    the artifacts themselves) places Mixtral-8x7B within its per-rank budget."""
    assert load_config(ROOT / "configs" / "tiny-ray-2-workers.yaml").placement.workers == 2
    cfg = load_config(ROOT / "cluster" / "deploy" / "serve.yaml")
    assert cfg.executor == "ray"
    resolve_placement(cfg.placement, mixtral)  # Mixtral-8x7B fits the stated per-rank budget
