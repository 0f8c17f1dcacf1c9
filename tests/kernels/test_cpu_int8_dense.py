"""int8 dense projections on CPU (`model.quantize_dense`): the native linear and attention block with int8
weights, and `CpuLinear`'s choices, against the definition (the weight dequantized, then the 16-bit op).

Tolerances: `linear_fp32` with int8 w sums the same fp32 products as `x.float() @ w.dequantize(fp32).T`
(the scale multiplies out of the sum), in another order and with the scale applied once after the sum
instead of to each weight: atol 1e-4 for inputs randn/10 (|y| < 1, as test_cpu_linear.py). Rounded 16-bit
results: atol 2e-2 (STYLE.md's 16-bit kernel tolerance; the dequantized reference also rounds each weight
to 16 bits, which the kernel never does).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from paged_cases import shuffled_pages

from moe_runtime.config import ModelConfig
from moe_runtime.kernels import cpu
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.cpu.dispatch import CpuPlan, RowPlan, weight_key
from moe_runtime.kernels.linear import CpuLinear, TorchLinear, make_linear
from moe_runtime.kernels.quant import quantize
from moe_runtime.model.layers import Attention, RotaryEmbedding
from moe_runtime.model.parts import ModelParts
from moe_runtime.presets.configs import preset_config

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")

ROWS = (1, 2, 3, 5, 16, 33, 64)
NK = ((37, 100), (67, 2050), (1, 9))


def _inputs(M: int, N: int, K: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) / 10).to(dtype)
    w = quantize(torch.randn(N, K, generator=g) / 10, "int8")
    return x, w


@pytest.mark.parametrize("N, K", NK)
@pytest.mark.parametrize("M", ROWS)
def test_int8_linear_matches_the_dequantized_product(M, N, K):
    x, w = _inputs(M, N, K)
    want = x.float() @ w.dequantize(torch.float32).T  # [M, N]
    torch.testing.assert_close(cpu.linear_fp32(x, w), want, atol=1e-4, rtol=0)
    scalar = cpu.extension().linear_fp32(x, w.data, simd=False, scale=w.scale)  # the fallback, same contract
    torch.testing.assert_close(scalar, want, atol=1e-4, rtol=0)
    assert cpu.linear(x, w).dtype == torch.bfloat16


def test_int8_linear_rejects_a_missing_or_wrong_scale():
    x, w = _inputs(2, 8, 16)
    ext = cpu.extension()
    with pytest.raises(RuntimeError, match="8-bit weights need their per-row scale"):
        ext.linear_fp32(x, w.data)
    with pytest.raises(RuntimeError, match=r"scale must be contiguous float32 \[8\]"):
        ext.linear_fp32(x, w.data, scale=w.scale[:4])
    with pytest.raises(RuntimeError, match="16-bit weights take none"):
        ext.linear_fp32(x, w.dequantize(torch.bfloat16), scale=w.scale)


# One plan per choice, so each path of `CpuLinear` runs whatever the machine would have measured.
PLANS = {c: RowPlan(bounds=(1,), choices=(c,)) for c in ("native", "bf16", "fp32")}


@pytest.mark.parametrize("choice", sorted(PLANS))
@pytest.mark.parametrize("M", (1, 7, 40))
@pytest.mark.parametrize("bias", (False, True))
def test_cpu_linear_int8_choices_match_the_reference(choice, M, bias):
    x, w = _inputs(M, 48, 96)
    b = (torch.randn(48) / 10).to(torch.bfloat16) if bias else None
    kernel = CpuLinear(CpuPlan("test", {weight_key(w.shape, "int8"): PLANS[choice]}))
    kernel.prepare(w)
    assert kernel.rows == PLANS[choice] and kernel.weight_fp32 is None  # no 4-byte copy of an 8-bit weight
    want = TorchLinear()(x, w, b)  # the definition: dequantized to bf16, torch's GEMM
    torch.testing.assert_close(kernel(x, w, b).float(), want.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(kernel.fp32(x, w), TorchLinear().fp32(x, w), atol=2e-2, rtol=0)
    parts = kernel.stacked(x, w, (16, 32), b)
    assert parts.shape == (M, 48)


@pytest.mark.parametrize("scheme", ("int8", "fp8"))
def test_cpu_linear_8bit_without_a_plan(scheme):
    x, _ = _inputs(3, 24, 40)
    w = quantize(torch.randn(24, 40, generator=torch.Generator().manual_seed(1)) / 10, scheme)
    kernel = make_linear("cpu")
    kernel.prepare(w)
    assert kernel.rows.choice(3) == "native" and kernel.rows.choice(1000) == "bf16"
    torch.testing.assert_close(kernel(x, w).float(), TorchLinear()(x, w).float(), atol=2e-2, rtol=0)
    many = torch.randn(100, 40, generator=torch.Generator().manual_seed(2)).bfloat16() / 10
    assert torch.equal(kernel(many, w), F.linear(many, w.dequantize(torch.bfloat16)))  # dequantized, torch's GEMM


# ---------------------------------------------------------------------------------------------------------
# attention_decode with int8 projections


def _case(ctx=(1, 7, 16, 40), block_size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = ModelConfig.from_hf(preset_config("tiny"))
    parts = ModelParts(attention="cpu", dense_quantization="int8")
    attn = Attention(cfg, parts).to(torch.bfloat16).requires_grad_(False)
    assert attn.qkv_proj.weight_data.dtype == torch.int8 and attn.qkv_proj.weight_scale.dtype == torch.float32
    for lin in (attn.qkv_proj, attn.o_proj):
        q = quantize(torch.randn(lin.weight_data.shape, generator=gen) * 0.05, "int8")  # outputs of order 1
        lin.matrix.copy_(q)
    T, Dh, KVH = len(ctx), cfg.head_dim, cfg.num_key_value_heads
    num_blocks = sum(-(-c // block_size) for c in ctx) + 3
    tables, slots = shuffled_pages(ctx, block_size, num_blocks, gen)
    k_cache = torch.randn(num_blocks, block_size, KVH, Dh, generator=gen).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, KVH, Dh, generator=gen).bfloat16()
    meta = AttentionMetadata(list(range(T + 1)), list(ctx), slots, tables)
    x = torch.randn(T, cfg.hidden_size, generator=gen).bfloat16()
    cos, sin = RotaryEmbedding(Dh, cfg.rope_theta)(torch.tensor(ctx) - 1, torch.bfloat16)
    return attn, x, cos, sin, k_cache, v_cache, meta


def test_attention_decode_with_int8_projections_matches_the_module():
    attn, x, cos, sin, k_cache, v_cache, meta = _case()
    want = attn(x, (cos, sin), meta, (k_cache.clone(), v_cache.clone()))  # the module: torch on dequantized
    got = cpu.attention_decode(x, attn.qkv_proj.matrix, attn.o_proj.matrix, cos, sin, k_cache, v_cache,
                               meta.slot_mapping, meta.block_tables, torch.tensor(meta.context_lens),
                               attn.n_heads, attn.n_kv_heads, attn.sliding_window)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)


def test_attention_decode_rejects_mixed_projection_formats():
    attn, x, cos, sin, k_cache, v_cache, meta = _case(ctx=(3,))
    args = (cos, sin, k_cache, v_cache, meta.slot_mapping, meta.block_tables, torch.tensor(meta.context_lens),
            attn.n_heads, attn.n_kv_heads)
    o16 = attn.o_proj.matrix.dequantize(torch.bfloat16)
    with pytest.raises(TypeError, match="16-bit weights or 8-bit ones of one format"):
        cpu.attention_decode(x, attn.qkv_proj.matrix, o16, *args, None)
    with pytest.raises(RuntimeError, match="8-bit projections need both scales"):  # no window: -1
        cpu.extension().attention_decode(x, attn.qkv_proj.matrix.data, attn.o_proj.matrix.data, *args, -1)
