"""Grouped GEMM 2: y[p] = weight[p] * inter[p] @ w2[s]^T over pairs sorted by slot, routing weight fused.

The output keeps one fp32 row per (token, k) pair, [T, k, H], and the top-k combine is a separate sum over
k followed by one rounding to the activation dtype (the reference's order of operations).
Why not atomics into [T, H]: bf16 atomic adds are unsupported in the interpreter and slow or missing on
some GPUs, fp32 atomics would need a zeroed fp32 buffer plus a cast pass (the same traffic as the sum),
and the order of atomic adds changes run to run, which breaks bit-reproducible serving. The k-row sum reads
T*k*H fp32 values once, which is small next to the expert weights this GEMM streams.
Reference: `reference.grouped_gemm2_reference`. 8-bit weights (HAS_SCALE): as in grouped GEMM 1, tiles
widened in registers and each output column scaled by its row's scale with the routing weight. fp8
activations (HAS_ACT_SCALE, w8a8: GEMM 1's output quantized per pair row by `quant_act.py`): fp8 x fp8 dots
as in grouped GEMM 1, and each output row also scaled by its pair's activation scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.quant import QuantizedActivations, QuantizedWeight
from moe_runtime.kernels.reference import AlignedRouting
from moe_runtime.kernels.tile_config import TileConfig
from moe_runtime.kernels.triton.grouped_gemm1 import dot_precision, split_activations, weight_and_scale


@triton.jit
def _grouped_gemm2_kernel(
    # Pointers
    a_ptr,  # [T * top_k, K] SwiGLU output, one row per pair; float8_e4m3fn with HAS_ACT_SCALE
    a_scale_ptr,  # [T * top_k] fp32, one per pair row (read only with HAS_ACT_SCALE)
    w_ptr,  # [S, N, K] down projection; 16-bit, or int8 / fp8 with HAS_SCALE
    scale_ptr,  # [S, N] fp32, one per row of w (read only with HAS_SCALE)
    weights_ptr,  # [T * top_k] fp32 routing weight of each pair
    out_ptr,  # [T * top_k, N] fp32 weighted rows, zero-initialised (dropped pairs stay zero)
    sorted_ids_ptr,  # [num_blocks * BLOCK_M] flat pair ids sorted by slot; padding = num_pairs
    block_slot_ptr,  # [num_blocks] slot of each M-block; -1 = unused
    # Dimensions
    N,  # H, the hidden size
    K,  # I, the intermediate size
    num_pairs,
    num_blocks,
    # Strides: how far the pointer moves for one step along a dimension.
    stride_ap,
    stride_ak,
    stride_as,
    stride_ws,
    stride_wn,
    stride_wk,
    stride_ss,
    stride_sn,
    stride_op,
    stride_on,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_SCALE: tl.constexpr,  # 8-bit weights with per-row scales
    HAS_ACT_SCALE: tl.constexpr,  # fp8 activations with per-row scales (w8a8; fp8 weights too)
):
    # -----------------------------------------------------------
    # Grouped program order, as in grouped GEMM 1.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % num_pid_in_group) % group_size
    pid_n = (pid % num_pid_in_group) // group_size

    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return

    # -----------------------------------------------------------
    # Rows of the activation are read directly by pair id (GEMM 1 wrote them there).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_mask = pair < num_pairs
    pair64 = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pair64[:, None] * stride_ap + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk

    # -----------------------------------------------------------
    # Accumulate in fp32, masking the K tail.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kk * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION,
                     max_num_imprecise_acc=BLOCK_K if HAS_ACT_SCALE else None)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # -----------------------------------------------------------
    # Routing weight (and 8-bit weights' row scales, fp8 activations' row scales) epilogue; rows stay fp32
    # (the combine rounds once) at their pair position.
    if HAS_SCALE:
        scale = tl.load(scale_ptr + slot * stride_ss + offs_n.to(tl.int64) * stride_sn, mask=n_mask, other=0.0)
        acc = acc * scale[None, :]
    if HAS_ACT_SCALE:
        acc = acc * tl.load(a_scale_ptr + pair64 * stride_as, mask=row_mask, other=0.0)[:, None]
    weight = tl.load(weights_ptr + pair, mask=row_mask, other=0.0)
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + pair64[:, None] * stride_op + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def grouped_gemm2(
    inter: torch.Tensor | QuantizedActivations,
    w2: torch.Tensor | QuantizedWeight,
    aligned: AlignedRouting,
    weights: torch.Tensor,
    config: TileConfig,
    zero_dropped: bool = True,
) -> torch.Tensor:
    """Triton twin of `reference.grouped_gemm2_reference`.

    inter: [T * k, I] from grouped GEMM 1, or it quantized per row (QuantizedActivations: w8a8, with fp8
    weights); w2: [S, H, I] same dtype, or a QuantizedWeight (data [S, H, I] int8 or float8_e4m3fn, scale
    [S, H] fp32); weights: [T, k] fp32; config: the pipeline's tiles (this GEMM launches with
    `config.for_gemm2()`).
    Returns [T, k, H] fp32; `.sum(dim=1).to(dtype)` of it is the MoE output (one rounding, as the
    reference does). Rows of dropped pairs are zero, or, with zero_dropped=False, left unwritten (for a
    caller that skips them, like `combine`: it saves a memset of the whole output).
    """
    T, k = weights.shape
    S, H, inter_size = w2.shape
    if inter.shape != (T * k, inter_size):
        raise ValueError(f"inter must be [T*k={T * k}, I={inter_size}], got {tuple(inter.shape)}")
    data, scale = weight_and_scale(inter, w2, "w2")
    a, a_scale, _ = split_activations(inter)
    if aligned.block_m != config.block_m or aligned.top_k != k:
        raise ValueError(f"aligned (block_m={aligned.block_m}, top_k={aligned.top_k}) does not match "
                         f"config.block_m={config.block_m}, weights top_k={k}")  # fmt: skip
    config = config.for_gemm2()
    flat_w = weights.reshape(-1).to(torch.float32).contiguous()  # [T*k]
    alloc = torch.zeros if zero_dropped else torch.empty
    out = alloc(T * k, H, dtype=torch.float32, device=a.device)
    num_blocks = aligned.block_slot.numel()
    grid = (num_blocks * triton.cdiv(H, config.block_n),)
    _grouped_gemm2_kernel[grid](
        a, a if a_scale is None else a_scale, data, data if scale is None else scale, flat_w, out,
        aligned.sorted_ids, aligned.block_slot,
        H, inter_size, T * k, num_blocks,
        a.stride(0), a.stride(1), 0 if a_scale is None else a_scale.stride(0),
        data.stride(0), data.stride(1), data.stride(2),
        *((0, 0) if scale is None else scale.stride()),
        out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        DOT_PRECISION=dot_precision(a.dtype), HAS_SCALE=scale is not None, HAS_ACT_SCALE=a_scale is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out.view(T, k, H)
