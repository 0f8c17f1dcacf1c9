"""Through the engine (KV cache, batching, chunked prefill, preemption): offloaded runs give the same greedy
tokens as the all-resident engine, and the store's counters reach the engine's model."""

from __future__ import annotations

import pytest

from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams

PROMPTS = ([1, 300, 301, 302], [1, 17], [1, *range(40, 77)], [1, 900, 5, 1200, 33, 7, 7, 7, 2000, 64, 128])
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
# (offload settings, engine/cache settings): budgets down to the minimum, every miss mode, both policies and
# tiers, and the engine's chunked prefill and preemption paths.
CASES = (
    (["resident_experts_per_layer=2", "miss=fetch", "policy=lru"], []),
    (["resident_experts_per_layer=2", "miss=host_compute", "host_tier=mmap", "prefetch=false"], []),
    (["resident_experts_per_layer=4", "miss=auto", "policy=lfu", "host_tier=mmap"], ["engine.max_num_batched_tokens=5"]),
    (["resident_experts_per_layer=3", "miss=fetch", "policy=lfu"], ["cache.num_blocks=14", "cache.block_size=4"]),
)


def _engine(model_dir, sets: list[str]) -> LLMEngine:
    cfg = load_config(overrides=[f"model.path={model_dir}", "cache.num_blocks=256", "engine.seed=0", *sets])
    return LLMEngine(cfg)


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    engine = LLMEngine(load_config(overrides=[f"model.path={tiny_model_dir}", "cache.num_blocks=256"]))
    return [out.token_ids for out in engine.generate(list(PROMPTS), GREEDY)]


@pytest.mark.parametrize("offload,engine_sets", CASES)
def test_engine_tokens_equal_all_resident(offload, engine_sets, tiny_model_dir, expected):
    sets = ["offload.enabled=true", *(f"offload.{s}" for s in offload), *engine_sets]
    engine = _engine(tiny_model_dir, sets)
    store = engine.executor.expert_store
    assert store is not None
    assert [out.token_ids for out in engine.generate(list(PROMPTS), GREEDY)] == expected
    s = store.stats()
    assert s.misses > 0 and s.hits + s.misses == s.uses and s.fetched + s.host_computed == s.misses
    assert engine.make_stats().offload == s  # what telemetry reads
    if "cache.num_blocks=14" in engine_sets:
        assert engine.make_stats().num_preemptions > 0
    engine.shutdown()
    store.close()
