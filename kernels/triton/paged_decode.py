"""Paged decode attention: one new token per sequence against its paged context, split over the context.

Two kernels and one launcher in this file (the reduce is a few lines and has no use alone):
`_decode_split_kernel` runs one program per (sequence, KV head, split). It loads the G = H / KVH query
heads of its group as one [G, Dh] tile, so each key and value row is read once for the whole group, and
keeps an online softmax in fp32 over its split's keys. It writes an fp32 partial: the output normalized
by its own softmax sum, and that sum's log-sum-exp (-inf for a split with no keys).
`_decode_reduce_kernel` combines a head's partials by their log-sum-exp and rounds once to q's dtype.

The splits cover the block table's whole width W, not the live contexts, so the grid depends on shapes
only and a CUDA graph captured for one batch size replays for any contexts that fit its block tables;
splits past a context (or before its sliding window) do no work.
Reference: `attention_reference.paged_attention_decode_reference`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.attention_reference import PagedBatch, check_attention_inputs
from moe_runtime.kernels.triton.grouped_gemm1 import dot_precision

LOG2E = 1.4426950408889634  # scores go through exp2: exp(x) = exp2(x * log2(e))


@triton.jit
def _decode_split_kernel(
    # Pointers
    q_ptr,  # [B, H, Dh]
    k_cache_ptr,  # [num_blocks, block_size, KVH, Dh]
    v_cache_ptr,  # [num_blocks, block_size, KVH, Dh]
    block_tables_ptr,  # [B, W] int32
    context_lens_ptr,  # [B] int32
    o_part_ptr,  # [B, H, S, Dh] fp32, contiguous: each split's output over its own keys
    lse_part_ptr,  # [B, H, S] fp32, contiguous: log2 of each split's softmax sum (-inf = no keys)
    # Dimensions
    block_size,
    head_dim,
    group,  # G = H // KVH
    window,  # sliding window in keys; W * block_size when there is none (every key is inside)
    split_len,  # keys per split, a multiple of BLOCK_N
    qk_scale,  # log2(e) / sqrt(Dh)
    # Strides: how far the pointer moves for one step along a dimension, e.g. stride_kt is one slot on.
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    # Meta-parameters
    BLOCK_G: tl.constexpr,  # G padded to a power of 2 >= 16, the smallest tl.dot tile
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,  # Dh padded to a power of 2
    DOT_PRECISION: tl.constexpr,
):
    # -----------------------------------------------------------
    # This program's keys: its split of [0, W * block_size), clipped to the context and to the window
    # of the query at position ctx - 1. An empty range (past the context, padding entry) skips the loop
    # and writes the empty partial.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * group
    num_splits = tl.num_programs(2)
    ctx = tl.load(context_lens_ptr + b)
    lo = tl.maximum(split * split_len, ctx - window)
    hi = tl.minimum((split + 1) * split_len, ctx)

    # -----------------------------------------------------------
    # The group's query heads as rows of one tile; rows past G are zero and never stored.
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    heads = kvh * group + offs_g
    q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    # -----------------------------------------------------------
    # Online softmax over BLOCK_N keys at a time, each key found through the block table. Every step
    # has at least one live key (start < hi), so the running max is finite after the first.
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        block = tl.load(block_tables_ptr + b * stride_bt + offs_n // block_size, mask=n_mask, other=0)
        in_block = offs_n % block_size
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_rows = block.to(tl.int64) * stride_kb + in_block * stride_kt + kvh * stride_kh
        k = tl.load(k_cache_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_rows = block.to(tl.int64) * stride_vb + in_block * stride_vt + kvh * stride_vh
        v = tl.load(v_cache_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # -----------------------------------------------------------
    # The partial, still fp32: output over this split's keys and the log2 of its softmax sum.
    live = l_i > 0
    o = tl.where(live[:, None], acc / tl.where(live, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)), float("-inf"))
    part = (b * num_heads + heads) * num_splits + split  # [BLOCK_G] rows of [B, H, S]
    o_mask = g_mask[:, None] & d_mask[None, :]
    tl.store(o_part_ptr + part[:, None] * head_dim + offs_d[None, :], o, mask=o_mask)
    tl.store(lse_part_ptr + part, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    # Pointers
    o_part_ptr,  # [B, H, S, Dh] fp32, contiguous
    lse_part_ptr,  # [B, H, S] fp32, contiguous
    out_ptr,  # [B, H, Dh]
    # Dimensions
    num_splits,
    head_dim,
    # Strides
    stride_ob,
    stride_oh,
    # Meta-parameters
    BLOCK_S: tl.constexpr,  # splits padded to a power of 2
    BLOCK_D: tl.constexpr,
):
    # -----------------------------------------------------------
    # Weight each split by exp2(lse - max lse); a padding entry has no live split and gets zeros.
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < head_dim
    lse = tl.load(lse_part_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # [BLOCK_S], 0 for empty splits
    o_ptrs = o_part_ptr + (row * num_splits + offs_s[:, None]) * head_dim + offs_d[None, :]
    o = tl.load(o_ptrs, mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(w, axis=0)

    # -----------------------------------------------------------
    # One rounding to the output dtype.
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@dataclass(frozen=True)
class DecodeTiles:
    """Launch shape of the split kernel (untuned defaults; GPU numbers are a starting point)."""

    block_n: int  # keys per inner step
    min_split_tiles: int  # a split spans at least this many steps of block_n keys
    num_warps: int


GPU_TILES = DecodeTiles(block_n=64, min_split_tiles=4, num_warps=4)  # splits of >= 256 keys
# The interpreter's cost is per step, not per key: long steps, and short splits so tests reach the reduce.
INTERPRETER_TILES = DecodeTiles(block_n=64, min_split_tiles=1, num_warps=1)
INTERPRETER_SMS = 4  # a pretend device: a few programs of a test still split
MAX_SPLITS = 32
WAVES = 2  # programs per SM the split count aims for


class Splits(NamedTuple):
    count: int  # S, splits per (sequence, KV head)
    keys: int  # keys per split, a multiple of block_n; count * keys >= capacity


def num_splits(capacity: int, programs: int, num_sms: int, tiles: DecodeTiles) -> Splits:
    """How to split the key range [0, capacity) of every sequence: a pure function of shapes and device.

    capacity: W * block_size, the longest context the block tables hold. programs: B * KVH before
    splitting. Aims for WAVES programs per SM (more splits for small batches), at most MAX_SPLITS, each
    split at least `tiles.min_split_tiles` steps long, and no split wholly past the capacity.

    Example (H200, 132 SMs; one sequence with 8 KV heads, 4096 keys of block table; then 64 sequences):
        >>> num_splits(capacity=4096, programs=8, num_sms=132, tiles=GPU_TILES)
        Splits(count=16, keys=256)
        >>> num_splits(capacity=4096, programs=512, num_sms=132, tiles=GPU_TILES)
        Splits(count=1, keys=4096)
    """
    steps = triton.cdiv(max(capacity, 1), tiles.block_n)
    wanted = triton.cdiv(WAVES * num_sms, max(programs, 1))
    count = max(1, min(wanted, MAX_SPLITS, steps // tiles.min_split_tiles))
    steps_per_split = triton.cdiv(steps, count)
    return Splits(count=triton.cdiv(steps, steps_per_split), keys=steps_per_split * tiles.block_n)


@functools.cache
def _num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device, looked up once (every layer of every step asks)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def paged_attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch
) -> torch.Tensor:
    """Triton twin of `attention_reference.paged_attention_decode_reference`.

    q: [B, H, Dh], row b the newest token of sequence b at position context_lens[b] - 1;
    k_cache, v_cache: [num_blocks, block_size, KVH, Dh] in q's dtype; batch: block_tables [B, W],
    context_lens [B] (0 = padding entry, output zeros) and sliding_window (query_start_loc unused).
    Returns [B, H, Dh] in q's dtype: fp32 softmax and accumulation, one rounding. Never syncs with the
    host; the grid is (B, KVH, splits) with splits from `num_splits`, then (B, H) for the reduce.
    """
    check_attention_inputs(q, k_cache, v_cache, batch)
    B, H, Dh = q.shape
    block_size, KVH = k_cache.shape[1], k_cache.shape[2]
    if B != batch.num_seqs:
        raise ValueError(f"q has {B} rows for {batch.num_seqs} sequences: decode takes one row each")
    if not q.is_cuda and q.dtype == torch.bfloat16:
        # The interpreter holds bf16 as raw uint16 bits, so its arithmetic is wrong (see issue 4).
        raise ValueError("bf16 needs a GPU; under TRITON_INTERPRET=1 use fp32 or fp16")
    out = torch.empty(B, H, Dh, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    capacity = batch.block_tables.shape[1] * block_size
    if q.is_cuda:
        tiles, sms = GPU_TILES, _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device())
    else:
        tiles, sms = INTERPRETER_TILES, INTERPRETER_SMS
    splits = num_splits(capacity, B * KVH, sms, tiles)
    o_part = torch.empty(B, H, splits.count, Dh, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, H, splits.count, dtype=torch.float32, device=q.device)
    window = batch.sliding_window if batch.sliding_window is not None else capacity
    BLOCK_D = triton.next_power_of_2(Dh)
    _decode_split_kernel[(B, KVH, splits.count)](
        q, k_cache, v_cache, batch.block_tables, batch.context_lens, o_part, lse_part,
        block_size, Dh, H // KVH, window, splits.keys, LOG2E / Dh**0.5,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        batch.block_tables.stride(0),
        BLOCK_G=max(16, triton.next_power_of_2(H // KVH)), BLOCK_N=tiles.block_n, BLOCK_D=BLOCK_D,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=tiles.num_warps,
    )  # fmt: skip
    _decode_reduce_kernel[(B, H)](
        o_part, lse_part, out, splits.count, Dh, out.stride(0), out.stride(1),
        BLOCK_S=triton.next_power_of_2(splits.count), BLOCK_D=BLOCK_D, num_warps=1,
    )  # fmt: skip
    return out
