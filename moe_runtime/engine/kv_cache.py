"""The paged KV cache: one (k, v) pool per layer, each [num_blocks, block_size, KVH, Dh].

Its size in blocks: `cache.num_blocks`; or `cache.memory_bytes` divided by the bytes one block takes across
all layers; or by default what the scheduler can ever use, `engine.max_num_seqs` full contexts of
`max_model_len` tokens, capped at a share of the memory free on the cache's device once the weights are
loaded. The embedded tiny model (1 KiB of KV per token) so gets 64 x 4096 tokens = 256 MiB; a large model
on a small host gets what fits.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.errors import ConfigError
from moe_runtime.kernels.attention import KVCache

log = logging.getLogger(__name__)

# Share of the free memory the default may take. A host's memory is shared with everything else on it; a
# GPU is the server's own, and what the default leaves there goes to activations and CUDA graphs.
FREE_MEMORY_SHARE = {"cpu": 0.5, "cuda": 0.8}
# The cap when the cache lives in other processes (Ray workers), whose free memory the driver cannot read.
REMOTE_CACHE_BYTES = 1 << 30


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of `block_size` tokens in every layer."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_hidden_layers * block_size * model.num_key_value_heads * model.head_dim * elem


def num_kv_blocks(cfg: RuntimeConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device | None) -> int:
    """Blocks in each layer's pool (module docstring). `device` holds the cache, None when other processes
    hold it (then the default is capped at `REMOTE_CACHE_BYTES`)."""
    cache = cfg.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = bytes_per_block(model, cache.block_size, dtype)
    if cache.memory_bytes is not None:
        if cache.memory_bytes < per_block:
            raise ConfigError(f"cache.memory_bytes={cache.memory_bytes}: too small for one KV block; allowed: "
                              f">= {per_block}")
        return cache.memory_bytes // per_block
    max_len = cfg.engine.max_model_len or model.max_position_embeddings
    per_seq = math.ceil(max_len / cache.block_size)
    wanted = cfg.engine.max_num_seqs * per_seq
    if device is None:
        cap, source = REMOTE_CACHE_BYTES, "the default for caches in other processes"
    else:
        share = FREE_MEMORY_SHARE.get(device.type, FREE_MEMORY_SHARE["cpu"])
        cap, source = int(share * free_memory_bytes(device)), f"{share:.0%} of the free {device.type} memory"
    blocks = min(wanted, cap // per_block)
    if blocks == 0:
        raise ConfigError(f"cache: {source} ({cap} bytes) holds no KV block of {per_block} bytes; set "
                          "cache.num_blocks or cache.memory_bytes, or free memory")
    why = (f"room for {cfg.engine.max_num_seqs} sequences x {max_len} tokens (engine.max_num_seqs x max_model_len)"
           if blocks == wanted else f"capped at {source}; {cfg.engine.max_num_seqs} full contexts would take "
           f"{wanted * per_block / 2**30:.1f} GiB")
    log.info("KV cache: %d blocks of %d tokens, %.0f MiB, %s; cache.num_blocks or cache.memory_bytes sets it",
             blocks, cache.block_size, blocks * per_block / 2**20, why)
    if blocks < per_seq:
        log.warning("KV cache holds %d tokens, less than one full context of %d: long requests will be refused",
                    blocks * cache.block_size, max_len)
    return blocks


def free_memory_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on `device`: the GPU's free memory, or the host's MemAvailable
    (free pages plus the page cache the kernel would give back)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # no /proc (macOS): free pages only


def allocate_kv_cache(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[KVCache]:
    """One zeroed (k, v) pair per layer, each [num_blocks, block_size, KVH, Dh]."""
    shape = (num_blocks, block_size, model.num_key_value_heads, model.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model.num_hidden_layers)
    ]
