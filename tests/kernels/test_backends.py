"""The public API and the backend registry."""

import pytest
import torch
from moe_cases import CASES, make_inputs

from moe_runtime.kernels import (
    BACKEND_NAMES,
    UNAVAILABLE_BACKENDS,
    BackendUnavailableError,
    UnknownBackendError,
    fused_moe,
    fused_moe_fp32,
    route,
)
from moe_runtime.kernels.backends import BACKENDS, resolve_backend
from moe_runtime.kernels.reference import fused_moe_reference_fp32, route_reference
from moe_runtime.kernels.torch_moe import fused_moe_torch_fp32

# The backends this build can run, and how far each one's rounded output may be from the reference's in
# fp32 (0: bit for bit; triton accumulates its GEMMs in tiles, in another order).
RUNNABLE = tuple(name for name in BACKENDS if name not in UNAVAILABLE_BACKENDS)
FP32_ATOL = {"reference": 0.0, "torch": 0.0, "cpu": 0.0, "triton": 1e-5}


def test_auto_picks_by_device():
    assert resolve_backend("auto", torch.device("cpu")) is fused_moe_torch_fp32
    assert resolve_backend("auto", torch.device("cuda")) is BACKENDS["triton"]


def test_names_are_the_registry_plus_auto():
    assert BACKEND_NAMES == ("auto", *BACKENDS)
    assert set(UNAVAILABLE_BACKENDS) <= set(BACKENDS)
    assert set(FP32_ATOL) == set(RUNNABLE)


def test_config_accepts_exactly_the_runnable_backends():
    """The runtime validates `model.moe_backend` against the registry: one-line ConfigErrors naming the
    value, never a kernels error at the first forward."""
    from moe_runtime.config import ModelLoadConfig, load_config
    from moe_runtime.errors import ConfigError

    for name in ("auto", *RUNNABLE):
        assert ModelLoadConfig(moe_backend=name).moe_backend == name
    unknown = r"model\.moe_backend='cuda-magic': not a MoE backend; allowed: .*'torch'"
    with pytest.raises(ConfigError, match=unknown):
        load_config(overrides=["model.moe_backend=cuda-magic"])
    for name in UNAVAILABLE_BACKENDS:
        with pytest.raises(ConfigError, match=rf"model\.moe_backend='{name}': not available in this build"):
            load_config(overrides=[f"model.moe_backend={name}"])


def test_unknown_backend_names_the_allowed_ones():
    unknown = r"moe_backend='cuda-magic' is not known; allowed: .*'torch'"
    with pytest.raises(UnknownBackendError, match=unknown):
        resolve_backend("cuda-magic", torch.device("cpu"))
    assert issubclass(UnknownBackendError, ValueError)


def test_megablocks_says_it_is_unavailable():
    x = make_inputs(CASES[0], torch.float32)
    with pytest.raises(BackendUnavailableError, match="megablocks"):
        fused_moe(x.hidden, x.w13, x.w2, x.routing, backend="megablocks")


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("case", [CASES[2], CASES[5]], ids=lambda c: c.name)
def test_every_backend_rounds_to_the_reference(case, backend):
    """Each registered function has the fp32 contract, and its rounding is the reference's rounding:
    bit for bit where FP32_ATOL says 0."""
    x = make_inputs(case, torch.float32)
    got = BACKENDS[backend](x.hidden, x.w13, x.w2, x.routing, x.slot_map)
    assert got.dtype == torch.float32 and got.shape == x.hidden.shape
    want = fused_moe_reference_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map)
    torch.testing.assert_close(got, want, atol=FP32_ATOL[backend], rtol=0)
    rounded = fused_moe(x.hidden, x.w13, x.w2, x.routing, slot_map=x.slot_map, backend=backend)
    assert torch.equal(rounded, got.to(x.hidden.dtype))


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_public_fused_moe(backend):
    x = make_inputs(CASES[5], torch.float32)
    got = fused_moe(x.hidden, x.w13, x.w2, x.routing, slot_map=x.slot_map, backend=backend)
    want = fused_moe_reference_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
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
    from moe_runtime.checkpoint.loader import load_model
    from moe_runtime.kernels.attention import AttentionMetadata
    from moe_runtime.model.experts import LocalExpertsBuilder
    from moe_runtime.model.parts import ModelParts

    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CPU = the interpreter
    prompt = torch.tensor([1, 17, 245, 3, 99, 870, 12, 5, 640, 33, 7], device=device)
    positions = torch.arange(len(prompt), device=device)
    meta = AttentionMetadata.for_prompts([len(prompt)])
    logits = {}
    for name in ("reference", backend):
        model = load_model(tiny_model_dir, dtype="float32", device=device, parts=ModelParts(experts=LocalExpertsBuilder(name)))
        logits[name] = model.compute_logits(model(prompt, positions, meta))
    torch.testing.assert_close(logits[backend], logits["reference"], atol=1e-4, rtol=0)
    assert torch.equal(logits[backend].argmax(-1), logits["reference"].argmax(-1))
