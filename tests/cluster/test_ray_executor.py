"""RayExecutor on a local Ray cluster with fake GPUs: the same greedy tokens as the local executor.

One cluster for the module (start-up costs seconds and ~300 MB per worker); tests that need workers share
one executor.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from moe_runtime.checkpoint.layout import expert_bytes
from moe_runtime.cluster.planner import plan_placement
from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.errors import ConfigError, EngineDeadError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

PROMPTS = ([1, 300, 301, 302], [1, 17], [1, *range(40, 77)], [1, 900, 5, 1200, 33, 7, 7, 7, 2000, 64, 128])
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# round-robin on 2 workers, plus second copies: expert 0 everywhere, expert 3 in layer 1
SETS = (
    "placement.workers=2",
    'placement.replicas={"*": {0: [1]}, 1: {0: [1], 3: [0]}}',
    "engine.seed=0",
    "cache.num_blocks=64",
    "executor=ray",
    "ray.collective_timeout_s=120",
    "ray.placement_timeout_s=120",
)


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # fake GPUs: bundles, no CUDA; 6 for the 2-worker group that lives all module plus a 4-worker one
    ray.init(address="local", num_cpus=6, num_gpus=6, include_dashboard=False)  # our own cluster
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_engine(cluster, tiny_model_dir):
    from moe_runtime.cluster.ray_executor import RayExecutor

    cfg = load_config(overrides=[f"model.path={tiny_model_dir}", *SETS])
    executor = RayExecutor(cfg, str(tiny_model_dir))
    yield LLMEngine(cfg, executor=executor)
    executor.shutdown()


def test_greedy_tokens_equal_local(ray_engine, tiny_model_dir):
    local = LLMEngine(
        load_config(overrides=[f"model.path={tiny_model_dir}", "engine.seed=0", "cache.num_blocks=64"])
    )
    expected = [out.token_ids for out in local.generate(list(PROMPTS), GREEDY)]
    assert [out.token_ids for out in ray_engine.generate(list(PROMPTS), GREEDY)] == expected


def test_four_workers_explicit_replicated_round_robin_equal_local(cluster, tiny_model_dir):
    from moe_runtime.cluster.ray_executor import RayExecutor

    base = [f"model.path={tiny_model_dir}", "engine.seed=0", "cache.num_blocks=64"]
    # layer 0 explicit with expert 0 on ranks 0 and 2; layer 1 round-robin
    cfg = load_config(overrides=[*base, "executor=ray", "placement.workers=4", "ray.collective_timeout_s=120",
                                 "ray.placement_timeout_s=120",
                                 "placement.explicit={0: {0: [0, 5], 1: [1, 6], 2: [2, 7, 0], 3: [3, 4]}}"])
    executor = RayExecutor(cfg, str(tiny_model_dir))
    try:
        got = [out.token_ids for out in LLMEngine(cfg, executor=executor).generate(list(PROMPTS), GREEDY)]
    finally:
        executor.shutdown()
    local = LLMEngine(load_config(overrides=base))
    assert got == [out.token_ids for out in local.generate(list(PROMPTS), GREEDY)]


def test_workers_hold_only_their_experts(ray_engine):
    executor = ray_engine.executor
    per_expert = expert_bytes(executor.model_config, "auto")
    copies = executor.placement.experts_per_rank().sum(dim=0).tolist()  # [N]
    assert executor.expert_bytes() == [c * per_expert for c in copies]
    assert sum(copies) < 2 * executor.model_config.num_hidden_layers * executor.model_config.num_local_experts


def test_rebalancing_mid_stream_changes_nothing(ray_engine):
    executor = ray_engine.executor
    expected = [out.token_ids for out in ray_engine.generate(list(PROMPTS), GREEDY)]
    cfg = executor.model_config
    load = torch.rand(
        cfg.num_hidden_layers, cfg.num_local_experts, generator=torch.Generator().manual_seed(1)
    )
    plan, _ = plan_placement(load**4, workers=2, redundant=3)  # [L, E] skewed
    assert plan != executor.placement
    for i, prompt in enumerate(PROMPTS):
        ray_engine.add_request(f"r{i}", prompt, GREEDY)
    final = {}
    for step in range(40):
        if step == 3:
            executor.apply_placement(plan)  # between steps, requests in flight
        for out in ray_engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        if not ray_engine.has_unfinished():
            break
    assert [final[f"r{i}"] for i in range(len(PROMPTS))] == expected
    assert executor.placement == plan
    per_expert = expert_bytes(cfg, "auto")
    assert executor.expert_bytes() == [c * per_expert for c in plan.experts_per_rank().sum(dim=0).tolist()]


def test_missing_bundles_fail_with_what_is_missing(cluster, tiny_model_dir):
    from moe_runtime.cluster.ray_executor import RayExecutor

    cfg = load_config(
        overrides=[
            f"model.path={tiny_model_dir}",
            "placement.workers=7",
            "ray.worker_device=gpu",
            "ray.placement_timeout_s=1",
            "executor=ray",
        ]
    )
    with pytest.raises(
        ConfigError, match=r"placement.workers=7: need bundles of 7 x 1 CPU, 7 x 1 GPU.*ray status"
    ):
        RayExecutor(cfg, str(tiny_model_dir))


@pytest.mark.parametrize(
    ("workers", "extra", "stage"),
    [
        # the cluster cannot hold 7 workers yet: cancelled with the whole placement_timeout_s left
        (7, ["ray.placement_timeout_s=3600"], "while waiting"),
        # bundles available: cancelled while the workers start, none left behind
        (2, [], "while the workers"),
    ],
    ids=["waiting-for-bundles", "workers-starting"],
)
def test_cancel_during_start_up_gives_the_bundles_back(cluster, tiny_model_dir, workers, extra, stage):
    """A server stopped (SIGTERM) during the executor's start-up stops at once, wherever it was, and gives back
    every bundle it asked for."""
    import threading

    from moe_runtime.cluster.ray_connect import StartupCancelled
    from moe_runtime.cluster.ray_executor import RayExecutor

    cfg = load_config(overrides=[f"model.path={tiny_model_dir}", f"placement.workers={workers}",
                                 "ray.worker_device=gpu", *extra, "executor=ray"])
    cancel = threading.Event()
    cancel.set()
    before = set(ray.util.placement_group_table())
    with pytest.raises(StartupCancelled, match=rf"placement.workers={workers}: start-up stopped {stage}"):
        RayExecutor(cfg, str(tiny_model_dir), cancel=cancel)
    ours = {k: pg for k, pg in ray.util.placement_group_table().items() if k not in before}
    assert ours and all(pg["state"] == "REMOVED" for pg in ours.values())


@pytest.mark.parametrize("scheme", ["int8"])
def test_quantized_experts_on_ray_workers_equal_the_local_quantized_engine(cluster, tiny_model_dir, scheme):
    """Each worker holds its experts in 8 bits (half the bytes and the row scales), gives the local int8
    engine's greedy tokens, and keeps them through a rebalance that reads experts again, quantized."""
    from moe_runtime.cluster.ray_executor import RayExecutor

    base = [f"model.path={tiny_model_dir}", f"model.quantization={scheme}"]
    local = LLMEngine(load_config(overrides=[*base, "engine.seed=0", "cache.num_blocks=64"]))
    expected = [out.token_ids for out in local.generate(list(PROMPTS), GREEDY)]
    cfg = load_config(overrides=[*base, *SETS])
    executor = RayExecutor(cfg, str(tiny_model_dir))
    try:
        engine = LLMEngine(cfg, executor=executor)
        model = executor.model_config
        per_expert = expert_bytes(model, "auto", scheme)
        assert per_expert < expert_bytes(model, "auto") / 2  # fp32 tiny: a quarter, plus the scales
        copies = executor.placement.experts_per_rank().sum(dim=0).tolist()
        assert executor.expert_bytes() == [c * per_expert for c in copies]
        assert [out.token_ids for out in engine.generate(list(PROMPTS), GREEDY)] == expected
        load = torch.rand(model.num_hidden_layers, model.num_local_experts, generator=torch.Generator().manual_seed(2))
        plan, _ = plan_placement(load**4, workers=2, redundant=3)
        assert plan != executor.placement
        executor.apply_placement(plan)
        assert executor.expert_bytes() == [c * per_expert for c in plan.experts_per_rank().sum(dim=0).tolist()]
        assert [out.token_ids for out in engine.generate(list(PROMPTS), GREEDY)] == expected
    finally:
        executor.shutdown()


