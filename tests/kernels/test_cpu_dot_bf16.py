"""The AVX512-BF16 (`vdpbf16ps`) tiles of the native GEMM (kernels/cpu/dot_bf16.h) for bf16 and int8
weights, their two switch points, and the measured plan that sets them.

Skipped where the CPU lacks AVX512-BF16 (AVX2-only EPYCs): there the kernels never take these tiles, and
tests/kernels/test_cpu_linear.py and test_cpu_int8_dense.py cover the AVX2 ones. Tolerance as there: both
tile kinds accumulate the exact fp32 products of bf16 values (or of int8 values and bf16 values) in fp32 and
differ only in summation order (atol 1e-4 for inputs randn/10, |y| < 1), against a float64 reference; int8
outputs are scaled by their row's scale after the sum on both.
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.checkpoint.loader import WeightFormats
from moe_runtime.config import EngineConfig, ModelConfig
from moe_runtime.engine import parts
from moe_runtime.engine.parts import KernelChoice
from moe_runtime.kernels import cpu
from moe_runtime.kernels.cpu import dispatch
from moe_runtime.kernels.quant import QuantizedWeight, quantize
from moe_runtime.kernels.reference import fused_moe_reference_fp32, route_reference
from moe_runtime.presets.configs import preset_config

pytestmark = pytest.mark.skipif(not cpu.has_avx512_bf16(), reason="this CPU lacks AVX512-BF16")

ROWS = (2, 3, 4, 5, 8, 9, 17, 33)
# N, K: K below, at and across the 32-element step (the masked tail), N not a multiple of the 4 streams
NK = ((37, 100), (1, 9), (64, 64), (19, 31), (260, 1031), (130, 32))
# int8: also K = 1 and 33 (a 1-byte masked load; one whole step and a 1-element tail)
NK_INT8 = (*NK, (8, 1), (23, 33))


@pytest.fixture
def tiles_from():
    """Set the process's switch point for one test and put back the one before."""
    before = cpu.dot_bf16_rows(0)
    yield cpu.dot_bf16_rows
    cpu.dot_bf16_rows(before)


@pytest.fixture
def int8_tiles_from():
    """The same for the switch point of int8 weights."""
    before = cpu.dot_int8_rows(0)
    yield cpu.dot_int8_rows
    cpu.dot_int8_rows(before)


def _inputs(M: int, N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g) / 10).bfloat16(), (torch.randn(N, K, generator=g) / 10).bfloat16()


def _int8_inputs(M: int, N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, QuantizedWeight]:
    """bf16 x [M, K] and an int8 weight [N, K] (per-row scales) quantized from randn / 10."""
    x, w = _inputs(M, N, K, seed)
    return x, quantize(w.float(), "int8")


