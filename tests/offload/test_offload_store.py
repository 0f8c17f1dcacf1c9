"""ExpertStore properties: the weights used for an expert are always that expert's (so an expert the step
still needs is never evicted), outputs equal the all-resident kernel bit for bit, and the counters add up."""

from __future__ import annotations

from unittest import mock

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_runtime.offload.store as store_module
from moe_runtime.config import ModelConfig, OffloadConfig
from moe_runtime.kernels import RoutingResult, fused_moe, fused_moe_fp32
from moe_runtime.offload import CostModel, ExpertStore
from moe_runtime.presets.configs import preset_config

L, E, A, D, I = 2, 6, 2, 8, 16  # noqa: E741
CFG = ModelConfig.from_hf(preset_config("tiny", num_hidden_layers=L, num_local_experts=E, hidden_size=D,
                                        intermediate_size=I, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=4))
# host compute wins for experts with at most 2 tokens: host = n, fetch = 2.5 + ~0
COST = CostModel(flops_per_token=1, host_flops=1.0, device_flops=1e12, copy_s=2.5)


def _routing(gen: torch.Generator, T: int) -> RoutingResult:
    ids = torch.stack([torch.randperm(E, generator=gen)[:A] for _ in range(T)]).to(torch.int32)  # [T, A]
    weights = torch.softmax(torch.randn(T, A, generator=gen), dim=-1)  # [T, A]
    return RoutingResult(weights, ids)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    slots=st.integers(A, E),
    policy=st.sampled_from(["lru", "lfu"]),
    miss=st.sampled_from(["fetch", "host_compute", "auto"]),
    prefetch=st.booleans(),
    steps=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_needed_experts_are_never_evicted(slots, policy, miss, prefetch, steps, seed, tier_factory):
    tier = tier_factory(L, E, D, I, seed=seed % 7)
    gen = torch.Generator().manual_seed(seed)
    gates = [torch.nn.Linear(D, E) for _ in range(L)]
    offload = OffloadConfig(enabled=True, resident_experts_per_layer=slots, policy=policy, miss=miss,
                            prefetch=prefetch)
    store = ExpertStore(CFG, offload, tier, gates, torch.device("cpu"), torch.float32, COST)
    layer_now = [0]

    def check_slots(routing, w13, w2, slot_map):
        for e in torch.unique(routing.ids).tolist():  # a mapped expert's slot holds that expert's weights
            s = int(slot_map[e])
            if s >= 0:
                assert torch.equal(w13[s], tier.w13[layer_now[0]][e]), f"expert {e} not in its slot"
                assert torch.equal(w2[s], tier.w2[layer_now[0]][e])

    def checked_fused_moe(x, w13, w2, routing, *, slot_map=None, backend="auto"):
        assert all(int(slot_map[e]) >= 0 for e in torch.unique(routing.ids).tolist())  # one call: all resident
        check_slots(routing, w13, w2, slot_map)
        return fused_moe(x, w13, w2, routing, slot_map=slot_map, backend=backend)

    def checked_fused_moe_fp32(x, w13, w2, routing, *, slot_map=None, backend="auto"):
        check_slots(routing, w13, w2, slot_map)
        return fused_moe_fp32(x, w13, w2, routing, slot_map=slot_map, backend=backend)

    uses = 0
    with mock.patch.object(store_module, "fused_moe", checked_fused_moe), \
         mock.patch.object(store_module, "fused_moe_fp32", checked_fused_moe_fp32):
        for T in steps:
            x = torch.randn(T, D, generator=gen)
            for layer in range(L):
                layer_now[0] = layer
                routing = _routing(gen, T)
                uses += len(torch.unique(routing.ids))
                out = store.run(layer, x, routing, "torch")
                expected = fused_moe(x, tier.w13[layer], tier.w2[layer], routing)
                assert torch.equal(out, expected)
                x = torch.tanh(out + x)
    s = store.stats()
    assert s.hits + s.misses == uses
    assert s.fetched + s.host_computed == s.misses
    assert s.prefetch_used <= s.prefetch_guessed and s.prefetch_useful <= s.prefetch_loaded <= s.prefetch_guessed
    assert (s.prefetch_guessed > 0) == (prefetch and True)
    if miss == "fetch":
        assert s.host_computed == 0
    if miss == "host_compute":
        assert s.fetched == 0
    store.close()


def test_all_resident_budget_never_misses(tier_factory):
    tier = tier_factory(L, E, D, I)
    offload = OffloadConfig(enabled=True, resident_experts_per_layer=E, miss="fetch")
    store = ExpertStore(CFG, offload, tier, [torch.nn.Linear(D, E) for _ in range(L)], "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        store.run(0, torch.randn(5, D), _routing(gen, 5), "torch")
    s = store.stats()
    assert (s.misses, s.evictions, s.bytes_moved, s.hits) == (0, 0, 0, s.uses)


def test_cost_model_prefers_host_for_few_tokens():
    assert [COST.prefer_host(n) for n in (1, 2, 3, 10)] == [True, True, False, False]
    tie = CostModel(flops_per_token=1, host_flops=1.0, device_flops=1.0, copy_s=0.0, read_s=5.0)
    assert not tie.prefer_host(1)  # ties fetch: the fetched expert can hit next step


def test_calibration_on_cpu(tier_factory):
    tier = tier_factory(1, 2, 64, 128)
    cost = CostModel.calibrate(CFG.model_copy(update={"hidden_size": 64, "intermediate_size": 128}), tier,
                               torch.device("cpu"), torch.float32)
    assert cost.copy_s > 0 and cost.host_flops > 0 and cost.token_s == 0.0
    assert cost.prefer_host(1)  # pinned tier on a CPU device: computing in place beats copying
