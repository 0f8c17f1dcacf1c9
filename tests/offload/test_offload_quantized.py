"""Offloaded experts in 8 bits: the store's slots and host tiers hold quantized experts (values and fp32 row
scales), a device byte budget buys twice the experts of bf16, bytes moved count the quantized size, and the
tokens are those of the all-resident quantized model (the offload store's contract, DESIGN.md 4).
"""

from __future__ import annotations

import pytest
import torch
from offload_cases import load_offloaded

from moe_runtime.checkpoint.layout import expert_bytes
from moe_runtime.checkpoint.loader import load_model, read_config
from moe_runtime.config import OffloadConfig
from moe_runtime.kernels.quant import QuantizedWeight

PROMPTS = [[1, 17, 45, 3, 99], [1, 8, 250, 31]]
STEPS = 6


@pytest.mark.parametrize("scheme", ("int8", "fp8"))
@pytest.mark.parametrize("tier,miss", (("pinned", "fetch"), ("mmap", "fetch"), ("pinned", "host_compute")))
def test_same_tokens_as_all_resident_quantized(tiny_model_dir, greedy, scheme, tier, miss, tmp_path):
    want = greedy(load_model(tiny_model_dir, "bfloat16", "cpu", quantization=scheme), PROMPTS, STEPS)
    offload = OffloadConfig(enabled=True, resident_experts_per_layer=2, miss=miss, prefetch=False, host_tier=tier,
                            spill_dir=str(tmp_path))  # mmap: the quantized spill file (offload/spill.py)
    model, store = load_offloaded(tiny_model_dir, offload, dtype="bfloat16", device="cpu", quantization=scheme)
    try:
        assert greedy(model, PROMPTS, STEPS) == want
        slots = next(iter(store.layers.values()))
        assert isinstance(slots.w13, QuantizedWeight) and slots.w13.scale.dtype == torch.float32
        s = store.stats()
        assert s.misses > 0
        per_expert = expert_bytes(model.config, "bfloat16", scheme)
        if miss == "fetch":
            assert s.bytes_moved == s.fetched * per_expert  # the quantized bytes, scales included
    finally:
        store.close()


def test_offloaded_experts_with_8bit_dense_projections(tiny_model_dir, greedy):
    """`model.quantize_dense` with offloaded int8 experts: the dense projections are 8-bit too, and the
    tokens are those of the all-resident model of the same formats."""
    kw = dict(dtype="bfloat16", device="cpu", quantization="int8", quantize_dense=True)
    want = greedy(load_model(tiny_model_dir, **kw), PROMPTS, STEPS)
    offload = OffloadConfig(enabled=True, resident_experts_per_layer=2, miss="fetch", prefetch=False)
    model, store = load_offloaded(tiny_model_dir, offload, **kw)
    try:
        assert model.layers[0].self_attn.qkv_proj.matrix.dtype == torch.int8
        assert greedy(model, PROMPTS, STEPS) == want
    finally:
        store.close()


def test_a_byte_budget_holds_twice_the_int8_experts(tiny_model_dir):
    cfg = read_config(tiny_model_dir)
    L = len(cfg.moe_layers)
    int8, bf16 = expert_bytes(cfg, "bfloat16", "int8"), expert_bytes(cfg, "bfloat16")
    assert bf16 / 2 < int8 < bf16 / 2 * 1.1  # one byte per weight + one fp32 scale per row (short rows here)
    budget = OffloadConfig(enabled=True, device_memory_bytes=L * 4 * int8)
    assert budget.resolve_slots(cfg, bf16) == 2 and budget.resolve_slots(cfg, int8) == 4
    stores = {}
    for scheme in ("none", "int8"):
        _, store = load_offloaded(tiny_model_dir, budget, dtype="bfloat16", device="cpu", quantization=scheme)
        stores[scheme] = (store.num_slots, store.device_bytes())
        store.close()
    assert stores["none"][0] == 2 and stores["int8"][0] == 4
    assert stores["int8"][1] == L * 4 * int8 and stores["none"][1] == L * 2 * bf16
