"""How a dense projection multiplies, `x @ w.T (+ b)`: one API, kernels chosen once per layer.

A kernel object (`make_linear(name)`, one per projection: some keep state derived from their weight) is
called as `kernel(x, w, b=None)` -> [M, N] in x's dtype (after `kernel.prepare(w)` once the weight is
loaded), `kernel.fp32(x, w)` -> [M, N] float32 without the final rounding (the LM head's logits), and
`kernel.stacked(x, w, sizes, b=None)` for several projections stacked in one weight (q, k, v): [M, sum(sizes)].
A bias b [N] is added before the one rounding to x's dtype, as `nn.Linear` does (q/k/v biases of Qwen2-MoE).
    torch  torch's GEMM; stacked projections run one GEMM each, so the result is the reference
           implementation's bit for bit (one GEMM over the stack may sum in another order on some CPUs)
    fused  torch's GEMM; stacked projections in one GEMM (GPUs: one launch instead of three)
    cpu    16-bit weights on CPU: per row count the fastest of the native small-M kernel (kernels/cpu),
           torch's 16-bit GEMM and an fp32 copy of the weight, as measured on the machine
           (kernels/cpu/dispatch.py); stacked projections in one call

Every kernel also takes an 8-bit weight (`kernels.quant.QuantizedWeight` [N, K] with one fp32 scale per row:
`model.quantize_dense`). Its arithmetic is defined as the weight dequantized to x's dtype, then the GEMM
(`torch` computes exactly that); `fused` on CUDA runs the Triton w8a16 GEMM (kernels/triton/linear_w8a16.py:
the 8-bit values widened in registers, each output column scaled once after the K loop); `cpu` runs int8
weights through the native kernel for a few rows and the dequantized weight through torch's GEMM for many,
as measured (FP8 weights: the dequantized weight, torch's GEMM).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from moe_runtime.kernels.cpu.dispatch import CpuPlan, RowPlan
from moe_runtime.kernels.quant import QuantizedWeight

# M rows, K input features, N output features

# What the `cpu` kernel runs without a measured plan (kernels/cpu/dispatch.py): the switch points of the
# 2-core AVX2 EPYC it was tuned on ([M, 1024] x [1024, 7168] bf16, one core, cold weights, bench/cpu_linear.py:
# native 1.7x / 4.1x / 5.0x torch's bf16 GEMM at M = 1 / 4 / 16, 1.6x the fp32 copy at 16 and 1.2x at 32;
# from 64 the fp32 copy is ahead). On a CPU with AVX512-BF16 or AMX torch's bf16 GEMM wins from a few
# rows instead: the engine measures (engine/parts.py).
DEFAULT_PLAN = RowPlan(bounds=(32, 33), choices=("native", "fp32"))
# 8-bit weights without a measured plan: the native kernel to the same 32 rows, then the weight dequantized
# to the activation dtype for torch's GEMM (an fp32 copy would hold 4 bytes per weight: not for 8-bit ones).
DEFAULT_PLAN_8BIT = RowPlan(bounds=(32, 33), choices=("native", "bf16"))

Weight = torch.Tensor | QuantizedWeight  # [N, K]


class LinearKernel(Protocol):
    def prepare(self, w: Weight) -> None:
        """Build whatever the kernel derives from its weight, once the weight is loaded."""

    def __call__(self, x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor: ...

    def fp32(self, x: torch.Tensor, w: Weight) -> torch.Tensor: ...

    def stacked(self, x: torch.Tensor, w: Weight, sizes: tuple[int, ...],
                b: torch.Tensor | None = None) -> torch.Tensor: ...


class TorchLinear:
    """x: [M, K]; w: [N, K]; b: [N] or None -> [M, N] in x's dtype, torch's GEMM (8-bit w: dequantized to
    x's dtype first, the definition of the quantized projection)."""

    def prepare(self, w: Weight) -> None:
        return None  # nothing derived from the weight

    def __call__(self, x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, dense(w, x.dtype), b)

    def fp32(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        return F.linear(x, dense(w, x.dtype)).float()

    def stacked(self, x: torch.Tensor, w: Weight, sizes: tuple[int, ...],
                b: torch.Tensor | None = None) -> torch.Tensor:
        biases = [None] * len(sizes) if b is None else b.split(sizes)
        parts = dense(w, x.dtype).split(sizes)
        return torch.cat([F.linear(x, part, bias) for part, bias in zip(parts, biases, strict=True)],
                         dim=-1)  # [M, sum(sizes)]


class FusedLinear(TorchLinear):
    """`TorchLinear` with stacked projections in one GEMM; 8-bit weights on CUDA through the Triton w8a16
    GEMM (chosen in `prepare`, from the loaded weight's format and device)."""

    def __init__(self):
        self._w8a16 = False

    def prepare(self, w: Weight) -> None:
        self._w8a16 = isinstance(w, QuantizedWeight) and w.device.type == "cuda" and (
            w.dtype == torch.int8 or torch.cuda.get_device_capability(w.device) >= (8, 9)
        )  # Triton widens e4m3 in registers from Ada / Hopper on; older GPUs dequantize (torch)

    def __call__(self, x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
        if self._w8a16:
            from moe_runtime.kernels.triton.linear_w8a16 import linear_w8a16

            return linear_w8a16(x, w, b).to(x.dtype)  # [M, N], fp32 rounded once
        return super().__call__(x, w, b)

    def fp32(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        if self._w8a16:
            from moe_runtime.kernels.triton.linear_w8a16 import linear_w8a16

            return linear_w8a16(x, w)  # [M, N] fp32
        return super().fp32(x, w)

    def stacked(self, x: torch.Tensor, w: Weight, sizes: tuple[int, ...],
                b: torch.Tensor | None = None) -> torch.Tensor:
        return self(x, w, b)


def dense(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """w as a tensor of `dtype`'s kind: a 16/32-bit weight as it is, an 8-bit one dequantized to `dtype`
    (`w.dequantize(dtype)`'s bits; on the CPU in one native pass, `cpu.dequantize`)."""
    if not isinstance(w, QuantizedWeight):
        return w
    from moe_runtime.kernels import cpu

    return cpu.dequantize(w, dtype)


class CpuLinear(FusedLinear):
    """Weights on CPU: each call runs what the plan picks for its rows (kernels/cpu/dispatch.py):
    `native` (the small-M kernel; torch's bf16 GEMM where the native kernels did not build), `bf16` (torch's
    16-bit GEMM) or `fp32` (an fp32 copy of the weight). fp32 weights always take torch's GEMM. Not torch's
    arithmetic: the same rounding points, fp32 accumulation in another order. 8-bit weights (int8, FP8):
    `native`, or `bf16` / `fp32` on the weight dequantized to that dtype at each call (no copy is kept: it
    would undo the saving).

    plan: the measured `CpuPlan` (the row plan for this weight's shape and format), or None for the defaults.
    `prepare(w)` picks the row plan and makes the fp32 copy if the plan ever uses it (2 bytes more per
    weight element); call it once the weight is loaded. A weight changed in place, or another weight
    tensor, is seen: the copy is made again on first use.
    """

    def __init__(self, plan: CpuPlan | None = None):
        super().__init__()
        self._plan = plan
        self.rows = DEFAULT_PLAN
        self._fp32: torch.Tensor | None = None
        self._source: tuple[int, int] | None = None  # (id, version) of the weight the copy was made from

    def prepare(self, w: Weight) -> None:
        measured = self._plan.linear_plan(w) if self._plan is not None else None
        default = DEFAULT_PLAN_8BIT if isinstance(w, QuantizedWeight) else DEFAULT_PLAN
        self.rows = measured if measured is not None else default
        if not _cpu_16bit(w) or "fp32" not in self.rows.choices:
            self._fp32, self._source = None, None
            return
        self._fp32, self._source = w.float(), (id(w), w._version)

    @property
    def weight_fp32(self) -> torch.Tensor | None:
        """The fp32 copy of the weight (None for fp32 and 8-bit weights, or before `prepare`)."""
        return self._fp32

    def _copy(self, w: torch.Tensor) -> torch.Tensor:
        if self._source != (id(w), w._version):
            self.prepare(w)
        return self._fp32

    def _choice(self, rows: int, w: Weight) -> str:
        if isinstance(w, QuantizedWeight):
            if w.device.type != "cpu":
                return "bf16"
        elif not _cpu_16bit(w):
            return "bf16"  # torch's GEMM in the weight's own dtype
        choice = self.rows.choice(rows)
        return "bf16" if choice == "native" and not _native_available() else choice

    def __call__(self, x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
        choice = self._choice(x.shape[0], w)
        if choice == "native":
            from moe_runtime.kernels import cpu

            if b is not None:  # the native kernel has no bias: add it before the one rounding
                return (cpu.linear_fp32(x, w) + b.float()).to(x.dtype)
            return cpu.linear(x, w)  # fp32 accumulation, rounded once to x's dtype
        if choice == "fp32":
            return F.linear(x.float(), self._wide(w), None if b is None else b.float()).to(x.dtype)
        return F.linear(x, dense(w, x.dtype), b)

    def fp32(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        choice = self._choice(x.shape[0], w)
        if choice == "native":
            from moe_runtime.kernels import cpu

            return cpu.linear_fp32(x, w)  # [M, N], no 16-bit rounding
        if choice == "fp32":
            return F.linear(x.float(), self._wide(w))  # [M, N], no 16-bit rounding
        return F.linear(x, dense(w, x.dtype)).float()

    def _wide(self, w: Weight) -> torch.Tensor:
        """The weight in fp32: the kept copy of a 16-bit one, an 8-bit one dequantized now."""
        return dense(w, torch.float32) if isinstance(w, QuantizedWeight) else self._copy(w)


def _cpu_16bit(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)


def _native_available() -> bool:
    from moe_runtime.kernels import cpu

    return cpu.available()


LINEAR_BACKENDS = {"torch": TorchLinear, "fused": FusedLinear, "cpu": CpuLinear}


class UnknownLinearBackendError(ValueError):
    """A linear backend name outside `LINEAR_BACKENDS`."""


def make_linear(name: str, plan: CpuPlan | None = None) -> LinearKernel:
    """A new kernel object of backend `name` (one per projection); `plan` reaches the `cpu` kernel."""
    try:
        kernel = LINEAR_BACKENDS[name]
    except KeyError:
        raise UnknownLinearBackendError(
            f"linear_backend={name!r} is not known; allowed: {sorted(LINEAR_BACKENDS)}"
        ) from None
    return kernel(plan) if kernel is CpuLinear else kernel()
