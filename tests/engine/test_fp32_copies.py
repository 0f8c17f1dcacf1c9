"""fp32 weight copies for large CPU batches (the `cpu` linear kernel's default plan, its native part
unavailable): identical to torch's 16-bit GEMM up to the plan's fp32 bucket, close above it."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.kernels import cpu
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.linear import DEFAULT_PLAN
from moe_runtime.model.parts import ModelParts

FP32_MIN_ROWS = DEFAULT_PLAN.max_rows("native") + 1  # from here on the default plan multiplies in fp32


@pytest.fixture
def no_native(monkeypatch):
    """The native kernels reported unavailable: the `cpu` linear kernel keeps only its fp32 copies."""
    monkeypatch.setattr(cpu, "available", lambda: False)


def _logits(model, n: int) -> torch.Tensor:
    ids = torch.arange(3, 3 + n)
    return model.compute_logits(model(ids, torch.arange(n), AttentionMetadata.for_prompts([n])))


def test_copies_change_only_large_batches(tiny_model_dir, no_native):
    plain = load_model(tiny_model_dir, dtype="bfloat16", device="cpu")
    copied = load_model(tiny_model_dir, dtype="bfloat16", device="cpu", parts=ModelParts(linear="cpu"))
    assert copied.lm_head.kernel.weight_fp32.dtype == torch.float32
    small = FP32_MIN_ROWS - 1
    torch.testing.assert_close(_logits(copied, small), _logits(plain, small), atol=0, rtol=0)
    big = FP32_MIN_ROWS + 9
    # bf16 rounding of activations: a few bf16 ulps of logits of order 1.
    torch.testing.assert_close(_logits(copied, big), _logits(plain, big), atol=0.1, rtol=0)


def test_no_copies_for_fp32_weights(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype="float32", device="cpu", parts=ModelParts(linear="cpu"))
    assert model.lm_head.kernel.weight_fp32 is None


def test_a_weight_changed_in_place_gets_a_new_copy(tiny_model_dir, no_native):
    model = load_model(tiny_model_dir, dtype="bfloat16", device="cpu", parts=ModelParts(linear="cpu"))
    head = model.lm_head
    before = _logits(model, FP32_MIN_ROWS + 9)
    head.weight.mul_(2)
    torch.testing.assert_close(_logits(model, FP32_MIN_ROWS + 9), 2 * before, atol=0.2, rtol=0.02)
    assert torch.equal(head.kernel.weight_fp32, head.weight.float())
