"""Backend registry: backend name -> fused MoE function, looked up by name and device.

Every entry has the contract of `reference.fused_moe_reference_fp32(hidden, w13, w2, routing, slot_map)`:
[T, H] float32, each token's k weighted pairs summed in fp32 and not rounded; `moe_runtime.kernels.fused_moe`
rounds that once to hidden's dtype. `auto` means Triton on CUDA and the torch backend elsewhere; `cpu` is
the torch backend with native expert GEMMs for small groups (kernels/cpu, not bit-identical to the
reference; the engine picks it for `auto` on CPU unless `model.exact`). The Triton entry imports its kernel
modules on first use, not at import time: `@triton.jit` reads TRITON_INTERPRET when a kernel is defined, so
the interpreter switch (tests/kernels/conftest.py) must win the race with the first import.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_runtime.kernels.cpu.dispatch import RowPlan
from moe_runtime.kernels.cpu.moe import CpuMoe, fused_moe_cpu_fp32
from moe_runtime.kernels.reference import RoutingResult, fused_moe_reference_fp32
from moe_runtime.kernels.torch_moe import fused_moe_torch_fp32

FusedMoeFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, RoutingResult, "torch.Tensor | None"], torch.Tensor
]


class UnknownBackendError(ValueError):
    """A MoE backend name that is neither registered nor "auto". The runtime's config checks
    `model.moe_backend` against BACKEND_NAMES first, so users get its ConfigError instead."""


class BackendUnavailableError(RuntimeError):
    """A registered MoE backend that this build cannot run (see UNAVAILABLE_BACKENDS)."""


# Registered backends this build cannot run: name -> why, and what to use instead.
UNAVAILABLE_BACKENDS: dict[str, str] = {
    "megablocks": "megablocks needs a CUDA host and is not wired yet; use 'auto', 'triton' or 'torch'",
}


def _triton(hidden, w13, w2, routing, slot_map):
    # 16-bit and 8-bit (QuantizedWeight) experts alike: int8 ones w8a16 (tiles widened in the kernel), fp8
    # ones w8a8 (activations quantized per token) where the GPU has fp8 tensor cores, else w8a16
    from moe_runtime.kernels.triton.fused_moe import fused_moe_for

    # fused_moe_for works the function out once per (device, format), then remembers it
    return fused_moe_for(hidden.device, w13.dtype)(hidden, w13, w2, routing, slot_map)


def _megablocks(hidden, w13, w2, routing, slot_map):
    # TODO(kernels): wire megablocks' grouped GEMM once a CUDA host with megablocks can test it.
    reason = UNAVAILABLE_BACKENDS["megablocks"]
    raise BackendUnavailableError(f"moe_backend='megablocks' is not available in this build: {reason}")


BACKENDS: dict[str, FusedMoeFn] = {
    "reference": fused_moe_reference_fp32,
    "torch": fused_moe_torch_fp32,
    "cpu": fused_moe_cpu_fp32,
    "triton": _triton,
    "megablocks": _megablocks,
}

# What `auto` means on each device type.
AUTO: dict[str, str] = {"cuda": "triton", "cpu": "torch"}

# Every name `resolve_backend` accepts, "auto" first: what `model.moe_backend` may be.
BACKEND_NAMES: tuple[str, ...] = ("auto", *BACKENDS)


def resolve_backend(name: str, device: torch.device) -> FusedMoeFn:
    """The fp32 fused MoE function of backend `name` on `device` ("auto" picks by device type).

    Raises UnknownBackendError for a name not in BACKEND_NAMES.
    """
    if name == "auto":
        name = AUTO.get(device.type, "torch")
    try:
        return BACKENDS[name]
    except KeyError:
        allowed = list(BACKEND_NAMES)
        raise UnknownBackendError(f"moe_backend={name!r} is not known; allowed: {allowed}") from None


def moe_kernel(name: str, expert_plan: RowPlan | None = None) -> FusedMoeFn:
    """The fp32 fused MoE function of backend `name` for a caller that keeps it (a layer's experts): the
    `cpu` backend with a measured plan for its expert groups (kernels/cpu/dispatch.py) when one is given,
    else the registered function, "auto" resolved by the device of each call's hidden states."""
    if name == "cpu" and expert_plan is not None:
        return CpuMoe(expert_plan)
    if name != "auto":
        return resolve_backend(name, torch.device("cpu"))  # a fixed name: the same function on any device
    return lambda hidden, *args: resolve_backend(name, hidden.device)(hidden, *args)
