"""KV write: copy a step's new keys and values into their slots of the paged KV cache.

One program per token copies its [KVH, Dh] key and value rows; a negative slot marks a padding row (a
batch padded for a captured CUDA graph) and is skipped. A plain copy, so the cache holds exactly k and v.
`rope_kv_write.py` does the same after rotating q and k, in one launch.
Reference: `attention_reference.kv_write_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.attention_reference import KVCache, check_kv_write_inputs


@triton.jit
def _kv_write_kernel(
    # Pointers
    k_ptr,  # [T, KVH, Dh]
    v_ptr,  # [T, KVH, Dh]
    k_cache_ptr,  # [num_blocks, block_size, KVH, Dh]
    v_cache_ptr,  # [num_blocks, block_size, KVH, Dh]
    slot_mapping_ptr,  # [T] int32 or int64, slot = block * block_size + offset; < 0 = skip
    # Dimensions
    num_kv_heads,
    head_dim,
    block_size,
    # Strides: how far the pointer moves for one step along a dimension, e.g. stride_kt is one token on.
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    # Meta-parameters
    BLOCK_H: tl.constexpr,  # KVH padded to a power of 2
    BLOCK_D: tl.constexpr,  # Dh padded to a power of 2
):
    # -----------------------------------------------------------
    # This token's slot; padding rows write nothing.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    in_block = slot % block_size

    # -----------------------------------------------------------
    # Copy the [KVH, Dh] rows of k and of v.
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < head_dim)[None, :]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + in_block * stride_kct + offs_h[:, None] * stride_kch
    v_dst = v_cache_ptr + block * stride_vcb + in_block * stride_vct + offs_h[:, None] * stride_vch
    tl.store(k_dst + offs_d[None, :], k, mask=mask)
    tl.store(v_dst + offs_d[None, :], v, mask=mask)


def kv_write(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Triton twin of `attention_reference.kv_write_reference`: k, v [T, KVH, Dh] into kv_cache = (k_cache,
    v_cache) [num_blocks, block_size, KVH, Dh] at slot_mapping [T] (< 0: skip), in place. Grid: (T,)."""
    check_kv_write_inputs(k, v, kv_cache, slot_mapping)
    k_cache, v_cache = kv_cache
    T, KVH, Dh = k.shape
    if T == 0:
        return
    _kv_write_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        KVH, Dh, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_H=triton.next_power_of_2(KVH), BLOCK_D=triton.next_power_of_2(Dh),
        num_warps=4,
    )  # fmt: skip
