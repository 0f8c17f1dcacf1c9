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


# The fp8 GEMMs' two tile kinds: AVX2 (vec.h `load8`) and, on AVX512-BF16 CPUs, `vdpbf16ps` from 1 row
# (dot_bf16.h `DotWeights<Float8_e4m3fn>`: bf16 x only, so the one-hot x below is bf16).
TILES = ("avx2", "bf16dp") if cpu.has_avx512_bf16() else ("avx2",)


@pytest.fixture(params=TILES)
def tiles(request):
    before = cpu.dot_fp8_rows(1 if request.param == "bf16dp" else 0)
    yield request.param
    cpu.dot_fp8_rows(before)


def test_every_number_through_the_gemm(tiles):
    """A one-hot x reads single weights back through the GEMM (the GEMV, small and large tiles), so every
    byte's widening is checked inside the kernels too: y[i, n] = w[n, i] * scale[n] exactly. The NaN bytes
    are checked apart (0 * NaN spreads over their whole row), on the AVX2 tiles only: the `vdpbf16ps` tiles
    of CPUs without AVX512-VBMI take finite bytes (the loader refuses NaN weights:
    tests/model/test_fp8_checkpoint.py)."""
    data = EVERY_BYTE.data.view(torch.uint8).clone()
    nan = (data & 0x7F) == 0x7F
    data[nan] = 0
    w = QuantizedWeight(data.view(torch.float8_e4m3fn), EVERY_BYTE.scale)
    x = torch.eye(32).bfloat16()
    for rows in (x[:1], x[:3], x):  # the GEMV, a small tile, all 32 rows
        got = cpu.linear_fp32(rows, w)
        assert torch.equal(got, w.dequantize(torch.float32)[:, : rows.shape[0]].T)
    if tiles == "bf16dp":
        return
    rows_with_nan = nan.any(dim=1)
    assert cpu.linear_fp32(x[:2], EVERY_BYTE)[:, rows_with_nan].isnan().all()
    assert not cpu.linear_fp32(x[:2], EVERY_BYTE)[:, ~rows_with_nan].isnan().any()


def test_every_number_through_the_64_weight_steps(tiles):
    """The same with K = 256 (each weight row every byte once, rotated row by row; NaN bytes zeroed): the
    64-weight steps of AVX512-VBMI CPUs (`BytePairs`) in the tiles (1 and 3 rows of x) and in the widening
    once for many rows (256 rows), the 32-weight steps elsewhere."""
    every = torch.arange(256, dtype=torch.uint8)
    data = torch.stack([every.roll(17 * r) for r in range(6)])
    data[(data & 0x7F) == 0x7F] = 0
    w = QuantizedWeight(data.view(torch.float8_e4m3fn), torch.linspace(0.5, 2.0, 6))
    x = torch.eye(256).bfloat16()
    for rows in (x[:1], x[5:8], x):
        got = cpu.linear_fp32(rows, w)
        want = rows.float() @ w.dequantize(torch.float32).T
        assert torch.equal(got, want)


@pytest.mark.parametrize("M", (1, 2, 3, 5, 16, 33))
@pytest.mark.parametrize("N,K", ((37, 100), (67, 2050), (8, 9), (23, 33), (8, 1)))
def test_linear_matches_the_dequantized_weight(M, N, K, tiles):
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
def test_moe_decode_routes_exactly_and_matches_the_reference(T, tiles):
    w13, w2, gate = _experts()
    hidden = torch.randn(T, 64, generator=torch.Generator().manual_seed(T)).bfloat16()
    counts = torch.zeros(8, dtype=torch.long)
    got = cpu.moe_decode(hidden, gate, w13, w2, 2, counts)
    routing = route_reference(F.linear(hidden, gate), 2)
    assert torch.equal(counts, torch.bincount(routing.ids.flatten(), minlength=8))
    want = fused_moe_reference_fp32(hidden, w13, w2, routing).to(hidden.dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("choice", ("native", "bf16", "fp32"))
def test_the_cpu_backend_runs_fp8_groups_on_every_choice(choice, tiles):
    """Groups beyond the native layer call (48 tokens x top-2 over 8 experts: ~12 rows each) on each plan
    choice: native tiles, dequantized in one native pass then torch's GEMMs, chunked fp32."""
    w13, w2, gate = _experts(seed=1)
    hidden = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    routing = route_reference(F.linear(hidden, gate), 2)
    got = CpuMoe(RowPlan(bounds=(1,), choices=(choice,)))(hidden, w13, w2, routing)
    want = fused_moe_reference_fp32(hidden, w13, w2, routing)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


@pytest.mark.skipif(not cpu.has_avx512_bf16(), reason="the vdpbf16ps tiles need AVX512-BF16")
def test_the_plan_measures_the_fp8_tiles_for_fp8_experts(tmp_path):
    from moe_runtime.checkpoint.loader import WeightFormats
    from moe_runtime.config import EngineConfig, ModelConfig
    from moe_runtime.engine import parts
    from moe_runtime.kernels.cpu import dispatch, plan_cache
    from moe_runtime.presets.configs import preset_config

    cfg = ModelConfig.from_hf(preset_config("tiny"))
    kernels = parts.KernelChoice(attention="cpu", norm="cpu", linear="cpu", moe="cpu", huge_pages=False,
                                 native_decode=True)
    engine = EngineConfig(cpu_plan_dir=str(tmp_path), max_num_batched_tokens=32)
    before = cpu.dot_fp8_rows(7)
    try:
        plan = parts.cpu_plan(kernels, cfg, torch.bfloat16, engine, WeightFormats(experts="fp8"))
        assert plan.dot_fp8 is not None and plan.dot_int8 is None and "native fp8 tiles: " in plan.describe()
        assert cpu.dot_fp8_rows(7) == dispatch.dot_min_rows(plan.dot_fp8)
        assert plan_cache.load_plan(next(tmp_path.iterdir())) == plan, "cached with the fp8 tiles"
        sixteen = parts.cpu_plan(kernels, cfg, torch.bfloat16, engine)  # no fp8 weights: the switch point stays
        assert sixteen.dot_fp8 is None and cpu.dot_fp8_rows(0) == 7
    finally:
        cpu.dot_fp8_rows(before)
