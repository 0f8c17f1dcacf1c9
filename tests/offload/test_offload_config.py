"""`offload:` config validation: every error names the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from moe_runtime.checkpoint.layout import expert_bytes
from moe_runtime.config import ModelConfig, OffloadConfig, load_config
from moe_runtime.errors import ConfigError
from moe_runtime.presets.configs import preset_config

TINY = ModelConfig.from_hf(preset_config("tiny"))  # 2 layers, 8 experts, top-2, D 128, I 256
EXPERT_BYTES_FP32 = expert_bytes(TINY, "float32")

BAD_YAML = (
    (["offload.enabled=true"], "needs a budget"),
    (["offload.resident_experts_per_layer=2", "offload.device_memory_bytes=1GiB"], "not both"),
    (["offload.policy=fifo"], "offload.policy='fifo'"),
    (["offload.miss=never"], "offload.miss='never'"),
    (["offload.host_tier=disk"], "offload.host_tier='disk'"),
    (["offload.resident_experts_per_layer=0"], "offload.resident_experts_per_layer=0"),
    (["offload.device_memory_bytes=lots"], "2GiB"),
    (["offload.prefetch_experts=0"], "offload.prefetch_experts=0"),
    (["offload.cache=lru"], "offload.cache: unknown key; allowed: ['device_memory_bytes', 'enabled'"),
)


@pytest.mark.parametrize("overrides,message", BAD_YAML)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)


def test_defaults_and_units():
    assert load_config().offload.enabled is False
    cfg = load_config(overrides=["offload.enabled=true", "offload.device_memory_bytes=2MiB"]).offload
    assert cfg.device_memory_bytes == 2 * 1024 * 1024
    assert (cfg.policy, cfg.prefetch, cfg.miss, cfg.host_tier) == ("lru", True, "auto", "pinned")


def test_slots_below_the_minimum_name_it():
    with pytest.raises(ConfigError, match=r"resident_experts_per_layer=1: below the minimum 2 .*allowed: 2\.\.8"):
        OffloadConfig(enabled=True, resident_experts_per_layer=1).resolve_slots(TINY, EXPERT_BYTES_FP32)


def test_memory_below_the_minimum_names_the_bytes():
    minimum = 2 * 2 * EXPERT_BYTES_FP32  # 2 layers x top-2 experts
    with pytest.raises(ConfigError, match=f"below the minimum 2 .*at least {minimum} bytes"):
        OffloadConfig(enabled=True, device_memory_bytes=minimum - 1).resolve_slots(TINY, EXPERT_BYTES_FP32)
    assert OffloadConfig(enabled=True, device_memory_bytes=minimum).resolve_slots(TINY, EXPERT_BYTES_FP32) == 2


def test_budget_above_all_experts_is_capped():
    assert OffloadConfig(enabled=True, resident_experts_per_layer=100).resolve_slots(TINY, EXPERT_BYTES_FP32) == 8
    assert OffloadConfig(enabled=True, device_memory_bytes=10**12).resolve_slots(TINY, EXPERT_BYTES_FP32) == 8
