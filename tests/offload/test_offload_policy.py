"""Eviction order of LRU and LFU, alone and inside the store, on scripted access sequences."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import ModelConfig, OffloadConfig
from moe_runtime.kernels import RoutingResult
from moe_runtime.offload import ExpertStore, LFUPolicy, LRUPolicy
from moe_runtime.presets.configs import preset_config


def test_lru_evicts_least_recent():
    p = LRUPolicy()
    for e in (0, 1, 2, 0, 3, 1):
        p.record_use(e)
    assert p.victim([0, 1, 2, 3]) == 2
    assert p.victim([0, 1, 3]) == 0
    assert p.victim([5, 4]) == 4  # never used: oldest, ties by id


def test_lfu_evicts_least_frequent_then_least_recent():
    p = LFUPolicy()
    for e in (0, 0, 0, 1, 1, 2, 3):
        p.record_use(e)
    assert p.victim([0, 1, 2, 3]) == 2  # 2 and 3 used once; 2 less recently
    assert p.victim([0, 1]) == 1
    p.record_use(2)
    assert p.victim([1, 2, 3]) == 3


# S = 3 slots holding experts 0, 1, 2 at start; top-2 routing of one token per step; one layer.
STEPS = ([0, 1], [0, 2], [0, 1], [3, 4], [5, 0])
EXPECTED = (
    ("lru", ([0, 1, 2], [0, 1, 2], [0, 1, 2], [1, 3, 4], [0, 4, 5]), [2, 0, 1, 3]),
    ("lfu", ([0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 3, 4], [0, 4, 5]), [2, 1, 3]),
)


@pytest.mark.parametrize("policy,residents,evicted", EXPECTED)
def test_store_eviction_order(policy, residents, evicted, tier_factory):
    cfg = ModelConfig.from_hf(preset_config("tiny", num_hidden_layers=1, num_local_experts=6, hidden_size=8,
                                            intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=4))
    tier = tier_factory(1, 6, 8, 16)
    offload = OffloadConfig(enabled=True, resident_experts_per_layer=3, policy=policy, miss="fetch", prefetch=False)
    store = ExpertStore(cfg, offload, tier, [torch.nn.Linear(8, 6)], torch.device("cpu"), torch.float32)
    victims, pick = [], store.layers[0].policy.victim
    store.layers[0].policy.victim = lambda candidates: victims.append(pick(candidates)) or victims[-1]
    for ids, expected in zip(STEPS, residents, strict=True):
        routing = RoutingResult(torch.tensor([[0.6, 0.4]]), torch.tensor([ids], dtype=torch.int32))
        store.run(0, torch.randn(1, 8), routing, "torch")
        assert store.resident(0) == expected, f"{policy} after routing {ids}"
    assert victims == evicted
    assert store.stats().evictions == len(evicted)
    store.close()
