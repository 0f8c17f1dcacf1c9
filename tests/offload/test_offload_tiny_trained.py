"""The committed `tiny-trained` checkpoint: `init-model --preset tiny-trained` writes it, it loads, and
offloading it in bf16 (its own dtype; steps run in parts round once) keeps the greedy tokens."""

from __future__ import annotations

import pytest

from moe_runtime.cli import main
from moe_runtime.config import OffloadConfig
from moe_runtime.model.loader import load_model
from moe_runtime.tokenizer import Tokenizer

TEXTS = ("def __init__(self, name):\n    self.", "import os\nfor path in sys.argv[1:]:\n", "class Error(Exception):")


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_trained")
    assert main(["init-model", "--preset", "tiny-trained", str(out)]) == 0
    return out


@pytest.mark.parametrize("slots,miss,tier", ((2, "host_compute", "mmap"), (3, "fetch", "pinned"), (4, "auto", "mmap")))
def test_bf16_offloaded_tokens_equal(trained_dir, greedy, slots, miss, tier):
    prompts = [Tokenizer.from_dir(trained_dir).encode(t) for t in TEXTS]
    ref = greedy(load_model(trained_dir, device="cpu"), prompts, 6)
    model = load_model(trained_dir, device="cpu", offload=OffloadConfig(
        enabled=True, resident_experts_per_layer=slots, miss=miss, host_tier=tier, policy="lfu"))
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.bfloat16"
    assert greedy(model, prompts, 6) == ref
    assert model.expert_store.stats().misses > 0
    model.expert_store.close()
