"""Triton top-k softmax vs `route_reference`, both routing variants: the same logits picked in the same order
(ids exact but for the order of equal logits, which torch.topk leaves unspecified: 16-bit logits over 128
experts tie), weights to fp32 rounding."""

import pytest
import torch

from moe_runtime.kernels.reference import route_reference
from moe_runtime.kernels.triton.topk_softmax import topk_softmax

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (T, E, k): T=1, a ragged token block (33 > 16 + 16), E not a power of two, k = 1, 2 and 3; then the
# served families' shapes: Qwen1.5/2-MoE (60 experts, top-4), OLMoE (64, top-8), Qwen3-MoE (128, top-8).
SHAPES = ((1, 8, 2), (3, 4, 1), (33, 8, 2), (17, 6, 3), (33, 60, 4), (17, 64, 8), (33, 128, 8), (1, 128, 8))


@pytest.mark.parametrize("renormalize", [True, False], ids=["renormalize", "softmax-probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_matches_reference(T, E, k, dtype, renormalize):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E + k)).to(DEVICE, dtype)
    got = topk_softmax(logits, k, renormalize)
    want = route_reference(logits, k, renormalize)
    assert got.ids.dtype == torch.int32 and got.weights.dtype == torch.float32
    picked = logits.gather(1, got.ids.long())  # [T, k]
    assert torch.equal(picked, logits.gather(1, want.ids.long()))
    assert all(len(set(row)) == k for row in got.ids.tolist())
    untied = (picked[:, :-1] != picked[:, 1:]).all(dim=1) & (picked[:, -1:] != _next_largest(logits, k)).all(1)
    assert torch.equal(got.ids[untied], want.ids[untied])
    torch.testing.assert_close(got.weights, want.weights, atol=1e-6, rtol=0)


def _next_largest(logits, k):
    """[T, 1]: the (k+1)-th largest logit of each row (-inf when E == k)."""
    if logits.shape[1] == k:
        return torch.full_like(logits[:, :1], float("-inf"))
    return torch.topk(logits.float(), k + 1, dim=1).values[:, -1:].to(logits.dtype)


@pytest.mark.parametrize("renormalize, weights", [(True, [[0.7311, 0.2689]]), (False, [[0.6439, 0.2369]])])
def test_docstring_example(renormalize, weights):
    r = topk_softmax(torch.tensor([[0.0, 2.0, 1.0, -1.0]], device=DEVICE), 2, renormalize)
    assert r.ids.tolist() == [[1, 2]]
    torch.testing.assert_close(r.weights.cpu(), torch.tensor(weights), atol=1e-4, rtol=0)


def test_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k=5"):
        topk_softmax(torch.zeros(2, 4, device=DEVICE), 5)
