"""Quantized experts (kernels/quant.py): the quantizer, and every CPU MoE backend against the reference on
the dequantized weights.

The oracle is `reference.fused_moe_reference_fp32` on `QuantizedWeight`s, which computes with the weights
dequantized to hidden's dtype (data * scale in fp32, rounded once). The `torch` backend does exactly that per
expert: bit for bit while every expert group has fewer than `UPCAST_MIN_ROWS` rows (larger groups
compute in fp32, as for 16-bit weights). The `cpu` backend's native int8 path multiplies the int8 values in fp32 and scales
after the K sum (the weights never rounded to 16 bits), so it matches within atol 2e-2 on bf16 outputs of
these randn / 10 inputs (STYLE.md's 16-bit kernel tolerance; the same as tests/kernels/test_cpu_moe.py).
"""

from __future__ import annotations

import pytest
import torch
from moe_cases import CASES, make_inputs

from moe_runtime.kernels import cpu, fused_moe_fp32
from moe_runtime.kernels.cpu.dispatch import EXPERT_CHOICES, RowPlan, plan_expert
from moe_runtime.kernels.cpu.moe import CpuMoe
from moe_runtime.kernels.quant import (
    QMAX,
    SCHEMES,
    QuantizedWeight,
    quantize,
    quantize_into,
    quantize_into_torch,
)
from moe_runtime.kernels.reference import RoutingResult, fused_moe_reference_fp32
from moe_runtime.kernels.torch_moe import UPCAST_MIN_ROWS

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
native = pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")


def quantized_inputs(case, dtype, scheme="int8"):
    x = make_inputs(case, dtype)
    return x, quantize(x.w13.float(), scheme), quantize(x.w2.float(), scheme)


