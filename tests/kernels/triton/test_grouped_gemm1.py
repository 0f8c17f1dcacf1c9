"""Triton grouped GEMM 1 (w13 + SwiGLU) vs `grouped_gemm1_reference` on every case, fp32 and fp16."""

import pytest
import torch
from moe_cases import CASES, TEST_TILES, make_inputs, num_slots

from moe_runtime.kernels.reference import align_reference, grouped_gemm1_reference
from moe_runtime.kernels.triton.grouped_gemm1 import grouped_gemm1

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case, dtype):
    x = make_inputs(case, dtype, DEVICE)
    a = align_reference(x.slot_ids, num_slots(x), TEST_TILES.block_m)
    got = grouped_gemm1(x.hidden, x.w13, a, TEST_TILES)
    want = grouped_gemm1_reference(x.hidden, x.w13, a)
    routed = (x.slot_ids >= 0).flatten()  # rows of dropped pairs are never written
    torch.testing.assert_close(got[routed].float(), want[routed].float(), atol=ATOL[dtype], rtol=0)


def test_rejects_mismatched_block_m():
    x = make_inputs(CASES[0], torch.float32, DEVICE)
    a = align_reference(x.slot_ids, num_slots(x), 32)
    with pytest.raises(ValueError, match="block_m"):
        grouped_gemm1(x.hidden, x.w13, a, TEST_TILES)
