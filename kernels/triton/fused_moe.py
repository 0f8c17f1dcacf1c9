"""The Triton MoE: align -> grouped GEMM 1 (w13, SwiGLU) -> grouped GEMM 2 (w2, routing weight) -> combine.

Four Triton launches per layer (align, the two GEMMs, the combine) and no other kernel, whatever the number
of experts, with grids that depend only on shapes (not on routing), so a decode step can be captured in a
CUDA graph; `kernels.fused_moe` adds one cast of the fp32 result. Reference:
`reference.fused_moe_reference_fp32`.

8-bit experts (`QuantizedWeight`s, int8 or float8_e4m3fn with per-row scales) run the same launches: the
grouped GEMMs widen their tiles in registers and apply the scales after the K loop (w8a16), so their decode
steps are captured like 16-bit ones. Their tiles come from the table of the weight format
(`dtype=int8_w8a16` / `fp8_w8a16` in `kernels/tuned/`), else the heuristic.

fp8 experts also run as w8a8 (`fused_moe_triton_w8a8_fp32`; the `triton` backend picks it on GPUs of
compute capability >= 8.9, `fused_moe_for`): the activations are quantized per token (`quant_act.py`)
before each grouped GEMM, the hidden states before GEMM 1 and GEMM 1's output, per pair row, before GEMM 2.
Both GEMMs then multiply fp8 by fp8 on tensor cores and scale by the token's and the weight row's scales.
Two more launches (six); grids still depend only on shapes. Tiles: a table of their own
(`dtype=fp8_w8a8`), else the heuristic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from moe_runtime.kernels.quant import QuantizedWeight
from moe_runtime.kernels.reference import RoutingResult
from moe_runtime.kernels.tile_config import MoeShape, TileConfig, device_name, tile_config_for
from moe_runtime.kernels.triton.align import align
from moe_runtime.kernels.triton.combine import combine
from moe_runtime.kernels.triton.grouped_gemm1 import grouped_gemm1
from moe_runtime.kernels.triton.grouped_gemm2 import grouped_gemm2
from moe_runtime.kernels.triton.quant_act import quantize_activations


def _checked_tiles(
    hidden: torch.Tensor,
    w13: torch.Tensor | QuantizedWeight,
    w2: torch.Tensor | QuantizedWeight,
    routing: RoutingResult,
    config: TileConfig | None,
    activations: torch.dtype | None = None,
) -> TileConfig:
    """Checks the experts' shapes and types against hidden's (ValueError / TypeError) and returns `config`,
    or when None the tuned tiles for these T, k and expert shape (the weights' 8-bit format, else hidden's
    dtype; `activations`: the dtype w8a8 quantizes the activations to, its own table), else the heuristic."""
    T, H = hidden.shape
    S, two_i, _ = w13.shape
    if w2.shape != (S, H, two_i // 2):
        raise ValueError(f"w2 must be [S={S}, H={H}, I={two_i // 2}], got {tuple(w2.shape)}")
    quantized = isinstance(w13, QuantizedWeight)
    if quantized != isinstance(w2, QuantizedWeight):
        raise TypeError(f"w13 and w2 must both be QuantizedWeight or both tensors, got {type(w13).__name__}, "
                        f"{type(w2).__name__}")
    if quantized and w2.dtype != w13.dtype:
        raise ValueError(f"w13 ({w13.dtype}) and w2 ({w2.dtype}) must hold the same 8-bit format")
    if config is not None:
        return config
    shape = MoeShape(
        num_experts=S, intermediate=two_i // 2, dtype=w13.dtype if quantized else hidden.dtype,
        device_name=device_name(hidden.device), activations=activations,
    )
    return tile_config_for(T, routing.top_k, shape)


def fused_moe_triton_fp32(
    hidden: torch.Tensor,
    w13: torch.Tensor | QuantizedWeight,
    w2: torch.Tensor | QuantizedWeight,
    routing: RoutingResult,
    slot_map: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Same contract as `reference.fused_moe_reference_fp32`; config=None looks up the tuned table.

    hidden: [T, H]; w13: [S, 2I, H]; w2: [S, H, I], both 16/32-bit of hidden's dtype or both QuantizedWeights
    of one 8-bit format (w8a16); routing ids [T, k] in [0, E); slot_map: [E] or None.
    Returns [T, H] float32 (fp32 accumulation inside each GEMM, the k rows of each token summed in fp32 by
    the combine, not rounded). `config` fixes the tiles (bench/tune_fused_moe.py times candidates with it).
    fp8 experts with fp8 activations (w8a8) are `fused_moe_triton_w8a8_fp32`.
    """
    config = _checked_tiles(hidden, w13, w2, routing, config)
    if hidden.shape[0] == 0:
        return torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    slots = routing.slots(slot_map)  # [T, k]
    aligned = align(slots, w13.shape[0], config.block_m)
    inter = grouped_gemm1(hidden, w13, aligned, config)  # [T*k, I] in hidden's dtype
    rows = grouped_gemm2(inter, w2, aligned, routing.weights, config, zero_dropped=False)  # [T, k, H] fp32
    return combine(rows, slots, torch.float32)  # [T, H]: dropped pairs skipped, k rows summed in fp32


