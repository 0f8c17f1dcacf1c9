"""Paged prefill attention: causal varlen GQA of a flat batch of new tokens over the paged KV cache.

Covers whole prompts, chunked prefill (a chunk attends to the cached chunks before it and to itself) and
mixed batches in which some sequences add one token (decode rows) and others many. The new keys and values
are in the cache already (`kv_write`), so every key is read through the block tables, and two sequences
may share blocks (a common prefix): the cache is only read here.

One program per (sequence, query tile, KV head). A tile packs BLOCK_Q new tokens x the G = H / KVH query
heads that read one KV head into one [BLOCK_Q * G, Dh] tile (row r is token r // G, head r % G), so each
key and value row is loaded once for the whole group. Keys run from the tile's earliest visible key (its
first token's window) to its last token, BLOCK_N at a time, with an fp32 online softmax and a
causal + window mask per row; one rounding at the end.
Reference: `attention_reference.paged_attention_prefill_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.attention_reference import PagedBatch, check_attention_inputs
from moe_runtime.kernels.triton.grouped_gemm1 import dot_precision
from moe_runtime.kernels.triton.paged_decode import LOG2E


@triton.jit
def _paged_prefill_kernel(
    # Pointers
    q_ptr,  # [T, H, Dh]
    k_cache_ptr,  # [num_blocks, block_size, KVH, Dh]
    v_cache_ptr,  # [num_blocks, block_size, KVH, Dh]
    out_ptr,  # [T, H, Dh]
    block_tables_ptr,  # [B, W] int32
    context_lens_ptr,  # [B] int32
    query_start_loc_ptr,  # [B+1] int32
    # Dimensions
    block_size,
    head_dim,
    group,  # G = H // KVH
    window,  # sliding window in keys; W * block_size when there is none (every key is inside)
    qk_scale,  # log2(e) / sqrt(Dh)
    # Strides: how far the pointer moves for one step along a dimension, e.g. stride_qt is one token on.
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    # Meta-parameters
    BLOCK_Q: tl.constexpr,  # new tokens per tile
    BLOCK_G: tl.constexpr,  # G padded to a power of 2; BLOCK_Q * BLOCK_G >= 16 for tl.dot
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,  # Dh padded to a power of 2
    DOT_PRECISION: tl.constexpr,
):
    # -----------------------------------------------------------
    # The grid is sized for the longest query, so tiles past this sequence's new tokens (and padding
    # entries, q_len 0) have nothing to do.
    b = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    ctx = tl.load(context_lens_ptr + b)
    first_pos = ctx - q_len + tile * BLOCK_Q  # position of the tile's first new token

    # -----------------------------------------------------------
    # Rows of the tile are (token, head) pairs, token-major; rows past q_len or past G are never stored.
    offs_r = tl.arange(0, BLOCK_Q * BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    token = tile * BLOCK_Q + offs_r // BLOCK_G  # index among the sequence's new tokens
    g = offs_r % BLOCK_G
    heads = kvh * group + g
    row_mask = (token < q_len) & (g < group)
    d_mask = offs_d < head_dim
    pos = ctx - q_len + token  # [R] each row's position in the sequence
    rows = (q_start + token).to(tl.int64)
    q_ptrs = q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    # -----------------------------------------------------------
    # Keys [lo, hi): from the first token's window start to the last token's own position. A row may
    # see no key of a step (its window starts later), so the running max can stay -inf: exponents are
    # taken against 0 then, which makes every weight 0 instead of NaN.
    lo = tl.maximum(first_pos - window + 1, 0)
    hi = tl.minimum(first_pos + BLOCK_Q, ctx)
    m_i = tl.full((BLOCK_Q * BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q * BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q * BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        block = tl.load(block_tables_ptr + b * stride_bt + offs_n // block_size, mask=n_mask, other=0)
        in_block = offs_n % block_size
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_rows = block.to(tl.int64) * stride_kb + in_block * stride_kt + kvh * stride_kh
        k = tl.load(k_cache_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [R, BLOCK_N]
        visible = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] > pos[:, None] - window)
        s = tl.where(visible & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_rows = block.to(tl.int64) * stride_vb + in_block * stride_vt + kvh * stride_vh
        v = tl.load(v_cache_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # -----------------------------------------------------------
    # Normalize in fp32 and round once. Every stored row saw at least its own key, so l_i > 0 there.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@dataclass(frozen=True)
class PrefillTiles:
    """Launch shape (untuned defaults; GPU numbers are a starting point)."""

    rows: int  # tile rows, BLOCK_Q * BLOCK_G: new tokens x query heads of one KV head
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


GPU_TILES = PrefillTiles(rows=64, block_n=64, num_warps=4, num_stages=2)
INTERPRETER_TILES = PrefillTiles(rows=64, block_n=64, num_warps=1, num_stages=1)


def paged_attention_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch
) -> torch.Tensor:
    """Triton twin of `attention_reference.paged_attention_prefill_reference`.

    q: [T, H, Dh] flat new tokens, sequence b's rows qsl[b]:qsl[b+1] at positions context_lens[b] - q_len
    .. context_lens[b] - 1 (the caller guarantees qsl[B] <= T and q_len <= context_lens[b]: checking would
    sync with the device); k_cache, v_cache: [num_blocks, block_size, KVH, Dh] in q's dtype, already
    holding the new keys and values.
    Returns [T, H, Dh] in q's dtype; rows past qsl[B] (graph padding) are zero.
    Grid: (B, cdiv(batch.max_query_len, BLOCK_Q), KVH), BLOCK_Q = tile rows // G rounded up to a power of 2.
    """
    check_attention_inputs(q, k_cache, v_cache, batch)
    T, H, Dh = q.shape
    block_size, KVH = k_cache.shape[1], k_cache.shape[2]
    if not q.is_cuda and q.dtype == torch.bfloat16:
        # The interpreter holds bf16 as raw uint16 bits, so its arithmetic is wrong (see issue 4).
        raise ValueError("bf16 needs a GPU; under TRITON_INTERPRET=1 use fp32 or fp16")
    out = torch.zeros(T, H, Dh, dtype=q.dtype, device=q.device)  # padding rows stay zero, never NaN
    if out.numel() == 0 or batch.num_seqs == 0 or batch.max_query_len == 0:
        return out
    tiles = GPU_TILES if q.is_cuda else INTERPRETER_TILES
    BLOCK_G = triton.next_power_of_2(H // KVH)
    BLOCK_Q = max(1, tiles.rows // BLOCK_G, 16 // BLOCK_G)
    capacity = batch.block_tables.shape[1] * block_size
    window = batch.sliding_window if batch.sliding_window is not None else capacity
    grid = (batch.num_seqs, triton.cdiv(batch.max_query_len, BLOCK_Q), KVH)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, batch.block_tables, batch.context_lens, batch.query_start_loc,
        block_size, Dh, H // KVH, window, LOG2E / Dh**0.5,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        batch.block_tables.stride(0),
        BLOCK_Q=BLOCK_Q, BLOCK_G=BLOCK_G, BLOCK_N=tiles.block_n, BLOCK_D=triton.next_power_of_2(Dh),
        DOT_PRECISION=dot_precision(q.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out
