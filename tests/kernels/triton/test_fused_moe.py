"""The whole Triton pipeline (align -> GEMM 1 -> GEMM 2 -> combine) vs `fused_moe_reference_fp32` over fp32
copies of the inputs."""

import pytest
import torch
from moe_cases import CASES, TEST_TILES, make_inputs

from moe_runtime.kernels import fused_moe, fused_moe_fp32
from moe_runtime.kernels.reference import fused_moe_reference_fp32
from moe_runtime.kernels.triton.fused_moe import fused_moe_triton_fp32

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def fp32_reference(x):
    f = torch.float32
    return fused_moe_reference_fp32(x.hidden.to(f), x.w13.to(f), x.w2.to(f), x.routing, x.slot_map)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case, dtype):
    x = make_inputs(case, dtype, DEVICE)
    got = fused_moe_triton_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map, TEST_TILES)
    assert got.dtype == torch.float32 and got.shape == (case.T, case.H)
    rounded = got.to(dtype)  # as `kernels.fused_moe` returns it
    torch.testing.assert_close(rounded.float(), fp32_reference(x), atol=ATOL[dtype], rtol=0)


def test_public_api_with_default_tiles():
    x = make_inputs(CASES[2], torch.float32, DEVICE)  # the heuristic picks block_m 16 here
    got = fused_moe(x.hidden, x.w13, x.w2, x.routing, backend="triton")
    torch.testing.assert_close(got, fp32_reference(x), atol=1e-5, rtol=0)


def test_no_tokens():
    x = make_inputs(CASES[0], torch.float32, DEVICE)
    empty = fused_moe_triton_fp32(
        x.hidden[:0], x.w13, x.w2, type(x.routing)(x.routing.weights[:0], x.routing.ids[:0])
    )
    assert empty.dtype == torch.float32 and empty.shape == (0, CASES[0].H)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
def test_bf16_is_refused_by_the_interpreter():
    x = make_inputs(CASES[0], torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 needs a GPU"):
        fused_moe_triton_fp32(x.hidden, x.w13, x.w2, x.routing, None, TEST_TILES)


def test_public_api_rounds_the_fp32_result_once():
    """`fused_moe_fp32(backend="triton")` is the pipeline with the tuned or heuristic tiles, fp32 [T, H];
    `fused_moe` is that rounded to fp16, bit for bit."""
    x = make_inputs(CASES[5], torch.float16, DEVICE)
    partial = fused_moe_fp32(x.hidden, x.w13, x.w2, x.routing, slot_map=x.slot_map, backend="triton")
    assert partial.dtype == torch.float32 and partial.shape == (CASES[5].T, CASES[5].H)
    assert torch.equal(partial, fused_moe_triton_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map))
    rounded = fused_moe(x.hidden, x.w13, x.w2, x.routing, slot_map=x.slot_map, backend="triton")
    assert torch.equal(rounded, partial.half())


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=lambda c: c.name)
def test_gemm2_with_its_own_tiles(case):
    """A tuned entry may give grouped GEMM 2 other tiles (same block_m): same result as the reference."""
    from dataclasses import replace

    tiles = replace(TEST_TILES, gemm2=replace(TEST_TILES, block_n=64, block_k=16, group_m=1))
    x = make_inputs(case, torch.float32, DEVICE)
    got = fused_moe_triton_fp32(x.hidden, x.w13, x.w2, x.routing, x.slot_map, tiles)
    torch.testing.assert_close(got, fp32_reference(x), atol=1e-5, rtol=0)
