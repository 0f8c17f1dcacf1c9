"""kernels/cpu/hugepages: weights copied onto (transparent) huge pages keep their values, shape and dtype;
large ones start on a 2 MiB boundary, small ones stay ordinary tensors."""

from __future__ import annotations

import gc
import mmap

import pytest
import torch

from moe_runtime.kernels.cpu import hugepages


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this platform")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_large_copy_is_aligned_and_equal(dtype):
    w = torch.randn(1030, 2051).to(dtype)  # not a whole number of huge pages
    got = hugepages.copy(w)
    assert got.data_ptr() % hugepages.HUGE_PAGE == 0
    assert got.shape == w.shape and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, w)
    got.add_(1)  # writable, and its own memory
    assert not torch.equal(got, w)


def test_small_tensors_stay_ordinary():
    w = torch.randn(16, 16)
    got = hugepages.copy(w)
    assert torch.equal(got, w) and got.data_ptr() != w.data_ptr()
    assert hugepages.empty((3, 5), torch.bfloat16).shape == (3, 5)


def test_memory_lives_as_long_as_the_tensor():
    views = [hugepages.copy(torch.full((2048, 2048), float(i)))[1:3] for i in range(3)]  # parents dropped
    gc.collect()
    for i, v in enumerate(views):
        assert torch.equal(v, torch.full((2, 2048), float(i)))


def test_model_weights_move_and_keep_their_values(tiny_model_dir, monkeypatch):
    """Parts with `huge_pages` put every weight of at least MIN_BYTES (lowered here for the tiny model) on
    huge pages, with the values the checkpoint holds."""
    from moe_runtime.checkpoint.loader import load_model
    from moe_runtime.model.parts import ModelParts

    monkeypatch.setattr(hugepages, "MIN_BYTES", 64 * 1024)
    before = dict(load_model(tiny_model_dir, dtype="bfloat16", device="cpu").named_parameters())
    model = load_model(tiny_model_dir, dtype="bfloat16", device="cpu", parts=ModelParts(huge_pages=True))
    moved = [n for n, p in model.named_parameters() if p.data_ptr() % hugepages.HUGE_PAGE == 0]
    assert any("w13" in n for n in moved) and "lm_head.weight" in moved
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
