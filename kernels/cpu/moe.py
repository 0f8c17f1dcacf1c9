"""The `cpu` MoE backend: the torch backend's sort / scatter, each expert group on its fastest implementation.

Steps 1 and 3 are `torch_moe.run_experts_fp32` (sort the (token, k) pairs by slot once, gather, weight in
fp32, scatter back, sum over k in fp32; `kernels.fused_moe` rounds once). Step 2 runs each active expert
with 16-bit weights on the implementation its `RowPlan` picks for the group's rows (kernels/cpu/dispatch.py,
measured on the machine): `native` (`kernels.cpu.expert_mlp`, which reads w13 and w2 once for all rows),
`bf16` (torch's 16-bit GEMMs) or `fp32` (the weights widened chunk by chunk). When every group is small
enough for `native` (decode: T * k rows in all), the whole layer is one native call (`cpu.moe_fp32`, the
same arithmetic without the Python per-expert loop). fp32 weights, and `native` where the native kernels
did not build, take the torch backend's path.

8-bit experts (`kernels.quant.QuantizedWeight`: int8, or float8_e4m3fn from FP8 checkpoints or
`model.quantization: fp8`) take the same plan with the same choice names: `native` the native kernels on the
8-bit values (widened in registers), `bf16` the expert dequantized to the activation dtype in one native
pass and torch's GEMMs, `fp32` dequantized chunk by chunk to fp32 (the plan is measured on weights of that
format then: `dispatch.plan_expert(..., weights="int8" | "fp8")`).

Not bit-identical to the reference: the same rounding points, but fp32 accumulation in another order
(tests/kernels/test_cpu_moe.py states the tolerance). `model.exact: true` keeps the `torch` backend.
"""

from __future__ import annotations

import torch

from moe_runtime.kernels import cpu
from moe_runtime.kernels.cpu.dispatch import RowPlan
from moe_runtime.kernels.quant import QuantizedWeight
from moe_runtime.kernels.reference import RoutingResult
from moe_runtime.kernels.torch_moe import (
    _expert_mlp,
    expert_mlp_16bit,
    expert_mlp_dequantized,
    expert_mlp_fp32,
    run_experts_fp32,
)

# What runs without a measured plan (the registered `cpu` backend, offloaded and sharded experts): the
# switch points of the 2-core AVX2 EPYC it was tuned on. One mini expert (H 1024, I 3584, bf16),
# bench/cpu_linear.py --shapes expert: native 1.7x / 3.8x / 1.6x / 1.3x the torch backend's expert at
# 1 / 4 / 16 / 32 rows (its chunked fp32 from 16 rows), equal at 64.
DEFAULT_PLAN = RowPlan(bounds=(32, 33), choices=("native", "fp32"))

__all__ = ["CpuMoe", "DEFAULT_PLAN", "expert_mlp_16bit", "expert_mlp_fp32", "fused_moe_cpu_fp32"]


class CpuMoe:
    """The `cpu` backend with a plan for the expert groups (fp32-partial contract, see `fused_moe_cpu_fp32`)."""

    def __init__(self, plan: RowPlan | None = None):
        self.plan = plan if plan is not None else DEFAULT_PLAN
        # Groups up to this many rows all choose `native`: a layer whose T * k rows fit is one native call.
        self.native_upto = next((b for b, c in zip(self.plan.bounds, self.plan.choices, strict=True)
                                 if c != "native"), self.plan.bounds[-1] + 1) - 1
        self._impls = {"native": self._native, "bf16": expert_mlp_16bit, "fp32": expert_mlp_fp32}
        self._impls_int8 = {"native": self._native, "bf16": _expert_mlp_dequantized_native, "fp32": expert_mlp_fp32}

    def __call__(
        self,
        hidden: torch.Tensor,
        w13: torch.Tensor | QuantizedWeight,
        w2: torch.Tensor | QuantizedWeight,
        routing: RoutingResult,
        slot_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [T, H]; w13 [S, 2I, H]; w2 [S, H, I]; routing ids/weights [T, k]; slot_map [E] or None.
        Returns [T, H] float32, not rounded. CPU tensors."""
        if isinstance(w13, QuantizedWeight):
            return self._quantized(hidden, w13, w2, routing, slot_map)
        if not _is_16bit(w13):
            return run_experts_fp32(hidden, w13, w2, routing, slot_map, _expert_mlp)
        if hidden.shape[0] * routing.top_k <= self.native_upto and cpu.available():
            return cpu.moe_fp32(hidden, w13, w2, routing.slots(slot_map), routing.weights)
        return run_experts_fp32(hidden, w13, w2, routing, slot_map, self._expert)

    def _quantized(self, hidden, w13: QuantizedWeight, w2: QuantizedWeight, routing, slot_map) -> torch.Tensor:
        if w13.dtype not in cpu.EIGHT_BIT or not cpu.available():
            return run_experts_fp32(hidden, w13, w2, routing, slot_map, expert_mlp_dequantized)
        if hidden.shape[0] * routing.top_k <= self.native_upto:
            return cpu.moe_fp32(hidden, w13, w2, routing.slots(slot_map), routing.weights)
        return run_experts_fp32(hidden, w13, w2, routing, slot_map, self._expert_int8)

    def _expert_int8(self, rows: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight) -> torch.Tensor:
        return self._impls_int8[self.plan.choice(rows.shape[0])](rows, w13, w2)

    def _expert(self, rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """One expert: rows [n, H]; w13 [2I, H]; w2 [H, I] -> [n, H], on the plan's choice for n rows."""
        return self._impls[self.plan.choice(rows.shape[0])](rows, w13, w2)

    @staticmethod
    def _native(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        if cpu.available():
            return cpu.expert_mlp(rows, w13, w2)
        return _expert_mlp(rows, w13, w2)


def _expert_mlp_dequantized_native(rows: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight) -> torch.Tensor:
    """`expert_mlp_dequantized` with the expert dequantized in one native pass (the same weights, bits and
    all): torch's 16-bit GEMMs on it at any row count (oneDNN's AVX512-BF16 / AMX where the CPU has them;
    the plan's `fp32` choice is the chunked fp32 alternative)."""
    return expert_mlp_16bit(rows, cpu.dequantize(w13, rows.dtype), cpu.dequantize(w2, rows.dtype))


fused_moe_cpu_fp32 = CpuMoe()  # the registered backend: the default plan


def _is_16bit(w: torch.Tensor) -> bool:
    return w.dtype in (torch.bfloat16, torch.float16)
