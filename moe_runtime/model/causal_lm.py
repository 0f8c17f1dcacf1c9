"""What every family's model shares: embed -> [decoder layer] x L -> RMSNorm -> lm_head, and the interface
the runtime uses (logits, router counts, the MoE blocks, kernel preparation).

A family (mixtral.py, qwen2_moe.py, qwen3_moe.py, olmoe.py) builds its L decoder layers and hands them to
`CausalLM`. A decoder layer has `input_layernorm`, `self_attn`, `post_attention_layernorm`, is called as
`layer(x, h, rope, meta, kv_cache)` (it adds its attention output to the residual stream h in place and
returns its MLP's output) and says which MoE block it holds (`moe_block`, asked only of the layers in
`cfg.moe_layers`). The model runs on a flat batch: T tokens from any number of sequences, each with its
position; attention finds sequence boundaries and KV pages in `AttentionMetadata`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.kernels.attention import AttentionMetadata, KVCache, Rope
from moe_runtime.model.experts import router_counts
from moe_runtime.model.layers import Linear, RMSNorm, RotaryEmbedding, SparseMoeBlock
from moe_runtime.model.parts import ModelParts

# T tokens, L layers, E experts, A activated experts (top-k), D hidden, V vocab, Dh head dim


class DecoderLayer(Protocol):
    """What `CausalLM` asks of a family's decoder layer (an `nn.Module`)."""

    input_layernorm: RMSNorm

    def __call__(self, x: torch.Tensor, h: torch.Tensor, rope: Rope, meta: AttentionMetadata,
                 kv_cache: KVCache | None) -> torch.Tensor:
        """x = input_layernorm(h) [T, D]: h += attention(x) in place; returns mlp(post_attention_layernorm(h))."""

    def moe_block(self) -> SparseMoeBlock:
        """The layer's MoE block (asked only of layers with routed experts)."""


class CausalLM(nn.Module):
    """The whole model. `forward` gives final hidden states; `compute_logits` applies the head to chosen rows.

    layers: the family's L decoder layers, in order.
    """

    def __init__(self, cfg: ModelConfig, parts: ModelParts, layers: list[DecoderLayer]):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.norm)
        # a head tied to the embedding is the embedding's weight, in its dtype (a lookup table stays 16-bit)
        head_parts = dataclasses.replace(parts, dense_quantization="none") if cfg.tie_word_embeddings else parts
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, head_parts)
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
        """input_ids, positions: [T] integer. kv_caches: one (k, v) pool per layer, or None. Returns [T, D].

        Each residual add fuses with the norm that follows it: h += attention(norm(h)); h += mlp(norm(h)).
        """
        h = self.embed_tokens(input_ids)  # [T, D], the residual stream: each norm below first adds to it
        rope = self.rotary(positions, h.dtype)  # cos, sin [T, Dh]
        x = self.layers[0].input_layernorm(h)  # [T, D]
        for i, layer in enumerate(self.layers):
            y = layer(x, h, rope, meta, None if kv_caches is None else kv_caches[i])  # h += a; [T, D]
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x = next_norm(y, residual=h)  # h += y; [T, D]
        return x

    def moe_blocks(self) -> dict[int, SparseMoeBlock]:
        """Decoder layer index -> its MoE block, for the layers with routed experts (`config.moe_layers`)."""
        return {l: self.layers[l].moe_block() for l in self.config.moe_layers}

    def routings(self) -> list[torch.Tensor]:
        """The latest forward's routing ids of each MoE layer, in layer order: [T, A] int32 each, on the
        device (a captured graph rewrites them in place at each replay)."""
        return [block.experts.last_routing for block in self.moe_blocks().values()]

    def router_counts(self, num_tokens: int, routings: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[L, E] int64 tokens routed to each expert by the first `num_tokens` rows of `routings` (default:
        the latest forward's), on the model's device with no host sync; dense layers' rows are zero."""
        cfg = self.config
        counts = router_counts(self.routings() if routings is None else routings, cfg.num_local_experts,
                               num_tokens)  # [L_moe, E]
        if not cfg.dense_layers:
            return counts
        every = counts.new_zeros(cfg.num_hidden_layers, cfg.num_local_experts)  # [L, E]
        every[list(cfg.moe_layers)] = counts
        return every

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] (usually each sequence's last row) -> logits [N, V] float32."""
        return self.lm_head.kernel.fp32(hidden, self.lm_head.matrix)

    def prepare_kernels(self) -> None:
        """Let the kernels build what they derive from their weights (the CPU kernel's fp32 copies); the
        loader calls this once the weights are in place."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.kernel.prepare(module.matrix)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype
