"""Grouped GEMM 1 with 8-bit weights (w8a16): inter = silu(x @ w1[s]^T) * (x @ w3[s]^T), weights int8 or fp8.

The 16-bit kernel (`grouped_gemm1.py`) with the weight tiles read in 8 bits: each K-tile of w13 is loaded
as int8 or float8_e4m3fn, widened to the activation dtype in registers (exact: |int8| <= 127 and every e4m3
value fit in fp16 and bf16), multiplied in the tensor cores with fp32 accumulation, and each output column
is scaled by its row's fp32 scale once, after the K loop (the scale of row n multiplies out of row n's sum):
    gate[m, n] = scale[s, n] * sum_k x[m, k] * data[s, n, k]        up: rows N + n
Same grid, tiles, program order and sorted-pair layout as the 16-bit kernel, so the same `align` output and
`TileConfig` drive it. Reference: `reference.grouped_gemm1_reference` on the dequantized weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.quant import QuantizedWeight
from moe_runtime.kernels.reference import AlignedRouting
from moe_runtime.kernels.tile_config import TileConfig
from moe_runtime.kernels.triton.grouped_gemm1 import dot_precision


@triton.jit
def _grouped_gemm1_w8a16_kernel(
    # Pointers
    x_ptr,  # [T, K] hidden states, 16 or 32 bits
    w_ptr,  # [S, 2N, K] int8 or float8_e4m3fn: gate rows [0, N) then up rows [N, 2N)
    scale_ptr,  # [S, 2N] fp32, one per row of w
    out_ptr,  # [T * top_k, N] one row per (token, k) pair
    sorted_ids_ptr,  # [num_blocks * BLOCK_M] flat pair ids sorted by slot; padding = num_pairs
    block_slot_ptr,  # [num_blocks] slot of each M-block; -1 = unused
    # Dimensions
    N,  # I, the intermediate size
    K,  # H, the hidden size
    num_pairs,  # T * top_k
    top_k,
    num_blocks,
    # Strides: how far the pointer moves for one step along a dimension, e.g. stride_xt is one token down.
    stride_xt,
    stride_xk,
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
):
    # -----------------------------------------------------------
    # Grouped program order, as in the 16-bit kernel.
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
        return  # an unused tail block of the static grid

    # -----------------------------------------------------------
    # Pointers to the first K-tiles: x rows gathered through the sorted pair ids, 8-bit gate and up tiles.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_mask = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xk
    g_ptrs = w_ptr + slot * stride_ws + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + N * stride_wn

    # -----------------------------------------------------------
    # Accumulate data x activations in fp32: 8-bit tiles widened to x's dtype in registers (exact).
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kk * BLOCK_K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(x.dtype)
        u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(x.dtype)
        acc_gate = tl.dot(x, g, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, u, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk

    # -----------------------------------------------------------
    # Per-row scales (columns of the output), then the SwiGLU epilogue in fp32 and one rounding.
    s_ptrs = scale_ptr + slot * stride_ss + offs_n.to(tl.int64) * stride_sn
    scale_gate = tl.load(s_ptrs, mask=n_mask, other=0.0)
    scale_up = tl.load(s_ptrs + N * stride_sn, mask=n_mask, other=0.0)
    acc_gate = acc_gate * scale_gate[None, :]
    acc_up = acc_up * scale_up[None, :]
    inter = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_op + offs_n[None, :] * stride_on
    tl.store(out_ptrs, inter.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def check_quantized(hidden: torch.Tensor, w: QuantizedWeight, name: str) -> None:
    """The launchers' shared checks: 8-bit values with unit stride along K, fp32 scales, a float activation
    dtype that the device can run (the interpreter holds bf16 as raw bits: issue 4)."""
    if not isinstance(w, QuantizedWeight):
        raise TypeError(
            f"{name} must be a QuantizedWeight (8-bit values, per-row scales), got {type(w).__name__}"
        )
    if w.data.device != hidden.device or w.scale.device != hidden.device:
        raise ValueError(f"{name} is on {w.data.device}, activations on {hidden.device}")
    if w.data.stride(-1) != 1:
        raise ValueError(f"{name}.data must have unit stride along K, got strides {w.data.stride()}")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"activations must be fp32, fp16 or bf16, got {hidden.dtype}")
    if not hidden.is_cuda and hidden.dtype == torch.bfloat16:
        raise ValueError("bf16 needs a GPU; under TRITON_INTERPRET=1 use fp32 or fp16")
    if (
        w.dtype == torch.float8_e4m3fn
        and hidden.is_cuda
        and torch.cuda.get_device_capability(hidden.device) < (8, 9)
    ):
        # Triton converts e4m3 (fp8e4nv) in registers only from Ada / Hopper on
        raise ValueError(
            "fp8 experts need compute capability >= 8.9 for the Triton kernels; use "
            "model.quantization=int8, or moe_backend=torch"
        )


def grouped_gemm1_w8a16(
    hidden: torch.Tensor, w13: QuantizedWeight, aligned: AlignedRouting, config: TileConfig
) -> torch.Tensor:
    """`grouped_gemm1` with 8-bit weights: the twin of `grouped_gemm1_reference(hidden, w13.dequantize(f32),
    aligned)` up to fp32 summation order.

    hidden: [T, H] fp32 / fp16 / bf16; w13: QuantizedWeight, data [S, 2I, H] int8 or float8_e4m3fn, scale
    [S, 2I] fp32; aligned: from `align(..., config.block_m)`. Returns [T * k, I] in hidden's dtype; rows of
    dropped pairs are left unwritten (never read later).
    """
    check_quantized(hidden, w13, "w13")
    T, H = hidden.shape
    S, two_i, H_w = w13.shape
    if H_w != H or two_i % 2:
        raise ValueError(f"w13 must be [S, 2I, H={H}], got {tuple(w13.shape)}")
    if aligned.block_m != config.block_m:
        raise ValueError(f"aligned with block_m={aligned.block_m} but config.block_m={config.block_m}")
    inter_size = two_i // 2
    out = torch.empty(T * aligned.top_k, inter_size, dtype=hidden.dtype, device=hidden.device)
    num_blocks = aligned.block_slot.numel()
    grid = (num_blocks * triton.cdiv(inter_size, config.block_n),)
    data, scale = w13.data, w13.scale
    _grouped_gemm1_w8a16_kernel[grid](
        hidden, data, scale, out, aligned.sorted_ids, aligned.block_slot,
        inter_size, H, T * aligned.top_k, aligned.top_k, num_blocks,
        hidden.stride(0), hidden.stride(1),
        data.stride(0), data.stride(1), data.stride(2),
        scale.stride(0), scale.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        DOT_PRECISION=dot_precision(hidden.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
