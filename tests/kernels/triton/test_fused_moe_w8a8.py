"""Triton MoE with fp8 experts and fp8 activations (w8a8: per-token activation scales) vs its references.

What runs where. Under TRITON_INTERPRET=1 on CPU (tests/kernels/conftest.py) everything above the GPU
section runs: the interpreter holds float8_e4m3fn tensors as raw bytes and multiplies fp8 x fp8 `tl.dot`
operands after widening them to fp16 (exact: every e4m3 value is an fp16 value) with fp32 accumulation,
the math the GPU's fp8 tensor cores do (Hopper's add within a K tile in reduced precision), so the kernels'
fp8 path, index handling and scale epilogues are all exercised (checked on this machine with a probe
before writing these tests). The interpreter's own
fp32 -> e4m3 cast rounds wrongly (see kernels/triton/quant_act.py), which is why the quantization kernel
rounds in fp32 itself and casts only exact values; on a GPU the same code runs. bf16 (the interpreter
cannot do bf16 arithmetic), Mixtral shapes, CUDA graphs and Hopper's fp8 tensor cores are the gpu-marked
tests at the bottom, unverified until a GPU session runs `pytest -m gpu`.

Tolerances (outputs of these randn / 10 cases are at most ~2e-2):
- Activation quantization: bit for bit against `quantize_activations_reference` (same fp32 operations,
  one rounding to e4m3).
- Each grouped GEMM on the same fp8 operands: atol 1e-6 (fp32), only fp32 summation order differs (the
  kernel scales after the sum, the reference dequantizes first).
- The whole w8a8 MoE against `fused_moe_reference_w8a8_fp32`: atol 2e-5. The summation order can move GEMM
  1's output by an ulp of its dtype, and where that crosses an e4m3 rounding boundary of the second
  quantization one element of the intermediate moves by an e4m3 step (2^-3 of its power of two), which
  moves an output by that times a w2 weight times a routing weight: ~1e-5 for a typical element here, a few
  1e-4 for the largest. Measured on these cases: at most 1.4e-6 in fp32 and 8e-9 in fp16 (fp16 rounds the
  fp32 differences away), against outputs up to 1.4e-2; a wrong scale or index is off by 1e-3 or more.
- Against the 16-bit MoE (fp32 weights, no quantization): loose. e4m3 keeps 3 mantissa bits, so each of
  the four quantized operands (x, w13, the intermediate, w2) carries a relative error of up to 2^-4 per
  element; summed over K these average out to a few percent of the output. Bound: relative Frobenius error
  <= 0.1 and max error <= 0.15 * max |output|; measured 0.043-0.075 and 0.031-0.082 (against the w8a16
  reference, which quantizes only the weights: 0.032-0.057).
"""

import pytest
import torch
from moe_cases import CASES, TEST_TILES, MoeCase, make_inputs

from moe_runtime.kernels import fused_moe_fp32
from moe_runtime.kernels.quant import MIN_ACT_AMAX, QuantizedActivations, quantize
from moe_runtime.kernels.reference import (
    RoutingResult,
    align_reference,
    fused_moe_reference_fp32,
    fused_moe_reference_w8a8_fp32,
    grouped_gemm1_reference,
    grouped_gemm2_reference,
    quantize_activations_reference,
)
from moe_runtime.kernels.triton.fused_moe import (
    fused_moe_for,
    fused_moe_triton_fp32,
    fused_moe_triton_w8a8_fp32,
)
from moe_runtime.kernels.triton.grouped_gemm1 import grouped_gemm1
from moe_runtime.kernels.triton.grouped_gemm2 import grouped_gemm2
from moe_runtime.kernels.triton.quant_act import quantize_activations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL_GEMM = 1e-6
ATOL_W8A8 = 2e-5
REL_16BIT = 0.1  # relative Frobenius error vs the unquantized MoE
MAX_16BIT = 0.15  # max error over max |output| vs the unquantized MoE

# Expert counts 4, 8, 16, top-1 and top-2, M = 1, 5, 33, 128; H and I not multiples of TEST_TILES (32).
W8A8_CASES = (
    MoeCase("t1_e8_k2", T=1, H=64, I=48, E=8, k=2),
    MoeCase("t5_e8_k2", T=5, H=40, I=72, E=8, k=2),
    MoeCase("t33_e16_k2", T=33, H=96, I=80, E=16, k=2),
    MoeCase("t33_e4_k1", T=33, H=56, I=40, E=4, k=1),
    MoeCase("t128_e8_k2", T=128, H=72, I=56, E=8, k=2),
    MoeCase("t128_e16_k1_slot_map", T=128, H=48, I=40, E=16, k=1,
            slot_map=(0, 1, -1, 2, 3, 4, -1, 5, 6, 7, 8, -1, 9, 10, 11, 12)),  # fmt: skip
)
ZERO_ROWS = (1, 3)  # tokens whose hidden state is all zeros, where a case has them (T = 1 keeps its one)


