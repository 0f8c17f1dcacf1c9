"""Configuration: pure data in one tree, loadable from one YAML file (DESIGN.md section 4).

`ModelConfig` is parsed from a Hugging Face `config.json`; `RuntimeConfig` is what a YAML preset holds,
one section per component. Every model is frozen and rejects unknown keys; every error is a `ConfigError`
that names the YAML path (or config.json key), the value and what is allowed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moe_runtime.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
DTYPES = ("auto", "bfloat16", "float16", "float32")


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------------------
# The checkpoint's architecture (HF config.json)
# ---------------------------------------------------------------------------------------------------------
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
        return _validate(cls, fields, source)

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


_OPTIONAL_HF_KEYS = {"sliding_window", "bos_token_id", "pad_token_id"}


# ---------------------------------------------------------------------------------------------------------
# The YAML sections
# ---------------------------------------------------------------------------------------------------------
class ModelLoadConfig(Section):
    """`model:` where the checkpoint lives and how to run it."""

    path: str | None = None  # HF checkpoint directory; None serves the embedded `tiny` model
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: the checkpoint's torch_dtype
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    moe_backend: Literal["auto", "torch", "triton", "megablocks", "reference"] = "auto"


class EngineConfig(Section):
    """`engine:` batching limits of the scheduler."""

    max_num_seqs: int = Field(default=64, gt=0)  # running requests per step
    max_num_batched_tokens: int = Field(default=2048, gt=0)  # tokens per step (chunked prefill budget)
    max_model_len: int | None = Field(default=None, gt=0)  # None: the checkpoint's max_position_embeddings
    num_threads: int | None = Field(default=None, gt=0)  # torch intra-op threads on CPU; None: torch default
    seed: int | None = None  # draws of requests without their own seed; None: a fresh seed per engine


class CacheConfig(Section):
    """`cache:` the paged KV cache. Give `num_blocks` or `memory_bytes` (default: 1 GiB)."""

    block_size: int = Field(default=16, gt=0)  # tokens per KV block
    num_blocks: int | None = Field(default=None, gt=0)
    memory_bytes: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_size(self) -> CacheConfig:
        if self.num_blocks is not None and self.memory_bytes is not None:
            raise ValueError("give cache.num_blocks or cache.memory_bytes, not both")
        return self


class OffloadConfig(Section):
    """`offload:` the tiered expert store (moe_runtime/offload, DESIGN.md section 4).

    With `enabled`, each MoE layer keeps S expert slots on the compute device and the other experts in a
    host tier: `pinned` (all experts in page-locked CPU memory) or `mmap` (read from the checkpoint's
    safetensors files on demand, so resident memory stays bounded on CPU-only hosts). Give the budget as
    `resident_experts_per_layer` (S) or `device_memory_bytes` (S = bytes // (layers * bytes per expert)).
    S must be at least the experts one token uses (num_experts_per_tok): `resolve_slots` checks it against
    the model and names the minimum. Example:

        offload: {enabled: true, resident_experts_per_layer: 4, policy: lru, miss: auto, host_tier: mmap}
    """

    enabled: bool = False
    resident_experts_per_layer: int | None = Field(default=None, gt=0)  # S slots per layer
    device_memory_bytes: int | None = Field(default=None, gt=0)  # all layers' slots; "2GiB" ok
    policy: Literal["lru", "lfu"] = "lru"  # which resident expert a miss evicts
    prefetch: bool = True  # guess the next layer's experts with its gate and load them ahead
    prefetch_experts: int | None = Field(default=None, gt=0)  # guesses per layer; None: num_experts_per_tok
    miss: Literal["fetch", "host_compute", "auto"] = "auto"  # auto: per expert, by the calibrated cost model
    host_tier: Literal["pinned", "mmap"] = "pinned"

    @field_validator("device_memory_bytes", mode="before")
    @classmethod
    def _parse_bytes(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value)
        if not m:
            raise ValueError("expected bytes as an integer or with a unit, e.g. 2GiB, 512MiB, 80GB")
        unit = m.group(2) or "B"
        scale = 1 if unit == "B" else (1024 if "i" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
        return int(float(m.group(1)) * scale)

    @model_validator(mode="after")
    def _one_budget(self) -> OffloadConfig:
        given = [self.resident_experts_per_layer is not None, self.device_memory_bytes is not None]
        if all(given):
            raise ValueError("give offload.resident_experts_per_layer or offload.device_memory_bytes, not both")
        if self.enabled and not any(given):
            raise ValueError(
                "offload.enabled=true needs a budget: offload.resident_experts_per_layer (e.g. 4) or "
                "offload.device_memory_bytes (e.g. 8GiB)"
            )
        return self

    def resolve_slots(self, cfg: ModelConfig, bytes_per_element: int) -> int:
        """Resident slots S per layer for this model, in [num_experts_per_tok, num_local_experts].

        Raises `ConfigError` naming the field, the value and the minimum when the budget cannot hold the
        experts of one token (the least any step needs). A budget above E is capped at E.
        """
        E, A, L = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
        if self.resident_experts_per_layer is not None:
            if self.resident_experts_per_layer < A:
                raise ConfigError(
                    f"offload.resident_experts_per_layer={self.resident_experts_per_layer}: below the minimum "
                    f"{A} (num_experts_per_tok; one token's experts must fit); allowed: {A}..{E}"
                )
            return min(self.resident_experts_per_layer, E)
        expert_bytes = 3 * cfg.hidden_size * cfg.intermediate_size * bytes_per_element
        slots = self.device_memory_bytes // (L * expert_bytes)
        if slots < A:
            raise ConfigError(
                f"offload.device_memory_bytes={self.device_memory_bytes}: holds {slots} experts per layer, "
                f"below the minimum {A} (num_experts_per_tok); allowed: at least {A * L * expert_bytes} bytes "
                f"({L} layers x {A} experts x {expert_bytes} bytes)"
            )
        return min(slots, E)


class RayConfig(Section):
    """`ray:` how the Ray executor (`executor: ray`) reaches its cluster; `placement.workers` sets the size."""

    address: str | None = None  # None: start a local cluster; "auto" or "ray://host:10001" join one
    placement_timeout_s: float = Field(default=60.0, gt=0)  # wait for the workers' bundles, then fail
    collective_timeout_s: float = Field(default=30.0, gt=0)  # a step or collective longer than this fails
    worker_device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: one GPU per worker when the cluster has them
    num_cpus_per_worker: float = Field(default=1.0, gt=0)


class AutoRebalanceConfig(Section):
    """`placement.auto_rebalance:` replan from the telemetry window and move experts when ranks drift apart
    (Ray executor only; cluster/auto_rebalance.py)."""

    enabled: bool = False
    threshold: float = Field(default=1.25, ge=1.0)  # act above this rank imbalance (sum max / sum mean)
    interval_s: float = Field(default=60.0, gt=0)  # seconds between checks
    redundant: int = Field(default=0, ge=0)  # extra expert copies per layer the plan may add
    min_tokens: int = Field(default=4096, ge=0)  # routed pairs per layer the window must hold first
    min_gain: float = Field(default=0.05, ge=0)  # predicted imbalance drop needed to move anything


LayerKey = int | Literal["*"]  # a layer index, or "*" for every layer without its own entry


class PlacementConfig(Section):
    """`placement:` where each (layer, expert) lives across workers (cluster/placement.py builds the plan).

    Layers without an `explicit` entry follow `strategy` (one copy per expert); `replicas` adds copies on
    top. Expert and rank ranges need the model, so `moe_runtime.cluster.placement.build_placement` checks
    them and names the YAML path. Example (4 workers, expert 0 doubled everywhere, layer 3 spelled out):

        placement:
          workers: 4
          strategy: round_robin
          replicas: {"*": {0: [2]}}
          explicit: {3: {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [6, 7, 0]}}
    """

    workers: int = Field(default=1, gt=0)
    strategy: Literal["round_robin", "contiguous"] = "round_robin"  # expert e -> e % N, or blocks of E/N
    explicit: dict[LayerKey, dict[int, list[int]]] = {}  # layer -> rank -> experts held (a full layout)
    replicas: dict[LayerKey, dict[int, list[int]]] = {}  # layer -> expert -> extra ranks holding a copy
    memory_per_rank: int | None = Field(default=None, gt=0)  # bytes of weights a rank may hold; "24GiB" ok
    # rank -> a custom Ray resource that only the intended node declares (`ray start --resources
    # '{"moe-node-a": 1}'`): the rank's bundle asks for a sliver of it, so it lands there. Unlisted ranks go
    # where the placement group's PACK strategy puts them.
    nodes: dict[int, str] = {}
    auto_rebalance: AutoRebalanceConfig = AutoRebalanceConfig()

    @field_validator("memory_per_rank", mode="before")
    @classmethod
    def _parse_bytes(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value)
        if not m:
            raise ValueError("expected bytes as an integer or with a unit, e.g. 24GiB, 512MiB, 80GB")
        unit = m.group(2) or "B"
        scale = 1 if unit == "B" else (1024 if "i" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
        return int(float(m.group(1)) * scale)


class ServerConfig(Section):
    """`server:` the gRPC endpoint."""

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    max_queued_requests: int = Field(default=256, gt=0)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    tls_cert: str | None = None  # PEM certificate chain path; TLS needs tls_cert and tls_key together
    tls_key: str | None = None  # PEM private key path
    drain_grace_s: float = Field(default=10.0, ge=0)  # SIGTERM: seconds in-flight streams get to finish

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give server.tls_cert and server.tls_key together (PEM paths), or neither")
        return self


class TelemetryConfig(Section):
    """`telemetry:` Prometheus export and the expert-load window."""

    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    per_expert_metrics: bool = False
    window_steps: int = Field(default=256, gt=0)


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

    @model_validator(mode="after")
    def _compatible_sections(self) -> RuntimeConfig:
        if self.executor == "ray" and self.offload.enabled:
            raise ValueError(
                "executor='ray' with offload.enabled=true is not supported: Ray workers hold only their placed "
                "experts already; allowed: executor: local with offloading, or executor: ray without it"
            )
        return self


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RuntimeConfig:
    """Load a YAML preset (or the defaults) and apply `section.key=value` overrides.

    >>> load_config(overrides=["engine.max_num_seqs=8"]).engine.max_num_seqs
    8
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return _validate(RuntimeConfig, data, str(path) if path else "config")


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


def _validate(cls: type[Section], data: dict[str, Any], source: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source, cls)) from None


def _format_validation_error(e: ValidationError, source: str, cls: type[Section]) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = err["loc"][:-1]
            allowed = _allowed_keys(cls, parent)
            lines.append(f"{where}: unknown key; allowed: {allowed}")
        elif err["type"] == "value_error":  # a validator's own message already names the values
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{where}={err.get('input')!r}: {err['msg']}")
    return f"{source}: " + "; ".join(lines)


def _allowed_keys(cls: type[Section], loc: tuple) -> list[str]:
    model: Any = cls
    for part in loc:
        field = model.model_fields.get(part) if model else None
        model = field.annotation if field is not None else None
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
