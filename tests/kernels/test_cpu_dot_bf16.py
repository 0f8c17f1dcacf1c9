"""The AVX512-BF16 (`vdpbf16ps`) tiles of the native GEMM (kernels/cpu/dot_bf16.h), their switch point, and
the measured plan that sets it.

Skipped where the CPU lacks AVX512-BF16 (AVX2-only EPYCs): there the kernels never take these tiles, and
tests/kernels/test_cpu_linear.py covers the AVX2 ones. Tolerance as there: both tile kinds accumulate the
exact fp32 products of bf16 values in fp32 and differ only in summation order (atol 1e-4 for inputs
randn/10, |y| < 1), against a float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import EngineConfig, ModelConfig
from moe_runtime.engine import parts
from moe_runtime.engine.parts import KernelChoice
from moe_runtime.kernels import cpu
from moe_runtime.kernels.cpu import dispatch
from moe_runtime.presets.configs import preset_config

pytestmark = pytest.mark.skipif(not cpu.has_avx512_bf16(), reason="this CPU lacks AVX512-BF16")

ROWS = (2, 3, 4, 5, 8, 9, 17, 33)
# N, K: K below, at and across the 32-element step (the masked tail), N not a multiple of the 4 streams
NK = ((37, 100), (1, 9), (64, 64), (19, 31), (260, 1031), (130, 32))


@pytest.fixture
def tiles_from():
    """Set the process's switch point for one test and put back the one before."""
    before = cpu.dot_bf16_rows(0)
    yield cpu.dot_bf16_rows
    cpu.dot_bf16_rows(before)


def _inputs(M: int, N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g) / 10).bfloat16(), (torch.randn(N, K, generator=g) / 10).bfloat16()


@pytest.mark.parametrize("N, K", NK)
@pytest.mark.parametrize("M", ROWS)
def test_the_bf16_tiles_match_a_float64_reference(tiles_from, M, N, K):
    x, w = _inputs(M, N, K)
    tiles_from(1)
    y = cpu.linear_fp32(x, w)
    torch.testing.assert_close(y, (x.double() @ w.double().T).float(), rtol=0, atol=1e-4)


def test_a_strided_x_and_a_weight_view_read_the_right_elements(tiles_from):
    x, w = _inputs(6, 80, 200)
    xs, ws = x[::2, 3:150], w[5:70, 3:150]  # rows of x 2 * 200 apart, W rows 200 apart, K = 147
    tiles_from(1)
    torch.testing.assert_close(cpu.linear_fp32(xs, ws), (xs.double() @ ws.double().T).float(), rtol=0, atol=1e-4)


def test_the_switch_point_picks_the_tiles_by_rows(tiles_from):
    """Below the switch point the AVX2 tiles run, from it the bf16 ones: the same values up to summation
    order, so the two differ (in some last bit) exactly where the switch says."""
    x, w = _inputs(16, 257, 1031, seed=1)
    tiles_from(0)
    avx2 = {m: cpu.linear_fp32(x[:m], w) for m in (4, 8, 16)}
    tiles_from(8)
    now = {m: cpu.linear_fp32(x[:m], w) for m in (4, 8, 16)}
    assert torch.equal(now[4], avx2[4])
    assert not torch.equal(now[8], avx2[8]) and not torch.equal(now[16], avx2[16])
    for m in (8, 16):
        torch.testing.assert_close(now[m], avx2[m], rtol=0, atol=1e-4)


def test_fp32_activations_keep_the_avx2_tiles(tiles_from):
    """x values that are not bf16 values would be rounded by the bf16 tiles: those GEMMs keep the AVX2
    tiles, bit for bit."""
    x, w = torch.randn(8, 300) / 10, _inputs(1, 96, 300)[1]
    tiles_from(0)
    avx2 = cpu.linear_fp32(x, w)
    tiles_from(1)
    assert torch.equal(cpu.linear_fp32(x, w), avx2)


def test_the_experts_take_the_tiles_with_the_same_result(tiles_from):
    g = torch.Generator().manual_seed(2)
    rows = (torch.randn(12, 64, generator=g) / 4).bfloat16()
    w13, w2 = (torch.randn(2 * 96, 64, generator=g) / 8).bfloat16(), (torch.randn(64, 96, generator=g) / 8).bfloat16()
    tiles_from(0)
    avx2 = cpu.expert_mlp(rows, w13, w2)
    tiles_from(1)
    torch.testing.assert_close(cpu.expert_mlp(rows, w13, w2), avx2, rtol=0, atol=2e-2)  # one bf16 rounding apart


def test_a_negative_switch_point_is_refused(tiles_from):
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        cpu.extension().set_dot_bf16_min_rows(-1)
    assert tiles_from(3) == 0 and tiles_from(0) == 3  # returns the value it replaced


def test_the_plan_measures_the_tiles_and_sets_them_for_the_process(tiles_from, tmp_path):
    cfg = ModelConfig.from_hf(preset_config("tiny"))
    kernels = KernelChoice(attention="cpu", norm="cpu", linear="cpu", moe="cpu", huge_pages=False,
                           native_decode=True)
    engine = EngineConfig(cpu_plan_dir=str(tmp_path), max_num_batched_tokens=32)
    plan = parts.cpu_plan(kernels, cfg, torch.bfloat16, engine)
    assert plan.dot is not None and plan.dot.bounds == (1, 2, 4, 8, 16, 32)
    assert set(plan.dot.choices) <= set(dispatch.DOT_CHOICES)
    assert tiles_from(0) == dispatch.dot_min_rows(plan.dot)
    assert "native bf16 tiles: " in plan.describe()
    tiles_from(7)
    assert parts.cpu_plan(kernels, cfg, torch.bfloat16, engine) == plan  # read from the cache: and set again
    assert tiles_from(0) == dispatch.dot_min_rows(plan.dot)
    tiles_from(7)
    parts.cpu_plan(kernels, cfg, torch.bfloat16, engine, sets_tiles=False)  # a draft: the target's stay
    assert tiles_from(0) == 7
