"""Triton grouped GEMM 2 (w2 + routing weight) vs `grouped_gemm2_reference` on every case, fp32 and fp16."""

import pytest
import torch
from moe_cases import CASES, TEST_TILES, make_inputs, num_slots

from moe_runtime.kernels.reference import align_reference, grouped_gemm1_reference, grouped_gemm2_reference
from moe_runtime.kernels.triton.grouped_gemm2 import grouped_gemm2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case, dtype):
    x = make_inputs(case, dtype, DEVICE)
    a = align_reference(x.slot_ids, num_slots(x), TEST_TILES.block_m)
    inter = grouped_gemm1_reference(x.hidden, x.w13, a)  # [T*k, I], zero rows for dropped pairs
    got = grouped_gemm2(inter, x.w2, a, x.routing.weights, TEST_TILES)
    want = grouped_gemm2_reference(inter, x.w2, a, x.routing.weights)
    assert got.shape == (case.T, case.k, case.H)
    # exact zeros where a pair was dropped, so the combine can sum blindly
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=0)
