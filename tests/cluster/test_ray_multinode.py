"""A two-node layout simulated with `ray.cluster_utils.Cluster`: `placement.nodes` pins each rank to the node
that declares its custom resource, and the two-node group still gives the local executor's greedy tokens.

Its own module: a `Cluster` (head + one node, each with its own raylet) cannot share a process with the
plain `ray.init` cluster of the other modules.
"""

from __future__ import annotations

import os

import pytest

from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

PROMPTS = ([1, 300, 301, 302], [1, 17, 5])
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node-a": 1}})
    node_b = cluster.add_node(num_cpus=1, resources={"node-b": 1})
    ray.init(address=cluster.address)
    try:
        cluster.wait_for_nodes()
        yield {"node-a": cluster.head_node.node_id, "node-b": node_b.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ranks_land_on_the_nodes_the_plan_names(two_nodes, tiny_model_dir):
    from moe_runtime.cluster.ray_executor import RayExecutor

    base = [f"model.path={tiny_model_dir}", "engine.seed=0", "cache.num_blocks=32"]
    cfg = load_config(overrides=[*base, "executor=ray", "placement.workers=2", "ray.worker_device=cpu",
                                 'placement.nodes={0: "node-b", 1: "node-a"}', "ray.placement_timeout_s=60",
                                 "ray.collective_timeout_s=60"])
    executor = RayExecutor(cfg, str(tiny_model_dir))
    try:
        nodes = ray.get([w.node_id.remote() for w in executor.workers])
        assert nodes == [two_nodes["node-b"], two_nodes["node-a"]]
        got = [out.token_ids for out in LLMEngine(cfg, executor=executor).generate(list(PROMPTS), GREEDY)]
    finally:
        executor.shutdown()
    local = LLMEngine(load_config(overrides=base))
    assert got == [out.token_ids for out in local.generate(list(PROMPTS), GREEDY)]
