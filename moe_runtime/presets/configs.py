"""Embedded model presets: HF configs for models generated locally (DESIGN.md section 9).

`tiny` (Mixtral) is for tests and the default server (created in seconds); `mini` (~0.8B parameters, bf16)
is the CPU benchmark size. `tiny-qwen3moe`, `tiny-qwen2moe` and `tiny-olmoe` are tiny models of the other
families with their released models' routing shapes: 128 experts top-8 (Qwen3-30B-A3B, top-k
renormalized), 60 experts top-4 with a shared expert and q/k/v bias (Qwen1.5-MoE-A2.7B), 64 experts top-8
(OLMoE-1B-7B); fp32, hidden 128, 2 layers.
"""

from __future__ import annotations

from typing import Any

from moe_runtime.errors import ConfigError

_COMMON: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "router_aux_loss_coef": 0.02,
    "output_router_logits": False,
    "use_cache": True,
}

# What the three non-Mixtral tiny presets share besides _COMMON's generic keys.
_TINY_OTHER: dict[str, Any] = {
    **{k: v for k, v in _COMMON.items() if k not in ("architectures", "model_type", "sliding_window")},
    "vocab_size": 2048,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.1,  # as `tiny`: greedy decoding of the random model does not collapse
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        **_COMMON,
        "vocab_size": 2048,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        # Wide enough that greedy decoding of the random model does not collapse into one repeated token.
        "initializer_range": 0.1,
    },
    "mini": {
        **_COMMON,
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 3584,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "tiny-qwen3moe": {
        **_TINY_OTHER,
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_key_value_heads": 2,
        "head_dim": 48,  # not hidden / heads, as in Qwen3-30B-A3B (128 vs 64)
        # q/k norms keep attention logits O(1) whatever the scale: wider weights elsewhere keep greedy
        # decoding of the random model from falling into a loop of two or three tokens
        "initializer_range": 0.2,
        "intermediate_size": 256,  # dense layers' (none here: mlp_only_layers is empty)
        "moe_intermediate_size": 64,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
    },
    "tiny-qwen2moe": {
        **_TINY_OTHER,
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "num_key_value_heads": 2,
        "intermediate_size": 256,  # dense layers' (none here)
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 256,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,
        "use_sliding_window": False,
    },
    "tiny-olmoe": {
        **_TINY_OTHER,
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "num_key_value_heads": 4,  # OLMoE-1B-7B attends with as many key/value heads as query heads
        "intermediate_size": 64,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "attention_bias": False,
        "clip_qkv": None,
    },
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The HF config.json dict of a preset, with keys overridden (e.g. for odd-sized test models)."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is not known; allowed: {sorted(PRESETS)}")
    return {**PRESETS[name], **overrides}
