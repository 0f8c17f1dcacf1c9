"""Decode steps on CPU in native calls: the layers of `mixtral.py`, four calls per layer instead of ~120 ops.

When every sequence of a step adds one token to its cached context and the CPU fast paths are on
(`MixtralForCausalLM.use_fast_cpu_paths`, i.e. `model.exact: false`), the model runs each layer as

    x = rms_norm(h)                                  # kernels/cpu/rms_norm.cpp
    a = attention_decode(x, ...)                     # q/k/v, RoPE, cache write, paged attention, o_proj
    x = rms_norm(a, residual=h)                      # h += a, then its norm
    y = moe_decode(x, ...)                           # router, top-k, experts, weighted sum
    x = rms_norm(y, next layer's / final weight, residual=h)

which is `DecoderLayer.forward` with the same rounding points as the fast path's torch ops
(`attention_fp32`, the `cpu` MoE backend), only in other summation orders. Why: at batch 1 on the 2-core
AVX2 EPYC the torch ops around the GEMVs took ~5 ms of a 36 ms step (~250 small ops and their dtype
conversions); these calls cost well under 1 ms (docs/benchmarks.md, Engine).

Layers whose experts are offloaded, and MoE backends other than `cpu` chosen in the config, keep their
`SparseMoeBlock` (the attention and norms stay native).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_runtime.kernels import cpu
from moe_runtime.kernels.cpu import hugepages
from moe_runtime.model.attention import AttentionMetadata, KVCache
from moe_runtime.model.experts import LocalExperts

# T tokens (= sequences), D hidden, H query heads, KVH key/value heads, Dh head dim, L layers

# Most tokens a native decode step takes. At 64 the native GEMMs are level with torch's fp32 ones
# (bench/cpu_linear.py) and the ops around them cost less: batch 64 on mini decoded 112 vs 91 tok/s with
# 1 thread and 194 vs 157 with 2 against the torch ops (bench/engine_throughput.py --batches 64, same
# session); beyond that, not measured.
MAX_TOKENS = 64


@dataclass(frozen=True)
class _Layer:
    """What the native calls of one layer take, looked up once (module attribute lookups cost ~1 us each)."""

    attn: nn.Module
    moe: nn.Module  # its experts, weights and backend are read at each step (placement may change them)
    w_qkv: torch.Tensor  # [(H + 2 KVH) Dh, D]
    w_o: torch.Tensor  # [D, H Dh]
    norm_attn: tuple[torch.Tensor, float]  # input_layernorm's weight [D] and eps
    norm_moe: tuple[torch.Tensor, float]  # post_attention_layernorm's


class CpuDecode:
    """The native decode path of one `MixtralForCausalLM` (built by `use_fast_cpu_paths`).

    It holds the layers' attention and norm weights as they were when it was built. Loading new values
    in place (`load_state_dict`, `copy_`) is seen, since the q/k/v parameters are views of the stacked
    weight; assigning new parameter objects needs `use_fast_cpu_paths()` again, as the fp32 copies do.
    """

    def __init__(self, model):
        self.model = model
        self._layers = [self._plan(i) for i in range(len(model.layers))]

    @staticmethod
    def applies(num_tokens: int, meta: AttentionMetadata, kv_caches: list[KVCache] | None) -> bool:
        """A decode step it can run: a KV cache, one new token per sequence, at most MAX_TOKENS of them."""
        return (
            kv_caches is not None
            and meta.block_tables is not None
            and 0 < num_tokens <= MAX_TOKENS
            and meta.num_seqs == num_tokens
        )

    def w_qkv(self, i: int) -> torch.Tensor:
        """Layer i's q, k and v weights stacked [(H + 2 KVH) Dh, D]; the three parameters are views of it."""
        return self._layers[i].w_qkv

    def _plan(self, i: int) -> _Layer:
        """Stack layer i's q, k, v weights into one tensor (on huge pages) and make the three parameters
        views of it, so no weight is held twice."""
        layer = self.model.layers[i]
        attn = layer.self_attn
        projs = attn.q_proj, attn.k_proj, attn.v_proj
        rows = [p.weight.shape[0] for p in projs]
        fused = hugepages.empty((sum(rows), attn.q_proj.weight.shape[1]), attn.q_proj.weight.dtype)
        torch.cat([p.weight for p in projs], out=fused)  # [(H + 2 KVH) Dh, D]
        for proj, part in zip(projs, fused.split(rows), strict=True):
            proj.weight = nn.Parameter(part, requires_grad=False)
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        return _Layer(
            attn=attn,
            moe=layer.block_sparse_moe,
            w_qkv=fused,
            w_o=attn.o_proj.weight,
            norm_attn=(ln1.weight, ln1.eps),
            norm_moe=(ln2.weight, ln2.eps),
        )

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64, one token of each of T sequences. Returns final hidden [T, D]."""
        m = self.model
        h = m.embed_tokens(input_ids)  # [T, D], the residual stream, updated in place by rms_norm
        cos, sin = m.rotary(positions, h.dtype)  # [T, Dh] each
        context_lens = torch.tensor(meta.context_lens, dtype=torch.long)  # [T]
        layers = self._layers
        x = cpu.rms_norm(h, *layers[0].norm_attn)  # [T, D]
        for i, (p, (k_cache, v_cache)) in enumerate(zip(layers, kv_caches, strict=True)):
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
                y = cpu.moe_decode(x, moe.gate.weight, experts.w13, experts.w2, moe.top_k, experts.routed_tokens)
            else:
                y = moe(x)  # [T, D]
            w, eps = layers[i + 1].norm_attn if i + 1 < len(layers) else (m.norm.weight, m.norm.eps)
            x = cpu.rms_norm(y, w, eps, residual=h)  # h += y; [T, D]
        return x
