"""Decode steps on CPU in native calls: the model's layers in four calls each instead of ~120 torch ops.

When every sequence of a step adds one token to its cached context, or a few (a speculative verification:
the last token and its proposals), and the CPU fast paths are on (`model.exact: false`, 16-bit activations, the
native kernels built; 16-bit, int8 or fp8 weights), each layer runs as

    x = rms_norm(h)                                  # kernels/cpu/rms_norm.cpp
    a = attention_decode(x, ...)                     # q/k/v, RoPE, cache write, paged attention, o_proj
    x = rms_norm(a, residual=h)                      # h += a, then its norm
    y = moe_decode(x, ...)                           # router, top-k, experts, weighted sum
    x = rms_norm(y, next layer's / final weight, residual=h)

which is `MixtralForCausalLM`'s forward with the same rounding points as the CPU parts' torch ops (`cpu`
attention, the `cpu` MoE backend), only in other summation orders. Mixtral's layer only: `make_forward`
builds this for families whose `model.registry.Family.native_decode` says their layer is exactly this one
(no q/k norms, biases, shared experts or dense layers; renormalized top-k); the others decode eagerly. Why: at batch 1 on the 2-core AVX2 EPYC
the torch ops around the GEMVs took ~5 ms of a 36 ms step (~250 small ops and their dtype conversions);
these calls cost well under 1 ms (docs/benchmarks.md, Engine).

A sequence with several new tokens becomes one row per token, each with the sequence's block table and
its own context length (its position + 1): `attention_decode` writes every row's keys and values before it
attends, so row j sees the tokens before it and itself, which is causal attention over the step.

Layers whose experts are not local on the `cpu` MoE backend (offloaded, or another backend chosen in the
config) keep their `SparseMoeBlock` (the attention and norms stay native).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_runtime.engine.forward import EagerForward, StepInputs
from moe_runtime.kernels import cpu
from moe_runtime.kernels.attention import AttentionMetadata, KVCache
from moe_runtime.kernels.cpu.dispatch import RowPlan, best_times, buckets, pick
from moe_runtime.kernels.quant import QuantizedWeight
from moe_runtime.model.experts import LocalExperts
from moe_runtime.model.mixtral import MixtralForCausalLM

# T tokens (= sequences), D hidden, H query heads, KVH key/value heads, Dh head dim, L layers

# Most tokens a native decode step takes. At 64 the native GEMMs are level with torch's fp32 ones
# (bench/cpu_linear.py) and the ops around them cost less: batch 64 on mini decoded 112 vs 91 tok/s with
# 1 thread and 194 vs 157 with 2 against the torch ops (bench/engine_throughput.py --batches 64, same
# session); beyond that, not measured.
MAX_TOKENS = 64
# Most new tokens of one sequence in a native step: a verification's last token and up to
# `speculative.num_tokens` (<= 16) proposals. A prompt (nothing cached before the step) always runs eagerly.
MAX_QUERY = 17


@dataclass(frozen=True)
class _Layer:
    """What the native calls of one layer take, looked up once (module attribute lookups cost ~1 us each)."""

    attn: nn.Module
    moe: nn.Module  # its experts, weights and backend are read at each step (placement may change them)
    w_qkv: torch.Tensor | QuantizedWeight  # [(H + 2 KVH) Dh, D]: 16-bit, or 8-bit (`model.quantize_dense`)
    w_o: torch.Tensor | QuantizedWeight  # [D, H Dh]
    norm_attn: tuple[torch.Tensor, float]  # input_layernorm's weight [D] and eps
    norm_moe: tuple[torch.Tensor, float]  # post_attention_layernorm's


class CpuDecodeForward:
    """Runs a model's decode steps of up to MAX_TOKENS sequences natively, every other step eagerly.

    plan: per batch size, "native" or "eager" (measured on the machine: `plan_decode`); None runs every
    decode step it can natively. It reads the layers' weights at each step (placement or a weight update
    may replace them).
    """

    def __init__(self, model: MixtralForCausalLM, kv_caches: list[KVCache], plan: RowPlan | None = None):
        self.model, self.kv_caches, self.plan = model, kv_caches, plan
        self.eager = EagerForward(model, kv_caches)
        self._layers = [self._plan(i) for i in range(len(model.layers))]

    def __call__(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        n = inputs.input_ids.shape[0]
        if not self.applies(n, inputs.meta) or (self.plan is not None and self.plan.choice(n) != "native"):
            return self.eager(inputs)
        return self.decode(inputs.input_ids, inputs.positions, per_token(inputs.meta))

    @staticmethod
    def applies(num_tokens: int, meta: AttentionMetadata) -> bool:
        """A step it can run: a KV cache, at most MAX_TOKENS new tokens, and each sequence adding one token,
        or up to MAX_QUERY to a context cached before the step (a speculative verification)."""
        if meta.block_tables is None or not 0 < num_tokens <= MAX_TOKENS:
            return False
        if meta.num_seqs == num_tokens:
            return True
        qsl, ctx = meta.query_start_loc, meta.context_lens
        return all(0 < qsl[b + 1] - qsl[b] <= MAX_QUERY and ctx[b] > qsl[b + 1] - qsl[b] for b in range(len(ctx)))

    def _plan(self, i: int) -> _Layer:
        layer = self.model.layers[i]
        attn = layer.self_attn
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        return _Layer(
            attn=attn,
            moe=layer.block_sparse_moe,
            w_qkv=attn.qkv_proj.matrix,
            w_o=attn.o_proj.matrix,
            norm_attn=(ln1.weight, ln1.eps),
            norm_moe=(ln2.weight, ln2.eps),
        )

    @torch.inference_mode()
    def decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, positions: [T]; `meta` with one row per token (`per_token`). Returns (final hidden [T, D],
        router counts [L, E])."""
        m = self.model
        h = m.embed_tokens(input_ids)  # [T, D], the residual stream, updated in place by rms_norm
        cos, sin = m.rotary(positions, h.dtype)  # [T, Dh] each
        context_lens = torch.tensor(meta.context_lens, dtype=torch.long)  # [T]
        counts = torch.zeros(len(self._layers), m.config.num_local_experts, dtype=torch.long)  # [L, E]
        layers = self._layers
        x = cpu.rms_norm(h, *layers[0].norm_attn)  # [T, D]
        for i, (p, (k_cache, v_cache)) in enumerate(zip(layers, self.kv_caches, strict=True)):
            attn, moe = p.attn, p.moe
            a = cpu.attention_decode(
                x,
                p.w_qkv,
                p.w_o,
                cos,
                sin,
                k_cache,
                v_cache,
                meta.slot_mapping,
                meta.block_tables,
                context_lens,
                attn.n_heads,
                attn.n_kv_heads,
                attn.sliding_window,
            )  # [T, D]
            x = cpu.rms_norm(a, *p.norm_moe, residual=h)  # h += a; [T, D]
            experts = moe.experts
            if isinstance(experts, LocalExperts) and experts.backend == "cpu":
                y = cpu.moe_decode(x, moe.gate.weight, experts.w13, experts.w2, moe.top_k, counts[i])  # [T, D]
            else:
                y = moe(x)  # [T, D]
                counts[i] += torch.bincount(experts.last_routing.flatten(), minlength=counts.shape[1])
            w, eps = layers[i + 1].norm_attn if i + 1 < len(layers) else (m.norm.weight, m.norm.eps)
            x = cpu.rms_norm(y, w, eps, residual=h)  # h += y; [T, D]
        return x, counts