def fp8_inputs(case: MoeCase, dtype: torch.dtype, zero_rows: bool = True):
    """The case's inputs with fp8 experts, and (zero_rows) some all-zero tokens: their scale is 0."""
    x = make_inputs(case, dtype, DEVICE)
    if zero_rows:
        x.hidden[[t for t in ZERO_ROWS if t < case.T]] = 0
    return x, quantize(x.w13.float(), "fp8"), quantize(x.w2.float(), "fp8")


# ----------------------------------------------------------------------------------------------------------
# Per-token activation quantization


def assert_same_quantization(got: QuantizedActivations, want: QuantizedActivations):
    assert got.orig_dtype == want.orig_dtype and got.data.shape == want.data.shape
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))  # the bits, -0 included
    assert torch.equal(got.scale, want.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, K", [(1, 64), (5, 40), (33, 96), (128, 72), (5, 1500)])
def test_quantize_activations_matches_reference_bit_for_bit(M, K, dtype):
    """Random rows with a wide dynamic range (e4m3 subnormals included); K=1500 takes two column tiles."""
    g = torch.Generator().manual_seed(M * K)
    x = torch.randn(M, K, generator=g) * torch.logspace(-4, 1, K)[torch.randperm(K, generator=g)]
    x = x.to(DEVICE, dtype)
    got = quantize_activations(x)
    assert_same_quantization(got, quantize_activations_reference(x))
    assert torch.isfinite(got.data.float()).all() and got.data.float().abs().amax(dim=1).eq(448).all()


def test_quantize_activations_rounds_to_nearest_even():
    """Row max 448 (scale 1), so the values are rounded as given: e4m3 midpoints go to the even neighbour,
    a carry out of the mantissa reaches the next power of two (odd and even exponents), subnormals and
    their midpoints, and a negative value rounding to zero keeps its sign."""
    values = [448.0, 1.0625, 1.1875, 1.9375, 3.875, -7.75, 2.0**-10, 1.5 * 2.0**-9, 2.0**-11, -(2.0**-11)]
    expected = [448.0, 1.0, 1.25, 2.0, 4.0, -8.0, 0.0, 2.0**-8, 0.0, -0.0]
    x = torch.tensor([values], device=DEVICE)
    got = quantize_activations(x)
    assert got.scale.tolist() == [1.0]
    assert got.data.float().tolist() == [expected]
    assert got.data.float()[0, -1].signbit()
    assert_same_quantization(got, quantize_activations_reference(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_activations_zero_rows_give_zero_scale_and_no_nan(dtype):
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    x[1] = 0
    if dtype == torch.float32:
        x[2] = MIN_ACT_AMAX / 4  # too small to scale (448 / max would overflow near 2^-120): zeros
    got = quantize_activations(x)
    assert_same_quantization(got, quantize_activations_reference(x))
    assert got.scale[1].item() == 0.0 and torch.equal(got.data[1].float(), torch.zeros(50, device=DEVICE))
    assert torch.isfinite(got.dequantize()).all()
    if dtype == torch.float32:
        assert not got.data[2].float().any()


def test_quantize_activations_strided_and_empty():
    x = torch.randn(40, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE).t()  # [9, 40], stride (1, 9)
    assert_same_quantization(quantize_activations(x), quantize_activations_reference(x.contiguous()))
    empty = quantize_activations(torch.zeros(0, 16, device=DEVICE))
    assert empty.data.shape == (0, 16) and empty.scale.shape == (0,)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
def test_quantize_activations_refuses_bf16_in_the_interpreter():
    with pytest.raises(ValueError, match="bf16 needs a GPU"):
        quantize_activations(torch.zeros(2, 8, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------
# The grouped GEMMs on fp8 operands (HAS_ACT_SCALE), each against its reference on the same operands


@pytest.mark.parametrize("case", CASES + W8A8_CASES, ids=lambda c: c.name)
def test_grouped_gemms_on_fp8_activations_match_their_references(case):
    x, q13, q2 = fp8_inputs(case, torch.float32)
    a = align_reference(x.slot_ids, q13.shape[0], TEST_TILES.block_m)
    routed = (x.slot_ids >= 0).flatten()  # rows of dropped pairs are never written
    xq = quantize_activations_reference(x.hidden)
    inter = grouped_gemm1(xq, q13, a, TEST_TILES)
    want_inter = grouped_gemm1_reference(xq.dequantize(), q13.dequantize(torch.float32), a)
    assert inter.dtype == torch.float32
    torch.testing.assert_close(inter[routed], want_inter[routed], atol=ATOL_GEMM, rtol=0)
    iq = quantize_activations_reference(want_inter)  # dropped rows are zero here: scale 0
    rows = grouped_gemm2(iq, q2, a, x.routing.weights, TEST_TILES)
    want_rows = grouped_gemm2_reference(iq.dequantize(), q2.dequantize(torch.float32), a, x.routing.weights)
    torch.testing.assert_close(rows, want_rows, atol=ATOL_GEMM, rtol=0)  # dropped rows zero in both


def test_grouped_gemm1_returns_the_dtype_activations_were_quantized_from():
    x, q13, _ = fp8_inputs(CASES[1], torch.float16)
    a = align_reference(x.slot_ids, q13.shape[0], TEST_TILES.block_m)
    assert grouped_gemm1(quantize_activations(x.hidden), q13, a, TEST_TILES).dtype == torch.float16


def test_fp8_activations_need_fp8_weights():
    x = make_inputs(CASES[1], torch.float32, DEVICE)
    a = align_reference(x.slot_ids, x.w13.shape[0], TEST_TILES.block_m)
    xq = quantize_activations(x.hidden)
    for w13 in (quantize(x.w13, "int8"), x.w13):
        with pytest.raises(ValueError, match="w8a8"):
            grouped_gemm1(xq, w13, a, TEST_TILES)


# ----------------------------------------------------------------------------------------------------------
# The whole pipeline: fused_moe_triton_w8a8_fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES + W8A8_CASES, ids=lambda c: c.name)
def test_matches_w8a8_reference(case, dtype):
    x, q13, q2 = fp8_inputs(case, dtype)
    got = fused_moe_triton_w8a8_fp32(x.hidden, q13, q2, x.routing, x.slot_map, TEST_TILES)
    assert got.dtype == torch.float32 and got.shape == (case.T, case.H)
    want = fused_moe_reference_w8a8_fp32(x.hidden, q13, q2, x.routing, x.slot_map)
    torch.testing.assert_close(got, want, atol=ATOL_W8A8, rtol=0)
    zero = [t for t in ZERO_ROWS if t < case.T]
    assert torch.isfinite(got).all() and not got[zero].any()  # all-zero tokens: scale 0, output exactly 0


@pytest.mark.parametrize("case", W8A8_CASES, ids=lambda c: c.name)
def test_close_to_the_16bit_moe(case):
    """The loose bound: w8a8 against the unquantized fp32 MoE (module docstring)."""
    x, q13, q2 = fp8_inputs(case, torch.float32, zero_rows=False)
    got = fused_moe_triton_w8a8_fp32(x.hidden, q13, q2, x.routing, x.slot_map, TEST_TILES)
    want = fused_moe_reference_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map)
    err = got - want
    assert err.norm() <= REL_16BIT * want.norm()
    assert err.abs().max() <= MAX_16BIT * want.abs().max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
def test_triton_backend_keeps_w8a16_without_fp8_tensor_cores():
    """On CPU (the interpreter) `moe_backend: triton` runs fp8 experts with 16-bit activations."""
    x, q13, q2 = fp8_inputs(CASES[2], torch.float16, zero_rows=False)
    got = fused_moe_fp32(x.hidden, q13, q2, x.routing, slot_map=x.slot_map, backend="triton")
    assert torch.equal(got, fused_moe_triton_fp32(x.hidden, q13, q2, x.routing, x.slot_map))


def test_the_function_follows_the_device_and_the_weight_format(monkeypatch):
    choose = fused_moe_for.__wrapped__  # the rule itself, not the per-device memo
    w8a8, w8a16 = fused_moe_triton_w8a8_fp32, fused_moe_triton_fp32
    assert choose(torch.device("cpu"), torch.float8_e4m3fn) is w8a16
    for capability, want in (((9, 0), w8a8), ((8, 9), w8a8), ((8, 6), w8a16), ((8, 0), w8a16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert choose(torch.device("cuda", 0), torch.float8_e4m3fn) is want
        assert choose(torch.device("cuda", 0), torch.int8) is w8a16
        assert choose(torch.device("cuda", 0), torch.bfloat16) is w8a16


def test_w8a8_rejects_other_weights():
    x = make_inputs(CASES[0], torch.float32, DEVICE)
    for w13, w2 in ((x.w13, x.w2), (quantize(x.w13, "int8"), quantize(x.w2, "int8"))):
        refusal = f"needs float8_e4m3fn QuantizedWeights, got {w13.dtype}; int8 and 16-bit experts run with "
        with pytest.raises(ValueError, match=refusal + "fused_moe_triton_fp32"):
            fused_moe_triton_w8a8_fp32(x.hidden, w13, w2, x.routing)


def test_w8a8_looks_up_its_own_tiles(monkeypatch):
    """fp8 experts find the fp8_w8a8 table through the w8a8 MoE and the fp8_w8a16 one through the w8a16 MoE."""
    from moe_runtime.kernels.triton import fused_moe as module

    looked_up = []
    monkeypatch.setattr(module, "tile_config_for", lambda T, k, shape: looked_up.append(shape.format) or TEST_TILES)
    x, q13, q2 = fp8_inputs(CASES[0], torch.float32)
    routing = RoutingResult(x.routing.weights[:0], x.routing.ids[:0])
    fused_moe_triton_w8a8_fp32(x.hidden[:0], q13, q2, routing)
    fused_moe_triton_fp32(x.hidden[:0], q13, q2, routing)
    assert looked_up == ["fp8_w8a8", "fp8_w8a16"]


def test_no_tokens():
    x, q13, q2 = fp8_inputs(CASES[0], torch.float32)
    routing = RoutingResult(x.routing.weights[:0], x.routing.ids[:0])
    empty = fused_moe_triton_w8a8_fp32(x.hidden[:0], q13, q2, routing)
    assert empty.dtype == torch.float32 and empty.shape == (0, CASES[0].H)


# ----------------------------------------------------------------------------------------------------------
# GPU (compute capability >= 8.9): bf16, Mixtral-8x7B shapes, the backend's choice, CUDA-graph capture.

MIXTRAL = dict(H=4096, I=14336, E=8, k=2)


def needs_fp8_tensor_cores():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("w8a8 needs compute capability >= 8.9")


def mixtral_fp8(T: int, seed: int = 7):
    """Mixtral-sized inputs scaled by 1/sqrt(fan_in) (activations O(1))."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, inter, E = MIXTRAL["H"], MIXTRAL["I"], MIXTRAL["E"]
    hidden = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    q13 = quantize(torch.randn(E, 2 * inter, H, device="cuda", generator=g) / H**0.5, "fp8")
    q2 = quantize(torch.randn(E, H, inter, device="cuda", generator=g) / inter**0.5, "fp8")
    logits = torch.randn(T, E, device="cuda", generator=g)
    return hidden, q13, q2, logits


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + W8A8_CASES, ids=lambda c: c.name)
def test_cases_bf16_gpu(case):
    """bf16 rounds GEMM 1's output coarser than fp16, so more elements cross e4m3 boundaries: 2e-4."""
    needs_fp8_tensor_cores()
    x, q13, q2 = fp8_inputs(case, torch.bfloat16)
    assert_same_quantization(quantize_activations(x.hidden), quantize_activations_reference(x.hidden))
    got = fused_moe_triton_w8a8_fp32(x.hidden, q13, q2, x.routing, x.slot_map, TEST_TILES)
    want = fused_moe_reference_w8a8_fp32(x.hidden, q13, q2, x.routing, x.slot_map)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 33, 512])
def test_mixtral_shapes_bf16_gpu(T):
    """The backend picks w8a8 here; against the w8a8 reference in bf16 (2e-2: STYLE.md's kernel atol, a
    few bf16 ulps of O(1) outputs, plus Hopper's reduced-precision fp8 accumulation within a K tile)."""
    needs_fp8_tensor_cores()
    from moe_runtime.kernels import fused_moe, route

    hidden, q13, q2, logits = mixtral_fp8(T)
    assert fused_moe_for(hidden.device, q13.dtype) is fused_moe_triton_w8a8_fp32
    routing = route(logits, MIXTRAL["k"])
    got = fused_moe(hidden, q13, q2, routing)  # auto = triton on CUDA
    want = fused_moe_reference_w8a8_fp32(hidden, q13, q2, routing)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)


# CUDA-graph capture of the w8a8 pipeline: tests/kernels/triton/test_fused_moe_w8a16.py
# `test_cuda_graph_capture_and_replay_gpu[fp8]`, which on compute capability >= 8.9 runs what the backend
# picks (w8a8) against its reference.
