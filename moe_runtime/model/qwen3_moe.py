"""Qwen3-MoE: embed -> [RMSNorm, GQA attention with q/k RMSNorm, RMSNorm, sparse MoE or dense MLP] x L
-> RMSNorm -> lm_head.

Qwen3 Technical Report (Qwen team, 2025, arXiv:2505.09388). Against Mixtral (mixtral.py):
  - attention normalizes each head of q and of k with RMSNorm (one [Dh] weight each, shared by the heads)
    before RoPE;
  - many small experts (Qwen3-30B-A3B: E = 128, top-8, I = 768), the top-k weights renormalized only where
    `norm_topk_prob` (config.json), else kept as the softmax probabilities over all E;
  - layers listed in `mlp_only_layers`, or skipped by `decoder_sparse_step`, have one dense SwiGLU instead
    of experts (`cfg.dense_layers`; the released checkpoints have none);
  - q, k, v and o carry a bias where `attention_bias`.
With the default `ModelParts`, fp32 logits match transformers' `Qwen3MoeForCausalLM`; in 16-bit its router
also rounds the routing weights to the activation dtype, which this runtime keeps in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.model.causal_lm import CausalLM
from moe_runtime.model.layers import Attention, DecoderLayer, RMSNorm, SparseMoeBlock, SwiGLU
from moe_runtime.model.parts import ModelParts

# T tokens, D hidden, H query heads, KVH key/value heads, Dh head dim


class Qwen3MoeAttention(Attention):
    """GQA attention whose q and k heads are RMSNorm-ed (per head, over Dh) before RoPE."""

    def __init__(self, cfg: ModelConfig, parts: ModelParts):
        super().__init__(cfg, parts)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, parts.norm)  # [Dh], shared by the H heads
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, parts.norm)  # [Dh], shared by the KVH heads

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T, H, KVH, Dh = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x)  # [T, H Dh], [T, KVH Dh], [T, KVH Dh]
        q = self.q_norm(q.reshape(T * H, Dh)).view(T, H, Dh)  # one row per head
        k = self.k_norm(k.reshape(T * KVH, Dh)).view(T, KVH, Dh)
        return q, k, v.view(T, KVH, Dh)


def qwen_mlp(cfg: ModelConfig, layer: int, parts: ModelParts) -> nn.Module:
    """A dense SwiGLU in `cfg.dense_layers`, routed experts elsewhere."""
    if layer in cfg.dense_layers:
        return SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size, parts)
    return SparseMoeBlock(cfg, parts.experts.build(cfg, layer))


class Qwen3MoeForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, parts: ModelParts | None = None):
        """parts: how each piece computes (default: the reference arithmetic, all experts local)."""
        parts = parts if parts is not None else ModelParts()
        layers = [DecoderLayer(cfg, parts, Qwen3MoeAttention(cfg, parts), qwen_mlp(cfg, l, parts))
                  for l in range(cfg.num_hidden_layers)]
        super().__init__(cfg, parts, layers)
