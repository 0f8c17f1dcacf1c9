"""RoPE + KV write: rotate q and k in place (rotate-half layout) and write k, v into the paged cache.

One launch where torch takes about a dozen (chunk, neg, cat, two multiplies and an add for each of q and
k, then two index copies). One program per token: it loads the token's cos and sin once for all its
query and key heads. The arithmetic is the model's `apply_rotary` step for step in the activation dtype:
each product is rounded to the dtype, then their sum, and no product is fused into an add (the launch
turns FMA contraction off), so the result is torch's bit for bit. Same skip rule as `kv_write`.
Reference: `attention_reference.rope_kv_write_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.attention_reference import KVCache, check_kv_write_inputs


@triton.jit
def _rotate(x1, x2, c, s):
    """x1 * c + x2 * s with torch's rounding points: each product, then the sum, in x1's dtype. The first
    half of rotate-half RoPE is _rotate(x1, -x2, cos1, sin1), the second _rotate(x2, x1, cos2, sin2)."""
    dt = x1.dtype
    a = (x1.to(tl.float32) * c.to(tl.float32)).to(dt)
    b = (x2.to(tl.float32) * s.to(tl.float32)).to(dt)
    return (a.to(tl.float32) + b.to(tl.float32)).to(dt)


@triton.jit
def _rope_kv_write_kernel(
    # Pointers
    q_ptr,  # [T, H, Dh], rotated in place
    k_ptr,  # [T, KVH, Dh], rotated in place
    v_ptr,  # [T, KVH, Dh]
    cos_ptr,  # [T, Dh]
    sin_ptr,  # [T, Dh]
    k_cache_ptr,  # [num_blocks, block_size, KVH, Dh]
    v_cache_ptr,  # [num_blocks, block_size, KVH, Dh]
    slot_mapping_ptr,  # [T] int32 or int64, slot = block * block_size + offset; < 0 = skip the write
    # Dimensions
    num_heads,
    num_kv_heads,
    half,  # Dh / 2
    block_size,
    # Strides: how far the pointer moves for one step along a dimension, e.g. stride_qt is one token on.
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    # Meta-parameters
    BLOCK_HQ: tl.constexpr,  # H padded to a power of 2
    BLOCK_HK: tl.constexpr,  # KVH padded to a power of 2
    BLOCK_HALF: tl.constexpr,  # Dh / 2 padded to a power of 2
):
    # -----------------------------------------------------------
    # This token's cos and sin, as the two halves that multiply each half of a head.
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    half_mask = offs < half
    cos1 = tl.load(cos_ptr + t * stride_cos + offs, mask=half_mask)[None, :]
    cos2 = tl.load(cos_ptr + t * stride_cos + half + offs, mask=half_mask)[None, :]
    sin1 = tl.load(sin_ptr + t * stride_sin + offs, mask=half_mask)[None, :]
    sin2 = tl.load(sin_ptr + t * stride_sin + half + offs, mask=half_mask)[None, :]

    # -----------------------------------------------------------
    # q in place: out = x * cos + cat(-x2, x1) * sin, one half at a time.
    offs_hq = tl.arange(0, BLOCK_HQ)
    q_mask = (offs_hq < num_heads)[:, None] & half_mask[None, :]
    q1_ptrs = q_ptr + t * stride_qt + offs_hq[:, None] * stride_qh + offs[None, :]
    q1 = tl.load(q1_ptrs, mask=q_mask)
    q2 = tl.load(q1_ptrs + half, mask=q_mask)
    tl.store(q1_ptrs, _rotate(q1, -q2, cos1, sin1), mask=q_mask)
    tl.store(q1_ptrs + half, _rotate(q2, q1, cos2, sin2), mask=q_mask)

    # -----------------------------------------------------------
    # k in place, the same way.
    offs_hk = tl.arange(0, BLOCK_HK)
    kv_mask = (offs_hk < num_kv_heads)[:, None] & half_mask[None, :]
    k1_ptrs = k_ptr + t * stride_kt + offs_hk[:, None] * stride_kh + offs[None, :]
    x1 = tl.load(k1_ptrs, mask=kv_mask)
    x2 = tl.load(k1_ptrs + half, mask=kv_mask)
    k1 = _rotate(x1, -x2, cos1, sin1)
    k2 = _rotate(x2, x1, cos2, sin2)
    tl.store(k1_ptrs, k1, mask=kv_mask)
    tl.store(k1_ptrs + half, k2, mask=kv_mask)

    # -----------------------------------------------------------
    # The rotated k and the untouched v go to this token's cache slot, unless it is padding.
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        in_block = slot % block_size
        kc_ptrs = k_cache_ptr + block * stride_kcb + in_block * stride_kct + offs_hk[:, None] * stride_kch
        tl.store(kc_ptrs + offs[None, :], k1, mask=kv_mask)
        tl.store(kc_ptrs + half + offs[None, :], k2, mask=kv_mask)
        v_ptrs = v_ptr + t * stride_vt + offs_hk[:, None] * stride_vh + offs[None, :]
        vc_ptrs = v_cache_ptr + block * stride_vcb + in_block * stride_vct + offs_hk[:, None] * stride_vch
        tl.store(vc_ptrs + offs[None, :], tl.load(v_ptrs, mask=kv_mask), mask=kv_mask)
        tl.store(vc_ptrs + half + offs[None, :], tl.load(v_ptrs + half, mask=kv_mask), mask=kv_mask)


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv_cache: KVCache,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton twin of `attention_reference.rope_kv_write_reference`, in place.

    q: [T, H, Dh]; k, v: [T, KVH, Dh] (any token and head strides, unit stride along Dh, Dh even);
    rope: (cos, sin) [T, Dh] in q's dtype, as `RotaryEmbedding` returns them; kv_cache: (k_cache, v_cache)
    [num_blocks, block_size, KVH, Dh]; slot_mapping: [T] int32/int64, < 0 = padding row (rotated, not
    written). Afterwards q and k hold `apply_rotary(q, cos, sin)`, `apply_rotary(k, cos, sin)` bit for bit,
    and the cache holds the rotated k and v. Grid: (T,).
    """
    check_kv_write_inputs(k, v, kv_cache, slot_mapping)
    cos, sin = rope
    T, KVH, Dh = k.shape
    if q.dim() != 3 or q.shape[0] != T or q.shape[2] != Dh or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q must be [T={T}, H, Dh={Dh}] {k.dtype} on {k.device}, "
                         f"got {tuple(q.shape)} {q.dtype} on {q.device}")  # fmt: skip
    if Dh % 2:
        raise ValueError(f"rotate-half RoPE needs an even head dim, got Dh={Dh}")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.shape != (T, Dh) or x.dtype != q.dtype or x.device != q.device or x.stride(-1) != 1:
            raise ValueError(f"rope {name} must be [T={T}, Dh={Dh}] {q.dtype} on {q.device} with unit stride "
                             f"along Dh, got {tuple(x.shape)} {x.dtype} on {x.device}")  # fmt: skip
    if q.stride(-1) != 1:
        raise ValueError("q needs unit stride along Dh")
    if not q.is_cuda and q.dtype == torch.bfloat16:
        # The interpreter holds bf16 as raw uint16 bits, so its arithmetic is wrong (see issue 4).
        raise ValueError("bf16 needs a GPU; under TRITON_INTERPRET=1 use fp32 or fp16")
    if T == 0:
        return
    k_cache, v_cache = kv_cache
    _rope_kv_write_kernel[(T,)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q.shape[1], KVH, Dh // 2, k_cache.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(KVH),
        BLOCK_HALF=triton.next_power_of_2(Dh // 2),
        num_warps=4, enable_fp_fusion=False,  # torch rounds each product before the add
    )  # fmt: skip
