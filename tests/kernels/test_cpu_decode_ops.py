"""The native decode ops (kernels/cpu: rms_norm, attention_decode, moe_decode) against the model's torch ops.

Each op rounds where the model's torch composition rounds and differs only in summation order, so:
- whatever the op computes with one rounding from exact inputs is held exactly (the residual add, the KV
  cache rows that nothing else writes, the router counts);
- 16-bit outputs within atol 2e-2 of the torch composition with values of order 1 (STYLE.md's 16-bit
  kernel tolerance), which allows one or two 16-bit ulps where a GEMM's sum lands near a rounding edge.
"""

from __future__ import annotations

import pytest
import torch
from paged_cases import shuffled_pages

from moe_runtime.config import ModelConfig
from moe_runtime.kernels import cpu
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.reference import fused_moe_reference_fp32, route_reference
from moe_runtime.model.layers import Attention, RMSNorm, RotaryEmbedding
from moe_runtime.model.parts import ModelParts
from moe_runtime.presets.configs import preset_config

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")

DTYPES = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# rms_norm


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float32))
def test_rms_norm_matches_the_module(dtype):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, eps=1e-5, kernel="torch").to(dtype)
    norm.weight.copy_(torch.rand(96, generator=gen) + 0.5)
    x = (torch.randn(5, 96, generator=gen) * 3).to(dtype)
    got = cpu.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), norm(x).float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_adds_the_residual_in_place_first(dtype):
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(64, eps=1e-6, kernel="torch").to(dtype)
    h = torch.randn(3, 64, generator=gen).to(dtype)
    x = torch.randn(3, 64, generator=gen).to(dtype)
    want_h = h + x  # the model's `h = h + block(h)`, one rounding
    got = cpu.rms_norm(x, norm.weight, norm.eps, residual=h)
    assert torch.equal(h, want_h)
    torch.testing.assert_close(got.float(), norm(want_h).float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_scalar_fallback_matches_avx2(dtype):
    """`simd=False` (any CPU): the same residual bits, the norm within the sum-of-squares order."""
    gen = torch.Generator().manual_seed(2)
    w = (torch.rand(128, generator=gen) + 0.5).to(dtype)
    x = torch.randn(4, 128, generator=gen).to(dtype)
    h = torch.randn(4, 128, generator=gen).to(dtype)
    h2 = h.clone()
    fast = cpu.extension().rms_norm(x, w, 1e-5, h, simd=True)
    slow = cpu.extension().rms_norm(x, w, 1e-5, h2, simd=False)
    assert torch.equal(h, h2)
    torch.testing.assert_close(fast.float(), slow.float(), atol=2e-2, rtol=1e-2)


def test_rms_norm_rejects_mismatched_inputs():
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"x \[T, D\] and w \[D\] expected"):
        cpu.rms_norm(x, torch.ones(4, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="residual must be a contiguous"):
        cpu.rms_norm(
            x, torch.ones(8, dtype=torch.bfloat16), 1e-5, residual=torch.zeros(3, 8, dtype=torch.bfloat16)
        )


# ---------------------------------------------------------------------------------------------------------
# attention_decode


def _attention_case(dtype, sliding_window=None, ctx=(1, 7, 16, 40), block_size=8, seed=0, **heads):
    """An `Attention` module (tiny preset's heads unless `heads` overrides them: 4 over 2 KV heads of 32)
    with random weights, and one decode token per sequence over a paged cache whose earlier rows hold
    random keys and values."""
    gen = torch.Generator().manual_seed(seed)
    cfg = ModelConfig.from_hf(preset_config("tiny", sliding_window=sliding_window, **heads))
    attn = Attention(cfg, ModelParts(attention="cpu")).to(dtype).requires_grad_(False)  # fp32 decode attention
    for p in attn.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    T, Dh, KVH = len(ctx), cfg.head_dim, cfg.num_key_value_heads
    num_blocks = sum(-(-c // block_size) for c in ctx) + 3
    # [T, W] and [T]: each sequence's pages in no particular order, the slot of its newest token
    tables, slots = shuffled_pages(ctx, block_size, num_blocks, gen)
    k_cache = torch.randn(num_blocks, block_size, KVH, Dh, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, KVH, Dh, generator=gen).to(dtype)
    meta = AttentionMetadata(list(range(T + 1)), list(ctx), slots, tables)
    x = torch.randn(T, cfg.hidden_size, generator=gen).to(dtype)
    cos, sin = RotaryEmbedding(Dh, cfg.rope_theta)(torch.tensor(ctx) - 1, dtype)  # [T, Dh]
    return attn, x, cos, sin, k_cache, v_cache, meta


def _native(attn, x, cos, sin, k_cache, v_cache, meta):
    return cpu.attention_decode(
        x, attn.qkv_proj.weight, attn.o_proj.weight, cos, sin, k_cache, v_cache, meta.slot_mapping, meta.block_tables,
        torch.tensor(meta.context_lens), attn.n_heads, attn.n_kv_heads, attn.sliding_window,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sliding_window", (None, 5))
def test_attention_decode_matches_the_module(dtype, sliding_window):
    attn, x, cos, sin, k_cache, v_cache, meta = _attention_case(dtype, sliding_window)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = attn(x, (cos, sin), meta, (k_ref, v_ref))  # [T, D]: torch ops, attention_fp32
    got = _native(attn, x, cos, sin, k_cache, v_cache, meta)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool).view(-1)
    written[meta.slot_mapping] = True
    flat = (k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:]))
    flat_ref = (k_ref.view(-1, *k_ref.shape[2:]), v_ref.view(-1, *v_ref.shape[2:]))
    for got_c, want_c in zip(flat, flat_ref, strict=True):
        assert torch.equal(got_c[~written], want_c[~written])  # nothing else written
        torch.testing.assert_close(got_c[written].float(), want_c[written].float(), atol=2e-2, rtol=0)


# Query heads per KV head 1, 2, 3, 4, 5, 6, 8 (the kernel takes a group's rows four at a time, then 3, 2
# or 1), head dims with and without a tail of 8 after whole 16s, contexts shorter and longer than the keys
# it prefetches ahead (8), not multiples of 8 (the vectorized exp's tail).
@pytest.mark.parametrize(
    "n_heads, n_kv_heads, head_dim",
    [(2, 2, 8), (4, 2, 24), (12, 4, 32), (8, 2, 64), (10, 2, 24), (12, 2, 40), (16, 2, 16), (4, 1, 128)],
)
def test_attention_decode_head_layouts(n_heads, n_kv_heads, head_dim):
    heads = dict(num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim)
    attn, x, cos, sin, k_cache, v_cache, meta = _attention_case(torch.float16, ctx=(1, 9, 57, 130), **heads)
    want = attn(x, (cos, sin), meta, (k_cache.clone(), v_cache.clone()))  # [T, D]
    got = _native(attn, x, cos, sin, k_cache, v_cache, meta)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)


