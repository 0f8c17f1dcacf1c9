"""Triton combine vs `rows.sum(dim=1).to(dtype)` with dropped rows zeroed: bit for bit."""

import pytest
import torch

from moe_runtime.kernels.triton.combine import combine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,k,H", [(1, 2, 64), (3, 1, 100), (33, 2, 1500), (5, 3, 2048)])
def test_matches_sum_then_one_rounding(T, k, H, dtype):
    g = torch.Generator().manual_seed(T * 100 + k)
    rows = torch.randn(T, k, H, generator=g).to(DEVICE)
    slots = torch.randint(-1, 4, (T, k), generator=g, dtype=torch.int32).to(DEVICE)
    dropped = slots < 0
    rows[dropped] = float("nan")  # never written by GEMM 2: must not be read
    want = rows.masked_fill(dropped[..., None], 0.0).sum(dim=1).to(dtype)
    got = combine(rows, slots, dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_rejects_bad_inputs():
    rows = torch.zeros(2, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        combine(rows.half(), torch.zeros(2, 2, dtype=torch.int32, device=DEVICE), torch.float32)
    with pytest.raises(ValueError, match=r"slots must be \[T=2, k=2\]"):
        combine(rows, torch.zeros(2, 3, dtype=torch.int32, device=DEVICE), torch.float32)
