"""The layers every family's model is built from: projections, RMSNorm, RoPE, GQA attention, a dense SwiGLU
MLP and the sparse MoE block (router + routed experts).

With the default `ModelParts` each computes what transformers' classes compute, operation for operation
(RMSNorm in fp32, RoPE cos/sin cast to the activation dtype, fp32 router softmax). Every module asks for its
kernel when it is constructed (`parts`), so nothing here names a device. A family's model file
(mixtral.py, qwen2_moe.py, qwen3_moe.py, olmoe.py) composes these and overrides only what its arithmetic
changes (for example `Attention.project`, where q and k get normalized).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.kernels import RoutingResult, route
from moe_runtime.kernels.attention import AttentionMetadata, KVCache, Rope, make_attention
from moe_runtime.kernels.linear import make_linear
from moe_runtime.kernels.norm import make_rms_norm
from moe_runtime.kernels.quant import SCHEMES, QuantizedWeight, keep_dtypes
from moe_runtime.model.experts import Experts
from moe_runtime.model.parts import ModelParts

# T tokens, E experts, A activated experts (top-k), D hidden, I intermediate, H query heads,
# KVH key/value heads, Dh head dim


class Linear(nn.Module):
    """y = x @ W^T (+ b), multiplied by the kernel `parts.linear` names (with `parts.cpu_plan`).

    bias: whether the projection has one (as `nn.Linear`; added before the one rounding to x's dtype).
    W is `weight` [out, in] in the model's dtype, or with `parts.dense_quantization` (int8 / fp8,
    `model.quantize_dense`) 8-bit `weight_data` [out, in] with one fp32 `weight_scale` per row
    (kernels/quant.py). `matrix` is W as the kernel takes it, either way.
    """

    def __init__(self, in_features: int, out_features: int, parts: ModelParts, bias: bool = False):
        super().__init__()
        self.scheme = parts.dense_quantization
        if self.scheme == "none":
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        else:
            self.weight_data = nn.Parameter(torch.empty(out_features, in_features, dtype=SCHEMES[self.scheme]),
                                            requires_grad=False)
            self.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None)
        self.kernel = make_linear(parts.linear, parts.cpu_plan)

    @property
    def matrix(self) -> torch.Tensor | QuantizedWeight:
        """W [out, in]: the 16/32-bit weight, or the 8-bit values with their row scales."""
        if self.scheme == "none":
            return self.weight
        return QuantizedWeight(self.weight_data, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.matrix, self.bias)  # [T, out]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.scheme != "none":  # 8-bit values and fp32 scales through `model.to(dtype)`
            keep_dtypes(self, {"weight_data": SCHEMES[self.scheme], "weight_scale": torch.float32})
        return self


class StackedLinear(Linear):
    """Several projections of the same input stacked in one weight [sum(sizes), in]: q, k and v; or a SwiGLU's
    gate and up rows. Returns one tensor per projection."""

    def __init__(self, in_features: int, sizes: tuple[int, ...], parts: ModelParts, bias: bool = False):
        super().__init__(in_features, sum(sizes), parts, bias)
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.kernel.stacked(x, self.matrix, self.sizes, self.bias).split(self.sizes, dim=-1)


class RMSNorm(nn.Module):
    """norm(x) = weight * x / rms(x) over the last dimension of x [N, dim]. With `residual`, the residual stream
    first takes x in place (h += x, rounded as `h = h + x`) and its new value is normalized: the model's skip
    connections."""

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
    """Causal grouped-query attention with RoPE (Mistral/Mixtral). q, k and v are one stacked projection
    (with a bias where `cfg.qkv_bias`); `project` turns it into heads, and is what families that normalize
    q and k before RoPE override. RoPE, the KV-cache write and attention itself are the attention backend's."""

    def __init__(self, cfg: ModelConfig, parts: ModelParts):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.sliding_window = cfg.sliding_window
        D, H, KVH, Dh = cfg.hidden_size, self.n_heads, self.n_kv_heads, cfg.head_dim
        self.qkv_proj = StackedLinear(D, (H * Dh, KVH * Dh, KVH * Dh), parts, bias=cfg.qkv_bias)
        self.o_proj = Linear(H * Dh, D, parts, bias=cfg.o_bias)
        self.attend = make_attention(parts.attention, cfg.sliding_window)  # RoPE, KV write, attention

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> q [T, H, Dh], k [T, KVH, Dh], v [T, KVH, Dh], not yet rotated."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x)  # [T, H Dh], [T, KVH Dh], [T, KVH Dh]
        return (q.view(T, self.n_heads, self.head_dim), k.view(T, self.n_kv_heads, self.head_dim),
                v.view(T, self.n_kv_heads, self.head_dim))

    def forward(self, x, rope: Rope, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.project(x)  # [T, H, Dh], [T, KVH, Dh], [T, KVH, Dh]
        o = self.attend(q, k, v, rope, meta, kv_cache)  # [T, H, Dh]: causal GQA over rotated q, k
        return self.o_proj(o.reshape(T, self.n_heads * self.head_dim))  # [T, D]


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP, down(silu(gate(x)) * up(x)), gate and up stacked as one [2I, D] projection: the
    dense layers of Qwen-MoE models, and Qwen2-MoE's shared expert."""

    def __init__(self, dim: int, intermediate: int, parts: ModelParts):
        super().__init__()
        self.gate_up_proj = StackedLinear(dim, (intermediate, intermediate), parts)
        self.down_proj = Linear(intermediate, dim, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, D] -> [T, D]."""
        gate, up = self.gate_up_proj(x)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)  # [T, D]


class SparseMoeBlock(nn.Module):
    """The router picks the top-A of E experts per token (softmax scores, renormalized over the A picks where
    `cfg.norm_topk_prob`); `experts` runs their SwiGLU MLPs, wherever they live."""

    def __init__(self, cfg: ModelConfig, experts: Experts):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = experts

    def route(self, x: torch.Tensor) -> RoutingResult:
        return route(self.gate(x), self.top_k, self.renormalize)  # weights [T, A] fp32, ids [T, A] int32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, D] -> [T, D]."""
        return self.experts(x, self.route(x))


class DecoderLayer(nn.Module):
    """h += attention(norm(h)); h += mlp(norm(h)), the MLP a `SparseMoeBlock` (or one with a shared expert)
    or, in dense layers, a `SwiGLU`: the layer of Qwen-MoE and OLMoE models (Mixtral names its MLP
    `block_sparse_moe`: mixtral.py). The first add fuses with `post_attention_layernorm`; the second with the
    next layer's `input_layernorm` (or the final norm), which the model applies."""

    def __init__(self, cfg: ModelConfig, parts: ModelParts, attention: Attention, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.norm)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.norm)
        self.mlp = mlp

    def forward(self, x, h, rope: Rope, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        """x = input_layernorm(h): [T, D]; h: [T, D], updated in place. Returns the MLP output [T, D]."""
        a = self.self_attn(x, rope, meta, kv_cache)  # [T, D]
        x = self.post_attention_layernorm(a, residual=h)  # h += a; [T, D]
        return self.mlp(x)  # [T, D]

    def moe_block(self) -> SparseMoeBlock:
        assert isinstance(self.mlp, SparseMoeBlock), "a dense layer has no MoE block"
        return self.mlp

