"""The `cpu` MoE backend: the torch backend's sort / scatter with native expert GEMMs for small groups.

Steps 1 and 3 are `torch_moe.run_experts_fp32` (sort the (token, k) pairs by slot once, gather, weight in
fp32, scatter back, sum over k in fp32; `kernels.fused_moe` rounds once). Step 2 differs: an active expert
with 16-bit weights and at most `NATIVE_MAX_ROWS` rows runs `kernels.cpu.expert_mlp`, which reads its w13
and w2 once for all its rows (rounding where the torch backend rounds below UPCAST_MIN_ROWS); larger groups
(prefill) and fp32 weights take the torch backend's path, whose fp32 GEMMs win there. Without the native
kernels (no AVX2, no compiler) every group takes the torch path: this backend then equals `torch`.

Not bit-identical to the reference: the same rounding points, but fp32 accumulation in another order
(tests/kernels/test_cpu_moe.py states the tolerance). `model.exact: true` keeps the `torch` backend.
"""

from __future__ import annotations

import torch

from moe_runtime.kernels import cpu
from moe_runtime.kernels.reference import RoutingResult
from moe_runtime.kernels.torch_moe import _expert_mlp, run_experts_fp32

# Rows per expert up to which the native kernel runs it. One core of the 2-core AVX2 EPYC, one mini
# expert (H 1024, I 3584, bf16), bench/cpu_linear.py --shapes expert: 1.7x / 3.8x / 1.6x / 1.3x the torch
# backend's expert at 1 / 4 / 16 / 32 rows (its chunked fp32 from 16 rows), equal at 64.
NATIVE_MAX_ROWS = 32


def _native_expert_mlp(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: rows [n, H]; w13 [2I, H]; w2 [H, I] -> [n, H] (fp32 from the native kernel)."""
    if _is_16bit(w13) and rows.shape[0] <= NATIVE_MAX_ROWS and cpu.available():
        return cpu.expert_mlp(rows, w13, w2)
    return _expert_mlp(rows, w13, w2)


def fused_moe_cpu_fp32(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: RoutingResult,
    slot_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference.fused_moe_reference_fp32`: hidden [T, H]; w13 [S, 2I, H]; w2 [S, H, I];
    routing ids/weights [T, k]; slot_map [E] or None. Returns [T, H] float32, not rounded. CPU tensors.

    When no group can exceed NATIVE_MAX_ROWS (T * k rows in all: decode), the whole layer is one native
    call (`cpu.moe_fp32`, the same arithmetic without the Python per-expert loop).
    """
    if _is_16bit(w13) and hidden.shape[0] * routing.top_k <= NATIVE_MAX_ROWS and cpu.available():
        return cpu.moe_fp32(hidden, w13, w2, routing.slots(slot_map), routing.weights)
    return run_experts_fp32(hidden, w13, w2, routing, slot_map, _native_expert_mlp)


def _is_16bit(w: torch.Tensor) -> bool:
    return w.dtype in (torch.bfloat16, torch.float16)
