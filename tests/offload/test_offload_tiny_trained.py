"""The committed `tiny-trained` checkpoint: `init-model --preset tiny-trained` writes it, it loads, and
offloading it in bf16 (its own dtype; steps run in parts round once) keeps the greedy tokens."""

from __future__ import annotations

import pytest
from offload_cases import load_offloaded

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.cli import main
from moe_runtime.config import OffloadConfig
from moe_runtime.tokenizer import Tokenizer

TEXTS = ("def __init__(self, name):\n    self.", "import os\nfor path in sys.argv[1:]:\n", "class Error(Exception):",
         # long enough that prefill gives some experts >= 16 rows: the torch backend runs those in fp32
         "def read(self, size=-1):\n    if self.closed:\n        raise ValueError('I/O operation on closed file')\n"
         "    if size is None or size < 0:\n        return self._buffer.read()\n    return self._buffer.read(size)\n")


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_trained")
    assert main(["init-model", "--preset", "tiny-trained", str(out)]) == 0
    return out


@pytest.mark.parametrize("slots,miss,tier", ((2, "host_compute", "mmap"), (3, "fetch", "pinned"), (4, "auto", "mmap")))
def test_bf16_offloaded_tokens_equal(trained_dir, greedy, slots, miss, tier):
    prompts = [Tokenizer.from_dir(trained_dir).encode(t) for t in TEXTS]
    ref = greedy(load_model(trained_dir, device="cpu"), prompts, 6)
    model, store = load_offloaded(trained_dir, device="cpu", offload=OffloadConfig(
        enabled=True, resident_experts_per_layer=slots, miss=miss, host_tier=tier, policy="lfu"))
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.bfloat16"
    assert greedy(model, prompts, 6) == ref
    assert store.stats().misses > 0
    store.close()


def test_bf16_hidden_states_bit_identical(trained_dir):
    """Stronger than tokens: the final hidden states of a long batched prefill are equal bit for bit, with
    experts split across waves and the host (some experts get >= 16 rows: the torch backend's fp32 path)."""
    import torch

    from moe_runtime.kernels.attention import AttentionMetadata

    tok = Tokenizer.from_dir(trained_dir)
    prompts = [tok.encode(t * 3) for t in TEXTS]
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    meta = AttentionMetadata.for_prompts([len(p) for p in prompts])
    ref = load_model(trained_dir, device="cpu")(ids, positions, meta)
    for miss in ("fetch", "host_compute"):
        model, store = load_offloaded(trained_dir, device="cpu", offload=OffloadConfig(
            enabled=True, resident_experts_per_layer=2, miss=miss, host_tier="mmap"))
        assert torch.equal(model(ids, positions, meta), ref), miss
        store.close()
