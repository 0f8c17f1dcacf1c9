"""A dense projection with 8-bit weights (w8a16): out = (x @ data^T) * scale (+ b), fp32 out.

`model.quantize_dense` stores attention's q/k/v and o and the LM head as a `QuantizedWeight` (int8 or
float8_e4m3fn values [N, K], one fp32 scale per row). Each program computes a [BLOCK_M, BLOCK_N] output
tile: weight tiles are loaded in 8 bits (half the bytes of bf16, the point at decode, where the GEMM is a
read of the weight), widened to the activation dtype in registers (exact: every int8 and e4m3 value is a
bf16 / fp16 value), and each output column is multiplied by its row's scale once, after the K loop:
    out[m, n] = scale[n] * sum_k x[m, k] * data[n, k]  (+ b[n])
Reference: `F.linear(x.float(), w.dequantize(torch.float32), b)`, up to fp32 summation order.
A static grid over (M, N) tiles and no host sync: decode steps that use it can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.quant import QuantizedWeight
from moe_runtime.kernels.triton.grouped_gemm1 import dot_precision, weight_and_scale


@triton.jit
def _linear_w8a16_kernel(
    # Pointers
    x_ptr,  # [M, K] activations (fp32 / fp16 / bf16)
    w_ptr,  # [N, K] 8-bit values, unit stride along K
    scale_ptr,  # [N] fp32, one per row of w
    bias_ptr,  # [N] or a dummy (read only with HAS_BIAS)
    out_ptr,  # [M, N] fp32
    # Dimensions
    M,
    N,
    K,
    # Strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # -----------------------------------------------------------
    # Program id -> (M-block, N-block), GROUP_M M-blocks at a time so neighbours share weight tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_pid_in_group) % group_size
    pid_n = (pid % num_pid_in_group) // group_size

    # -----------------------------------------------------------
    # Pointers to the first K-tiles; the weight tile is read as [BLOCK_K, BLOCK_N] (w transposed).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk

    # -----------------------------------------------------------
    # Accumulate in fp32, the 8-bit tile widened to the activation dtype, masking the K tail.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kk * BLOCK_K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # -----------------------------------------------------------
    # Row scales (and the bias) once per output column, then the fp32 tile out.
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


def _tiles(M: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by rows: decode batches stream the weight in
    narrow N tiles with long K steps (many programs, each reading a strip once); prefill-sized M takes
    square tiles (tensor-core bound). Not tuned on a GPU yet (no table): a heuristic like the grouped
    GEMMs' `default_tile_config`."""
    if M <= 16:
        return 16, 64, 128, 4, 4
    if M <= 64:
        return 64, 64, 64, 4, 4
    return 128, 128, 64, 8, 3


def linear_w8a16(x: torch.Tensor, w: QuantizedWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (fp32 / fp16; bf16 on a GPU) times an 8-bit w [N, K] (int8 or float8_e4m3fn with scale [N]
    fp32), plus b [N] if given -> [M, N] float32, not rounded (callers round once to x's dtype, or keep fp32
    for logits). Example: x = [[1, 2]], w.data = [[3, -1]], w.scale = [0.5], b = [1] -> [[(3 - 2) * 0.5 + 1]] = [[1.5]].
    """
    if not isinstance(w, QuantizedWeight) or w.data.dim() != 2:
        raise TypeError(f"w must be a 2-D QuantizedWeight [N, K], got {type(w).__name__} {tuple(w.shape)}")
    data, scale = weight_and_scale(x, w, "w")
    M, K = x.shape
    N, K_w = data.shape
    if K_w != K:
        raise ValueError(f"x [M, K={K}] and w [N, K={K_w}] disagree on K")
    if b is not None and (b.shape != (N,) or b.device != x.device):
        raise ValueError(f"b must be [N={N}] on {x.device}, got {tuple(b.shape)} on {b.device}")
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = _tiles(M)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _linear_w8a16_kernel[grid](
        x, data, scale, scale if b is None else b, out,
        M, N, K,
        x.stride(0), x.stride(1), data.stride(0), data.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        DOT_PRECISION=dot_precision(x.dtype), HAS_BIAS=b is not None,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
