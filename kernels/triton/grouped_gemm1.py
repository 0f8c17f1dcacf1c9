"""Grouped GEMM 1: inter = silu(x @ w1[s]^T) * (x @ w3[s]^T) over pairs sorted by slot, SwiGLU fused.

Each program computes a [BLOCK_M, BLOCK_N] tile of the gate and the up projection of the same rows
(two accumulators over one pass of x), so the [T*k, 2I] pre-activation never reaches memory.
Reference: `reference.grouped_gemm1_reference`.

8-bit experts (w8a16, `kernels.quant.QuantizedWeight`: int8 or float8_e4m3fn values, one fp32 scale per
row) run the same kernel with HAS_SCALE: each weight tile is widened to the activation dtype in registers
(exact: |int8| <= 127 and every e4m3 value fit in fp16 and bf16), and each output column is scaled by its
row's scale once, after the K loop (row n's scale multiplies out of row n's sum):
    gate[m, n] = scale[s, n] * sum_k x[m, k] * data[s, n, k]        up: rows N + n
Without HAS_SCALE the widening is a no-op and the scale code is not compiled.

fp8 experts with fp8 activations (w8a8, HAS_ACT_SCALE): x arrives quantized per token
(`kernels.quant.QuantizedActivations` from `quant_act.py`: float8_e4m3fn values, one fp32 scale per token),
so both tiles are fp8 and tl.dot runs on fp8 tensor cores (compute capability >= 8.9) into the fp32
accumulators; the token's scale multiplies out of the sum like the weight row's:
    gate[m, n] = xscale[t] * scale[s, n] * sum_k xq[t, k] * data[s, n, k]          t = token of pair m
Hopper's fp8 tensor cores add in reduced precision: each K tile's partial sum (at most BLOCK_K products)
is promoted to the fp32 accumulator (max_num_imprecise_acc=BLOCK_K), not only the final one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.quant import QuantizedActivations, QuantizedWeight
from moe_runtime.kernels.reference import AlignedRouting
from moe_runtime.kernels.tile_config import TileConfig


@triton.jit
def _grouped_gemm1_kernel(
    # Pointers
    x_ptr,  # [T, K] hidden states; float8_e4m3fn with HAS_ACT_SCALE
    x_scale_ptr,  # [T] fp32, one per token (read only with HAS_ACT_SCALE)
    w_ptr,  # [S, 2N, K] gate rows [0, N) then up rows [N, 2N); 16-bit, or int8 / fp8 with HAS_SCALE
    scale_ptr,  # [S, 2N] fp32, one per row of w (read only with HAS_SCALE)
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
    stride_xs,
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
    DOT_PRECISION: tl.constexpr,  # "ieee" keeps fp32 inputs exact-ish; None is the backend default
    HAS_SCALE: tl.constexpr,  # 8-bit weights with per-row scales
    HAS_ACT_SCALE: tl.constexpr,  # fp8 activations with per-token scales (w8a8; fp8 weights too)
):
    # -----------------------------------------------------------
    # Map the program id to the (M-block, N-block) it computes, GROUP_M M-blocks at a time so that
    # neighbouring programs share weight tiles in L2.
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
    # Pointers to the first K-tiles: rows of x are gathered through the sorted pair ids (padding rows
    # are masked), and the up tile sits N rows below the gate tile in the same slot.
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
    # Accumulate both projections in fp32, masking the K tail. With fp8 x and fp8 weights the widening is
    # a no-op and the dots are fp8 x fp8.
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kk * BLOCK_K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(x.dtype)
        u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(x.dtype)
        acc_gate = tl.dot(x, g, acc_gate, input_precision=DOT_PRECISION,
                          max_num_imprecise_acc=BLOCK_K if HAS_ACT_SCALE else None)
        acc_up = tl.dot(x, u, acc_up, input_precision=DOT_PRECISION,
                        max_num_imprecise_acc=BLOCK_K if HAS_ACT_SCALE else None)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk

    # -----------------------------------------------------------
    # Per-row scales of 8-bit weights (columns of the output) and per-token scales of fp8 activations
    # (rows), then the SwiGLU epilogue while the accumulators are still fp32, then one rounding to the
    # output dtype.
    if HAS_SCALE:
        s_ptrs = scale_ptr + slot * stride_ss + offs_n.to(tl.int64) * stride_sn
        acc_gate = acc_gate * tl.load(s_ptrs, mask=n_mask, other=0.0)[None, :]
        acc_up = acc_up * tl.load(s_ptrs + N * stride_sn, mask=n_mask, other=0.0)[None, :]
    if HAS_ACT_SCALE:
        x_scale = tl.load(x_scale_ptr + token * stride_xs, mask=row_mask, other=0.0)
        acc_gate = acc_gate * x_scale[:, None]
        acc_up = acc_up * x_scale[:, None]
    inter = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_op + offs_n[None, :] * stride_on
    tl.store(out_ptrs, inter.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs use full-precision dot (not TF32); 16-bit inputs keep the backend default."""
    return "ieee" if dtype == torch.float32 else None


