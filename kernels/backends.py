"""Backend registry: backend name -> fused MoE function, looked up once per call by name and device.

Every entry has the contract of `reference.fused_moe_reference(hidden, w13, w2, routing, slot_map)`.
`auto` means Triton on CUDA and the torch backend elsewhere; `cpu` is the torch backend with native
expert GEMMs for small groups (kernels/cpu, not bit-identical to the reference; the engine picks it for
`auto` on CPU unless `model.exact`). The Triton entry imports its kernel modules
on first use, not at import time: `@triton.jit` reads TRITON_INTERPRET when a kernel is defined, so the
interpreter switch (tests/kernels/conftest.py) must win the race with the first import.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_runtime.errors import ConfigError
from moe_runtime.kernels.cpu.moe import fused_moe_cpu, fused_moe_cpu_fp32
from moe_runtime.kernels.reference import RoutingResult, fused_moe_reference, fused_moe_reference_fp32
from moe_runtime.kernels.torch_moe import fused_moe_torch, fused_moe_torch_fp32

FusedMoeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RoutingResult, "torch.Tensor | None"], torch.Tensor]


def _triton(hidden, w13, w2, routing, slot_map):
    from moe_runtime.kernels.triton.fused_moe import fused_moe_triton

    return fused_moe_triton(hidden, w13, w2, routing, slot_map)


def _triton_fp32(hidden, w13, w2, routing, slot_map):
    from moe_runtime.kernels.triton.fused_moe import fused_moe_triton_fp32

    return fused_moe_triton_fp32(hidden, w13, w2, routing, slot_map)


def _megablocks(hidden, w13, w2, routing, slot_map):
    # TODO(kernels): wire megablocks' grouped GEMM once a CUDA host with megablocks can test it.
    raise ConfigError(
        "moe_backend='megablocks' is not available in this build (megablocks needs a CUDA host and is not "
        "wired yet); use 'auto', 'triton' or 'torch'"
    )


BACKENDS: dict[str, FusedMoeFn] = {
    "reference": fused_moe_reference,
    "torch": fused_moe_torch,
    "cpu": fused_moe_cpu,
    "triton": _triton,
    "megablocks": _megablocks,
}

# The same backends before the final rounding: [T, H] fp32 (`moe_runtime.kernels.fused_moe_fp32`).
FP32_BACKENDS: dict[str, FusedMoeFn] = {
    "reference": fused_moe_reference_fp32,
    "torch": fused_moe_torch_fp32,
    "cpu": fused_moe_cpu_fp32,
    "triton": _triton_fp32,
    "megablocks": _megablocks,
}

# What `auto` means on each device type.
AUTO: dict[str, str] = {"cuda": "triton", "cpu": "torch"}


def resolve_backend(name: str, device: torch.device, table: dict[str, FusedMoeFn] = BACKENDS) -> FusedMoeFn:
    """The fused MoE function for backend `name` on `device` ("auto" picks by device type), from `table`
    (`BACKENDS`, or `FP32_BACKENDS` for the unrounded variants)."""
    if name == "auto":
        name = AUTO.get(device.type, "torch")
    try:
        return table[name]
    except KeyError:
        allowed = ["auto", *BACKENDS]
        raise ConfigError(f"moe_backend={name!r} is not known; allowed: {allowed}") from None
