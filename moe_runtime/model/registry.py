"""The supported architectures: Hugging Face `architectures` name -> the model class that computes it.

Three tables share these keys, each holding one kind of fact: `config.model_config.SUPPORTED_ARCHITECTURES`
(the names config.json may give, and how its keys map onto `ModelConfig`: torch-free, for validation),
`checkpoint.layout.LAYOUTS` (the hub tensor names) and `FAMILIES` here (the arithmetic, and whether
engine/cpu_decode.py's native decode step implements the family's decoder layer). tests/model/test_registry.py
holds the three equal. An architecture outside them is refused when config.json is read: one `ConfigError`
line naming it and the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_runtime.config import ModelConfig
from moe_runtime.model.causal_lm import CausalLM
from moe_runtime.model.mixtral import MixtralForCausalLM
from moe_runtime.model.olmoe import OlmoeForCausalLM
from moe_runtime.model.parts import ModelParts
from moe_runtime.model.qwen2_moe import Qwen2MoeForCausalLM
from moe_runtime.model.qwen3_moe import Qwen3MoeForCausalLM


@dataclass(frozen=True)
class Family:
    model: type[CausalLM]  # built as model(cfg, parts)
    # engine/cpu_decode.py runs this family's decode steps in native calls: its layer is exactly Mixtral's
    # (no q/k norms, no biases, no shared expert, no dense layers, renormalized top-k). Other families run
    # decode steps eagerly on the same CPU parts.
    native_decode: bool = False


FAMILIES: dict[str, Family] = {
    "MixtralForCausalLM": Family(MixtralForCausalLM, native_decode=True),
    "Qwen2MoeForCausalLM": Family(Qwen2MoeForCausalLM),
    "Qwen3MoeForCausalLM": Family(Qwen3MoeForCausalLM),
    "OlmoeForCausalLM": Family(OlmoeForCausalLM),
}


def family(cfg: ModelConfig) -> Family:
    """The family of `cfg.architecture` (always one of FAMILIES: `ModelConfig` admits no other)."""
    return FAMILIES[cfg.architecture]


def build_model(cfg: ModelConfig, parts: ModelParts | None = None) -> CausalLM:
    """The model of `cfg`'s family, its weights uninitialized (build under `torch.device("meta")` to load)."""
    return family(cfg).model(cfg, parts)
