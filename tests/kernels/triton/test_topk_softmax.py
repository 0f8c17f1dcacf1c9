"""Triton top-k softmax vs `route_reference` (renormalized): ids exact, weights to fp32 rounding."""

import pytest
import torch

from moe_runtime.kernels.reference import route_reference
from moe_runtime.kernels.triton.topk_softmax import topk_softmax

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (T, E, k): T=1, a ragged token block (33 > 16 + 16), E not a power of two, k = 1, 2 and 3.
SHAPES = ((1, 8, 2), (3, 4, 1), (33, 8, 2), (17, 6, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_matches_reference(T, E, k, dtype):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E + k)).to(DEVICE, dtype)
    got = topk_softmax(logits, k)
    want = route_reference(logits, k, renormalize=True)
    assert got.ids.dtype == torch.int32 and got.weights.dtype == torch.float32
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.weights, want.weights, atol=1e-6, rtol=0)


def test_docstring_example():
    r = topk_softmax(torch.tensor([[0.0, 2.0, 1.0, -1.0]], device=DEVICE), 2)
    assert r.ids.tolist() == [[1, 2]]
    torch.testing.assert_close(r.weights.cpu(), torch.tensor([[0.7311, 0.2689]]), atol=1e-4, rtol=0)


def test_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k=5"):
        topk_softmax(torch.zeros(2, 4, device=DEVICE), 5)
