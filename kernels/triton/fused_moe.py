"""The Triton MoE: align -> grouped GEMM 1 (w13, SwiGLU) -> grouped GEMM 2 (w2, routing weight) -> combine.

Four Triton launches per layer (align, the two GEMMs, the combine) and no other kernel, whatever the number
of experts, with grids that depend only on shapes (not on routing), so a decode step can be captured in a
CUDA graph; `kernels.fused_moe` adds one cast of the fp32 result. Reference:
`reference.fused_moe_reference_fp32`.
"""

from __future__ import annotations

import torch

from moe_runtime.kernels.reference import RoutingResult
from moe_runtime.kernels.tile_config import MoeShape, TileConfig, device_name, tile_config_for
from moe_runtime.kernels.triton.align import align
from moe_runtime.kernels.triton.combine import combine
from moe_runtime.kernels.triton.grouped_gemm1 import grouped_gemm1
from moe_runtime.kernels.triton.grouped_gemm2 import grouped_gemm2


def fused_moe_triton_fp32(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: RoutingResult,
    slot_map: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Same contract as `reference.fused_moe_reference_fp32`; config=None looks up the tuned table.

    hidden: [T, H]; w13: [S, 2I, H]; w2: [S, H, I]; routing ids [T, k] in [0, E); slot_map: [E] or None.
    Returns [T, H] float32 (fp32 accumulation inside each GEMM, the k rows of each token summed in fp32 by
    the combine, not rounded). `config` fixes the tiles (bench/tune_fused_moe.py times candidates with it).
    """
    T, H = hidden.shape
    S, two_i, _ = w13.shape
    if w2.shape != (S, H, two_i // 2):
        raise ValueError(f"w2 must be [S={S}, H={H}, I={two_i // 2}], got {tuple(w2.shape)}")
    if T == 0:
        return torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    k = routing.top_k
    if config is None:
        shape = MoeShape(
            num_experts=S, intermediate=two_i // 2, dtype=hidden.dtype, device_name=device_name(hidden.device)
        )
        config = tile_config_for(T, k, shape)
    slots = routing.slots(slot_map)  # [T, k]
    aligned = align(slots, S, config.block_m)
    inter = grouped_gemm1(hidden, w13, aligned, config)  # [T*k, I]
    rows = grouped_gemm2(inter, w2, aligned, routing.weights, config, zero_dropped=False)  # [T, k, H] fp32
    return combine(rows, slots, torch.float32)  # [T, H]: dropped pairs skipped, k rows summed in fp32
