"""Offloading the other families' routed experts: the same greedy tokens as the all-resident run, with dense
layers (no store slots) among sparse ones and a shared expert that is always resident.

With top-k > 2, a step that runs a layer's experts in parts (more of them needed than the resident slots, or
some computed on the host) sums each token's pairs in another association than the one-call kernel: fp32
logits may then differ in the last bits, 16-bit ones after their one rounding almost never. Steps whose
experts fit the slots are bit-identical (checked on logits).
"""

from __future__ import annotations

import pytest
import torch
from offload_cases import load_offloaded

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.config import OffloadConfig
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.model.experts import LocalExperts
from moe_runtime.offload import OffloadedExperts
from moe_runtime.presets.configs import preset_config
from moe_runtime.presets.init_model import write_checkpoint

PROMPTS = ([1, 5, 77, 300, 12, 999], [1, 42], [1, 7, 7, 7, 1500, 3, 640, 2000, 11])
STEPS = 6
# preset, overrides: Qwen3 with a dense middle layer (32 experts, top-8); Qwen2 with its shared expert
# (60 experts, top-4) and a dense first layer (decoder_sparse_step=2: layers 1 and 3 sparse).
MODELS = {
    "qwen3-dense": ("tiny-qwen3moe", dict(num_hidden_layers=3, mlp_only_layers=[1], num_experts=32)),
    "qwen2-shared": ("tiny-qwen2moe", dict(num_hidden_layers=4, decoder_sparse_step=2)),
    "olmoe": ("tiny-olmoe", {}),
}
# (model, resident experts per layer, miss, prefetch, host tier): the minimum (top-k) and more, each miss mode
MATRIX = (
    ("qwen3-dense", 8, "fetch", True, "pinned"),
    ("qwen3-dense", 12, "host_compute", False, "mmap"),
    ("qwen3-dense", 20, "auto", True, "mmap"),
    ("qwen2-shared", 4, "fetch", False, "mmap"),
    ("qwen2-shared", 10, "auto", True, "pinned"),
    ("olmoe", 8, "host_compute", True, "pinned"),
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: write_checkpoint(tmp_path_factory.mktemp(name), preset_config(preset, **overrides), seed=0)
            for name, (preset, overrides) in MODELS.items()}


def logits(model, seqs):
    ids = torch.tensor([t for s in seqs for t in s])
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    return model.compute_logits(model(ids, positions, AttentionMetadata.for_prompts([len(s) for s in seqs])))


@pytest.mark.parametrize("name,slots,miss,prefetch,tier", MATRIX)
def test_same_tokens_as_all_resident(checkpoints, greedy, name, slots, miss, prefetch, tier):
    ckpt = checkpoints[name]
    want = greedy(load_model(ckpt, device="cpu"), list(PROMPTS), STEPS)
    offload = OffloadConfig(enabled=True, resident_experts_per_layer=slots, miss=miss, prefetch=prefetch,
                            host_tier=tier)
    model, store = load_offloaded(ckpt, device="cpu", offload=offload)
    assert greedy(model, list(PROMPTS), STEPS) == want
    assert sorted(store.layers) == list(model.config.moe_layers)  # slots for sparse layers only
    s = store.stats()
    assert s.misses > 0 and s.fetched + s.host_computed == s.misses
    store.close()


def test_one_call_steps_are_bit_identical_in_bf16_and_fp32(checkpoints):
    ckpt = checkpoints["qwen3-dense"]
    for dtype in ("float32", "bfloat16"):
        want = logits(load_model(ckpt, dtype=dtype, device="cpu"), [PROMPTS[1]])
        # 2 tokens x top-8 need at most 16 experts per layer: they always fit the 16 slots (misses fetched)
        offload = OffloadConfig(enabled=True, resident_experts_per_layer=16, miss="fetch", host_tier="mmap")
        model, store = load_offloaded(ckpt, dtype=dtype, device="cpu", offload=offload)
        assert torch.equal(logits(model, [PROMPTS[1]]), want)
        assert store.stats().misses > 0
        store.close()


def test_shared_expert_and_dense_layers_stay_resident(checkpoints):
    ckpt = checkpoints["qwen2-shared"]
    offload = OffloadConfig(enabled=True, resident_experts_per_layer=4, host_tier="mmap")
    model, store = load_offloaded(ckpt, device="cpu", offload=offload)
    plain = load_model(ckpt, device="cpu")
    cfg = model.config
    assert cfg.dense_layers == (0, 2) and cfg.moe_layers == (1, 3)
    for l, block in model.moe_blocks().items():
        assert isinstance(block.experts, OffloadedExperts) and not list(block.experts.parameters())
        want = plain.moe_blocks()[l]
        assert torch.equal(block.shared_expert.gate_up_proj.weight, want.shared_expert.gate_up_proj.weight)
        assert torch.equal(block.shared_expert_gate.weight, want.shared_expert_gate.weight)
    for l in cfg.dense_layers:
        assert torch.equal(model.layers[l].mlp.down_proj.weight, plain.layers[l].mlp.down_proj.weight)
    assert isinstance(plain.moe_blocks()[1].experts, LocalExperts)
    assert store.device_bytes() == 2 * 4 * 3 * 128 * 64 * 4  # sparse layers x S x expert bytes (fp32)
    store.close()


def test_device_memory_budget_counts_sparse_layers_only(checkpoints):
    ckpt = checkpoints["qwen2-shared"]
    expert = 3 * 128 * 64 * 4  # fp32
    offload = OffloadConfig(enabled=True, device_memory_bytes=2 * 5 * expert, host_tier="mmap")  # 2 sparse layers
    model, store = load_offloaded(ckpt, device="cpu", offload=offload)
    assert store.num_slots == 5
    store.close()
