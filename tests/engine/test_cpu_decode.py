"""The native decode path (`engine.cpu_decode.CpuDecodeForward`): the same decode step as the model's ops.

Against the same model with the CPU fast parts (`cpu` attention, native linears, the `cpu` MoE backend)
run eagerly, from the same KV cache: final hidden states within atol 5e-2 (values of
order 1 after the final norm; summation order only), the written KV rows within atol 2e-2, router counts
equal. Engine-level greedy tokens through this path are checked in test_native_kernels.py and
test_generate_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.engine.cpu_decode import MAX_TOKENS, CpuDecodeForward, plan_decode
from moe_runtime.engine.forward import StepInputs
from moe_runtime.engine.kv_cache import allocate_kv_cache
from moe_runtime.kernels import cpu
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.cpu.dispatch import RowPlan
from moe_runtime.model.experts import LocalExpertsBuilder
from moe_runtime.model.parts import ModelParts

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the native CPU kernels run only on AVX2 CPUs")

BLOCK = 4
PROMPTS = ([1, 300, 301, 302, 9, 10], [1, 17], [1, *range(40, 51)])


FAST = ModelParts(experts=LocalExpertsBuilder("cpu"), attention="cpu", linear="cpu")  # the engine's CPU parts


def _prefilled(tiny_model_dir, dtype="bfloat16", prompts=PROMPTS):
    """A fast model, and KV caches holding `prompts` (blocks of 4 tokens, sequence b owns blocks 8b...)."""
    model = load_model(tiny_model_dir, dtype=dtype, device="cpu", parts=FAST)
    kv = allocate_kv_cache(model.config, 8 * len(prompts), BLOCK, model.dtype, model.device)
    tables = torch.tensor([[8 * b + j for j in range(8)] for b in range(len(prompts))])  # [B, 8]
    for b, p in enumerate(prompts):
        slots = torch.tensor([tables[b, i // BLOCK] * BLOCK + i % BLOCK for i in range(len(p))])
        meta = AttentionMetadata([0, len(p)], [len(p)], slots, tables[b : b + 1])
        model(torch.tensor(p), torch.arange(len(p)), meta, kv)  # prefill: the torch path
    return model, kv, tables


def _decode_inputs(tables, rows, prompts=PROMPTS):
    """One new token for each sequence in `rows`, at the position after its prompt."""
    ctx = [len(prompts[b]) + 1 for b in rows]
    slots = torch.tensor(
        [tables[b, (c - 1) // BLOCK] * BLOCK + (c - 1) % BLOCK for b, c in zip(rows, ctx, strict=True)]
    )
    meta = AttentionMetadata(list(range(len(rows) + 1)), ctx, slots, tables[rows])
    return torch.tensor([500 + b for b in rows]), torch.tensor(ctx) - 1, meta


def _torch_ops(model, ids, positions, meta, kv):
    """The same step with the native decode path off: the fast parts' ops, eagerly."""
    return model(ids, positions, meta, kv)


def _native(model, ids, positions, meta, kv):
    """The step through the native decode path: (hidden [T, D], router counts [L, E])."""
    return CpuDecodeForward(model, kv)(StepInputs(ids, positions, meta, decode=True))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_native_step_matches_the_torch_ops(tiny_model_dir, dtype, monkeypatch):
    model, kv, tables = _prefilled(tiny_model_dir, dtype)
    calls = []
    for op in ("rms_norm", "attention_decode", "moe_decode"):
        real = getattr(cpu, op)
        monkeypatch.setattr(
            cpu, op, lambda *a, _real=real, _op=op, **kw: calls.append(_op) or _real(*a, **kw)
        )
    ids, positions, meta = _decode_inputs(tables, [0, 1, 2])
    kv_ref = [(k.clone(), v.clone()) for k, v in kv]

    got, got_counts = _native(model, ids, positions, meta, kv)
    L = model.config.num_hidden_layers
    assert sorted(calls) == sorted(["rms_norm"] * (2 * L + 1) + ["attention_decode", "moe_decode"] * L)
    want = _torch_ops(model, ids, positions, meta, kv_ref)
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=0)
    assert torch.equal(got_counts, model.router_counts(3))
    assert got_counts.sum() == 3 * model.config.num_experts_per_tok * model.config.num_hidden_layers
    for (k, v), (k_ref, v_ref) in zip(kv, kv_ref, strict=True):
        torch.testing.assert_close(k.float(), k_ref.float(), atol=2e-2, rtol=0)
        torch.testing.assert_close(v.float(), v_ref.float(), atol=2e-2, rtol=0)


