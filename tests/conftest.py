"""Shared fixtures: seeded checkpoints generated once per test session (no downloads, ever)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from moe_runtime.presets.init_model import init_model

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Stop at once when the repository root shadows Hugging Face's `kernels` (DESIGN.md 2): transformers
    imports it, and would fail in every parity test with an error that names neither cause nor fix."""
    spec = importlib.util.find_spec("kernels")
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin is not None and origin.is_relative_to(ROOT) and "site-packages" not in origin.parts:
        pytest.exit(
            f"`import kernels` finds {spec.origin}, not Hugging Face's `kernels` that transformers imports. "
            "If that is the repository's kernels/ folder, `python -m pytest` put the root first on sys.path: "
            "run `make test`, `.venv/bin/pytest` or `python -P -m pytest`; otherwise rename the module.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


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


@pytest.fixture(scope="session")
def no_tokenizer_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The `tiny` checkpoint without its tokenizer files (what `save_pretrained` of a model alone writes)."""
    out = tmp_path_factory.mktemp("no-tokenizer")
    for f in tiny_model_dir.iterdir():
        if not f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    return out
