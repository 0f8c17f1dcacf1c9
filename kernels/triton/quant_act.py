"""Per-token FP8 quantization of activations for the w8a8 grouped GEMMs: one fp32 scale per row.

    scale[m]   = max_k |x[m, k]| / 448                      (448: e4m3's largest finite value)
    data[m, k] = e4m3(x[m, k] * (448 / max_k |x[m, k]|))    nearest, ties to even

One program per row, two passes over it: the row's max, then the values (the second pass finds the row in
L2; a row is a few tens of KB at most). The grouped GEMMs multiply `data` on fp8 tensor cores and the fp32
accumulator by scale[m] (HAS_ACT_SCALE). Reference: `reference.quantize_activations_reference`, which this
kernel matches bit for bit.

Rounding: the scaled value v is rounded to the e4m3 grid in fp32 first (`_round_to_e4m3`), so the cast to
fp8 that follows is exact. On a GPU that gives what the hardware cast (cvt.rn.satfinite) would; under
TRITON_INTERPRET=1 it is needed, because Triton 3.9's interpreter casts fp32 -> e4m3 by truncating and
adding the first cut-off bit, which rounds ties away from zero and, when the mantissa carries out, ORs the
carry into the exponent instead of adding it (a value that should round up to the next power of two
loses half its magnitude when its exponent is odd). The launch disables FMA contraction
(enable_fp_fusion=False) so that x * inv is rounded before the rounding's add, as in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_runtime.kernels.quant import MIN_ACT_AMAX, QMAX, QuantizedActivations


@triton.jit
def _round_to_e4m3(v):
    """fp32 v with |v| <= 448 -> the nearest float8_e4m3fn value (ties to even), still fp32.

    Adding 1.5 * 2^(e + 20), where 2^e <= |v| < 2^(e+1), puts |v| where fp32's ulp is 2^(e - 3), e4m3's
    spacing at v, so the add rounds |v| to e4m3 (to nearest even) and the subtraction is exact. Below 2^-6
    e4m3 is subnormal and its spacing stays 2^-9: e is clamped to -6. v's sign bit is put back afterwards
    (a negative v that rounds to zero gives -0, as torch's cast does).
    """
    bits = v.to(tl.uint32, bitcast=True)
    a = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)  # |v|
    biased_exp = tl.maximum(bits >> 23 & 0xFF, 127 - 6)  # e + 127
    magic = (((biased_exp + 20) << 23) | (1 << 22)).to(tl.float32, bitcast=True)  # 1.5 * 2^(e + 20)
    rounded = (a + magic) - magic
    return (rounded.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows_kernel(
    # Pointers
    x_ptr,  # [M, K] fp32 / fp16 / bf16
    data_ptr,  # [M, K] float8_e4m3fn
    scale_ptr,  # [M] fp32
    # Dimensions
    K,
    # Strides: how far the pointer moves for one step along a dimension, e.g. stride_xm is one row down.
    stride_xm,
    stride_xk,
    stride_dm,
    # Meta-parameters
    BLOCK_K: tl.constexpr,
    FP8_MAX: tl.constexpr,  # 448.0
    MIN_AMAX: tl.constexpr,  # rows whose max is below this quantize to zeros (quant.MIN_ACT_AMAX)
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    data_row = data_ptr + row * stride_dm

    # -----------------------------------------------------------
    # The row's max |x| in fp32 (exact: widening and max round nothing).
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    row_max = tl.max(amax, axis=0)

    # -----------------------------------------------------------
    # Its scale, and the inverse the values are multiplied by: 0 for a row of zeros, so no division by
    # zero and data 0 (the GEMMs then multiply an all-zero row by scale 0).
    tl.store(scale_ptr + row, tl.div_rn(row_max, FP8_MAX))
    inv = tl.where(row_max >= MIN_AMAX, tl.div_rn(FP8_MAX, tl.maximum(row_max, MIN_AMAX)), 0.0)

    # -----------------------------------------------------------
    # The values, scaled into [-448, 448] and rounded to e4m3 (the clamp only catches x * inv rounding a
    # hair above 448 at the row's max).
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + (k0 + offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x * inv, -FP8_MAX), FP8_MAX)
        tl.store(data_row + k0 + offs, _round_to_e4m3(v).to(data_ptr.dtype.element_ty), mask=mask)


def quantize_activations(x: torch.Tensor) -> QuantizedActivations:
    """Triton twin of `reference.quantize_activations_reference` (bit for bit).

    x: [M, K] fp32 / fp16 (bf16 on a GPU), any strides. Returns `QuantizedActivations`: data [M, K]
    float8_e4m3fn (contiguous), scale [M] fp32, orig_dtype x.dtype. One launch with a grid of M programs
    (static for a given M, so it is captured in CUDA graphs like the GEMMs).
    """
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a [M, K] fp32 / fp16 / bf16 matrix, got {x.dtype} {tuple(x.shape)}")
    if not x.is_cuda and x.dtype == torch.bfloat16:
        raise ValueError("bf16 needs a GPU; under TRITON_INTERPRET=1 use fp32 or fp16")
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
        raise ValueError("fp8 activations need compute capability >= 8.9 (Ada / Hopper)")
    M, K = x.shape
    data = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        _quantize_rows_kernel[(M,)](
            x, data, scale,
            K,
            x.stride(0), x.stride(1), data.stride(0),
            BLOCK_K=min(triton.next_power_of_2(max(K, 1)), 1024), FP8_MAX=QMAX[torch.float8_e4m3fn],
            MIN_AMAX=MIN_ACT_AMAX, num_warps=4, enable_fp_fusion=False,
        )  # fmt: skip
    return QuantizedActivations(data=data, scale=scale, orig_dtype=x.dtype)
