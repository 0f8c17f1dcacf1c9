"""Inputs for the paged-attention kernel tests (tests/kernels/triton/test_paged_decode.py, _prefill.py).

Caches are random in every slot: the kernels only read them, so "new" keys need no writing.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from paged_cases import shuffled_pages

from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.attention_reference import PagedBatch


@dataclass(frozen=True)
class PagedCase:
    name: str
    ctx: tuple[int, ...]  # context_lens after the step; 0 = padding entry
    q_lens: tuple[int, ...]  # new tokens per sequence (decode: 1 each; a padding entry of decode keeps 1)
    heads: tuple[int, int]  # (H, KVH)
    head_dim: int
    block_size: int
    window: int | None = None
    shared: int = 0  # leading pages that sequence 1 reads from sequence 0's table (a common prefix)


@dataclass(frozen=True)
class PagedInputs:
    q: torch.Tensor  # [T + padding rows, H, Dh]
    k_cache: torch.Tensor  # [num_blocks, block_size, KVH, Dh]
    v_cache: torch.Tensor
    batch: PagedBatch  # int32 index tensors
    block_tables: torch.Tensor  # [B, W] int64, as the model's AttentionMetadata holds them


def decode_case(name, ctx, heads, head_dim, block_size, window=None, shared=0) -> PagedCase:
    return PagedCase(name, ctx, (1,) * len(ctx), heads, head_dim, block_size, window, shared)


def make_inputs(case: PagedCase, dtype: torch.dtype, device: str, padding_rows: int = 0) -> PagedInputs:
    """Seeded random q and caches (randn: O(1) scores, so the softmax is not flat), shuffled pages."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    H, KVH = case.heads
    bs, Dh = case.block_size, case.head_dim
    pages = [max(c, 1) for c in case.ctx]  # a padding entry still gets a (never read) page
    num_blocks = sum(-(-c // bs) for c in pages) + 3
    tables, _ = shuffled_pages(pages, bs, num_blocks, gen)  # [B, W]
    if case.shared:
        tables[1, : case.shared] = tables[0, : case.shared]
    k_cache = torch.randn(num_blocks, bs, KVH, Dh, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, bs, KVH, Dh, generator=gen).to(dtype)
    qsl = [0]
    for n in case.q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1] + padding_rows, H, Dh, generator=gen).to(dtype)
    i32 = dict(dtype=torch.int32, device=device)
    batch = PagedBatch(
        block_tables=tables.to(**i32),
        context_lens=torch.tensor(case.ctx, **i32),
        query_start_loc=torch.tensor(qsl, **i32),
        max_query_len=max(case.q_lens),
        sliding_window=case.window,
    )
    to = dict(device=device)
    return PagedInputs(q.to(**to), k_cache.to(**to), v_cache.to(**to), batch, tables.to(**to))


def model_step(x: PagedInputs, case: PagedCase, dtype: torch.dtype) -> tuple[AttentionMetadata, tuple]:
    """The model's view of the same step: metadata with host lists and int64 slots of the new tokens, and
    the new keys and values, random, [T, KVH, Dh] each (`attention` writes them into the cache)."""
    gen = torch.Generator().manual_seed(1)
    qsl = x.batch.query_start_loc.tolist()
    slots = []
    for b, (c, n) in enumerate(zip(case.ctx, case.q_lens, strict=True)):
        for j in range(c - n, c):
            slots.append(int(x.block_tables[b, j // case.block_size]) * case.block_size + j % case.block_size)
    meta = AttentionMetadata(qsl, list(case.ctx), torch.tensor(slots, device=x.q.device), x.block_tables)
    T, KVH, Dh = qsl[-1], case.heads[1], case.head_dim
    k = torch.randn(T, KVH, Dh, generator=gen).to(dtype).to(x.q.device)
    v = torch.randn(T, KVH, Dh, generator=gen).to(dtype).to(x.q.device)
    return meta, (k, v)
