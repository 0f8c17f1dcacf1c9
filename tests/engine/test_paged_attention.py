"""Batched decode attention over shuffled KV pages equals each sequence attended alone."""

from __future__ import annotations

import pytest
import torch
from paged_cases import shuffled_pages

from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.torch_attention import attention, decode_batch

# (context lengths, sliding window)
CASES = (((5, 17, 1, 33), None), ((9, 16, 40), 7), ((2, 3), None))


@pytest.mark.parametrize(("ctx", "window"), CASES)
def test_batched_decode_equals_one_by_one(ctx, window):
    gen = torch.Generator().manual_seed(0)
    H, KVH, Dh, bs = 4, 2, 8, 4
    num_blocks = sum(-(-c // bs) for c in ctx) + 3
    k_cache = torch.randn(num_blocks, bs, KVH, Dh, generator=gen) / 10
    v_cache = torch.randn(num_blocks, bs, KVH, Dh, generator=gen) / 10
    block_tables, slots = shuffled_pages(ctx, bs, num_blocks, gen)
    B = len(ctx)
    q = torch.randn(B, H, Dh, generator=gen)
    k = torch.randn(B, KVH, Dh, generator=gen)
    v = torch.randn(B, KVH, Dh, generator=gen)
    meta = AttentionMetadata(list(range(B + 1)), list(ctx), slots, block_tables)
    caches = (k_cache.clone(), v_cache.clone())
    batched = attention(q, k, v, meta, caches, window)
    assert (decode_batch(meta, bs) is None) == (sum(c > 1 for c in ctx) < 2)
    for b, c in enumerate(ctx):
        one = AttentionMetadata([0, 1], [c], slots[b : b + 1], block_tables[b : b + 1])
        alone = attention(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], one, (k_cache.clone(), v_cache.clone()), window
        )
        torch.testing.assert_close(batched[b], alone[0], atol=1e-6, rtol=0)
