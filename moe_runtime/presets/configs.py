"""Embedded model presets: HF Mixtral configs for models generated locally (DESIGN.md section 9).

`tiny` is for tests and the default server (created in seconds); `mini` (~0.8B parameters, bf16) is the CPU
benchmark size.
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
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The HF config.json dict of a preset, with keys overridden (e.g. for odd-sized test models)."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is not known; allowed: {sorted(PRESETS)}")
    return {**PRESETS[name], **overrides}