def _reference(x: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """x @ (data * scale)^T in float64, rounded once to fp32: [M, N]."""
    return (x.double() @ (q.data.double() * q.scale.double()[:, None]).T).float()


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


@pytest.mark.parametrize("weights", ("bf16", "int8"))
def test_fp32_activations_keep_the_avx2_tiles(tiles_from, int8_tiles_from, weights):
    """x values that are not bf16 values would be rounded by the bf16 tiles: those GEMMs keep the AVX2
    tiles, bit for bit, for bf16 and int8 weights alike."""
    set_rows, make = (tiles_from, _inputs) if weights == "bf16" else (int8_tiles_from, _int8_inputs)
    x, w = torch.randn(8, 300) / 10, make(1, 96, 300)[1]
    set_rows(0)
    avx2 = cpu.linear_fp32(x, w)
    set_rows(1)
    assert torch.equal(cpu.linear_fp32(x, w), avx2)


def test_the_experts_take_the_tiles_with_the_same_result(tiles_from):
    g = torch.Generator().manual_seed(2)
    rows = (torch.randn(12, 64, generator=g) / 4).bfloat16()
    w13, w2 = (torch.randn(2 * 96, 64, generator=g) / 8).bfloat16(), (torch.randn(64, 96, generator=g) / 8).bfloat16()
    tiles_from(0)
    avx2 = cpu.expert_mlp(rows, w13, w2)
    tiles_from(1)
    torch.testing.assert_close(cpu.expert_mlp(rows, w13, w2), avx2, rtol=0, atol=2e-2)  # one bf16 rounding apart


@pytest.mark.parametrize("weights", ("bf16", "int8"))
def test_a_negative_switch_point_is_refused(tiles_from, int8_tiles_from, weights):
    set_rows = tiles_from if weights == "bf16" else int8_tiles_from
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        getattr(cpu.extension(), f"set_dot_{weights}_min_rows")(-1)
    assert set_rows(3) == 0 and set_rows(0) == 3  # returns the value it replaced


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


# ---------------------------------------------------------------------------------------------------------
# int8 weights: the same tiles, each 32 int8 values widened to bf16 in registers
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N, K", NK_INT8)
@pytest.mark.parametrize("M", ROWS)
def test_the_int8_tiles_match_a_float64_reference(int8_tiles_from, M, N, K):
    x, q = _int8_inputs(M, N, K)
    int8_tiles_from(1)
    torch.testing.assert_close(cpu.linear_fp32(x, q), _reference(x, q), rtol=0, atol=1e-4)


def test_every_int8_value_is_widened_exactly_and_in_k_order(int8_tiles_from):
    """Each weight row a permutation of -127..127 (kernels/quant.py's int8: symmetric, never -128, which the
    AVX512-VBMI widening relies on) against small-integer x (bf16 values): every product and partial sum is
    an integer below 2^24, exact in fp32 in any order, so the tiles must give the float64 result bit for
    bit; a value widened wrong, or a weight met by the wrong x element, shows. K = 247 takes the 64-weight
    steps, a 32-weight one and a tail."""
    g = torch.Generator().manual_seed(4)
    data = torch.stack([torch.randperm(255, generator=g) - 127 for _ in range(9)]).to(torch.int8)  # [9, 255]
    q = QuantizedWeight(data[:, 3:250], torch.ones(9))  # K = 247: whole steps and a tail of 23
    x = torch.randint(-8, 9, (5, 247), generator=g).bfloat16()
    int8_tiles_from(1)
    assert torch.equal(cpu.linear_fp32(x, q), (x.double() @ q.data.double().T).float())


def test_int8_weights_widened_once_for_many_rows_give_the_same_bits(int8_tiles_from):
    """Above 4 rows of x the int8 weights are widened once into bf16 rows and the bf16 tiles run over them;
    up to 4, widened in each tile. The same bf16 values summed in the same order: each x row's outputs are
    the same bits whichever way (and whatever the other rows)."""
    x, q = _int8_inputs(13, 70, 1031, seed=3)
    int8_tiles_from(1)
    once = cpu.linear_fp32(x, q)  # 13 rows: widened once
    per_tile = torch.cat([cpu.linear_fp32(x[m:m + 4], q) for m in range(0, 13, 4)])  # 4, 4, 4, 1 rows
    assert torch.equal(once, per_tile)


def test_the_int8_tiles_read_a_strided_x_and_a_weight_view(int8_tiles_from):
    x, q = _int8_inputs(6, 80, 200)
    xs, qs = x[::2, 3:150], QuantizedWeight(q.data[5:70, 3:150], q.scale[5:70])  # W rows 200 bytes apart, K = 147
    int8_tiles_from(1)
    torch.testing.assert_close(cpu.linear_fp32(xs, qs), _reference(xs, qs), rtol=0, atol=1e-4)


def test_the_int8_switch_point_picks_the_tiles_by_rows_on_its_own(tiles_from, int8_tiles_from):
    """int8 weights follow their own switch point: the AVX2 tiles below it (whatever the bf16 one says),
    the bf16 tiles from it, which differ in some last bit (summation order); bf16 weights ignore it."""
    x, q = _int8_inputs(16, 257, 1031, seed=1)
    tiles_from(1)
    int8_tiles_from(0)
    avx2 = {m: cpu.linear_fp32(x[:m], q) for m in (4, 8, 16)}
    tiles_from(0)
    int8_tiles_from(8)
    now = {m: cpu.linear_fp32(x[:m], q) for m in (4, 8, 16)}
    assert torch.equal(now[4], avx2[4])
    assert not torch.equal(now[8], avx2[8]) and not torch.equal(now[16], avx2[16])
    for m in (8, 16):
        torch.testing.assert_close(now[m], avx2[m], rtol=0, atol=1e-4)
    w = _inputs(1, 96, 1031)[1]
    sixteen = cpu.linear_fp32(x, w)  # bf16 weights, their switch point 0: AVX2 tiles whatever the int8 one says
    int8_tiles_from(1)
    assert torch.equal(cpu.linear_fp32(x, w), sixteen)


def test_int8_experts_take_the_tiles_with_the_same_result(int8_tiles_from):
    """One expert (`expert_mlp`) and a whole MoE block (`moe_decode`) of int8 experts: the tiles against the
    AVX2 path and the reference on the dequantized weights, within the 16-bit kernel tolerance."""
    g = torch.Generator().manual_seed(5)
    E, H, inter, T, top_k = 4, 64, 96, 6, 2
    hidden = (torch.randn(T, H, generator=g) / 4).bfloat16()
    gate = (torch.randn(E, H, generator=g) / 10).bfloat16()
    q13 = quantize(torch.randn(E, 2 * inter, H, generator=g) / 8, "int8")
    q2 = quantize(torch.randn(E, H, inter, generator=g) / 8, "int8")
    out = {}
    for rows in (0, 1):
        int8_tiles_from(rows)
        counts = torch.zeros(E, dtype=torch.long)
        out[rows] = cpu.expert_mlp(hidden, q13[1], q2[1]), cpu.moe_decode(hidden, gate, q13, q2, top_k, counts)
    routing = route_reference(torch.nn.functional.linear(hidden, gate), top_k)
    want = fused_moe_reference_fp32(hidden, q13, q2, routing)
    for tiles, avx2 in zip(out[1], out[0], strict=True):
        torch.testing.assert_close(tiles, avx2, rtol=0, atol=2e-2)  # one bf16 rounding apart
    torch.testing.assert_close(out[1][1].float(), want, rtol=0, atol=2e-2)
    assert counts.sum() == T * top_k


def test_the_plan_measures_the_int8_tiles_for_int8_models_only(tiles_from, int8_tiles_from, tmp_path):
    cfg = ModelConfig.from_hf(preset_config("tiny"))
    kernels = KernelChoice(attention="cpu", norm="cpu", linear="cpu", moe="cpu", huge_pages=False,
                           native_decode=True)
    engine = EngineConfig(cpu_plan_dir=str(tmp_path), max_num_batched_tokens=32)
    int8 = WeightFormats(experts="int8")
    plan = parts.cpu_plan(kernels, cfg, torch.bfloat16, engine, int8)
    assert plan.dot is not None and plan.dot_int8 is not None and plan.dot_int8.bounds == (1, 2, 4, 8, 16, 32)
    assert set(plan.dot_int8.choices) <= set(dispatch.DOT_CHOICES)
    assert int8_tiles_from(0) == dispatch.dot_min_rows(plan.dot_int8)
    assert tiles_from(0) == dispatch.dot_min_rows(plan.dot)
    assert "native int8 tiles: " in plan.describe()
    int8_tiles_from(7)
    assert parts.cpu_plan(kernels, cfg, torch.bfloat16, engine, int8) == plan  # read from the cache: set again
    assert int8_tiles_from(0) == dispatch.dot_min_rows(plan.dot_int8)
    int8_tiles_from(7)
    parts.cpu_plan(kernels, cfg, torch.bfloat16, engine, int8, sets_tiles=False)  # a draft: the target's stay
    assert int8_tiles_from(0) == 7
    int8_tiles_from(7)
    sixteen = parts.cpu_plan(kernels, cfg, torch.bfloat16, engine)  # no int8 weights: the int8 switch point stays
    assert sixteen.dot is not None and sixteen.dot_int8 is None
    assert int8_tiles_from(0) == 7 and "native int8 tiles" not in sixteen.describe()
