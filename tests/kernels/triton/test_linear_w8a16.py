"""The Triton w8a16 dense projection (kernels/triton/linear_w8a16.py) against the dequantized product.

Both sides sum the same fp32 products (x times the 8-bit values; the scale multiplies out of the sum), in
another order: atol 1e-4 for fp32 inputs randn/10 (|out| < 1) and 2e-3 for fp16 activations (the tl.dot of
16-bit inputs on the interpreter rounds nothing further; on a GPU tensor cores accumulate in fp32 too).
Shapes: M = 1 and 33 and one past a 64-row tile, N and K off every tile size, a bias and none.
"""

import pytest
import torch

from moe_runtime.kernels.linear import FusedLinear
from moe_runtime.kernels.quant import quantize
from moe_runtime.kernels.triton.linear_w8a16 import linear_w8a16

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3}
SHAPES = ((1, 37, 100), (33, 70, 129), (65, 16, 64), (3, 1, 9))


@pytest.mark.parametrize("scheme", ("int8", "fp8"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("M, N, K", SHAPES)
@pytest.mark.parametrize("bias", (False, True))
def test_matches_the_dequantized_product(M, N, K, dtype, scheme, bias):
    g = torch.Generator().manual_seed(M * 1000 + N)
    x = (torch.randn(M, K, generator=g) / 10).to(dtype).to(DEVICE)
    w = quantize((torch.randn(N, K, generator=g) / 10).to(DEVICE), scheme)
    b = (torch.randn(N, generator=g) / 10).to(dtype).to(DEVICE) if bias else None
    got = linear_w8a16(x, w, b)
    want = torch.nn.functional.linear(x.float(), w.dequantize(torch.float32), None if b is None else b.float())
    assert got.dtype == torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=0)


def test_rejects_bad_inputs():
    x = torch.randn(2, 16)
    w = quantize(torch.randn(8, 16), "int8")
    with pytest.raises(ValueError, match="disagree on K"):
        linear_w8a16(x[:, :8], w)
    with pytest.raises(ValueError, match=r"b must be \[N=8\]"):
        linear_w8a16(x, w, torch.zeros(4))
    with pytest.raises(TypeError, match="2-D QuantizedWeight"):
        linear_w8a16(x, w.dequantize(torch.float32))
    with pytest.raises(ValueError, match="bf16 needs a GPU"):
        linear_w8a16(x.bfloat16(), w)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ("int8", "fp8"))
def test_fused_linear_runs_it_on_cuda(scheme):
    """The `fused` linear backend (the GPU's) picks the Triton kernel for 8-bit weights on CUDA: bf16
    results within one bf16 ulp of the definition (dequantize to bf16, torch's GEMM)."""
    x = (torch.randn(5, 256, device="cuda") / 10).bfloat16()
    w = quantize(torch.randn(384, 256, device="cuda") / 10, scheme)
    kernel = FusedLinear()
    kernel.prepare(w)
    want = torch.nn.functional.linear(x, w.dequantize(torch.bfloat16))
    torch.testing.assert_close(kernel(x, w).float(), want.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(kernel.fp32(x, w), want.float(), atol=2e-2, rtol=0)
