"""The paged KV cache: one (k, v) pool per layer, each [num_blocks, block_size, KVH, Dh].

The number of blocks comes from `cache.num_blocks`, or from `cache.memory_bytes` (default 1 GiB) divided
by the bytes one block takes across all layers.
"""

from __future__ import annotations

import torch

from moe_runtime.config import CacheConfig, ModelConfig
from moe_runtime.errors import ConfigError
from moe_runtime.kernels.attention import KVCache

DEFAULT_MEMORY_BYTES = 1 << 30


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of `block_size` tokens in every layer."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_hidden_layers * block_size * model.num_key_value_heads * model.head_dim * elem


def num_kv_blocks(cache: CacheConfig, model: ModelConfig, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    budget = cache.memory_bytes if cache.memory_bytes is not None else DEFAULT_MEMORY_BYTES
    per_block = bytes_per_block(model, cache.block_size, dtype)
    if budget < per_block:
        raise ConfigError(f"cache.memory_bytes={budget}: too small for one KV block; allowed: >= {per_block}")
    return budget // per_block


def allocate_kv_cache(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[KVCache]:
    """One zeroed (k, v) pair per layer, each [num_blocks, block_size, KVH, Dh]."""
    shape = (num_blocks, block_size, model.num_key_value_heads, model.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model.num_hidden_layers)
    ]
