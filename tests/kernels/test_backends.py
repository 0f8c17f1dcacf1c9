"""The public API and the backend registry."""

import pytest
import torch
from moe_cases import CASES, make_inputs

from moe_runtime.errors import ConfigError
from moe_runtime.kernels import fused_moe, fused_moe_fp32, route
from moe_runtime.kernels.backends import BACKENDS, FP32_BACKENDS, resolve_backend
from moe_runtime.kernels.reference import fused_moe_reference, route_reference
from moe_runtime.kernels.torch_moe import fused_moe_torch


def test_auto_picks_by_device():
    assert resolve_backend("auto", torch.device("cpu")) is fused_moe_torch
    assert resolve_backend("auto", torch.device("cuda")) is BACKENDS["triton"]


def test_config_values_are_all_registered():
    from typing import get_args

    from moe_runtime.config import ModelLoadConfig

    allowed = get_args(ModelLoadConfig.model_fields["moe_backend"].annotation)
    assert set(allowed) == {"auto", *BACKENDS}
    assert set(FP32_BACKENDS) == set(BACKENDS)


def test_unknown_backend_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="allowed: .*'torch'"):
        resolve_backend("cuda-magic", torch.device("cpu"))


def test_megablocks_says_it_is_unavailable():
    x = make_inputs(CASES[0], torch.float32)
    with pytest.raises(ConfigError, match="megablocks"):
        fused_moe(x.hidden, x.w13, x.w2, x.routing, backend="megablocks")


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_public_fused_moe(backend):
    x = make_inputs(CASES[5], torch.float32)
    got = fused_moe(x.hidden, x.w13, x.w2, x.routing, slot_map=x.slot_map, backend=backend)
    want = fused_moe_reference(x.hidden, x.w13, x.w2, x.routing, x.slot_map)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fused_moe_fp32_is_fused_moe_before_rounding(backend, dtype):
    """fused_moe == fused_moe_fp32 rounded, bit for bit; and fp32 partials over disjoint pair subsets (the
    expert-parallel shares), summed then rounded once, give fused_moe's bits too (top-2)."""
    x = make_inputs(CASES[5], dtype)
    kw = {"slot_map": x.slot_map, "backend": backend}
    full = fused_moe_fp32(x.hidden, x.w13, x.w2, x.routing, **kw)
    assert full.dtype == torch.float32
    want = fused_moe(x.hidden, x.w13, x.w2, x.routing, **kw)
    assert torch.equal(full.to(dtype), want)
    S = x.w13.shape[0]
    parts = torch.zeros_like(full)
    for keep in (0, 1):  # even slots, then odd slots, as two ranks would own them
        slot_map = x.slot_map if x.slot_map is not None else torch.arange(S)
        slot_map = torch.where(slot_map % 2 == keep, slot_map, -1)
        parts += fused_moe_fp32(x.hidden, x.w13, x.w2, x.routing, slot_map=slot_map, backend=backend)
    assert torch.equal(parts.to(dtype), want)


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_on_cpu_is_the_reference(renormalize):
    logits = torch.randn(7, 8)
    got, want = route(logits, 2, renormalize), route_reference(logits, 2, renormalize)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.weights, want.weights)
    assert got.ids.dtype == torch.int32 and got.weights.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tiny_model_forward_with_each_backend(tiny_model_dir, backend):
    """The model's MoE blocks through each backend give the reference backend's logits (fp32)."""
    from moe_runtime.model.attention import AttentionMetadata
    from moe_runtime.model.loader import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CPU = the interpreter
    prompt = torch.tensor([1, 17, 245, 3, 99, 870, 12, 5, 640, 33, 7], device=device)
    positions = torch.arange(len(prompt), device=device)
    meta = AttentionMetadata.for_prompts([len(prompt)])
    logits = {}
    for name in ("reference", backend):
        model = load_model(tiny_model_dir, dtype="float32", device=device, moe_backend=name)
        logits[name] = model.compute_logits(model(prompt, positions, meta))
    torch.testing.assert_close(logits[backend], logits["reference"], atol=1e-4, rtol=0)
    assert torch.equal(logits[backend].argmax(-1), logits["reference"].argmax(-1))
