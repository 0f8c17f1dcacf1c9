"""Mixtral: embed -> [RMSNorm, GQA attention, RMSNorm, sparse MoE] x L -> RMSNorm -> lm_head.

Mixtral of Experts (Jiang et al., 2024, arXiv:2401.04088). Every layer is sparse: the router's softmax over
E experts picks the top-A, whose weights are renormalized to sum to 1, and each token's output is the
weighted sum of those A SwiGLU experts. With the default `ModelParts` the arithmetic follows transformers'
`MixtralForCausalLM` operation for operation (RMSNorm in fp32, RoPE cos/sin cast to the activation dtype,
fp32 router softmax, per-expert accumulation in the activation dtype), so logits match it bit for bit in
fp32 and greedy tokens match it in every dtype. Other parts (GPU kernels, CPU fast paths) change only where
the sums happen, never the rounding points.

The layers are model/layers.py's; the model around them (embedding, the loop over layers with each residual
add fused into the next norm, final norm, head) is model/causal_lm.py's. Parameters are plain tensors filled
by `checkpoint.loader` (q, k, v stacked as one projection; experts stacked per layer as w13 [E, 2I, D] and
w2 [E, D, I]).
"""

from __future__ import annotations

import torch

from moe_runtime.config import ModelConfig
from moe_runtime.kernels.attention import AttentionMetadata, KVCache, Rope
from moe_runtime.model.causal_lm import CausalLM
from moe_runtime.model.layers import Attention, RMSNorm, SparseMoeBlock
from moe_runtime.model.parts import ModelParts

# T tokens, E experts, A activated experts (top-k), D hidden, I intermediate, V vocab,
# H query heads, KVH key/value heads, Dh head dim


class DecoderLayer(torch.nn.Module):
    """h += attention(norm(h)); h += moe(norm(h)). The first add fuses with `post_attention_layernorm`; the
    second with the next layer's `input_layernorm` (or the final norm), which the model applies."""

    def __init__(self, cfg: ModelConfig, layer: int, parts: ModelParts):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.norm)
        self.self_attn = Attention(cfg, parts)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.norm)
        self.block_sparse_moe = SparseMoeBlock(cfg, parts.experts.build(cfg, layer))

    def forward(self, x, h, rope: Rope, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        """x = input_layernorm(h): [T, D]; h: [T, D], updated in place. Returns the MoE output [T, D]."""
        a = self.self_attn(x, rope, meta, kv_cache)  # [T, D]
        x = self.post_attention_layernorm(a, residual=h)  # h += a; [T, D]
        return self.block_sparse_moe(x)  # [T, D]

    def moe_block(self) -> SparseMoeBlock:
        return self.block_sparse_moe


class MixtralForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, parts: ModelParts | None = None):
        """parts: how each piece computes (default: the reference arithmetic, all experts local)."""
        parts = parts if parts is not None else ModelParts()
        super().__init__(cfg, parts, [DecoderLayer(cfg, l, parts) for l in range(cfg.num_hidden_layers)])
