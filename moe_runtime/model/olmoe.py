"""OLMoE: embed -> [RMSNorm, GQA attention with q/k RMSNorm over the projections, RMSNorm, sparse MoE] x L
-> RMSNorm -> lm_head.

OLMoE: Open Mixture-of-Experts Language Models (Muennighoff et al., 2024, arXiv:2409.02060). Against
Mixtral (mixtral.py):
  - attention normalizes q and k with RMSNorm over each whole projection (weights [H Dh] and [KVH Dh], not
    per head as Qwen3 does), and with `clip_qkv` clamps q, k and v to [-clip, clip], before RoPE;
  - 64 experts, top-8 (OLMoE-1B-7B), the routing weights the softmax probabilities over all E (no
    renormalization unless `norm_topk_prob`);
  - q, k, v and o carry a bias where `attention_bias`.
With the default `ModelParts`, fp32 logits match transformers' `OlmoeForCausalLM`; in 16-bit its router also
rounds the routing weights to the activation dtype, which this runtime keeps in fp32.
"""

from __future__ import annotations

import torch

from moe_runtime.config import ModelConfig
from moe_runtime.model.causal_lm import CausalLM
from moe_runtime.model.layers import Attention, DecoderLayer, RMSNorm, SparseMoeBlock
from moe_runtime.model.parts import ModelParts

# T tokens, D hidden, H query heads, KVH key/value heads, Dh head dim


class OlmoeAttention(Attention):
    """GQA attention whose q and k projections are RMSNorm-ed as wholes (then clipped, with `clip_qkv`)
    before RoPE."""

    def __init__(self, cfg: ModelConfig, parts: ModelParts):
        super().__init__(cfg, parts)
        H, KVH, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_norm = RMSNorm(H * Dh, cfg.rms_norm_eps, parts.norm)  # [H Dh]
        self.k_norm = RMSNorm(KVH * Dh, cfg.rms_norm_eps, parts.norm)  # [KVH Dh]
        self.clip_qkv = cfg.clip_qkv

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T, H, KVH, Dh = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x)  # [T, H Dh], [T, KVH Dh], [T, KVH Dh]
        q, k = self.q_norm(q), self.k_norm(k)  # over each whole projection
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        return q.view(T, H, Dh), k.view(T, KVH, Dh), v.view(T, KVH, Dh)


class OlmoeForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, parts: ModelParts | None = None):
        """parts: how each piece computes (default: the reference arithmetic, all experts local)."""
        parts = parts if parts is not None else ModelParts()
        layers = [DecoderLayer(cfg, parts, OlmoeAttention(cfg, parts),
                               SparseMoeBlock(cfg, parts.experts.build(cfg, l)))
                  for l in range(cfg.num_hidden_layers)]
        super().__init__(cfg, parts, layers)
