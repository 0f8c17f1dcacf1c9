"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): embed -> [RMSNorm, GQA attention with q/k/v bias, RMSNorm,
routed experts + shared expert (or a dense MLP)] x L -> RMSNorm -> lm_head.

Qwen2 Technical Report (Qwen team, 2024, arXiv:2407.10671). Against Mixtral (mixtral.py):
  - q, k and v projections carry a bias (`qkv_bias`), o does not;
  - every token also goes through one shared expert, a larger SwiGLU outside the routed set, scaled by
    sigmoid(shared_expert_gate(x)) and added to the routed experts' sum;
  - the routed weights are the softmax probabilities over all E (no renormalization unless
    `norm_topk_prob`); Qwen1.5-MoE-A2.7B: E = 60, top-4, I = 1408, shared I = 5632;
  - layers in `mlp_only_layers`, or skipped by `decoder_sparse_step`, are dense (`cfg.dense_layers`).
The shared expert is an ordinary part of the layer: always resident under offload, replicated on every rank
under a placement (which places routed experts only). With the default `ModelParts`, fp32 logits match
transformers' `Qwen2MoeForCausalLM`; in 16-bit its router also rounds the routing weights to the
activation dtype, which this runtime keeps in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.model.causal_lm import CausalLM
from moe_runtime.model.experts import Experts
from moe_runtime.model.layers import Attention, DecoderLayer, Linear, SparseMoeBlock, SwiGLU
from moe_runtime.model.parts import ModelParts

# T tokens, D hidden


class SharedExpertMoeBlock(SparseMoeBlock):
    """Routed experts (the router and `experts` of `SparseMoeBlock`) plus one shared SwiGLU expert that every
    token goes through, scaled by a sigmoid gate of its own."""

    def __init__(self, cfg: ModelConfig, experts: Experts, parts: ModelParts):
        super().__init__(cfg, experts)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size, parts)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, D] -> [T, D]."""
        routed = self.experts(x, self.route(x))  # [T, D]
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # [T, 1] * [T, D]
        return routed + shared  # [T, D]


def qwen2_mlp(cfg: ModelConfig, layer: int, parts: ModelParts) -> nn.Module:
    """A dense SwiGLU in `cfg.dense_layers`, routed + shared experts elsewhere."""
    if layer in cfg.dense_layers:
        return SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size, parts)
    return SharedExpertMoeBlock(cfg, parts.experts.build(cfg, layer), parts)


class Qwen2MoeForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, parts: ModelParts | None = None):
        """parts: how each piece computes (default: the reference arithmetic, all experts local)."""
        parts = parts if parts is not None else ModelParts()
        layers = [DecoderLayer(cfg, parts, Attention(cfg, parts), qwen2_mlp(cfg, l, parts))
                  for l in range(cfg.num_hidden_layers)]
        super().__init__(cfg, parts, layers)
