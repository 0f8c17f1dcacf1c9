"""`RuntimeConfig`: everything one YAML file holds, loaded with `--set section.key=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import model_validator

from moe_runtime.config.base import Section, validate
from moe_runtime.config.sections import (
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


class RuntimeConfig(Section):
    """Everything one YAML file holds."""

    model: ModelLoadConfig = ModelLoadConfig()
    engine: EngineConfig = EngineConfig()
    cache: CacheConfig = CacheConfig()
    offload: OffloadConfig = OffloadConfig()
    executor: Literal["local", "ray"] = "local"
    ray: RayConfig = RayConfig()
    placement: PlacementConfig = PlacementConfig()
    server: ServerConfig = ServerConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()

    @model_validator(mode="after")
    def _compatible_sections(self) -> RuntimeConfig:
        if self.executor == "ray" and self.offload.enabled:
            raise ValueError(
                "executor='ray' with offload.enabled=true is not supported: Ray workers hold only their placed "
                "experts already; allowed: executor: local with offloading, or executor: ray without it"
            )
        if self.executor == "ray" and self.speculative.method != "none":
            raise ValueError(
                f"executor='ray' with speculative.method={self.speculative.method!r} is not supported yet: the "
                "Ray workers run no proposer; allowed: speculative.method: none with executor: ray"
            )
        if self.model.load_format == "dummy" and (self.offload.enabled or self.executor == "ray"):
            raise ValueError(
                "model.load_format='dummy' reads no checkpoint, but offloading and the Ray workers read experts "
                "from its files; allowed: load_format: dummy with executor: local and offload disabled"
            )
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RuntimeConfig:
    """Load a YAML preset (or the defaults) and apply `section.key=value` overrides.

    >>> load_config(overrides=["engine.max_num_seqs=8"]).engine.max_num_seqs
    8
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except OSError as e:  # a directory, no permission
            raise ConfigError(f"config file {path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                              f"{e.start}); allowed: a UTF-8 YAML file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML ({_one_line(e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return validate(RuntimeConfig, data, str(path) if path else "config")


def _one_line(e: yaml.YAMLError) -> str:
    """PyYAML's message (several lines, with a caret under the source) as one line: problem, line, column."""
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem is None:
        return " ".join(str(e).split())
    where = "" if e.problem_mark is None else f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}"
    return f"{e.problem}{where}" + (f", {e.context}" if e.context else "")


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`8`, `true`, `null`, `[1,2]`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. engine.max_num_seqs=8")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value
