"""fp32 weight copies for large CPU batches: identical below FP32_MIN_ROWS, close above it."""

from __future__ import annotations

import torch

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.model.attention import AttentionMetadata
from moe_runtime.model.mixtral import FP32_MIN_ROWS


def _logits(model, n: int) -> torch.Tensor:
    ids = torch.arange(3, 3 + n)
    return model.compute_logits(model(ids, torch.arange(n), AttentionMetadata.for_prompts([n])))


def test_copies_change_only_large_batches(tiny_model_dir):
    plain = load_model(tiny_model_dir, dtype="bfloat16", device="cpu")
    copied = load_model(tiny_model_dir, dtype="bfloat16", device="cpu")
    copied.keep_fp32_copies()
    assert copied.lm_head.weight_fp32.dtype == torch.float32
    small = FP32_MIN_ROWS - 1
    torch.testing.assert_close(_logits(copied, small), _logits(plain, small), atol=0, rtol=0)
    big = FP32_MIN_ROWS + 9
    # bf16 rounding of activations: a few bf16 ulps of logits of order 1.
    torch.testing.assert_close(_logits(copied, big), _logits(plain, big), atol=0.1, rtol=0)


def test_no_copies_for_fp32_weights(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype="float32", device="cpu")
    model.keep_fp32_copies()
    assert model.lm_head.weight_fp32 is None and not model.lm_head.uses_fp32(10_000)
