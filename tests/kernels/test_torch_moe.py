"""The torch backend against the reference on every shape: fp32 to rounding, 16-bit within stated atol."""

import pytest
import torch
from moe_cases import CASES, MoeCase, make_inputs

from moe_runtime.kernels.reference import fused_moe_reference_fp32
from moe_runtime.kernels.torch_moe import UPCAST_MIN_ROWS, fused_moe_torch_fp32

# Enough rows per expert (T * k / E = 128) that 16-bit experts take the fp32 path on CPU.
LARGE = MoeCase("t256_e4_k2_upcast", T=256, H=64, I=48, E=4, k=2)
ALL_CASES = (*CASES, LARGE)


def torch_moe(x):
    """The torch backend's fp32 [T, H] rounded once to the inputs' dtype, as `kernels.fused_moe` does."""
    return fused_moe_torch_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map).to(x.hidden.dtype)


def reference(x):
    """The reference, rounded the same way."""
    return fused_moe_reference_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map).to(x.hidden.dtype)


def largest_group(x) -> int:
    slots = x.slot_ids[x.slot_ids >= 0]
    return int(torch.bincount(slots.flatten().long()).max()) if slots.numel() else 0


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_fp32_is_the_reference_bit_for_bit(case):
    x = make_inputs(case, torch.float32)
    assert torch.equal(torch_moe(x), reference(x))


# Cases where every expert stays below the upcast threshold; the others are checked within tolerance below.
BELOW_UPCAST = tuple(c for c in ALL_CASES if largest_group(make_inputs(c, torch.bfloat16)) < UPCAST_MIN_ROWS)


def test_some_cases_take_each_path():
    assert 0 < len(BELOW_UPCAST) < len(ALL_CASES)


@pytest.mark.parametrize("case", BELOW_UPCAST, ids=lambda c: c.name)
def test_bf16_is_the_reference_bit_for_bit_below_the_upcast(case):
    x = make_inputs(case, torch.bfloat16)
    assert torch.equal(torch_moe(x), reference(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_16bit_close_to_fp32_reference(case, dtype):
    x = make_inputs(case, dtype)
    got = torch_moe(x)
    assert got.dtype == dtype
    want = fused_moe_reference_fp32(x.hidden.float(), x.w13.float(), x.w2.float(), x.routing, x.slot_map)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
    # and as close to the 16-bit reference as that is to the fp32 one (a few output ulps)
    ref16 = reference(x)
    assert (got.float() - ref16.float()).abs().max() <= 2 * (ref16.float() - want).abs().max() + 1e-3


def test_large_case_takes_the_upcast_path():
    assert LARGE.T * LARGE.k // LARGE.E >= UPCAST_MIN_ROWS


def test_dropped_pairs_contribute_zero():
    case = MoeCase("all_dropped", T=5, H=32, I=16, E=4, k=2, slot_map=(-1, -1, -1, 0))
    x = make_inputs(case, torch.float32)
    x.routing.ids[:] = torch.tensor([0, 1], dtype=torch.int32)  # only experts 0 and 1: neither resident
    got = fused_moe_torch_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map)
    assert torch.equal(got, torch.zeros_like(got))


def test_upcast_linear_over_several_chunks(monkeypatch):
    import moe_runtime.kernels.torch_moe as torch_moe

    monkeypatch.setattr(torch_moe, "UPCAST_CHUNK", 7 * 40)  # 7 rows of K=40 per chunk; N=45 leaves a tail
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 40, generator=g), torch.randn(45, 40, generator=g).to(torch.bfloat16)
    got = torch_moe._upcast_linear(x, w)
    torch.testing.assert_close(got, x @ w.float().T, atol=1e-5, rtol=0)