def test_attention_decode_reads_only_the_context():
    """Rows past a sequence's context (and other sequences' pages) do not change its output."""
    attn, x, cos, sin, k_cache, v_cache, meta = _attention_case(torch.bfloat16, ctx=(3, 9))
    before = _native(attn, x, cos, sin, k_cache.clone(), v_cache.clone(), meta)
    tables, block_size = meta.block_tables, k_cache.shape[1]
    k2, v2 = k_cache.clone(), v_cache.clone()
    for t, c in enumerate(meta.context_lens):
        last = tables[t, (c - 1) // block_size]
        k2[last, c % block_size or block_size :] = 99.0  # the tail of its last page
        v2[last, c % block_size or block_size :] = -99.0
    assert torch.equal(_native(attn, x, cos, sin, k2, v2, meta), before)


def test_attention_decode_rejects_bad_metadata():
    attn, x, cos, sin, k_cache, v_cache, meta = _attention_case(torch.bfloat16, ctx=(3, 9))
    bad_slots = AttentionMetadata(
        meta.query_start_loc, meta.context_lens, torch.tensor([0, 10_000]), meta.block_tables
    )
    with pytest.raises(RuntimeError, match=r"slot 10000 of token 1 outside the cache's \d+ slots"):
        _native(attn, x, cos, sin, k_cache, v_cache, bad_slots)
    too_long = AttentionMetadata(meta.query_start_loc, [3, 999], meta.slot_mapping, meta.block_tables)
    with pytest.raises(RuntimeError, match=r"context length 999 of token 1 outside \[1, 16\]"):
        _native(attn, x, cos, sin, k_cache, v_cache, too_long)
    with pytest.raises(RuntimeError, match="x must be bfloat16 or float16"):
        _native(attn, x.float(), cos, sin, k_cache, v_cache, meta)


# ---------------------------------------------------------------------------------------------------------
# moe_decode


def _moe_case(dtype, T, E=8, H=64, I=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    gate = (torch.randn(E, H, generator=gen) * 0.5).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) * 0.15).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) * 0.15).to(dtype)
    return hidden, gate, w13, w2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, top_k", [(1, 2), (5, 2), (16, 2), (32, 1), (4, 8)])
