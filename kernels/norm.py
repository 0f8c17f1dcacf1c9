"""RMSNorm with an optional fused residual add: one API, backends chosen once.

`rms_norm(x, weight, eps, residual=None)`: with `residual`, first residual += x in place (rounded to the
dtype, as the model's `h = h + sublayer(...)`), then the updated residual is normalized. The model's residual
stream goes through its norms this way, so each add costs no launch of its own.
    torch   the reference implementation's arithmetic (`rms_norm_reference`, below)
    triton  one launch per call (kernels/triton/rms_norm.py; GPU)
    cpu     the native kernel (kernels/cpu/rms_norm.cpp; 16-bit weights, sums of squares in another order)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# T tokens, D hidden

RmsNorm = Callable[[torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], torch.Tensor]


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """The model's `RMSNorm` of x [T, D] with weight [D] (x's dtype) -> [T, D] in x's dtype.

    With residual [T, D]: residual += x first, in place and rounded to the dtype (the model's
    `h = h + block(h)`), and the updated residual is what gets normalized.
    """
    if residual is not None:
        residual += x  # [T, D]
        x = residual
    h = x.float()  # [T, D]
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [T, D]
    return weight * h.to(x.dtype)  # 16-bit: the product in fp32, rounded once


def _triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    from moe_runtime.kernels.triton.rms_norm import rms_norm  # lazy: see backends.py

    return rms_norm(x, weight, eps, residual)


def _cpu(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    from moe_runtime.kernels import cpu

    return cpu.rms_norm(x, weight, eps, residual)


RMS_NORM_BACKENDS: dict[str, RmsNorm] = {"torch": rms_norm_reference, "triton": _triton, "cpu": _cpu}


class UnknownNormBackendError(ValueError):
    """A norm backend name outside `RMS_NORM_BACKENDS`."""


def make_rms_norm(name: str) -> RmsNorm:
    try:
        return RMS_NORM_BACKENDS[name]
    except KeyError:
        raise UnknownNormBackendError(f"norm_backend={name!r} is not known; allowed: {sorted(RMS_NORM_BACKENDS)}") from None