def test_native_step_with_max_tokens_sequences(tiny_model_dir):
    """MAX_TOKENS sequences of mixed lengths in one native step: the same hidden states and KV rows."""
    prompts = [PROMPTS[b % 3][: 2 + b % 10] for b in range(MAX_TOKENS)]
    model, kv, tables = _prefilled(tiny_model_dir, prompts=prompts)
    ids, positions, meta = _decode_inputs(tables, list(range(MAX_TOKENS)), prompts)
    assert CpuDecodeForward.applies(MAX_TOKENS, meta)
    kv_ref = [(k.clone(), v.clone()) for k, v in kv]
    got, _ = _native(model, ids, positions, meta, kv)
    want = _torch_ops(model, ids, positions, meta, kv_ref)
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=0)
    for (k, v), (k_ref, v_ref) in zip(kv, kv_ref, strict=True):
        torch.testing.assert_close(k.float(), k_ref.float(), atol=2e-2, rtol=0)
        torch.testing.assert_close(v.float(), v_ref.float(), atol=2e-2, rtol=0)


def test_applies_to_decode_steps_only(tiny_model_dir):
    model, kv, tables = _prefilled(tiny_model_dir)
    ids, positions, meta = _decode_inputs(tables, [0, 2])
    assert CpuDecodeForward.applies(2, meta)
    assert not CpuDecodeForward.applies(2, AttentionMetadata.for_prompts([1, 1]))  # no cache: whole prompts
    mixed = AttentionMetadata([0, 1, 3], [7, 13], torch.tensor([6, 75, 76]), tables[[0, 2]])
    assert not CpuDecodeForward.applies(3, mixed)  # a prompt chunk in the step
    many = AttentionMetadata(
        list(range(MAX_TOKENS + 2)), [2] * (MAX_TOKENS + 1), None, tables[[0] * (MAX_TOKENS + 1)]
    )
    assert not CpuDecodeForward.applies(MAX_TOKENS + 1, many)


def test_new_weights_loaded_in_place_reach_the_native_step(tiny_model_dir):
    """The native step reads the stacked q/k/v weight the model holds: a reload in place is seen."""
    model, kv, tables = _prefilled(tiny_model_dir)
    ids, positions, meta = _decode_inputs(tables, [0, 1])
    attn = model.layers[0].self_attn
    forward = CpuDecodeForward(model, kv)
    v_rows = attn.qkv_proj.sizes[2]
    state = {"layers.0.self_attn.qkv_proj.weight": torch.cat([attn.qkv_proj.weight[:-v_rows],
                                                              torch.zeros_like(attn.qkv_proj.weight[-v_rows:])])}
    model.load_state_dict(state, strict=False)  # a reload: in place
    native, _ = forward(StepInputs(ids, positions, meta, decode=True))
    want = _torch_ops(model, ids, positions, meta, [(k.clone(), v.clone()) for k, v in kv])
    torch.testing.assert_close(native.float(), want.float(), atol=5e-2, rtol=0)


def test_other_moe_backends_keep_their_block(tiny_model_dir):
    """A layer whose MoE backend is not `cpu` (set in the config, or offloaded experts) runs its
    SparseMoeBlock inside the native step; the result is the same step."""
    model, kv, tables = _prefilled(tiny_model_dir)
    ids, positions, meta = _decode_inputs(tables, [1, 2])
    want, want_counts = _native(model, ids, positions, meta, [(k.clone(), v.clone()) for k, v in kv])
    model.layers[1].block_sparse_moe.experts.backend = "torch"
    calls = []
    model.layers[1].block_sparse_moe.register_forward_hook(lambda *a: calls.append(1))
    got, got_counts = _native(model, ids, positions, meta, [(k.clone(), v.clone()) for k, v in kv])
    assert calls == [1]
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=0)
    assert torch.equal(got_counts, want_counts)


def test_the_decode_plan_sends_each_batch_size_its_way(tiny_model_dir):
    """A measured plan: one sequence decodes natively, two go through the eager ops."""
    model, kv, tables = _prefilled(tiny_model_dir)
    forward = CpuDecodeForward(model, kv, RowPlan(bounds=(1, 64), choices=("native", "eager")))
    ran = []
    eager = forward.eager
    forward.eager = lambda inputs: ran.append("eager") or eager(inputs)
    for rows in ([0], [0, 1]):
        ids, positions, meta = _decode_inputs(tables, rows)
        forward(StepInputs(ids, positions, meta, decode=True))
    assert ran == ["eager"]  # the batch of two only
    assert plan_decode(model, kv, max_batch=4).bounds == (1, 2, 4)
