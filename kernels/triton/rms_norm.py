"""RMSNorm, optionally fused with the residual add before it: one program per row, the row in one tile.

The arithmetic is the model's `RMSNorm.forward` (model/mixtral.py): h = x in fp32; h * 1/sqrt(mean(h^2)
+ eps) rounded to x's dtype; times the weight, computed in fp32 and rounded once. With a residual, the
residual add comes first, rounded to the dtype like the model's `h = h + block(h)` and stored in place,
and the updated residual is normalized. Two kernels, one per case (a mode flag would be the only
difference), share `_norm_row`. The square root and divisions are IEEE-rounded (`sqrt_rn`, `div_rn`, as
torch's CPU `rsqrt` and `mean`), and no multiply is fused into an add; only the order of the sum of
squares differs from torch, which can move the mean by an ulp of fp32.
Reference: `norm.rms_norm_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_row(h, w_ptr, out_ptr, offs, D, eps):
    """Store weight * round(h * 1/sqrt(mean(h^2) + eps)) for one fp32 row h [BLOCK_D] (zero past D)."""
    mask = offs < D
    mean_sq = tl.div_rn(tl.sum(h * h, axis=0), D * 1.0)
    inv = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    dt = out_ptr.dtype.element_ty
    normed = (h * inv).to(dt).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (w * normed).to(dt), mask=mask)


@triton.jit
def _rms_norm_kernel(
    # Pointers
    x_ptr,  # [T, D]
    w_ptr,  # [D]
    out_ptr,  # [T, D]
    # Dimensions
    D,
    eps,
    # Strides: how far the pointer moves for one row down.
    stride_xt,
    stride_ot,
    # Meta-parameters
    BLOCK_D: tl.constexpr,  # D padded to a power of 2
):
    # -----------------------------------------------------------
    # One row of x in fp32, normalized.
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    h = tl.load(x_ptr + t * stride_xt + offs, mask=offs < D, other=0.0).to(tl.float32)
    _norm_row(h, w_ptr, out_ptr + t * stride_ot, offs, D, eps)


@triton.jit
def _add_rms_norm_kernel(
    # Pointers
    x_ptr,  # [T, D]
    residual_ptr,  # [T, D], += x in place
    w_ptr,  # [D]
    out_ptr,  # [T, D]
    # Dimensions
    D,
    eps,
    # Strides: how far the pointer moves for one row down.
    stride_xt,
    stride_rt,
    stride_ot,
    # Meta-parameters
    BLOCK_D: tl.constexpr,  # D padded to a power of 2
):
    # -----------------------------------------------------------
    # residual + x rounded to the dtype and stored: the next residual add reads exactly this.
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(residual_ptr + t * stride_rt + offs, mask=mask, other=0.0).to(tl.float32)
    r = (r + x).to(residual_ptr.dtype.element_ty)
    tl.store(residual_ptr + t * stride_rt + offs, r, mask=mask)

    # -----------------------------------------------------------
    # The rounded sum, normalized.
    _norm_row(r.to(tl.float32), w_ptr, out_ptr + t * stride_ot, offs, D, eps)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton twin of `norm.rms_norm_reference`.

    x: [T, D]; weight: [D] in x's dtype; residual: None or [T, D] in x's dtype, updated in place to
    residual + x (then normalized instead of x). All need unit stride along D. Returns [T, D] in x's
    dtype. Grid: (T,), the whole row in one tile.

    Example (one layer's two norms): a = rms_norm(h, w_in, eps); o = attn(a);
    b = rms_norm(o, w_post, eps, residual=h) leaves h = h + o and returns the norm of that sum.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got {tuple(x.shape)}")
    T, D = x.shape
    if weight.shape != (D,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be [D={D}] {x.dtype} on {x.device}, "
                         f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}")  # fmt: skip
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device
    ):
        raise ValueError(f"residual must be [T={T}, D={D}] {x.dtype} on {x.device}, "
                         f"got {tuple(residual.shape)} {residual.dtype} on {residual.device}")  # fmt: skip
    if any(t.stride(-1) != 1 for t in (x, weight) + (() if residual is None else (residual,))):
        raise ValueError("x, weight and residual need unit stride along D")
    if not x.is_cuda and x.dtype == torch.bfloat16:
        # The interpreter holds bf16 as raw uint16 bits, so its arithmetic is wrong (see issue 4).
        raise ValueError("bf16 needs a GPU; under TRITON_INTERPRET=1 use fp32 or fp16")
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    BLOCK_D = triton.next_power_of_2(D)
    num_warps = min(16, max(1, BLOCK_D // 256))  # about 8 elements per thread
    if residual is None:
        _rms_norm_kernel[(T,)](
            x, weight, out, D, eps, x.stride(0), out.stride(0),
            BLOCK_D=BLOCK_D, num_warps=num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    else:
        _add_rms_norm_kernel[(T,)](
            x, residual, weight, out, D, eps, x.stride(0), residual.stride(0), out.stride(0),
            BLOCK_D=BLOCK_D, num_warps=num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out