def fused_moe_triton_w8a8_fp32(
    hidden: torch.Tensor,
    w13: QuantizedWeight,
    w2: QuantizedWeight,
    routing: RoutingResult,
    slot_map: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """fp8 experts with fp8 activations (w8a8): same contract as `reference.fused_moe_reference_w8a8_fp32`;
    on a GPU it needs compute capability >= 8.9 (fp8 tensor cores). config=None looks up the tuned table.

    hidden: [T, H] (16/32-bit); w13: [S, 2I, H]; w2: [S, H, I], both float8_e4m3fn QuantizedWeights (else
    ValueError); routing ids [T, k] in [0, E); slot_map: [E] or None. The hidden states and GEMM 1's output
    are quantized per row to e4m3 (one fp32 scale each) before the GEMM that reads them.
    Returns [T, H] float32, as `fused_moe_triton_fp32`.
    """
    if not isinstance(w13, QuantizedWeight) or w13.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fused_moe_triton_w8a8_fp32 needs float8_e4m3fn QuantizedWeights, got {w13.dtype}; "
                         "int8 and 16-bit experts run with fused_moe_triton_fp32")
    config = _checked_tiles(hidden, w13, w2, routing, config, torch.float8_e4m3fn)
    if hidden.shape[0] == 0:
        return torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    slots = routing.slots(slot_map)  # [T, k]
    aligned = align(slots, w13.shape[0], config.block_m)
    x = quantize_activations(hidden)  # [T, H] fp8, scales [T]
    # [T*k, I] in hidden's dtype; every row is quantized next, so rows of dropped pairs (a slot map's -1)
    # are zeros there rather than uninitialized memory
    inter = grouped_gemm1(x, w13, aligned, config, zero_dropped=slot_map is not None)
    inter = quantize_activations(inter)  # per pair row, fp8 with scales [T*k]
    rows = grouped_gemm2(inter, w2, aligned, routing.weights, config, zero_dropped=False)  # [T, k, H] fp32
    return combine(rows, slots, torch.float32)  # [T, H]: dropped pairs skipped, k rows summed in fp32


@functools.cache
def fused_moe_for(device: torch.device, weight_dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """The Triton MoE the `triton` backend runs experts stored in `weight_dtype` with on `device`:
    `fused_moe_triton_w8a8_fp32` for float8_e4m3fn experts on a GPU with fp8 tensor cores (compute
    capability >= 8.9), else `fused_moe_triton_fp32` (8-bit experts' tiles widened in registers: w8a16).
    A property of the device and the weights' format, worked out once per pair (the experts are built
    before their device is known, on meta)."""
    if device.type != "cuda" or weight_dtype != torch.float8_e4m3fn:
        return fused_moe_triton_fp32
    if torch.cuda.get_device_capability(device) >= (8, 9):
        return fused_moe_triton_w8a8_fp32
    return fused_moe_triton_fp32

