"""How a Hugging Face Mixtral checkpoint lays out its tensors, and how the runtime stacks them: the one home of
these facts (hub tensor names, the expert stacking, bytes per expert and per rank, dtype spellings).

Hub names: `model.layers.{l}.block_sparse_moe.experts.{e}.w1|w2|w3.weight` for the experts (w1 the gate
projection [I, D], w3 the up projection [I, D], w2 the down projection [D, I]), `...block_sparse_moe.gate`
for the router, `self_attn.{q,k,v,o}_proj`, the two norms per layer, `model.embed_tokens`, `model.norm`
and `lm_head`. The runtime stacks each layer's experts as w13 [E, 2I, D] (gate rows, then up rows: one GEMM
computes both) and w2 [E, D, I], and each layer's q, k and v projections as one [(H + 2 KVH) Dh, D] weight
(q rows, then k, then v: `qkv_rows`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch

from moe_runtime.config import ModelConfig
from moe_runtime.errors import ConfigError

T = TypeVar("T")

# L layers, E experts, D hidden, I intermediate, V vocab, H query heads, KVH key/value heads, Dh head dim

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some exporters save that carry no information (recomputed from the config).
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# config.json's and the YAML's dtype names -> torch dtypes.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# safetensors header dtype codes -> torch dtypes (the ones a checkpoint of these DTYPES holds).
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class ExpertNames(NamedTuple):
    """Hub names of one expert's three matrices."""

    w1: str  # gate projection [I, D]: rows 0..I-1 of the stacked w13
    w3: str  # up projection [I, D]: rows I..2I-1 of w13
    w2: str  # down projection [D, I]


def expert_names(layer: int, expert: int) -> ExpertNames:
    """Example:
    >>> expert_names(3, 7).w1
    'model.layers.3.block_sparse_moe.experts.7.w1.weight'
    """
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
    return ExpertNames(p + "w1.weight", p + "w3.weight", p + "w2.weight")


def is_expert_tensor(name: str) -> bool:
    """Whether a hub name is one of the experts' matrices (`...block_sparse_moe.experts.{e}.w1|w2|w3`)."""
    return ".block_sparse_moe.experts." in name


def read_expert(read_into: Callable[[str, torch.Tensor], T], layer: int, expert: int,
                w13: torch.Tensor, w2: torch.Tensor) -> list[T]:
    """Fill one expert's stacked weights through `read_into(hub name, destination)`: w13 [2I, D] gets w1 in
    its first I rows and w3 in the rest, w2 [D, I] gets w2. Returns what the three calls returned."""
    names = expert_names(layer, expert)
    inter = w13.shape[0] // 2
    return [
        read_into(names.w1, w13[:inter]),  # gate rows
        read_into(names.w3, w13[inter:]),  # up rows
        read_into(names.w2, w2),
    ]


def qkv_rows(cfg: ModelConfig) -> dict[str, slice]:
    """Where each attention projection's rows sit in the stacked q/k/v weight.

    >>> cfg = ModelConfig.from_hf({"architectures": ["MixtralForCausalLM"], "vocab_size": 8, "hidden_size": 8,
    ...     "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    ...     "num_local_experts": 2, "num_experts_per_tok": 1})
    >>> qkv_rows(cfg)
    {'q_proj': slice(0, 8, None), 'k_proj': slice(8, 12, None), 'v_proj': slice(12, 16, None)}
    """
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hub tensor name -> shape for a Mixtral checkpoint with this config."""
    D, I, V, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, KVH, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (H * Dh, D)
        shapes[p + "self_attn.k_proj.weight"] = (KVH * Dh, D)
        shapes[p + "self_attn.v_proj.weight"] = (KVH * Dh, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, H * Dh)
        shapes[p + "block_sparse_moe.gate.weight"] = (E, D)
        for e in range(E):
            names = expert_names(l, e)
            shapes[names.w1] = (I, D)
            shapes[names.w2] = (D, I)
            shapes[names.w3] = (I, D)
    return shapes


def resolve_dtype(dtype: str, cfg: ModelConfig) -> torch.dtype:
    """The torch dtype `model.dtype` names ("auto": the checkpoint's own `torch_dtype`)."""
    if dtype == "auto":
        return DTYPES[cfg.torch_dtype]
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; allowed: ['auto', {', '.join(map(repr, DTYPES))}]")
    return DTYPES[dtype]


def dtype_bytes(cfg: ModelConfig, dtype: str | torch.dtype) -> int:
    """Bytes per weight element in `dtype` (a torch dtype, or a name: "auto" is the checkpoint's)."""
    return (dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, cfg)).itemsize


def expert_bytes(cfg: ModelConfig, dtype: str | torch.dtype) -> int:
    """Bytes of one expert's weights: w1 and w3 [I, D] plus w2 [D, I]."""
    return 3 * cfg.hidden_size * cfg.intermediate_size * dtype_bytes(cfg, dtype)


def shared_bytes(cfg: ModelConfig, dtype: str | torch.dtype) -> int:
    """Bytes of the weights every rank replicates: embeddings, attention, norms, routers, lm_head."""
    D, E = cfg.hidden_size, cfg.num_local_experts
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = 2 * D * q + 2 * D * kv + E * D + 2 * D  # q, o, k, v, router, two norms
    embed = cfg.vocab_size * D * (1 if cfg.tie_word_embeddings else 2)
    return (cfg.num_hidden_layers * per_layer + embed + D) * dtype_bytes(cfg, dtype)
