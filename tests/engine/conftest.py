"""Engine fixtures: engines over the session's tiny checkpoint, and a reference greedy loop.

Every engine a test builds through `make_engine` has its block manager checked when the test ends: exact
accounting, and no block held once no request is left.
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.model.attention import AttentionMetadata

# Prompts of mixed lengths (token ids of the tiny vocab; 1 is BOS).
PROMPTS = (
    [1, 300, 301, 302],
    [1, 17],
    [1, *range(40, 77)],  # 38 tokens: several 16-token blocks
    [1, 900, 5, 1200, 33, 7, 7, 7, 2000, 64, 128],
)


@pytest.fixture
def make_engine(tiny_model_dir):
    engines: list[LLMEngine] = []

    def make(**overrides) -> LLMEngine:
        sets = [f"model.path={tiny_model_dir}", "cache.num_blocks=256", "engine.seed=0"]
        sets += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
        engine = LLMEngine(load_config(overrides=sets))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        bm = engine.scheduler.block_manager
        bm.check_invariants()
        if not engine.has_unfinished():
            assert bm.num_used == 0, f"{bm.num_used} KV blocks leaked"


def reference_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """The oracle: a plain loop that re-runs the whole sequence without a KV cache for every token."""
    ids = list(prompt)
    for _ in range(max_tokens):
        meta = AttentionMetadata.for_prompts([len(ids)])
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), meta, None)
        ids.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return ids[len(prompt) :]


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] of a whole sequence without a KV cache."""
    meta = AttentionMetadata.for_prompts([len(ids)])
    return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), meta, None))
