"""Greedy tokens with offloading equal the all-resident run, token for token, for every policy, budget
(down to the minimum), prefetch on/off, miss mode and host tier, batch 1 and batched."""

from __future__ import annotations

import pytest
import torch
from offload_cases import load_offloaded

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.config import OffloadConfig
from moe_runtime.model.experts import LocalExperts
from moe_runtime.offload import OffloadedExperts

PROMPTS = ([1, 5, 77, 300, 12, 999], [1, 42], [1, 7, 7, 7, 1500, 3, 640, 2000, 11])
STEPS = 6
# (resident experts per layer, policy, miss, prefetch, host tier): every budget x miss x prefetch once,
# with policy and tier varied across them; tiny has 8 experts, top-2, so 2 is the minimum.
MATRIX = tuple(
    (slots, ("lru", "lfu")[(i // 2) % 2], miss, prefetch, ("pinned", "mmap")[(i // 4) % 2])
    for i, (slots, miss, prefetch) in enumerate(
        (s, m, p) for s in (2, 4, 8) for m in ("fetch", "host_compute", "auto") for p in (True, False)
    )
)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, greedy):
    model = load_model(tiny_model_dir, device="cpu")
    return greedy(model, [PROMPTS[0]], STEPS)[0], greedy(model, list(PROMPTS), STEPS)


@pytest.mark.parametrize("slots,policy,miss,prefetch,tier", MATRIX)
def test_same_tokens_as_all_resident(slots, policy, miss, prefetch, tier, tiny_model_dir, greedy, reference):
    offload = OffloadConfig(enabled=True, resident_experts_per_layer=slots, policy=policy, miss=miss,
                            prefetch=prefetch, host_tier=tier)  # fmt: skip
    model, store = load_offloaded(tiny_model_dir, device="cpu", offload=offload)
    single, batched = reference
    assert greedy(model, [PROMPTS[0]], STEPS)[0] == single
    assert greedy(model, list(PROMPTS), STEPS) == batched
    s = store.stats()
    assert s.hits + s.misses > 0 and s.fetched + s.host_computed == s.misses
    if slots < 8:
        assert s.misses > 0  # the budget really bit
    store.close()


def test_device_memory_budget_and_bf16(tiny_model_dir, greedy):
    expert_bytes = 3 * 128 * 256 * 2  # bf16
    offload = OffloadConfig(enabled=True, device_memory_bytes=2 * 3 * expert_bytes, host_tier="mmap")
    ref = greedy(load_model(tiny_model_dir, dtype="bfloat16", device="cpu"), list(PROMPTS), STEPS)
    model, store = load_offloaded(tiny_model_dir, dtype="bfloat16", device="cpu", offload=offload)
    assert store.num_slots == 3
    assert greedy(model, list(PROMPTS), STEPS) == ref
    store.close()


def test_offloaded_model_holds_no_experts(tiny_model_dir):
    offload = OffloadConfig(enabled=True, resident_experts_per_layer=2, host_tier="mmap")
    model, store = load_offloaded(tiny_model_dir, device="cpu", offload=offload)
    for layer in model.layers:
        experts = layer.block_sparse_moe.experts
        assert isinstance(experts, OffloadedExperts) and not list(experts.parameters())
    assert store.device_bytes() == 2 * 2 * 3 * 128 * 256 * 4  # L x S x expert bytes (fp32)
    store.close()
    plain = load_model(tiny_model_dir, device="cpu")  # all experts local
    assert isinstance(plain.layers[0].block_sparse_moe.experts, LocalExperts)
    assert plain.layers[0].block_sparse_moe.experts.w13.shape == (8, 512, 128)


def teacher_forced_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """Logits at every position of each sequence, in one flat forward pass: [sum of lengths, vocab]."""
    from moe_runtime.kernels.attention import AttentionMetadata

    ids = torch.tensor([t for s in seqs for t in s], device=model.device)
    positions = torch.cat([torch.arange(len(s)) for s in seqs]).to(model.device)
    return model.compute_logits(model(ids, positions, AttentionMetadata.for_prompts([len(s) for s in seqs])))


@pytest.mark.gpu
def test_same_results_on_cuda_pinned(tiny_model_dir, greedy):
    """On a GPU, `fetch` (experts copied from pinned host memory into slots) gives the all-resident greedy
    tokens, and logits equal to fp32 rounding (the Triton tiles are looked up by the number of resident
    slots, so the K-reduction order may differ from the all-resident run). `host_compute` and `auto` run
    missed experts on the CPU, whose GEMMs sum in another order again: their logits are checked within
    1e-4, teacher-forced on the reference tokens, instead of greedy tokens that could flip on a near-tie."""
    resident = load_model(tiny_model_dir, device="cuda")
    ref = greedy(resident, list(PROMPTS), STEPS)
    seqs = [list(p) + r for p, r in zip(PROMPTS, ref, strict=True)]
    ref_logits = teacher_forced_logits(resident, seqs)
    for miss in ("fetch", "host_compute", "auto"):
        offload = OffloadConfig(enabled=True, resident_experts_per_layer=2, miss=miss, host_tier="pinned")
        model, store = load_offloaded(tiny_model_dir, device="cuda", offload=offload)
        logits = teacher_forced_logits(model, seqs)
        s = store.stats()
        assert s.misses > 0 and s.fetched + s.host_computed == s.misses
        if miss == "fetch":
            assert s.host_computed == 0
            assert greedy(model, list(PROMPTS), STEPS) == ref
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
        else:
            assert miss == "auto" or s.host_computed == s.misses
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
        store.close()


def test_counters_add_up_to_the_routers_expert_uses(tiny_model_dir):
    """hits + misses == the (forward, layer, expert) triples the router sent tokens to (router_counts)."""
    from moe_runtime.kernels.attention import AttentionMetadata

    offload = OffloadConfig(enabled=True, resident_experts_per_layer=3, miss="auto", host_tier="mmap")
    model, store = load_offloaded(tiny_model_dir, device="cpu", offload=offload)
    uses = 0
    for prompt in PROMPTS:
        ids = torch.tensor(prompt)
        model(ids, torch.arange(len(prompt)), AttentionMetadata.for_prompts([len(prompt)]))
        uses += int((model.router_counts(len(prompt)) > 0).sum())  # [L, E] tokens per expert this forward
    s = store.stats()
    assert s.hits + s.misses == uses
    assert s.fetched + s.host_computed == s.misses
    assert s.prefetch_useful <= s.prefetch_loaded
    store.close()
