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

import torch

from moe_runtime.kernels import cpu
from moe_runtime.model.attention import AttentionMetadata, KVCache

# T tokens (= sequences), D hidden, H query heads, KVH key/value heads, Dh head dim, L layers

# Most tokens a native decode step takes: the native GEMMs' limit (`mixtral.NATIVE_MAX_ROWS`).
MAX_TOKENS = 32


class CpuDecode:
    """The native decode path of one `MixtralForCausalLM` (built by `use_fast_cpu_paths`)."""

    def __init__(self, model):
        self.model = model
        self._qkv: list[tuple[torch.Tensor, ...] | None] = [None] * len(model.layers)  # fused, q, k, v

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
        """Layer i's q, k and v weights stacked [(H + 2 KVH) Dh, D]; the three parameters become views of it.

        Built on first use and rebuilt if a parameter was replaced since (a reload), so no weight is held
        twice and none goes stale.
        """
        attn = self.model.layers[i].self_attn
        params = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        cached = self._qkv[i]
        if cached is not None and all(p is c for p, c in zip(params, cached[1:], strict=True)):
            return cached[0]
        fused = torch.cat(params)  # [(H + 2 KVH) Dh, D]
        nq, nk = params[0].shape[0], params[1].shape[0]
        views = []
        for proj, part in zip(
            (attn.q_proj, attn.k_proj, attn.v_proj), fused.split([nq, nk, nk]), strict=True
        ):
            proj.weight = torch.nn.Parameter(part, requires_grad=False)
            views.append(proj.weight)
        self._qkv[i] = (fused, *views)
        return fused

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
        norms = [layer.input_layernorm for layer in m.layers] + [m.norm]
        x = cpu.rms_norm(h, norms[0].weight, norms[0].eps)  # [T, D]
        for i, layer in enumerate(m.layers):
            attn, moe = layer.self_attn, layer.block_sparse_moe
            k_cache, v_cache = kv_caches[i]
            a = cpu.attention_decode(
                x,
                self.w_qkv(i),
                attn.o_proj.weight,
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
            post = layer.post_attention_layernorm
            x = cpu.rms_norm(a, post.weight, post.eps, residual=h)  # h += a; [T, D]
            if moe.experts is None and moe.backend == "cpu":
                y = cpu.moe_decode(
                    x, moe.gate.weight, moe.w13, moe.w2, moe.top_k, m.router_counts[i]
                )  # [T, D]
            else:
                y = moe(x, m.router_counts[i])  # [T, D]
            x = cpu.rms_norm(y, norms[i + 1].weight, norms[i + 1].eps, residual=h)  # h += y; [T, D]
        return x
