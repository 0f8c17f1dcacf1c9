"""The `cpu` MoE backend: the torch backend's sort and scatter with native expert GEMMs (kernels/cpu).

16-bit weights: against the reference computed in fp32 from the same 16-bit inputs, atol 2e-2 (STYLE.md's
16-bit kernel tolerance; the native path rounds where the torch backend rounds, only its GEMMs sum in
another order). fp32 weights take the torch backend's path: bit for bit the same as `torch`.
"""

from __future__ import annotations

import pytest
import torch
from moe_cases import CASES, make_inputs

from moe_runtime.kernels import cpu
from moe_runtime.kernels.cpu.dispatch import RowPlan
from moe_runtime.kernels.cpu.moe import DEFAULT_PLAN, CpuMoe, fused_moe_cpu_fp32
from moe_runtime.kernels.reference import RoutingResult, fused_moe_reference_fp32
from moe_runtime.kernels.torch_moe import fused_moe_torch_fp32, run_experts_fp32

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_16bit_matches_fp32_reference(case, dtype):
    x = make_inputs(case, dtype)
    want = fused_moe_reference_fp32(x.hidden.float(), x.w13.float(), x.w2.float(), x.routing, x.slot_map)
    got = fused_moe_cpu_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    torch.testing.assert_close(got.to(dtype).float(), want, atol=2e-2, rtol=0)  # as `fused_moe` rounds it


NATIVE_MAX_ROWS = DEFAULT_PLAN.max_rows("native")


def test_large_groups_take_the_torch_path():
    """With the default plan, a group above NATIVE_MAX_ROWS runs the torch backend's arithmetic."""
    case = next(c for c in CASES if c.routing == "one_expert")  # k=1: every token on one expert
    x = make_inputs(case, torch.bfloat16)
    reps = NATIVE_MAX_ROWS // case.T + 1
    big = torch.cat([x.hidden] * reps)  # [> NATIVE_MAX_ROWS, H], one group
    routing = RoutingResult(torch.cat([x.routing.weights] * reps), torch.cat([x.routing.ids] * reps))
    got = fused_moe_cpu_fp32(big, x.w13, x.w2, routing)
    assert torch.equal(got, fused_moe_torch_fp32(big, x.w13, x.w2, routing))


@pytest.mark.parametrize("case", CASES[:3], ids=[c.name for c in CASES[:3]])
def test_fp32_weights_equal_the_torch_backend(case):
    x = make_inputs(case, torch.float32)
    got = fused_moe_cpu_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map)
    assert torch.equal(got, fused_moe_torch_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map))


@pytest.mark.parametrize("case", [c for c in CASES if c.T * c.k <= NATIVE_MAX_ROWS], ids=lambda c: c.name)
def test_one_call_layer_equals_the_per_expert_loop(case):
    """`cpu.moe_fp32` (decode: the layer in one native call) computes what the Python loop over
    `expert_mlp` computes, bit for bit (top-1 and top-2: the k-sum has one order)."""
    x = make_inputs(case, torch.bfloat16)
    slots = x.slot_ids  # [T, k], -1 = dropped
    got = cpu.moe_fp32(x.hidden, x.w13, x.w2, slots, x.routing.weights)
    want = run_experts_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map, cpu.expert_mlp)
    assert torch.equal(got, want)


def test_one_call_layer_rejects_bad_slots():
    x = make_inputs(CASES[1], torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside"):
        cpu.moe_fp32(x.hidden, x.w13, x.w2, x.slot_ids + 100, x.routing.weights)


@pytest.mark.parametrize("choice", ["native", "bf16", "fp32"])
def test_every_plan_choice_matches_the_reference(choice):
    """Whatever the measured plan picks for a group size, the layer is the reference within the 16-bit
    tolerance: the implementations differ only in summation order (and fp32 widening)."""
    case = next(c for c in CASES if c.name == "t33_e8_k2_ragged")
    x = make_inputs(case, torch.bfloat16)
    want = fused_moe_reference_fp32(x.hidden.float(), x.w13.float(), x.w2.float(), x.routing, x.slot_map)
    moe = CpuMoe(RowPlan(bounds=(1, 1000), choices=(choice, choice)))
    torch.testing.assert_close(moe(x.hidden, x.w13, x.w2, x.routing, x.slot_map), want, atol=2e-2, rtol=0)


def test_a_plan_switches_the_implementation_by_group_size(monkeypatch):
    """Groups of up to 2 rows run native, larger ones bf16; no layer-wide native call when groups exceed 2."""
    calls = []
    monkeypatch.setattr(cpu, "expert_mlp", lambda r, *a: calls.append(("native", r.shape[0])) or torch.zeros(r.shape))
    import moe_runtime.kernels.cpu.moe as cpu_moe

    monkeypatch.setattr(cpu_moe, "expert_mlp_16bit", lambda r, *a: calls.append(("bf16", r.shape[0])) or torch.zeros(r.shape))
    case = next(c for c in CASES if c.name == "t33_e8_k2_ragged")
    x = make_inputs(case, torch.bfloat16)
    moe = cpu_moe.CpuMoe(RowPlan(bounds=(2, 64), choices=("native", "bf16")))
    moe(x.hidden, x.w13, x.w2, x.routing, x.slot_map)
    assert calls and all(kind == ("native" if n <= 2 else "bf16") for kind, n in calls)
