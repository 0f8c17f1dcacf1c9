"""Triton RMSNorm (optionally after the residual add) vs the model's `RMSNorm` module.

Bit for bit whenever the sum of squares is exact in any order (dyadic inputs). With random inputs the
kernel sums the squares in another order than torch, which can move the mean by an ulp of fp32: then
fp32 results agree within 1e-6 (a few ulps), and in fp16 the normalized value before the weight can
round one ulp apart, which the weight's product can turn into two ulps of the output (rtol 2**-9);
nearly every element is still equal. The residual sum is always exact.
"""

import pytest
import torch

from moe_runtime.kernels.norm import rms_norm_reference
from moe_runtime.kernels.triton.rms_norm import rms_norm
from moe_runtime.model.layers import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=1e-7, rtol=2**-9)}
EPS = 1e-5

# (T, D)
SHAPES = ((1, 64), (33, 100), (33, 4096))


def make_norm(T, D, dtype, dyadic: bool, device=DEVICE):
    """A model RMSNorm with a random weight, x and a residual. Dyadic: multiples of 1/8 in [-2, 2], whose
    squares sum exactly in fp32 in any order (D * 4 < 2**18 at 1/64 resolution)."""
    gen = torch.Generator().manual_seed(T * 7 + D)
    norm = RMSNorm(D, EPS, kernel="torch")
    norm.weight.copy_(1 + torch.randn(D, generator=gen) / 10)
    norm = norm.to(dtype).to(device)

    def draw():
        if dyadic:
            return (torch.randint(-16, 17, (T, D), generator=gen) / 8).to(dtype).to(device)
        return torch.randn(T, D, generator=gen).to(dtype).to(device)

    return norm, draw(), draw()


@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_when_the_sum_is_exact(shape, dtype):
    norm, x, residual = make_norm(*shape, dtype, dyadic=True)
    assert torch.equal(rms_norm(x, norm.weight, EPS), norm(x))
    assert torch.equal(rms_norm_reference(x, norm.weight, EPS), norm(x))
    want_residual = residual + x  # the model's h = h + block(h)
    want = norm(want_residual)
    for fn in (rms_norm, rms_norm_reference):
        r = residual.clone()
        assert torch.equal(fn(x, norm.weight, EPS, residual=r), want), fn.__name__
        assert torch.equal(r, want_residual), fn.__name__


@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_inputs_within_an_ulp(shape, dtype):
    norm, x, residual = make_norm(*shape, dtype, dyadic=False)
    got = rms_norm(x, norm.weight, EPS)
    torch.testing.assert_close(got, norm(x), **TOL[dtype])
    r = residual.clone()
    got = rms_norm(x, norm.weight, EPS, residual=r)
    assert torch.equal(r, residual + x)
    torch.testing.assert_close(got, norm(residual + x), **TOL[dtype])
    if dtype == torch.float16:
        assert (got != norm(residual + x)).float().mean() < 1e-3  # a rounding boundary crossed, rarely


def test_rejects_mismatched_weight():
    norm, x, residual = make_norm(2, 64, torch.float32, dyadic=True)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, norm.weight.half(), EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, norm.weight, EPS, residual=residual[:1])


# -----------------------------------------------------------
# GPU: bf16 at Mixtral's width. torch's CUDA rsqrt is not IEEE-rounded (the kernel's is), so the bound
# is the fp16 one's in bf16 ulps (rtol 2**-7) even for exact sums.


@pytest.mark.gpu
@pytest.mark.parametrize("dyadic", [True, False])
def test_bf16_on_gpu(dyadic):
    norm, x, residual = make_norm(512, 4096, torch.bfloat16, dyadic, "cuda")
    torch.testing.assert_close(rms_norm(x, norm.weight, EPS), norm(x), atol=1e-6, rtol=2**-7)
    r = residual.clone()
    got = rms_norm(x, norm.weight, EPS, residual=r)
    assert torch.equal(r, residual + x)
    torch.testing.assert_close(got, norm(residual + x), atol=1e-6, rtol=2**-7)
