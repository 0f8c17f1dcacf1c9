"""Mixtral: embed -> [RMSNorm, GQA attention, RMSNorm, sparse MoE] x L -> RMSNorm -> lm_head.

Mixtral of Experts (Jiang et al., 2024, arXiv:2401.04088). With the default `ModelParts` the arithmetic
follows transformers' `MixtralForCausalLM` operation for operation (RMSNorm in fp32, RoPE cos/sin cast to
the activation dtype, fp32 router softmax, per-expert accumulation in the activation dtype), so logits
match it bit for bit in fp32 and greedy tokens match it in every dtype. Other parts (GPU kernels, CPU fast
paths) change only where the sums happen, never the rounding points.

The model runs on a flat batch: T tokens from any number of sequences, each with its position; attention
finds sequence boundaries and KV pages in `AttentionMetadata`. Parameters are plain tensors filled by
`checkpoint.loader` (q, k, v stacked as one projection; experts stacked per layer as w13 [E, 2I, D] and
w2 [E, D, I]).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.kernels import RoutingResult, route
from moe_runtime.kernels.attention import AttentionMetadata, KVCache, Rope, make_attention
from moe_runtime.kernels.linear import make_linear
from moe_runtime.kernels.norm import make_rms_norm
from moe_runtime.model.experts import Experts, router_counts
from moe_runtime.model.parts import ModelParts

# T tokens, E experts, A activated experts (top-k), D hidden, I intermediate, V vocab,
# H query heads, KVH key/value heads, Dh head dim


class Linear(nn.Module):
    """y = x @ W^T without bias, multiplied by the kernel `parts.linear` names (with `parts.cpu_plan`)."""

    def __init__(self, in_features: int, out_features: int, parts: ModelParts):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.kernel = make_linear(parts.linear, parts.cpu_plan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight)


class StackedLinear(Linear):
    """Several projections of the same input stacked in one weight [sum(sizes), in] (q, k and v)."""

    def __init__(self, in_features: int, sizes: tuple[int, ...], parts: ModelParts):
        super().__init__(in_features, sum(sizes), parts)
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.kernel.stacked(x, self.weight, self.sizes).split(self.sizes, dim=-1)


class RMSNorm(nn.Module):
    """norm(x) = weight * x / rms(x). With `residual`, the residual stream first takes x in place
    (h += x, rounded as `h = h + x`) and its new value is normalized: the model's skip connections."""

    def __init__(self, dim: int, eps: float, kernel: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.kernel = make_rms_norm(kernel)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel(x, self.weight, self.eps, residual)


class RotaryEmbedding(nn.Module):
    """RoPE with the rotate-half layout of the HF checkpoints (not the interleaved one of the paper)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # [Dh/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: ModelParts):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.sliding_window = cfg.sliding_window
        D, H, KVH, Dh = cfg.hidden_size, self.n_heads, self.n_kv_heads, cfg.head_dim
        self.qkv_proj = StackedLinear(D, (H * Dh, KVH * Dh, KVH * Dh), parts)
        self.o_proj = Linear(H * Dh, D, parts)
        self.attend = make_attention(parts.attention, cfg.sliding_window)  # RoPE, KV write, attention

    def forward(self, x, rope: Rope, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x)  # [T, H Dh], [T, KVH Dh], [T, KVH Dh]
        q = q.view(T, self.n_heads, self.head_dim)  # [T, H, Dh]
        k = k.view(T, self.n_kv_heads, self.head_dim)  # [T, KVH, Dh]
        v = v.view(T, self.n_kv_heads, self.head_dim)  # [T, KVH, Dh]
        o = self.attend(q, k, v, rope, meta, kv_cache)  # [T, H, Dh]: causal GQA over rotated q, k
        return self.o_proj(o.reshape(T, self.n_heads * self.head_dim))  # [T, D]


class SparseMoeBlock(nn.Module):
    """Router picks the top-A of E experts per token; `experts` runs their SwiGLU MLPs (wherever they live)."""

    def __init__(self, cfg: ModelConfig, experts: Experts):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = experts

    def route(self, x: torch.Tensor) -> RoutingResult:
        return route(self.gate(x), self.top_k)  # weights [T, A] fp32, ids [T, A] int32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, D] -> [T, D]."""
        return self.experts(x, self.route(x))


class DecoderLayer(nn.Module):
    """The layer's parts. `MixtralForCausalLM.forward` runs them, so that each residual add fuses with the
    norm that follows it: h += attention(norm(h)); h += moe(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer: int, parts: ModelParts):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.norm)
        self.self_attn = Attention(cfg, parts)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.norm)
        self.block_sparse_moe = SparseMoeBlock(cfg, parts.experts.build(cfg, layer))


class MixtralForCausalLM(nn.Module):
    """The whole model. `forward` gives final hidden states; `compute_logits` applies the head to chosen rows."""

    def __init__(self, cfg: ModelConfig, parts: ModelParts | None = None):
        """parts: how each piece computes (default: the reference arithmetic, all experts local)."""
        super().__init__()
        parts = parts if parts is not None else ModelParts()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(cfg, l, parts) for l in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.norm)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, parts)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.requires_grad_(False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] integer. kv_caches: one (k, v) pool per layer, or None. Returns [T, D]."""
        h = self.embed_tokens(input_ids)  # [T, D], the residual stream: each norm below first adds to it
        rope = self.rotary(positions, h.dtype)  # cos, sin [T, Dh]
        x = self.layers[0].input_layernorm(h)  # [T, D]
        for i, layer in enumerate(self.layers):
            a = layer.self_attn(x, rope, meta, None if kv_caches is None else kv_caches[i])  # [T, D]
            x = layer.post_attention_layernorm(a, residual=h)  # h += a; [T, D]
            y = layer.block_sparse_moe(x)  # [T, D]
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x = next_norm(y, residual=h)  # h += y; [T, D]
        return x

    def router_counts(self, num_tokens: int) -> torch.Tensor:
        """[L, E] int64 tokens routed to each expert by the latest forward's first `num_tokens` rows (on the
        model's device, no host sync)."""
        routing = [layer.block_sparse_moe.experts.last_routing for layer in self.layers]
        return router_counts(routing, self.config.num_local_experts, num_tokens)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] (usually each sequence's last row) -> logits [N, V] float32."""
        return self.lm_head.kernel.fp32(hidden, self.lm_head.weight)

    def prepare_kernels(self) -> None:
        """Let the kernels build what they derive from their weights (the CPU kernel's fp32 copies); the
        loader calls this once the weights are in place."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.kernel.prepare(module.weight)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype
