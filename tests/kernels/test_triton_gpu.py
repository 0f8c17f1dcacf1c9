"""GPU-only kernel checks: every case in bf16, Mixtral-8x7B shapes, and CUDA-graph capture.

bf16 results are compared with an fp32 reference over the same bf16 inputs (atol 2e-2, rtol 0). At
Mixtral sizes the inputs are scaled by 1/sqrt(fan_in) so every activation is O(1) and 2e-2 is a few bf16
ulps of the output, not a tolerance that hides a wrong row.
Run with `pytest -m gpu tests/kernels` (bench/gpu_check.sh does).
"""

import pytest
import torch
from moe_cases import CASES, make_inputs

from moe_runtime.kernels import fused_moe, route
from moe_runtime.kernels.reference import RoutingResult, fused_moe_reference_fp32, route_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MIXTRAL = dict(H=4096, I=14336, E=8, k=2)
BACKENDS = ("triton", "torch")


def fp32_reference(hidden, w13, w2, routing, slot_map=None):
    f = torch.float32
    return fused_moe_reference_fp32(hidden.to(f), w13.to(f), w2.to(f), routing, slot_map)


def mixtral_inputs(T: int, seed: int = 7):
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, inter, E = MIXTRAL["H"], MIXTRAL["I"], MIXTRAL["E"]
    bf16 = torch.bfloat16
    hidden = torch.randn(T, H, device="cuda", generator=g).to(bf16)
    w13 = (torch.randn(E, 2 * inter, H, device="cuda", generator=g) / H**0.5).to(bf16)
    w2 = (torch.randn(E, H, inter, device="cuda", generator=g) / inter**0.5).to(bf16)
    logits = torch.randn(T, E, device="cuda", generator=g)
    return hidden, w13, w2, logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cases_bf16(case, backend):
    x = make_inputs(case, torch.bfloat16, "cuda")
    got = fused_moe(x.hidden, x.w13, x.w2, x.routing, slot_map=x.slot_map, backend=backend)
    torch.testing.assert_close(got.float(), fp32_reference(x.hidden, x.w13, x.w2, x.routing, x.slot_map),
                               atol=2e-2, rtol=0)  # fmt: skip


@pytest.mark.parametrize("T", [1, 33, 512])
def test_mixtral_shapes_bf16(T):
    hidden, w13, w2, logits = mixtral_inputs(T)
    routing = route(logits, MIXTRAL["k"])
    want_routing = route_reference(logits, MIXTRAL["k"])
    assert torch.equal(routing.ids, want_routing.ids)
    got = fused_moe(hidden, w13, w2, routing)  # auto = triton on CUDA
    torch.testing.assert_close(got.float(), fp32_reference(hidden, w13, w2, routing), atol=2e-2, rtol=0)


@pytest.mark.parametrize("T", [1, 33])
def test_cuda_graph_capture_and_replay(T):
    hidden, w13, w2, logits = mixtral_inputs(T)
    static_hidden, static_logits = hidden.clone(), logits.clone()
    fused_moe(static_hidden, w13, w2, route(static_logits, 2))  # warm up: compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fused_moe(static_hidden, w13, w2, route(static_logits, 2))
    # new inputs (new routing too) through the captured graph
    hidden2, _, _, logits2 = mixtral_inputs(T, seed=8)
    static_hidden.copy_(hidden2)
    static_logits.copy_(logits2)
    graph.replay()
    torch.cuda.synchronize()
    want = fp32_reference(hidden2, w13, w2, route_reference(logits2, 2))
    torch.testing.assert_close(static_out.float(), want, atol=2e-2, rtol=0)


def test_slot_map_drops_experts_on_mixtral_shapes():
    hidden, w13, w2, logits = mixtral_inputs(16)
    routing = route(logits, 2)
    slot_map = torch.tensor([0, -1, 1, 2, -1, 3, 4, 5], device="cuda", dtype=torch.int32)
    resident = torch.tensor([0, 2, 3, 5, 6, 7], device="cuda")
    got = fused_moe(hidden, w13[resident], w2[resident], routing, slot_map=slot_map)
    want = fp32_reference(hidden, w13[resident], w2[resident], routing, slot_map)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
    assert isinstance(routing, RoutingResult)
