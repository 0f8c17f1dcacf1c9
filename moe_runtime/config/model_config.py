"""`ModelConfig`: the architecture of a MoE checkpoint, parsed from its Hugging Face `config.json`.

Four families share one set of fields (`from_hf` maps each family's config.json keys onto them):
    MixtralForCausalLM   every layer sparse; top-k weights renormalized
    Qwen2MoeForCausalLM  a shared expert beside the routed ones (sigmoid gate); q/k/v bias; dense layers
    Qwen3MoeForCausalLM  q/k RMSNorm per head; `norm_topk_prob`; dense layers (`mlp_only_layers`)
    OlmoeForCausalLM     q/k RMSNorm over the whole projections; optional `clip_qkv`
`intermediate_size` is always a routed expert's I (Qwen's `moe_intermediate_size`); a dense layer's I is
`dense_intermediate_size`. Which model class serves each family: `model/registry.py`; its tensor names:
`checkpoint/layout.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from moe_runtime.config.base import Section, validate
from moe_runtime.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
_MODEL_TYPES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
_OPTIONAL_HF_KEYS = {"sliding_window", "bos_token_id", "pad_token_id", "dense_intermediate_size", "clip_qkv"}


class ModelConfig(Section):
    """The architecture of a MoE checkpoint, parsed from its HF `config.json`."""

    architecture: Literal[SUPPORTED_ARCHITECTURES] = "MixtralForCausalLM"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)  # I of one routed expert
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    num_local_experts: int = Field(gt=0)  # E routed experts per sparse layer
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
    norm_topk_prob: bool = True  # renormalize each token's top-k routing weights to sum to 1
    qkv_bias: bool = False  # q, k and v projections have a bias
    o_bias: bool = False  # the output projection has a bias
    clip_qkv: float | None = Field(default=None, gt=0)  # q, k, v clamped to [-clip, clip] (OLMoE)
    # Decoder layers whose MLP is one dense SwiGLU instead of routed experts (Qwen's `mlp_only_layers` and
    # the layers `decoder_sparse_step` skips), ascending; their I is dense_intermediate_size.
    dense_layers: tuple[int, ...] = ()
    dense_intermediate_size: int | None = Field(default=None, gt=0)
    # I of the shared expert every token also goes through (Qwen2-MoE); None: no shared expert.
    shared_expert_intermediate_size: int | None = Field(default=None, gt=0)

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
        if list(self.dense_layers) != sorted(set(self.dense_layers)) or any(
            not 0 <= l < self.num_hidden_layers for l in self.dense_layers
        ):
            raise ValueError(f"dense layers {list(self.dense_layers)} must be distinct layer indices in "
                             f"[0, {self.num_hidden_layers})")
        if len(self.dense_layers) == self.num_hidden_layers:
            raise ValueError("every layer is dense (mlp_only_layers / decoder_sparse_step): not a MoE model")
        if self.dense_layers and self.dense_intermediate_size is None:
            raise ValueError(f"dense layers {list(self.dense_layers)} need intermediate_size (their MLP's)")
        return self

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The decoder layers with routed experts, ascending (every layer but `dense_layers`)."""
        dense = set(self.dense_layers)
        return tuple(l for l in range(self.num_hidden_layers) if l not in dense)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a HF `config.json` dict of a supported family. Raises `ConfigError` naming the key and the
        allowed values (an unsupported architecture: one line naming it and the supported ones)."""
        archs = hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"))]
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
            "architecture": archs[0],
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
        fields.update(_FAMILY_KEYS[archs[0]](hf, source))
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
        except NotADirectoryError:
            raise ConfigError(f"{model_dir}: a file, not a model directory; give the directory that holds "
                              "config.json") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read ({e}); a model directory holds a UTF-8 config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(hf, str(path))


# Each family's config.json keys that differ from Mixtral's, with transformers' defaults for absent ones.


def _mixtral_keys(hf: dict[str, Any], source: str) -> dict[str, Any]:
    return {}


def _num_experts(hf: dict[str, Any]) -> Any:
    """Routed experts: `num_experts` on the hub; transformers 5 saves Qwen3-MoE's as `num_local_experts`."""
    return hf.get("num_experts", hf.get("num_local_experts"))


def _qwen_moe_keys(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Qwen2-MoE and Qwen3-MoE: experts under `num_experts` / `moe_intermediate_size`, dense layers."""
    layers, step = hf.get("num_hidden_layers"), hf.get("decoder_sparse_step", 1)
    only = hf.get("mlp_only_layers") or []
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"{source}: decoder_sparse_step={step!r} is not supported; allowed: an integer >= 1")
    dense = () if not isinstance(layers, int) else tuple(
        l for l in range(layers) if l in only or (l + 1) % step != 0  # as transformers decides
    )
    return {"num_local_experts": _num_experts(hf), "intermediate_size": hf.get("moe_intermediate_size"),
            "norm_topk_prob": hf.get("norm_topk_prob", False), "dense_layers": dense,
            "dense_intermediate_size": hf.get("intermediate_size") if dense else None}


def _qwen2_moe_keys(hf: dict[str, Any], source: str) -> dict[str, Any]:
    if hf.get("use_sliding_window", False):
        raise ConfigError(f"{source}: use_sliding_window=true (sliding attention on some layers only) is not "
                          "supported for Qwen2MoeForCausalLM; allowed: false")
    return {**_qwen_moe_keys(hf, source), "sliding_window": None, "qkv_bias": hf.get("qkv_bias", True),
            "shared_expert_intermediate_size": hf.get("shared_expert_intermediate_size", 5632)}


def _qwen3_moe_keys(hf: dict[str, Any], source: str) -> dict[str, Any]:
    bias = hf.get("attention_bias", False)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    return {**_qwen_moe_keys(hf, source), "sliding_window": window, "qkv_bias": bias, "o_bias": bias}


def _olmoe_keys(hf: dict[str, Any], source: str) -> dict[str, Any]:
    if hf.get("sliding_window") is not None:
        raise ConfigError(f"{source}: sliding_window={hf['sliding_window']!r} is not supported for "
                          "OlmoeForCausalLM; allowed: null")
    bias = hf.get("attention_bias", False)
    return {"num_local_experts": _num_experts(hf), "norm_topk_prob": hf.get("norm_topk_prob", False),
            "qkv_bias": bias, "o_bias": bias, "clip_qkv": hf.get("clip_qkv")}


_FAMILY_KEYS = {"MixtralForCausalLM": _mixtral_keys, "Qwen2MoeForCausalLM": _qwen2_moe_keys,
                "Qwen3MoeForCausalLM": _qwen3_moe_keys, "OlmoeForCausalLM": _olmoe_keys}
