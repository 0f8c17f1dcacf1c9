"""Expert-parallel MoE: the sum of every rank's share equals the local `fused_moe` with the same backend.

Shares are fp32 (`fused_moe_fp32`) and rounded once after the sum, so without replicas the result is bit
for bit the local one in fp32 and bf16 alike (top-2: a + b == b + a). A replicated expert runs its GEMM on
fewer rows: equal within the dtype's tolerance then, with the same greedy tokens. Layer level runs the ranks one after
another in this process; the model level runs two processes over gloo, as the Ray workers will.
"""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.multiprocessing as mp
from expert_parallel_ranks import forward, free_port, run_rank

from moe_runtime.checkpoint.layout import expert_bytes
from moe_runtime.checkpoint.loader import load_model
from moe_runtime.cluster import expert_parallel
from moe_runtime.cluster.expert_parallel import QuantizedShardedExperts, ShardedExperts, ShardedExpertsBuilder
from moe_runtime.cluster.placement import Placement
from moe_runtime.cluster.placement_config import build_placement
from moe_runtime.cluster.planner import round_robin
from moe_runtime.config import ModelConfig, PlacementConfig
from moe_runtime.kernels import fused_moe, route
from moe_runtime.kernels.quant import SCHEMES, quantize
from moe_runtime.model.parts import ModelParts

E, D, I = 6, 32, 48  # noqa: E741  experts, hidden, intermediate
CFG = ModelConfig.from_hf({"architectures": ["MixtralForCausalLM"], "vocab_size": 64, "hidden_size": D,
                           "intermediate_size": I, "num_hidden_layers": 1, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "num_local_experts": E, "num_experts_per_tok": 2})

# (name, placement of one layer of E=6 experts)
PLACEMENTS = (
    ("one_rank", round_robin(1, E, 1)),
    ("round_robin_2", round_robin(1, E, 2)),
    ("replicated_3", Placement(3, (((0, 1, 2), (1,), (2,), (0, 2), (0,), (1,)),))),
    ("every_expert_everywhere_4", Placement(4, (((0, 1, 2, 3),) * E,))),
)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("T", (1, 33))
@pytest.mark.parametrize("name, placement", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_ranks_sum_to_local(name, placement, T, dtype):
    g = torch.Generator().manual_seed(T)
    x = (torch.randn(T, D, generator=g) / 10).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=g) / 10).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) / 10).to(dtype)
    routing = route(torch.randn(T, E, generator=g), top_k=2)
    expected = fused_moe(x, w13, w2, routing, backend="torch")  # [T, D]
    total = torch.zeros(T, D)
    for rank in range(placement.workers):
        local = placement.local_experts(rank, 0)
        experts = ShardedExperts(CFG, placement, rank, 0, backend="torch")
        experts.w13.data, experts.w2.data = w13[local], w2[local]
        total += experts.share(x, routing)  # fp32, rounded once below as the kernels do
    assert experts.share(x, routing).dtype == torch.float32
    if int(placement.replica_counts().max()) == 1:
        assert torch.equal(total.to(dtype), expected)  # bf16 too: one rounding after the fp32 sum
    else:
        torch.testing.assert_close(total.to(dtype), expected)  # dtype's default tolerances


