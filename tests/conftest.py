"""Shared fixtures: seeded checkpoints generated once per test session (no downloads, ever)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_runtime.model.init_model import init_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords or "multigpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The `tiny` preset, seed 0 (fp32, 2 layers, 8 experts, top-2)."""
    return init_model("tiny", tmp_path_factory.mktemp("tiny"), seed=0)
