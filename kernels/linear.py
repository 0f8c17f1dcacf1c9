"""How a dense projection multiplies, `x @ w.T`: one API, kernels chosen once per layer.

A kernel object (`make_linear(name)`, one per projection: some keep state derived from their weight) is
called as `kernel(x, w)` -> [M, N] in x's dtype (after `kernel.prepare(w)` once the weight is loaded), `kernel.fp32(x, w)` -> [M, N] float32 without the final
rounding (the LM head's logits), and `kernel.stacked(x, w, sizes)` for several projections stacked in one
weight (q, k, v): [M, sum(sizes)].
    torch  torch's GEMM; stacked projections run one GEMM each, so the result is the reference
           implementation's bit for bit (one GEMM over the stack may sum in another order on some CPUs)
    fused  torch's GEMM; stacked projections in one GEMM (GPUs: one launch instead of three)
    cpu    16-bit weights on CPU: the native small-M kernel (kernels/cpu) for a few rows, an fp32 copy of
           the weight for large batches, torch in between; stacked projections in one call
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

# M rows, K input features, N output features

# Rows up to which the `cpu` kernel runs the native small-M kernel: it reads the weight once for all rows
# and accumulates in fp32. One core of the 2-core AVX2 EPYC, [M, 1024] x [1024, 7168] bf16, cold weights
# (bench/cpu_linear.py, docs/benchmarks.md, Engine): 1.7x / 4.1x / 5.0x torch's bf16 GEMM at M = 1 / 4 /
# 16, 1.6x the fp32 copy at 16 and 1.2x at 32; at 64 the fp32 copy is ahead (0.94x).
# TODO(cpu): measured on the machine at start-up instead (issue 16); these are one chip's switch points.
NATIVE_MAX_ROWS = 32
# Rows from which the `cpu` kernel multiplies by an fp32 copy of its weight (the native kernel goes first
# up to NATIVE_MAX_ROWS). CPUs without native bf16 GEMMs (AVX2, no AVX512-BF16/AMX) run a bf16 GEMM about
# row by row (1.6 ms per row for 7168x1024 on one core of that EPYC) while the fp32 GEMM reads its weight
# once (9 ms for 16 rows, 38 ms for 64, vs 28 and 194 in bf16). Below this, a 16-bit GEMV streams the
# half-size weight once and wins.
FP32_MIN_ROWS = 16


class LinearKernel(Protocol):
    def prepare(self, w: torch.Tensor) -> None:
        """Build whatever the kernel derives from its weight, once the weight is loaded."""

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...

    def fp32(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...

    def stacked(self, x: torch.Tensor, w: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor: ...


class TorchLinear:
    """x: [M, K]; w: [N, K] -> [M, N] in x's dtype, torch's GEMM."""

    def prepare(self, w: torch.Tensor) -> None:
        return None  # nothing derived from the weight

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def fp32(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w).float()

    def stacked(self, x: torch.Tensor, w: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        return torch.cat([F.linear(x, part) for part in w.split(sizes)], dim=-1)  # [M, sum(sizes)]


class FusedLinear(TorchLinear):
    """`TorchLinear` with stacked projections in one GEMM."""

    def stacked(self, x: torch.Tensor, w: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        return F.linear(x, w)


class CpuLinear(FusedLinear):
    """16-bit weights on CPU: native kernel up to NATIVE_MAX_ROWS rows, an fp32 copy of the weight from
    FP32_MIN_ROWS, torch's GEMM otherwise (and always for fp32 weights, or where the native kernels are not
    available). Not torch's arithmetic: the same rounding points, fp32 accumulation in another order.

    `prepare(w)` makes the fp32 copy (2 bytes more per weight element); call it once the weight is loaded.
    A weight changed in place, or another weight tensor, is seen: the copy is made again on first use.
    """

    def __init__(self):
        self._fp32: torch.Tensor | None = None
        self._source: tuple[int, int] | None = None  # (id, version) of the weight the copy was made from

    def prepare(self, w: torch.Tensor) -> None:
        if not _cpu_16bit(w):
            self._fp32, self._source = None, None
            return
        self._fp32, self._source = w.float(), (id(w), w._version)

    @property
    def weight_fp32(self) -> torch.Tensor | None:
        """The fp32 copy of the weight (None for fp32 weights, or before `prepare`)."""
        return self._fp32

    def _copy(self, w: torch.Tensor) -> torch.Tensor:
        if self._source != (id(w), w._version):
            self.prepare(w)
        return self._fp32

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows <= NATIVE_MAX_ROWS and _native(w):
            from moe_runtime.kernels import cpu

            return cpu.linear(x, w)  # fp32 accumulation, rounded once to x's dtype
        if rows >= FP32_MIN_ROWS and _cpu_16bit(w):
            return F.linear(x.float(), self._copy(w)).to(x.dtype)
        return F.linear(x, w)

    def fp32(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows <= NATIVE_MAX_ROWS and _native(w):
            from moe_runtime.kernels import cpu

            return cpu.linear_fp32(x, w)  # [M, N], no 16-bit rounding
        if rows >= FP32_MIN_ROWS and _cpu_16bit(w):
            return F.linear(x.float(), self._copy(w))  # [M, N], no 16-bit rounding
        return F.linear(x, w).float()

    def stacked(self, x: torch.Tensor, w: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        return self(x, w)


def _cpu_16bit(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)


def _native(w: torch.Tensor) -> bool:
    from moe_runtime.kernels import cpu

    return _cpu_16bit(w) and cpu.available()


LINEAR_BACKENDS = {"torch": TorchLinear, "fused": FusedLinear, "cpu": CpuLinear}


class UnknownLinearBackendError(ValueError):
    """A linear backend name outside `LINEAR_BACKENDS`."""


def make_linear(name: str) -> LinearKernel:
    """A new kernel object of backend `name` (one per projection)."""
    try:
        return LINEAR_BACKENDS[name]()
    except KeyError:
        raise UnknownLinearBackendError(
            f"linear_backend={name!r} is not known; allowed: {sorted(LINEAR_BACKENDS)}"
        ) from None
