"""`model.load_format: dummy`: a checkpoint's shapes from config.json alone, seeded random weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from engine_cases import PROMPTS

from moe_runtime.checkpoint.dummy import dummy_model
from moe_runtime.checkpoint.loader import load_model, read_config
from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.errors import ConfigError


@pytest.fixture(scope="module")
def config_only(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint's config.json, and nothing else."""
    out = tmp_path_factory.mktemp("config-only")
    shutil.copy(tiny_model_dir / "config.json", out / "config.json")
    return out


def test_same_shapes_as_the_checkpoint_and_the_same_weights_for_a_seed(tiny_model_dir, config_only):
    real = load_model(tiny_model_dir, dtype="float32", device="cpu")
    a, b = (dummy_model(read_config(config_only), "float32", "cpu", seed=3) for _ in range(2))
    c = dummy_model(read_config(config_only), "float32", "cpu", seed=4)
    shapes = {n: p.shape for n, p in real.named_parameters()}
    assert {n: p.shape for n, p in a.named_parameters()} == shapes
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), name
        if name.endswith("layernorm.weight") or name == "norm.weight":
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert not torch.equal(p, r) and 0.015 < float(p.std()) < 0.025, name


def test_an_engine_runs_on_dummy_weights(config_only):
    cfg = load_config(overrides=[f"model.path={config_only}", "model.load_format=dummy", "cache.num_blocks=64"])
    out = LLMEngine(cfg).generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 4 and out[0].text == ""  # no tokenizer.json either: token ids only


def test_dummy_weights_with_offload_or_ray_are_refused():
    for extra in (["offload.enabled=true", "offload.resident_experts_per_layer=2"], ["executor=ray"]):
        with pytest.raises(ConfigError, match="load_format='dummy' reads no checkpoint"):
            load_config(overrides=["model.load_format=dummy", *extra])
