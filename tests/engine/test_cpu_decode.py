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
from moe_runtime.engine.cpu_decode import MAX_QUERY, MAX_TOKENS, CpuDecodeForward, plan_decode
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
    prompt = AttentionMetadata([0, 1, 3], [7, 2], torch.tensor([6, 32, 33]), tables[[0, 1]])
    assert not CpuDecodeForward.applies(3, prompt)  # a whole prompt in the step (nothing cached before it)
    verify = AttentionMetadata([0, 1, 3], [7, 13], torch.tensor([6, 75, 76]), tables[[0, 2]])
    assert CpuDecodeForward.applies(3, verify)  # two new tokens after a cached context: a verification
    long = AttentionMetadata([0, 1, 1 + MAX_QUERY + 1], [7, 40], torch.arange(MAX_QUERY + 2), tables[[0, 2]])
    assert not CpuDecodeForward.applies(MAX_QUERY + 2, long)  # more new tokens than a verification has
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


def _verification(tables, new):
    """Sequence b adds new[b] tokens after its prompt: (ids [T], positions [T], meta)."""
    ids, positions, slots, qsl, ctx = [], [], [], [0], []
    for b, n in new.items():
        start = len(PROMPTS[b])
        for pos in range(start, start + n):
            ids.append(600 + 7 * b + pos)
            positions.append(pos)
            slots.append(int(tables[b, pos // BLOCK]) * BLOCK + pos % BLOCK)
        qsl.append(qsl[-1] + n)
        ctx.append(start + n)
    return torch.tensor(ids), torch.tensor(positions), AttentionMetadata(qsl, ctx, torch.tensor(slots), tables[list(new)])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_verification_step_is_the_tokens_decoded_one_at_a_time(tiny_model_dir, dtype):
    """A speculative verification (sequences adding 3, 1 and 5 tokens to their cached prompts) runs natively,
    one row per token with its own context length: every token's hidden state and KV rows are those of
    decoding the tokens one step at a time (the same native calls), so attention over the step is causal."""
    model, kv, tables = _prefilled(tiny_model_dir, dtype)
    new = {0: 3, 1: 1, 2: 5}
    ids, positions, meta = _verification(tables, new)
    assert CpuDecodeForward.applies(len(ids), meta)
    kv_steps = [(k.clone(), v.clone()) for k, v in kv]
    got, got_counts = _native(model, ids, positions, meta, kv)

    rows, want, want_counts = [], torch.empty_like(got), torch.zeros_like(got_counts)
    for b, n in new.items():
        rows += [(b, j) for j in range(n)]
    for j in range(max(new.values())):  # step j: the j-th new token of every sequence that has one
        step = [t for t, (b, jj) in enumerate(rows) if jj == j]
        seqs = [rows[t][0] for t in step]
        meta_j = AttentionMetadata(list(range(len(step) + 1)), [int(positions[t]) + 1 for t in step],
                                   meta.slot_mapping[step], tables[seqs])
        want[step], counts = _native(model, ids[step], positions[step], meta_j, kv_steps)
        want_counts += counts
    torch.testing.assert_close(got, want, atol=1e-2, rtol=0)  # bf16 rounding of the same sums
    assert torch.equal(got_counts, want_counts)
    for (k, v), (k_ref, v_ref) in zip(kv, kv_steps, strict=True):
        torch.testing.assert_close(k, k_ref, atol=1e-2, rtol=0)
        torch.testing.assert_close(v, v_ref, atol=1e-2, rtol=0)


def test_verification_step_is_close_to_the_torch_ops(tiny_model_dir):
    """Against the eager ops, whose multi-token attention rounds scores to bf16 where the native kernel keeps
    fp32: final hidden states within atol 5e-2; KV rows after the first layer carry that difference."""
    model, kv, tables = _prefilled(tiny_model_dir)
    ids, positions, meta = _verification(tables, {0: 3, 1: 1, 2: 5})
    kv_ref = [(k.clone(), v.clone()) for k, v in kv]
    got, _ = _native(model, ids, positions, meta, kv)
    want = _torch_ops(model, ids, positions, meta, kv_ref)
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=0)
    assert torch.equal(kv[0][0], kv_ref[0][0]) and torch.equal(kv[0][1], kv_ref[0][1])  # layer 0: exact
    for (k, v), (k_ref, v_ref) in zip(kv[1:], kv_ref[1:], strict=True):
        torch.testing.assert_close(k.float(), k_ref.float(), atol=5e-2, rtol=0)
        torch.testing.assert_close(v.float(), v_ref.float(), atol=5e-2, rtol=0)
