"""Configuration: pure data in one tree, loadable from one YAML file (DESIGN.md section 4).

`ModelConfig` is parsed from a Hugging Face `config.json`; `RuntimeConfig` is what a YAML preset holds,
one section per component. Every model is frozen and rejects unknown keys; every error is a `ConfigError`
that names the YAML path (or config.json key), the value and what is allowed. No environment variables
are read here (only `moe_runtime/cli.py` reads them).
"""

from moe_runtime.config.base import ByteSize, Section, parse_byte_size
from moe_runtime.config.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from moe_runtime.config.runtime import RuntimeConfig, apply_override, load_config
from moe_runtime.config.sections import (
    AutoRebalanceConfig,
    CacheConfig,
    EngineConfig,
    ModelLoadConfig,
    OffloadConfig,
    PlacementConfig,
    RayConfig,
    ServerConfig,
    SpeculativeConfig,
    TelemetryConfig,
)
from moe_runtime.errors import ConfigError

__all__ = [
    "SUPPORTED_ARCHITECTURES", "AutoRebalanceConfig", "ByteSize", "CacheConfig", "ConfigError", "EngineConfig",
    "ModelConfig", "ModelLoadConfig", "OffloadConfig", "PlacementConfig", "RayConfig", "RuntimeConfig",
    "Section", "ServerConfig", "SpeculativeConfig", "TelemetryConfig", "apply_override", "load_config",
    "parse_byte_size",
]
