"""The Triton MoE with 8-bit expert weights (w8a16): align -> grouped GEMM 1 -> grouped GEMM 2 -> combine.

`fused_moe.py`'s pipeline with the two grouped GEMMs replaced by their w8a16 twins (int8 or float8_e4m3fn
values, one fp32 scale per output row, widened in registers, fp32 accumulation, scales applied after the K
loop). Same launches, same static grids (only shapes decide them, not routing or scale values), so a decode
step with quantized experts is captured in a CUDA graph like a 16-bit one. Tiles come from the tuned table
of the weight format (`dtype=int8_w8a16` / `fp8_w8a16` in `kernels/tuned/`), else the heuristic.
Reference: `reference.fused_moe_reference_fp32` on the `QuantizedWeight`s (their dequantized weights).
"""

from __future__ import annotations

import torch

from moe_runtime.kernels.quant import QuantizedWeight
from moe_runtime.kernels.reference import RoutingResult
from moe_runtime.kernels.tile_config import MoeShape, TileConfig, device_name, tile_config_for
from moe_runtime.kernels.triton.align import align
from moe_runtime.kernels.triton.combine import combine
from moe_runtime.kernels.triton.grouped_gemm1_w8a16 import grouped_gemm1_w8a16
from moe_runtime.kernels.triton.grouped_gemm2_w8a16 import grouped_gemm2_w8a16


def fused_moe_triton_w8a16_fp32(
    hidden: torch.Tensor,
    w13: QuantizedWeight,
    w2: QuantizedWeight,
    routing: RoutingResult,
    slot_map: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """`fused_moe_triton_fp32` for quantized experts; config=None looks up the tuned table.

    hidden: [T, H] fp32 / fp16 / bf16 (bf16 on CUDA only); w13: QuantizedWeight data [S, 2I, H], scale
    [S, 2I]; w2: QuantizedWeight data [S, H, I], scale [S, H], both int8 or both float8_e4m3fn; routing ids
    [T, k] in [0, E); slot_map: [E] or None. Returns [T, H] float32, not rounded (the backends' contract).
    """
    T, H = hidden.shape
    if not (isinstance(w13, QuantizedWeight) and isinstance(w2, QuantizedWeight)):
        raise TypeError(
            f"w13 and w2 must both be QuantizedWeight, got {type(w13).__name__}, {type(w2).__name__}"
        )
    S, two_i, _ = w13.shape
    if w2.shape != (S, H, two_i // 2):
        raise ValueError(f"w2 must be [S={S}, H={H}, I={two_i // 2}], got {tuple(w2.shape)}")
    if w2.dtype != w13.dtype:
        raise ValueError(f"w13 ({w13.dtype}) and w2 ({w2.dtype}) must hold the same 8-bit format")
    if T == 0:
        return torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    k = routing.top_k
    if config is None:
        shape = MoeShape(
            num_experts=S, intermediate=two_i // 2, dtype=w13.dtype, device_name=device_name(hidden.device)
        )
        config = tile_config_for(T, k, shape)
    slots = routing.slots(slot_map)  # [T, k]
    aligned = align(slots, S, config.block_m)
    inter = grouped_gemm1_w8a16(hidden, w13, aligned, config)  # [T*k, I] in hidden's dtype
    rows = grouped_gemm2_w8a16(inter, w2, aligned, routing.weights, config, zero_dropped=False)  # [T, k, H]
    return combine(rows, slots, torch.float32)  # [T, H]: dropped pairs skipped, k rows summed in fp32