def per_token(meta: AttentionMetadata) -> AttentionMetadata:
    """`meta` with one row per new token: token j of a sequence with n new tokens and context c gets the
    sequence's block table and context c - n + 1 + j. A decode step (one token each) is returned as it is."""
    if meta.num_seqs == meta.slot_mapping.shape[0]:
        return meta
    qsl, rows, context_lens = meta.query_start_loc, [], []
    for b, c in enumerate(meta.context_lens):
        n = qsl[b + 1] - qsl[b]
        rows += [b] * n
        context_lens += range(c - n + 1, c + 1)
    return AttentionMetadata(list(range(len(rows) + 1)), context_lens, meta.slot_mapping,
                             meta.block_tables[torch.tensor(rows)])


def plan_decode(model: MixtralForCausalLM, kv_caches: list[KVCache], max_batch: int, context: int = 64) -> RowPlan:
    """Per batch size up to `max_batch`: whether the native decode step or the eager ops (with the model's
    measured kernels) run a decode step faster on this machine, timed on the loaded model with sequences of
    `context` tokens (they all read the same cache blocks and write one slot: values do not matter here)."""
    num_blocks, block_size = kv_caches[0][0].shape[:2]
    context = min(context, num_blocks * block_size)
    native = CpuDecodeForward(model, kv_caches)
    choices = []
    for batch in buckets(max_batch):
        table = torch.arange(-(-context // block_size)).repeat(batch, 1)  # [B, W]: the same blocks for each
        slots = torch.full((batch,), int(table[0, -1]) * block_size + (context - 1) % block_size)
        meta = AttentionMetadata(list(range(batch + 1)), [context] * batch, slots, table)
        step = StepInputs(torch.zeros(batch, dtype=torch.long), torch.full((batch,), context - 1), meta, True)
        times = best_times({"native": lambda s=step: native.decode(s.input_ids, s.positions, s.meta),
                            "eager": lambda s=step: native.eager(s)}, rounds=2)
        choices.append(pick(times, choices[-1] if choices else None))
    return RowPlan(buckets(max_batch), tuple(choices))
