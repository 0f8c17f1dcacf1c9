"""Engine fixtures: engines over the session's tiny checkpoint (prompts and the oracle: engine_cases.py).

Every engine a test builds through `make_engine` has its block manager checked when the test ends: exact
accounting, and no block held once no request is left.
"""

from __future__ import annotations

import pytest

from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine


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
