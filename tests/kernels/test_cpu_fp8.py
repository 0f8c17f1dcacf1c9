"""float8_e4m3fn weights (FP8 checkpoints' experts, `model.quantization: fp8`) in the native CPU kernels:
each byte widened exactly (vec.h `load8`), against the definition (`QuantizedWeight.dequantize`, then the
16-bit or fp32 op).

Tolerances as tests/kernels/test_cpu_int8_dense.py: fp32 results atol 1e-4 for inputs randn/10 (the same
fp32 products, another order, the scale applied once after the sum); 16-bit results atol 2e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_runtime.kernels import cpu
from moe_runtime.kernels.cpu.dispatch import RowPlan
from moe_runtime.kernels.cpu.moe import CpuMoe
from moe_runtime.kernels.quant import QuantizedWeight, quantize
from moe_runtime.kernels.reference import fused_moe_reference_fp32, route_reference

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")

EVERY_BYTE = QuantizedWeight(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(8, 32),
                             torch.linspace(0.5, 2.0, 8))


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bits where `want` is a number, NaN where it is NaN (NaN payloads may differ)."""
    nan = want.float().isnan()
    return torch.equal(got.float().isnan(), nan) and torch.equal(got[~nan], want[~nan])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_every_byte_dequantizes_as_torch_does(dtype):
    """All 256 e4m3fn bytes (subnormals, both zeros, both NaNs, +-448), each row its own scale."""
    assert _same(cpu.dequantize(EVERY_BYTE, dtype), EVERY_BYTE.dequantize(dtype))


def test_every_number_through_the_gemm():
    """A one-hot x reads single weights back through the GEMM (the GEMV, small and large AVX2 tiles), so
    every byte's widening is checked inside the kernels too: y[i, n] = w[n, i] * scale[n] exactly. The two
    NaN bytes are left out (0 * NaN would spread over their whole row)."""
    data = EVERY_BYTE.data.view(torch.uint8).clone()
    data[(data & 0x7F) == 0x7F] = 0
    w = QuantizedWeight(data.view(torch.float8_e4m3fn), EVERY_BYTE.scale)
    x = torch.eye(32)
    for rows in (x[:1], x[:3], x):  # the GEMV, a small tile, all 32 rows
        got = cpu.linear_fp32(rows, w)
        assert torch.equal(got, w.dequantize(torch.float32)[:, : rows.shape[0]].T)


@pytest.mark.parametrize("M", (1, 2, 3, 5, 16, 33))
@pytest.mark.parametrize("N,K", ((37, 100), (67, 2050), (8, 9)))
def test_linear_matches_the_dequantized_weight(M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    x = (torch.randn(M, K, generator=g) / 10).bfloat16()
    w = quantize(torch.randn(N, K, generator=g) / 10, "fp8")
    want = x.float() @ w.dequantize(torch.float32).T
    torch.testing.assert_close(cpu.linear_fp32(x, w), want, atol=1e-4, rtol=0)
    scalar = cpu.extension().linear_fp32(x, w.data, simd=False, scale=w.scale)
    torch.testing.assert_close(scalar, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(cpu.linear(x, w).float(), F.linear(x, w.dequantize(torch.bfloat16)).float(),
                               atol=2e-2, rtol=0)


def _experts(E: int = 8, H: int = 64, I: int = 96, seed: int = 0):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    w13 = quantize(torch.randn(E, 2 * I, H, generator=g) / 8, "fp8")
    w2 = quantize(torch.randn(E, H, I, generator=g) / 8, "fp8")
    gate = (torch.randn(E, H, generator=g) / 4).bfloat16()
    return w13, w2, gate


@pytest.mark.parametrize("T", (1, 4, 16))
def test_moe_decode_routes_exactly_and_matches_the_reference(T):
    w13, w2, gate = _experts()
    hidden = torch.randn(T, 64, generator=torch.Generator().manual_seed(T)).bfloat16()
    counts = torch.zeros(8, dtype=torch.long)
    got = cpu.moe_decode(hidden, gate, w13, w2, 2, counts)
    routing = route_reference(F.linear(hidden, gate), 2)
    assert torch.equal(counts, torch.bincount(routing.ids.flatten(), minlength=8))
    want = fused_moe_reference_fp32(hidden, w13, w2, routing).to(hidden.dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("choice", ("native", "bf16", "fp32"))
def test_the_cpu_backend_runs_fp8_groups_on_every_choice(choice):
    """Groups beyond the native layer call (48 tokens x top-2 over 8 experts: ~12 rows each) on each plan
    choice: native tiles, dequantized in one native pass then torch's GEMMs, chunked fp32."""
    w13, w2, gate = _experts(seed=1)
    hidden = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    routing = route_reference(F.linear(hidden, gate), 2)
    got = CpuMoe(RowPlan(bounds=(1,), choices=(choice,)))(hidden, w13, w2, routing)
    want = fused_moe_reference_fp32(hidden, w13, w2, routing)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
