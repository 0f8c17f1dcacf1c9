"""`attention_fp32` (decode rows in fp32 matmuls, the CPU fast path) against SDPA (`attention`).

Same inputs, fp32 arithmetic on both sides for fp32 tensors: equal within fp32 rounding (atol 1e-5).
bf16 tensors: `attention_fp32` rounds an fp32 result once, SDPA accumulates in fp32 too, so they agree
within one bf16 ulp of outputs below 1 (atol 2**-8). Covers batched decode over shuffled pages (with and
without a sliding window), a single decoding sequence, and prefill rows (which stay on SDPA).
"""

from __future__ import annotations

import pytest
import torch
from paged_cases import shuffled_pages

from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.torch_attention import attention, attention_fp32

H, KVH, Dh, BS = 6, 2, 8, 4
# (context lengths of the decoding sequences, sliding window)
CASES = (((5, 17, 1, 33), None), ((9, 16, 40), 7), ((12,), None), ((30,), 5))
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8}


def _paged_step(ctx: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    """One decode step: each sequence adds its last token to a context of c tokens in shuffled pages."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // BS) for c in ctx) + 3
    k_cache = (torch.randn(num_blocks, BS, KVH, Dh, generator=gen) / 2).to(dtype)
    v_cache = (torch.randn(num_blocks, BS, KVH, Dh, generator=gen) / 2).to(dtype)
    block_tables, slots = shuffled_pages(ctx, BS, num_blocks, gen)
    B = len(ctx)
    q, k, v = (torch.randn(B, h, Dh, generator=gen).to(dtype) for h in (H, KVH, KVH))
    meta = AttentionMetadata(list(range(B + 1)), list(ctx), slots, block_tables)
    return q, k, v, meta, (k_cache, v_cache)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize(("ctx", "window"), CASES)
def test_decode_matches_sdpa(ctx, window, dtype):
    q, k, v, meta, (kc, vc) = _paged_step(ctx, dtype)
    want = attention(q, k, v, meta, (kc.clone(), vc.clone()), window)
    got = attention_fp32(q, k, v, meta, (kc.clone(), vc.clone()), window)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("window", (None, 3))
def test_prefill_rows_stay_on_sdpa(window):
    """Whole prompts (several query rows) take SDPA in both: the same bits."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(9, h, Dh, generator=gen).bfloat16() for h in (H, KVH, KVH))
    meta = AttentionMetadata.for_prompts([4, 5])
    assert torch.equal(attention_fp32(q, k, v, meta, None, window), attention(q, k, v, meta, None, window))
