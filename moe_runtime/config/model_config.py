"""`ModelConfig`: the architecture of a Mixtral checkpoint, parsed from its Hugging Face `config.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from moe_runtime.config.base import Section, validate
from moe_runtime.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
_OPTIONAL_HF_KEYS = {"sliding_window", "bos_token_id", "pad_token_id"}


class ModelConfig(Section):
    """The architecture of a Mixtral checkpoint, parsed from its HF `config.json`."""

    architecture: Literal["MixtralForCausalLM"] = "MixtralForCausalLM"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    num_local_experts: int = Field(gt=0)
    num_experts_per_tok: int = Field(gt=0)
    rope_theta: float = Field(gt=0)
    rms_norm_eps: float = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: bool = False
    sliding_window: int | None = Field(default=None, gt=0)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        return self

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a HF Mixtral `config.json` dict. Raises `ConfigError` naming the key and the allowed values."""
        archs = hf.get("architectures") or [hf.get("model_type") == "mixtral" and "MixtralForCausalLM"]
        if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: architectures={hf.get('architectures')!r} (model_type={hf.get('model_type')!r}) "
                f"is not supported; allowed: {list(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; allowed: ['silu']")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope_type={rope_type!r} is not supported; allowed: ['default']")
        dtype = hf.get("torch_dtype", hf.get("dtype", "bfloat16"))
        eos = hf.get("eos_token_id")
        heads = hf.get("num_attention_heads")
        head_dim = hf.get("head_dim")
        if head_dim is None and isinstance(heads, int) and heads > 0 and isinstance(hf.get("hidden_size"), int):
            head_dim = hf["hidden_size"] // heads
        fields = {
            "vocab_size": hf.get("vocab_size"),
            "hidden_size": hf.get("hidden_size"),
            "intermediate_size": hf.get("intermediate_size"),
            "num_hidden_layers": hf.get("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": hf.get("num_key_value_heads") or heads,
            "head_dim": head_dim,
            "num_local_experts": hf.get("num_local_experts"),
            "num_experts_per_tok": hf.get("num_experts_per_tok"),
            "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 1e6)),
            "rms_norm_eps": hf.get("rms_norm_eps", 1e-5),
            "max_position_embeddings": hf.get("max_position_embeddings", 4096 * 32),
            "tie_word_embeddings": hf.get("tie_word_embeddings", False),
            "sliding_window": hf.get("sliding_window"),
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_ids": () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
            "pad_token_id": hf.get("pad_token_id"),
            "torch_dtype": dtype,
        }
        missing = [k for k, v in fields.items() if v is None and k not in _OPTIONAL_HF_KEYS]
        if missing:
            raise ConfigError(f"{source}: required key(s) missing: {', '.join(missing)}")
        return validate(cls, fields, source)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found; a model directory holds config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(hf, str(path))