@pytest.mark.parametrize("scheme", ("int8", "fp8"))
@pytest.mark.parametrize("name, placement", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_quantized_ranks_sum_to_local(name, placement, scheme):
    """8-bit shares (`QuantizedShardedExperts`) sum to the local fused MoE over the same quantized stacks."""
    g = torch.Generator().manual_seed(5)
    T = 17
    x = torch.randn(T, D, generator=g) / 10
    w13 = quantize(torch.randn(E, 2 * I, D, generator=g) / 10, scheme)
    w2 = quantize(torch.randn(E, D, I, generator=g) / 10, scheme)
    routing = route(torch.randn(T, E, generator=g), top_k=2)
    expected = fused_moe(x, w13, w2, routing, backend="torch")  # [T, D]
    total = torch.zeros(T, D)
    for rank in range(placement.workers):
        local = placement.local_experts(rank, 0)
        experts = QuantizedShardedExperts(CFG, placement, rank, 0, scheme, backend="torch")
        assert experts.w13.dtype == SCHEMES[scheme] and experts.w13.shape == (len(local), 2 * I, D)
        experts.w13.copy_(w13[local])
        experts.w2.copy_(w2[local])
        total += experts.share(x, routing)
    if int(placement.replica_counts().max()) == 1:
        assert torch.equal(total, expected)
    else:
        torch.testing.assert_close(total, expected)


def test_placement_must_match_the_model():
    with pytest.raises(ValueError, match="layer 0: placement is 1 layers x 4 experts, the model has 1 x 6"):
        ShardedExperts(CFG, round_robin(1, 4, 2), 1, 0)
    with pytest.raises(ValueError, match="placement is 1 layers x 6 experts, model 2 x 6"):
        ShardedExpertsBuilder(round_robin(1, E, 2), 1).build(CFG.model_copy(update={"num_hidden_layers": 2}), 0)


@pytest.mark.slow
def test_two_ranks_match_local_model(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir, "float32", "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: fp32 GEMMs may block differently with another thread count
    try:
        expected = forward(model)
    finally:
        torch.set_num_threads(threads)
    cfg = model.config
    layers, experts = cfg.num_hidden_layers, cfg.num_local_experts
    replicas = {"*": {7: [0]}, 1: {0: [1], 2: [1]}}  # round-robin plus a second copy of some experts
    placements = [
        round_robin(layers, experts, 2),
        build_placement(PlacementConfig(workers=2, replicas=replicas), layers, experts),
    ]
    out = tmp_path / "hidden.pt"
    mp.spawn(run_rank, args=(2, free_port(), str(tiny_model_dir), placements, str(out)), nprocs=2, join=True)
    plain, replicated = torch.load(out)
    assert torch.equal(plain, expected)
    torch.testing.assert_close(replicated, expected)
    logits = model.compute_logits(replicated)
    assert torch.equal(logits.argmax(-1), model.compute_logits(expected).argmax(-1))


def test_a_rank_loads_only_its_experts_and_re_places_them(tiny_model_dir):
    """What a Ray worker loads: the replicated weights and only its own experts; the same tensors as the
    full model's rows of those experts, before and after moving to another placement."""
    full = load_model(tiny_model_dir, "float32", "cpu")
    cfg = full.config
    placement = build_placement(PlacementConfig(workers=2, replicas={"*": {3: [0]}}), cfg.num_hidden_layers,
                                cfg.num_local_experts)
    builder = ShardedExpertsBuilder(placement, 1)
    model = load_model(tiny_model_dir, "float32", "cpu", parts=ModelParts(experts=builder))

    def check(placement):
        for layer, (got, want) in enumerate(zip(model.layers, full.layers, strict=True)):
            local = placement.local_experts(1, layer)
            assert torch.equal(got.block_sparse_moe.experts.w13, want.block_sparse_moe.experts.w13[local])
            assert torch.equal(got.block_sparse_moe.experts.w2, want.block_sparse_moe.experts.w2[local])

    check(placement)
    moved = round_robin(cfg.num_hidden_layers, cfg.num_local_experts, 2)  # keeps some, reads the others
    builder.apply(moved)
    check(moved)
    assert [b.block_sparse_moe.experts.w13.shape[0] for b in model.layers] == [4] * cfg.num_hidden_layers


@pytest.mark.parametrize("scheme", ("int8", "fp8"))
def test_a_rank_loads_only_its_experts_quantized_and_re_places_them(tiny_model_dir, scheme):
    """As above with `model.quantization`: the rank's experts are the local quantized model's rows of them
    (values and scales), before and after a new placement reads some again, and take their 8-bit bytes."""
    full = load_model(tiny_model_dir, "float32", "cpu", quantization=scheme)
    cfg = full.config
    placement = build_placement(PlacementConfig(workers=2, replicas={"*": {3: [0]}}), cfg.num_hidden_layers,
                                cfg.num_local_experts)
    builder = ShardedExpertsBuilder(placement, 1, quantization=scheme)
    model = load_model(tiny_model_dir, "float32", "cpu", parts=ModelParts(experts=builder), quantization=scheme)

    def check(placement):
        for layer, (got, want) in enumerate(zip(model.layers, full.layers, strict=True)):
            local = placement.local_experts(1, layer)
            got, want = got.block_sparse_moe.experts, want.block_sparse_moe.experts
            assert isinstance(got, QuantizedShardedExperts)
            for a, b in ((got.w13, want.w13[local]), (got.w2, want.w2[local])):
                assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
                assert torch.equal(a.scale, b.scale)
        copies = sum(len(placement.local_experts(1, layer)) for layer in range(cfg.num_hidden_layers))
        assert builder.expert_bytes() == copies * expert_bytes(cfg, "float32", scheme)

    check(placement)
    moved = round_robin(cfg.num_hidden_layers, cfg.num_local_experts, 2)  # keeps some, reads the others
    builder.apply(moved)
    check(moved)


def test_doctests():
    assert doctest.testmod(expert_parallel).failed == 0