def test_killed_worker_fails_fast_and_restart_recovers(ray_engine, tiny_model_dir):
    executor = ray_engine.executor
    before = [out.token_ids for out in ray_engine.generate(list(PROMPTS[:2]), GREEDY)]
    ray.kill(executor.workers[1])
    ray_engine.add_request("doomed", PROMPTS[0], GREEDY)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match="a Ray worker failed"):
        while ray_engine.has_unfinished():
            ray_engine.step()
    assert time.monotonic() - t0 < 30
    ray_engine.abort("doomed")
    executor.restart()
    fresh = LLMEngine(ray_engine.config, executor=executor)  # the old engine's scheduler holds dead state
    assert [out.token_ids for out in fresh.generate(list(PROMPTS[:2]), GREEDY)] == before


def test_prefix_cache_hits_on_ray_workers_keep_greedy_tokens(ray_engine, tiny_model_dir):
    """Prefix caching with the Ray executor: the block tables are the scheduler's, and every worker's KV cache
    holds the same blocks, so a request that adopts another's cached prefix blocks reads the same keys on
    every rank. Tokens equal a local engine that computes every prefix (caching off)."""
    prefix = [1, *range(500, 547)]  # 48 tokens: three full blocks of 16
    first = [[*prefix, 7, 8]]
    later = [[*prefix, 9], [*prefix, 3, 4, 5], [*prefix[:20], 6]]  # the last shares one full block only
    local = LLMEngine(load_config(overrides=[f"model.path={tiny_model_dir}", "engine.seed=0",
                                             "cache.num_blocks=64", "cache.prefix_caching=false"]))
    expected = [out.token_ids for out in local.generate(first + later, GREEDY)]
    hits = ray_engine.make_stats().prefix_cache_hits
    got = [out.token_ids for out in ray_engine.generate(first, GREEDY)]
    got += [out.token_ids for out in ray_engine.generate(later, GREEDY)]
    assert got == expected
    # the second call found the first's three blocks for two requests and one block for the third
    assert ray_engine.make_stats().prefix_cache_hits - hits >= 2 * 48 + 16