def weight_and_scale(x: torch.Tensor | QuantizedActivations, w: torch.Tensor | QuantizedWeight, name: str
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The launchers' checks of a weight against its activations x: (values, per-row scales or None).

    16-bit weights must have x's dtype; 8-bit ones (a QuantizedWeight) need unit stride along K, float
    activations, and for fp8 a GPU that converts e4m3 in registers. bf16 needs a GPU (the interpreter holds
    bf16 as raw uint16 bits, so its arithmetic is wrong: issue 4). fp8 activations (QuantizedActivations,
    w8a8) need fp8 weights, and are checked as the dtype they were quantized from (the GEMMs' output dtype)."""
    fp8_x = isinstance(x, QuantizedActivations)
    dtype = x.orig_dtype if fp8_x else x.dtype
    on_gpu = x.device.type == "cuda"
    if not on_gpu and dtype == torch.bfloat16:
        raise ValueError("bf16 needs a GPU; under TRITON_INTERPRET=1 use fp32 or fp16")
    if fp8_x and not (isinstance(w, QuantizedWeight) and w.dtype == torch.float8_e4m3fn):
        raise ValueError(f"fp8 activations (w8a8) need float8_e4m3fn QuantizedWeights, got {name} of {w.dtype}")
    if not isinstance(w, QuantizedWeight):
        if w.dtype != dtype:
            raise ValueError(f"{name} dtype {w.dtype} differs from the activations' dtype {dtype}")
        return w, None
    if w.data.device != x.device or w.scale.device != x.device:
        raise ValueError(f"{name} is on {w.data.device}, activations on {x.device}")
    if w.data.stride(-1) != 1:
        raise ValueError(f"{name}.data must have unit stride along K, got strides {w.data.stride()}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"activations must be fp32, fp16 or bf16, got {dtype}")
    if w.dtype == torch.float8_e4m3fn and on_gpu and torch.cuda.get_device_capability(x.device) < (8, 9):
        # Triton converts e4m3 (fp8e4nv) in registers only from Ada / Hopper on
        raise ValueError("fp8 experts need compute capability >= 8.9 for the Triton kernels; use "
                         "model.quantization=int8, or moe_backend=torch")
    return w.data, w.scale


def split_activations(x: torch.Tensor | QuantizedActivations
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
    """(values, per-token scales or None, the dtype a GEMM returns) of 16/32-bit activations, or of fp8 ones
    quantized per token (w8a8)."""
    if isinstance(x, QuantizedActivations):
        return x.data, x.scale, x.orig_dtype
    return x, None, x.dtype


def grouped_gemm1(
    hidden: torch.Tensor | QuantizedActivations,
    w13: torch.Tensor | QuantizedWeight,
    aligned: AlignedRouting,
    config: TileConfig,
    zero_dropped: bool = False,
) -> torch.Tensor:
    """Triton twin of `reference.grouped_gemm1_reference` (on `w13.dequantize()` for 8-bit weights, and on
    `hidden.dequantize()` for fp8 activations, up to fp32 summation order).

    hidden: [T, H] (fp32 / fp16 / bf16), or QuantizedActivations (data [T, H] float8_e4m3fn, scale [T]
    fp32: w8a8, with fp8 weights); w13: [S, 2I, H] of hidden's dtype on its device, or a QuantizedWeight
    (data [S, 2I, H] int8 or float8_e4m3fn, scale [S, 2I] fp32); aligned: from `align(...,
    config.block_m)`. Returns [T * k, I] in hidden's dtype (fp8 activations: the dtype they were quantized
    from). Rows of dropped pairs are left unwritten (never read later), or zero with `zero_dropped` (for a
    consumer that reads every row, as the w8a8 path's per-row quantization does).
    """
    T, H = hidden.shape
    S, two_i, H_w = w13.shape
    if H_w != H or two_i % 2:
        raise ValueError(f"w13 must be [S, 2I, H={H}], got {tuple(w13.shape)}")
    data, scale = weight_and_scale(hidden, w13, "w13")
    x, x_scale, out_dtype = split_activations(hidden)
    if aligned.block_m != config.block_m:
        raise ValueError(f"aligned with block_m={aligned.block_m} but config.block_m={config.block_m}")
    inter_size = two_i // 2
    alloc = torch.zeros if zero_dropped else torch.empty
    out = alloc(T * aligned.top_k, inter_size, dtype=out_dtype, device=x.device)
    num_blocks = aligned.block_slot.numel()
    grid = (num_blocks * triton.cdiv(inter_size, config.block_n),)
    _grouped_gemm1_kernel[grid](
        x, x if x_scale is None else x_scale, data, data if scale is None else scale, out,
        aligned.sorted_ids, aligned.block_slot,
        inter_size, H, T * aligned.top_k, aligned.top_k, num_blocks,
        x.stride(0), x.stride(1), 0 if x_scale is None else x_scale.stride(0),
        data.stride(0), data.stride(1), data.stride(2),
        *((0, 0) if scale is None else scale.stride()),
        out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        DOT_PRECISION=dot_precision(x.dtype), HAS_SCALE=scale is not None, HAS_ACT_SCALE=x_scale is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