# ---------------------------------------------------------------------------------------------------------
# The quantizer
# ---------------------------------------------------------------------------------------------------------
@native
@pytest.mark.parametrize("scheme", ("int8", "fp8"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("shape", ((300, 1031), (3, 5, 37), (2, 7), (4, 8)))
def test_the_native_quantizer_gives_torchs_bits(scheme, dtype, shape):
    """kernels/cpu/quant.cpp against `quantize_into_torch` (the definition): the same values and scales,
    bit for bit, for rows of mixed magnitudes, an all-zero row, K with and without a tail of 8."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * torch.rand((*shape[:-1], 1), generator=g) * 30
    w.view(-1, shape[-1])[1] = 0
    w = w.to(dtype)
    qdtype = SCHEMES[scheme]
    ours, torchs = (torch.empty(shape, dtype=qdtype) for _ in range(2))
    s_ours, s_torch = (torch.empty(shape[:-1]) for _ in range(2))
    assert cpu.quantize_into(w, ours, s_ours)
    quantize_into_torch(w, torchs, s_torch)
    assert torch.equal(ours.view(torch.uint8), torchs.view(torch.uint8)) and torch.equal(s_ours, s_torch)
    assert torch.equal(s_ours.view(-1)[1], torch.tensor(1.0))  # a zero row: scale 1, values 0


def test_the_quantizer_takes_torchs_ops_where_the_native_one_cannot():
    w = torch.randn(8, 16)[:, ::2]  # not contiguous
    data, scale = torch.empty(8, 8, dtype=torch.int8), torch.empty(8)
    assert not cpu.quantize_into(w, data, scale)
    quantize_into(w, data, scale)  # through torch's ops
    ref = quantize(w.contiguous(), "int8")
    assert torch.equal(data, ref.data) and torch.equal(scale, ref.scale)


@native
def test_the_native_quantizer_names_what_it_refuses():
    ext = cpu.extension()
    with pytest.raises(RuntimeError, match="w must be bfloat16, float16 or float32, got Double"):
        ext.quantize_into(torch.zeros(2, 4, dtype=torch.float64), torch.empty(2, 4, dtype=torch.int8), torch.empty(2))
    with pytest.raises(RuntimeError, match="data must be contiguous int8 or float8_e4m3fn"):
        ext.quantize_into(torch.zeros(2, 4), torch.empty(2, 4, dtype=torch.int16), torch.empty(2))
    with pytest.raises(RuntimeError, match=r"scale must be contiguous float32 \[2\]"):
        ext.quantize_into(torch.zeros(2, 4), torch.empty(2, 4, dtype=torch.int8), torch.empty(3))


@pytest.mark.parametrize("scheme", ("int8", "fp8"))
def test_round_trip_error_is_bounded_per_row(scheme):
    w = torch.randn(3, 40, 72, generator=torch.Generator().manual_seed(0))
    q = quantize(w, scheme)
    assert q.data.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[scheme]
    assert q.scale.shape == (3, 40) and q.scale.dtype == torch.float32
    assert q.data.float().abs().amax(-1).eq(QMAX[q.dtype]).all()  # each row's absmax maps onto the top code
    err = (q.dequantize(torch.float32) - w).abs()
    if scheme == "int8":  # uniform steps of `scale`: at most half of one
        assert (err <= q.scale.unsqueeze(-1) / 2 + 1e-7).all()
    else:  # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal numbers
        assert (err <= w.abs() / 16 + q.scale.unsqueeze(-1) * 2.0**-9).all()


def test_zero_rows_stay_zero():
    w = torch.zeros(1, 2, 8)
    w[0, 1] = torch.arange(8) - 4.0
    q = quantize(w, "int8")
    assert q.scale[0, 0] == 1 and not q.data[0, 0].any()
    assert torch.equal(q.dequantize(torch.float32)[0, 0], torch.zeros(8))


def test_slot_indexing_gives_one_experts_weights():
    q = quantize(torch.randn(4, 6, 8), "int8")
    assert isinstance(q[2], QuantizedWeight) and q[2].shape == (6, 8) and q[2].scale.shape == (6,)
    assert torch.equal(q[2].dequantize(torch.float32), q.dequantize(torch.float32)[2])
    assert q.nbytes() == 4 * 6 * 8 + 4 * 6 * 4  # int8 values + fp32 scales


@pytest.mark.parametrize(
    "data,scale,match",
    [(torch.zeros(2, 3, dtype=torch.bfloat16), torch.ones(2), "int8 or float8"),
     (torch.zeros(2, 3, dtype=torch.int8), torch.ones(3), "one per row"),
     (torch.zeros(2, 3, dtype=torch.int8), torch.ones(2, dtype=torch.bfloat16), "float32")],
)
def test_malformed_quantized_weight_names_the_problem(data, scale, match):
    with pytest.raises(ValueError, match=match):
        QuantizedWeight(data, scale)


def test_unknown_scheme_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"quantization='int4' is not supported; allowed: \['int8', 'fp8'\]"):
        quantize(torch.ones(2, 2), "int4")


# ---------------------------------------------------------------------------------------------------------
# Backends against the reference on dequantized weights
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ("int8", "fp8"))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_torch_backend_is_the_reference_bit_for_bit(case, scheme):
    x, q13, q2 = quantized_inputs(case, torch.bfloat16, scheme)
    want = fused_moe_reference_fp32(x.hidden, q13, q2, x.routing, x.slot_map)
    got = fused_moe_fp32(x.hidden, q13, q2, x.routing, slot_map=x.slot_map, backend="torch")
    if case.T < UPCAST_MIN_ROWS:  # every group on the 16-bit GEMMs: the reference's ops
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)  # larger groups: fp32 GEMMs, more accurate


def test_reference_is_the_16bit_reference_on_dequantized_weights():
    x, q13, q2 = quantized_inputs(CASES[2], torch.bfloat16)
    want = fused_moe_reference_fp32(x.hidden, q13.dequantize(torch.bfloat16), q2.dequantize(torch.bfloat16),
                                    x.routing, x.slot_map)
    assert torch.equal(fused_moe_reference_fp32(x.hidden, q13, q2, x.routing, x.slot_map), want)


@native
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cpu_backend_int8_matches_the_reference(case, dtype):
    x, q13, q2 = quantized_inputs(case, dtype)
    want = fused_moe_reference_fp32(x.hidden, q13, q2, x.routing, x.slot_map)
    got = fused_moe_fp32(x.hidden, q13, q2, x.routing, slot_map=x.slot_map, backend="cpu")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


@native
@pytest.mark.parametrize("choice", EXPERT_CHOICES)
def test_every_plan_choice_runs_int8_groups(choice):
    """Groups larger than the native one-call layer go through the plan's choice per expert group."""
    case = next(c for c in CASES if c.T == 33 and c.routing == "random")
    x, q13, q2 = quantized_inputs(case, torch.bfloat16)
    moe = CpuMoe(RowPlan(bounds=(1,), choices=(choice,)))
    want = fused_moe_reference_fp32(x.hidden, q13, q2, x.routing)
    torch.testing.assert_close(moe(x.hidden, q13, q2, x.routing), want, atol=2e-2, rtol=0)


def test_fp8_takes_the_native_path_on_cpu():
    """fp8 experts run the native kernels as int8 ones do (tests/kernels/test_cpu_fp8.py has the rest)."""
    x, q13, q2 = quantized_inputs(CASES[1], torch.bfloat16, "fp8")  # T = 3: one native layer call
    want = fused_moe_reference_fp32(x.hidden, q13, q2, x.routing, x.slot_map)
    torch.testing.assert_close(CpuMoe()(x.hidden, q13, q2, x.routing, x.slot_map), want, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# The native int8 ops
# ---------------------------------------------------------------------------------------------------------
@native
@pytest.mark.parametrize("rows", (1, 2, 3, 4, 5, 8, 17, 40))
@pytest.mark.parametrize("H,I", ((64, 48), (40, 72), (2056, 24)))  # K > kTileMaxK takes the `block` tiles
def test_expert_mlp_int8_simd_equals_scalar_and_reference(rows, H, I):
    g = torch.Generator().manual_seed(rows)
    xs = (torch.randn(rows, H, generator=g) / 10).bfloat16()
    q13 = quantize(torch.randn(2 * I, H, generator=g) / 10, "int8")
    q2 = quantize(torch.randn(H, I, generator=g) / 10, "int8")
    got = cpu.expert_mlp(xs, q13, q2)
    routing = RoutingResult(torch.ones(rows, 1), torch.zeros(rows, 1, dtype=torch.int32))
    want = fused_moe_reference_fp32(xs, QuantizedWeight(q13.data[None], q13.scale[None]),
                                    QuantizedWeight(q2.data[None], q2.scale[None]), routing)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
    slots = torch.zeros(rows, 1, dtype=torch.long)
    ext = cpu.extension()
    args = (xs, q13.data[None], q2.data[None], slots, torch.ones(rows, 1))
    scales = dict(s13=q13.scale[None], s2=q2.scale[None])
    simd, scalar = ext.moe_fp32(*args, simd=True, **scales), ext.moe_fp32(*args, simd=False, **scales)
    torch.testing.assert_close(simd, scalar, atol=2e-2, rtol=0)


@native
def test_native_decode_with_int8_experts_matches_the_torch_ops():
    case = CASES[2]
    x, q13, q2 = quantized_inputs(case, torch.bfloat16)
    gate = (torch.randn(case.E, case.H, generator=torch.Generator().manual_seed(3)) / 10).bfloat16()
    counts = torch.zeros(case.E, dtype=torch.long)
    got = cpu.moe_decode(x.hidden, gate, q13, q2, case.k, counts)
    from moe_runtime.kernels.reference import route_reference

    routing = route_reference(torch.nn.functional.linear(x.hidden, gate), case.k)
    want = fused_moe_reference_fp32(x.hidden, q13, q2, routing)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
    assert counts.sum() == case.T * case.k
    fp8 = torch.zeros(case.E, dtype=torch.long)  # FP8 experts: torch's ops behind the same call
    f13, f2 = quantize(x.w13.float(), "fp8"), quantize(x.w2.float(), "fp8")
    torch.testing.assert_close(cpu.moe_decode(x.hidden, gate, f13, f2, case.k, fp8).float(),
                               fused_moe_reference_fp32(x.hidden, f13, f2, routing), atol=2e-2, rtol=0)
    assert torch.equal(fp8, counts)


@native
def test_int8_without_scales_is_refused_with_the_reason():
    q = quantize(torch.randn(2, 8, 16), "int8")
    q2 = quantize(torch.randn(2, 16, 4), "int8")
    slots, weights = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    with pytest.raises(RuntimeError, match="8-bit experts need both scales"):
        cpu.extension().moe_fp32(torch.randn(1, 16), q.data, q2.data, slots, weights)
    with pytest.raises(RuntimeError, match="do not match"):
        cpu.extension().moe_fp32(torch.randn(1, 16), q.data, q2.data, slots, weights, s13=q2.scale, s2=q.scale)


@native
def test_int8_expert_plan_is_measured_with_the_same_choices():
    plan = plan_expert(64, 48, torch.bfloat16, max_rows=4, native=True, weights="int8")
    assert plan.bounds == (1, 2, 4) and set(plan.choices) <= set(EXPERT_CHOICES)


@native
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("shape", ((3, 40, 72), (5, 9), (2, 4, 1)))  # K % 8 tails, a K of one
def test_native_dequantize_gives_the_same_bits(shape, dtype):
    q = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(1)), "int8")
    assert torch.equal(cpu.dequantize(q, dtype), q.dequantize(dtype))
    assert torch.equal(cpu.extension().dequantize(q.data, q.scale, dtype, simd=False), q.dequantize(dtype))


def test_triton_backend_runs_quantized_experts_within_fp32_rounding_of_torch():
    """The `triton` backend runs its w8a16 kernels on quantized experts (tests/kernels/triton/
    test_fused_moe_w8a16.py): in fp32 it differs from the torch backend's dequantized arithmetic only in
    the order of fp32 operations (scales after the K sum)."""
    x, q13, q2 = quantized_inputs(CASES[1], torch.float32)
    want = fused_moe_fp32(x.hidden, q13, q2, x.routing, slot_map=x.slot_map, backend="torch")
    got = fused_moe_fp32(x.hidden, q13, q2, x.routing, slot_map=x.slot_map, backend="triton")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