def test_moe_decode_matches_route_then_reference(dtype, T, top_k):
    hidden, gate, w13, w2 = _moe_case(dtype, T)
    counts = torch.full((8,), 7, dtype=torch.long)
    got = cpu.moe_decode(hidden, gate, w13, w2, top_k, counts)
    routing = route_reference(torch.nn.functional.linear(hidden, gate), top_k)  # logits in hidden's dtype
    want = fused_moe_reference_fp32(hidden, w13, w2, routing).to(dtype)  # rounded once, as moe_decode
    assert got.dtype == dtype and got.shape == hidden.shape
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)
    assert torch.equal(counts - 7, torch.bincount(routing.ids.flatten().long(), minlength=8))


def test_moe_decode_rejects_bad_arguments():
    hidden, gate, w13, w2 = _moe_case(torch.bfloat16, 2)
    counts = torch.zeros(8, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"top_k 9 outside \[1, 8\]"):
        cpu.moe_decode(hidden, gate, w13, w2, 9, counts)
    with pytest.raises(RuntimeError, match=r"counts must be a contiguous int64 \[8\]"):
        cpu.moe_decode(hidden, gate, w13, w2, 2, torch.zeros(8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"gate must be \[E, H\] = \[8, 64\]"):
        cpu.moe_decode(hidden, gate[:4], w13, w2, 2, counts)


# ---------------------------------------------------------------------------------------------------------
# The scalar fallback (CPUs without AVX2) against the AVX2 path


def test_scalar_fallback_matches_avx2():
    """`simd=False` runs the portable loops (std::exp, no FMA): the same results within fp32 summation
    order, hence atol 2e-2 on 16-bit outputs; the KV cache rows both paths write agree as well."""
    ext = cpu.extension()
    hidden, gate, w13, w2 = _moe_case(torch.bfloat16, 6)
    counts = [torch.zeros(8, dtype=torch.long) for _ in range(2)]
    fast, slow = (
        ext.moe_decode(hidden, gate, w13, w2, 2, c, simd=s)
        for c, s in zip(counts, (True, False), strict=True)
    )
    torch.testing.assert_close(slow.float(), fast.float(), atol=2e-2, rtol=0)
    assert torch.equal(counts[0], counts[1])

    attn, x, cos, sin, k_cache, v_cache, meta = _attention_case(torch.bfloat16, sliding_window=5)
    w_qkv = attn.qkv_proj.weight
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    outs = [
        ext.attention_decode(x, w_qkv, attn.o_proj.weight, cos, sin, k, v, meta.slot_mapping, meta.block_tables,
                             torch.tensor(meta.context_lens), attn.n_heads, attn.n_kv_heads, 5, simd=s)
        for (k, v), s in zip(caches, (True, False), strict=True)
    ]  # fmt: skip
    torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(caches[1][0].float(), caches[0][0].float(), atol=2e-2, rtol=0)
