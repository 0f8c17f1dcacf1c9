"""Loading a checkpoint with offloaded experts, as the offload tests and benchmarks do.

Importable from every test folder (tests/ is on pytest's pythonpath, pyproject.toml).
"""

from __future__ import annotations

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.config import OffloadConfig
from moe_runtime.model.parts import ModelParts
from moe_runtime.offload import ExpertStore, OffloadedExpertsBuilder


def load_offloaded(model_dir, offload: OffloadConfig, **kwargs) -> tuple:
    """(model, its open ExpertStore): `load_model(model_dir, **kwargs)` with experts behind the store."""
    builder = OffloadedExpertsBuilder(offload)
    model = load_model(model_dir, parts=ModelParts(experts=builder), **kwargs)
    store: ExpertStore = builder.store
    return model, store
