"""Expert parallelism for the other families: routed experts are placed and sharded, everything else (shared
experts, dense layers' MLPs, attention with its norms and biases) is replicated on every rank.

Layer level: every rank's fp32 share sums to the local kernel's output (top-8 of 128 experts: the shares
add a token's pairs in another association, so within fp32 rounding, not bit for bit as top-2 is). Model
level: a rank loads exactly its experts plus every replicated weight; the planner places a Qwen3-size load;
and a local Ray cluster of 2 workers gives the local engine's greedy tokens on a Qwen2-MoE model with a
shared expert and a dense layer.
"""

from __future__ import annotations

import os

import pytest
import torch

from moe_runtime.checkpoint.layout import expert_bytes, shared_bytes
from moe_runtime.checkpoint.loader import load_model
from moe_runtime.cluster.expert_parallel import ShardedExperts, ShardedExpertsBuilder
from moe_runtime.cluster.placement_memory import rank_bytes
from moe_runtime.cluster.planner import plan_placement, round_robin
from moe_runtime.config import ModelConfig, load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.kernels import fused_moe, route
from moe_runtime.model.parts import ModelParts
from moe_runtime.presets.configs import preset_config
from moe_runtime.presets.init_model import write_checkpoint

QWEN3 = ModelConfig.from_hf(preset_config("tiny-qwen3moe", num_hidden_layers=1))  # E=128, top-8, I=64, D=128
QWEN2_DENSE = dict(num_hidden_layers=3, mlp_only_layers=[1], num_experts=8)  # shared expert, layer 1 dense


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("qwen2"), preset_config("tiny-qwen2moe", **QWEN2_DENSE), seed=0)


@pytest.mark.parametrize("workers", (2, 4))
def test_top8_ranks_sum_to_local(workers):
    E, D, I, T = QWEN3.num_local_experts, QWEN3.hidden_size, QWEN3.intermediate_size, 33
    g = torch.Generator().manual_seed(workers)
    x = torch.randn(T, D, generator=g) / 10
    w13, w2 = torch.randn(E, 2 * I, D, generator=g) / 10, torch.randn(E, D, I, generator=g) / 10
    routing = route(torch.randn(T, E, generator=g), top_k=8, renormalize=True)
    expected = fused_moe(x, w13, w2, routing, backend="torch")  # [T, D]
    placement = round_robin(1, E, workers)
    total = torch.zeros(T, D)
    for rank in range(workers):
        experts = ShardedExperts(QWEN3, placement, rank, 0, backend="torch")
        local = placement.local_experts(rank, 0)
        experts.w13.data, experts.w2.data = w13[local], w2[local]
        total += experts.share(x, routing)
    torch.testing.assert_close(total, expected, atol=1e-6, rtol=1e-5)


def test_a_rank_holds_its_experts_and_every_replicated_weight(qwen2_dir):
    full = load_model(qwen2_dir, "float32", "cpu")
    cfg = full.config
    placement = round_robin(cfg.num_hidden_layers, cfg.num_local_experts, 2)
    builder = ShardedExpertsBuilder(placement, 1)
    model = load_model(qwen2_dir, "float32", "cpu", parts=ModelParts(experts=builder))
    assert [e.layer for e in builder.layers] == list(cfg.moe_layers) == [0, 2]
    for l, block in model.moe_blocks().items():
        want = full.moe_blocks()[l]
        local = placement.local_experts(1, l)
        assert torch.equal(block.experts.w13, want.experts.w13[local])
        assert torch.equal(block.shared_expert.down_proj.weight, want.shared_expert.down_proj.weight)
    replicated = {n: p for n, p in model.named_parameters() if ".experts." not in n}
    for name, p in full.named_parameters():
        if ".experts." not in name:
            assert torch.equal(replicated[name], p), name
    # weights per rank: the replicated ones plus its copies in the sparse layers (dense layer 1 holds none)
    per_rank = rank_bytes(placement, cfg, "float32")
    sparse_copies = [len(placement.local_experts(r, l)) for r in range(2) for l in cfg.moe_layers]
    assert per_rank[1] == shared_bytes(cfg, "float32") + sum(sparse_copies[2:]) * expert_bytes(cfg, "float32")
    assert builder.expert_bytes() == sum(sparse_copies[2:]) * expert_bytes(cfg, "float32")


def test_planner_balances_128_experts_and_ignores_dense_rows():
    g = torch.Generator().manual_seed(0)
    load = torch.rand(3, 128, generator=g) ** 4 * 1000  # skewed, as trained routers are
    load[1] = 0  # a dense layer: no routed tokens
    plan, report = plan_placement(load, workers=4, redundant=8)
    assert report.imbalance_after < report.imbalance_before
    assert plan.num_experts == 128 and plan.num_layers == 3


@pytest.mark.slow
def test_ray_two_workers_equal_local(qwen2_dir):
    ray = pytest.importorskip("ray")
    from moe_runtime.cluster.ray_executor import RayExecutor

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    prompts = ([1, 300, 301, 302], [1, 17], [1, *range(40, 77)])
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    base = [f"model.path={qwen2_dir}", "engine.seed=0", "cache.num_blocks=64"]
    expected = [out.token_ids for out in LLMEngine(load_config(overrides=base)).generate(list(prompts), greedy)]
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)  # fake GPUs: bundles, no CUDA
    try:
        cfg = load_config(overrides=[*base, "executor=ray", "placement.workers=2", 'placement.replicas={"*": {0: [1]}}',
                                     "ray.collective_timeout_s=120", "ray.placement_timeout_s=120"])
        executor = RayExecutor(cfg, str(qwen2_dir))
        try:
            got = [out.token_ids for out in LLMEngine(cfg, executor=executor).generate(list(prompts), greedy)]
            held = executor.expert_bytes()
        finally:
            executor.shutdown()
    finally:
        ray.shutdown()
    assert got == expected
    per_expert = expert_bytes(executor.model_config, "auto")
    assert sum(held) == (2 * 8 + 2) * per_expert  # 8 experts in each of 2 sparse layers, plus expert 0 twice more
