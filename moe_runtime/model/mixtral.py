"""Mixtral: embed -> [RMSNorm, GQA attention, RMSNorm, sparse MoE] x L -> RMSNorm -> lm_head.

Mixtral of Experts (Jiang et al., 2024, arXiv:2401.04088). The arithmetic follows transformers'
`MixtralForCausalLM` operation for operation (RMSNorm in fp32, RoPE cos/sin cast to the activation dtype,
fp32 router softmax, per-expert accumulation in the activation dtype), so that logits match it bit for bit
in fp32 and greedy tokens match it in every dtype.

The model runs on a flat batch: T tokens from any number of sequences, each with its position; attention
finds sequence boundaries and KV pages in `AttentionMetadata`. Parameters are plain tensors filled by
`model.loader` (experts stacked per layer as w13 [E, 2I, D] and w2 [E, D, I]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.kernels import RoutingResult, cpu, route
from moe_runtime.kernels.cpu import hugepages
from moe_runtime.model.attention import AttentionMetadata, KVCache, attention, attention_fp32
from moe_runtime.model.cpu_decode import CpuDecode
from moe_runtime.model.experts import Experts, ExpertsBuilder, LocalExperts, LocalExpertsBuilder

# T tokens, E experts, A activated experts (top-k), D hidden, I intermediate, V vocab,
# H query heads, KVH key/value heads, Dh head dim


# Rows up to which a 16-bit `Linear` on CPU runs the native small-M kernel (kernels/cpu), once
# `MixtralForCausalLM.use_fast_cpu_paths` switched it on: it reads the weight once for all rows and
# accumulates in fp32. One core of the 2-core AVX2 EPYC, [M, 1024] x [1024, 7168] bf16, cold weights
# (bench/cpu_linear.py, docs/benchmarks.md, Engine): 1.7x / 4.1x / 5.0x torch's bf16 GEMM at M = 1 / 4 /
# 16, 1.6x the fp32 copy at 16 and 1.2x at 32; at 64 the fp32 copy is ahead (0.94x).
NATIVE_MAX_ROWS = 32
# Rows from which a 16-bit `Linear` on CPU multiplies by an fp32 copy of its weight (once the copies exist,
# see `MixtralForCausalLM.keep_fp32_copies`; the native kernel goes first up to NATIVE_MAX_ROWS). CPUs
# without native bf16 GEMMs (AVX2, no AVX512-BF16/AMX) run a bf16 GEMM about row by row (1.6 ms per row
# for 7168x1024 on one core of the 2-core AVX2 EPYC these figures come from) while the fp32 GEMM reads its
# weight once (9 ms for 16 rows, 38 ms for 64, vs 28 and 194 in bf16). Below this, a 16-bit GEMV streams
# the half-size weight once and wins.
FP32_MIN_ROWS = 16


class Linear(nn.Linear):
    """`nn.Linear` without bias; with 16-bit weights on CPU it may run the native kernel for a few rows and
    keep an fp32 copy of its weight for large batches. Plain torch arithmetic until asked otherwise."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.weight_fp32: torch.Tensor | None = None  # a copy, not a parameter: checkpoints never see it
        self.native = False  # kernels/cpu for up to NATIVE_MAX_ROWS rows (`use_native_kernel`)

    def keep_fp32_copy(self) -> None:
        w = self.weight
        self.weight_fp32 = w.float() if w.device.type == "cpu" and w.dtype != torch.float32 else None

    def use_native_kernel(self) -> None:
        w = self.weight
        self.native = (
            w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16) and cpu.available()
        )

    def uses_native(self, rows: int) -> bool:
        return self.native and rows <= NATIVE_MAX_ROWS

    def uses_fp32(self, rows: int) -> bool:
        return self.weight_fp32 is not None and rows >= FP32_MIN_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_native(x.shape[0]):
            return cpu.linear(x, self.weight)  # fp32 accumulation, rounded once to x's dtype
        if self.uses_fp32(x.shape[0]):
            return F.linear(x.float(), self.weight_fp32).to(x.dtype)
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE with the rotate-half layout of the HF checkpoints (not the interleaved one of the paper)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # [Dh/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, Dh]; cos, sin: [T, Dh]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.sliding_window = cfg.sliding_window
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(D, self.n_heads * Dh)
        self.k_proj = Linear(D, self.n_kv_heads * Dh)
        self.v_proj = Linear(D, self.n_kv_heads * Dh)
        self.o_proj = Linear(self.n_heads * Dh, D)
        self.attend = attention  # SDPA in the activation dtype; `attention_fp32` on the CPU fast path

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)  # [T, H, Dh]
        k = self.k_proj(x).view(T, self.n_kv_heads, self.head_dim)  # [T, KVH, Dh]
        v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)  # [T, KVH, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = self.attend(q, k, v, meta, kv_cache, self.sliding_window)  # [T, H, Dh]
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
    def __init__(self, cfg: ModelConfig, experts: Experts):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(cfg, experts)

    def forward(self, h, cos, sin, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, kv_cache)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class MixtralForCausalLM(nn.Module):
    """The whole model. `forward` gives final hidden states; `compute_logits` applies the head to chosen rows."""

    def __init__(self, cfg: ModelConfig, experts: ExpertsBuilder | None = None):
        """experts: makes each layer's `Experts` (default: all local, on the `auto` MoE backend)."""
        super().__init__()
        experts = experts if experts is not None else LocalExpertsBuilder()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(cfg, experts.build(cfg, l)) for l in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.cpu_decode: CpuDecode | None = None  # native decode steps (`use_fast_cpu_paths`)
        self.requires_grad_(False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64. kv_caches: one (k, v) pool per layer, or None. Returns [T, D]."""
        if self.cpu_decode is not None and self.cpu_decode.applies(input_ids.shape[0], meta, kv_caches):
            return self.cpu_decode(input_ids, positions, meta, kv_caches)  # the same layers in native calls
        h = self.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.rotary(positions, h.dtype)  # [T, Dh] each
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, meta, None if kv_caches is None else kv_caches[i])
        return self.norm(h)

    def take_router_counts(self) -> torch.Tensor:
        """Return the [L, E] tokens routed to each expert since the last call (on the model's device), and
        reset them."""
        rows = [layer.block_sparse_moe.experts.routed_tokens for layer in self.layers]  # L x [E]
        counts = torch.stack(rows)  # [L, E]
        for row in rows:
            row.zero_()
        return counts

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] (usually each sequence's last row) -> logits [N, V] float32."""
        if self.lm_head.uses_native(hidden.shape[0]):
            return cpu.linear_fp32(hidden, self.lm_head.weight)  # [N, V], no 16-bit rounding
        if self.lm_head.uses_fp32(hidden.shape[0]):
            return F.linear(hidden.float(), self.lm_head.weight_fp32)  # [N, V], no 16-bit rounding
        return self.lm_head(hidden).float()

    def keep_fp32_copies(self) -> None:
        """Keep fp32 copies of the 16-bit attention and head weights on CPU (see `FP32_MIN_ROWS`).

        Costs 2 bytes more per parameter of those layers (the experts are not copied); batches of at least
        FP32_MIN_ROWS tokens then use them. Call again after changing the weights.
        """
        for module in self.modules():
            if isinstance(module, Linear):
                module.keep_fp32_copy()

    def use_fast_cpu_paths(self) -> None:
        """Run 16-bit weights on CPU where torch's bf16 arithmetic is slow (no native bf16 GEMMs):
        linear layers of up to NATIVE_MAX_ROWS rows on the native kernels (kernels/cpu), the `auto` MoE
        backend becomes `cpu` (native kernels for small expert groups), decode attention in fp32 matmuls
        (`attention_fp32`), and decode steps of up to 64 sequences run each layer in four native calls
        (`cpu_decode.CpuDecode`). Weights of 4 MiB or more move to huge pages where Linux gives them
        (`kernels.cpu.hugepages`; values unchanged).

        Not torch's arithmetic: the same rounding points (each GEMM's result rounded to the activation
        dtype; logits of the native head stay fp32, as with the fp32 copies) but fp32 accumulation in
        another order, so bf16 logits differ from the reference's by a few ulps (the engine skips this
        with `model.exact: true`). No-op on GPUs and for
        fp32 weights; where the native kernels are unavailable (no AVX2 or no compiler: one logged warning)
        only the attention changes.
        """
        if self.device.type != "cpu" or self.dtype not in (torch.bfloat16, torch.float16):
            return
        for layer in self.layers:
            layer.self_attn.attend = attention_fp32
        for module in self.modules():
            if isinstance(module, Linear):
                module.use_native_kernel()
        if cpu.available():
            for layer in self.layers:
                experts = layer.block_sparse_moe.experts
                if isinstance(experts, LocalExperts) and experts.backend == "auto":
                    experts.backend = "cpu"
            self.cpu_decode = CpuDecode(self)  # stacks each layer's q/k/v weights, on huge pages
        for p in self.parameters():  # streamed once per decode step: fewer TLB misses on 2 MiB pages
            nbytes = p.numel() * p.element_size()
            if nbytes >= hugepages.MIN_BYTES and p.untyped_storage().nbytes() == nbytes:  # not the stacked q/k/v
                p.data = hugepages.copy(p.data)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype
