"""KV cache sizing: given blocks or bytes, else max_num_seqs full contexts capped by the device's free memory."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import ModelConfig, load_config
from moe_runtime.engine import kv_cache
from moe_runtime.engine.kv_cache import REMOTE_CACHE_BYTES, bytes_per_block, free_memory_bytes, num_kv_blocks
from moe_runtime.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_model_dir)


def test_tiny_block_bytes(tiny):
    # 2 (K, V) x 2 layers x 16 tokens x 2 KV heads x 32 dims x 4 bytes: 1 KiB per token
    assert bytes_per_block(tiny, 16, torch.float32) == 16 * 1024


def test_given_sizes_win(tiny):
    assert num_kv_blocks(load_config(overrides=["cache.num_blocks=7"]), tiny, torch.float32, CPU) == 7
    assert num_kv_blocks(load_config(overrides=["cache.memory_bytes=1MiB"]), tiny, torch.float32, CPU) == 64
    with pytest.raises(ConfigError, match=r"cache\.memory_bytes=100: too small for one KV block; allowed: >= 16384"):
        num_kv_blocks(load_config(overrides=["cache.memory_bytes=100"]), tiny, torch.float32, CPU)


def test_default_holds_max_num_seqs_full_contexts(tiny, monkeypatch):
    monkeypatch.setattr(kv_cache, "free_memory_bytes", lambda device: 64 * 2**30)
    # 64 sequences x 4096 tokens / 16 per block: 256 MiB for the tiny model, not the old fixed 1 GiB
    assert num_kv_blocks(load_config(), tiny, torch.float32, CPU) == 64 * 256
    cfg = load_config(overrides=["engine.max_num_seqs=4", "engine.max_model_len=100"])
    assert num_kv_blocks(cfg, tiny, torch.float32, CPU) == 4 * 7  # ceil(100 / 16) blocks per sequence


def test_default_is_capped_by_free_memory(tiny, monkeypatch, caplog):
    monkeypatch.setattr(kv_cache, "free_memory_bytes", lambda device: 32 * 2**20)
    with caplog.at_level("INFO"):
        blocks = num_kv_blocks(load_config(), tiny, torch.float32, CPU)
    assert blocks == 16 * 2**20 // (16 * 1024)  # half of the host's 32 MiB
    assert "capped at 50% of the free cpu memory" in caplog.text
    monkeypatch.setattr(kv_cache, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(ConfigError, match="holds no KV block"):
        num_kv_blocks(load_config(), tiny, torch.float32, CPU)


def test_default_in_other_processes_is_capped_at_a_fixed_size(tiny):
    cfg = load_config(overrides=["engine.max_num_seqs=4096"])
    assert num_kv_blocks(cfg, tiny, torch.float32, None) == REMOTE_CACHE_BYTES // (16 * 1024)


def test_free_memory_is_read_from_the_host():
    assert 0 < free_memory_bytes(CPU)
