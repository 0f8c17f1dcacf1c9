"""Combine: out[t] = sum over k of rows[t, k] (fp32), rounded once to the output dtype, in one launch.

Rows of dropped pairs (slot -1: the expert lives elsewhere) are skipped rather than read, so grouped GEMM 2
need not zero its output first. The k rows are added in order k = 0, 1, ... in fp32, as
`reference.fused_moe_reference_fp32` does. Reference: `rows.sum(dim=1).to(dtype)` with dropped rows zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_kernel(
    rows_ptr,  # [T, K, H] fp32 weighted expert outputs, one row per (token, k) pair
    slots_ptr,  # [T, K] int32 slot of each pair, -1 = dropped (its row is never written)
    out_ptr,  # [T, H] output dtype
    H,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slot = tl.load(slots_ptr + token * TOP_K + k)
        kept = (tl.zeros((BLOCK_H,), dtype=tl.int32) + slot) >= 0  # the scalar, as a vector mask
        acc += tl.load(rows_ptr + (token * TOP_K + k) * H + offs_h, mask=h_mask & kept, other=0.0)
    tl.store(out_ptr + token * H + offs_h, acc.to(out_ptr.dtype.element_ty), mask=h_mask)


def combine(rows: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows: [T, k, H] fp32 contiguous; slots: [T, k] int (-1 = dropped). Returns [T, H] in `dtype`."""
    T, k, H = rows.shape
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        raise ValueError(f"rows must be contiguous float32 [T, k, H], got {rows.dtype} {tuple(rows.shape)}")
    if slots.shape != (T, k):
        raise ValueError(f"slots must be [T={T}, k={k}], got {tuple(slots.shape)}")
    out = torch.empty(T, H, dtype=dtype, device=rows.device)
    if T == 0:
        return out
    block_h = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](
        rows, slots.to(torch.int32).contiguous(), out, H, TOP_K=k, BLOCK_H=block_h
    )
    return out
