"""The YAML sections, one per component: `model`, `engine`, `cache`, `speculative`, `offload`, `ray`,
`placement`, `server`, `telemetry`. Each field's comment gives its unit or meaning; the component that reads a section
owns its semantics.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from moe_runtime.config.base import ByteSize, Section
from moe_runtime.config.model_config import ModelConfig
from moe_runtime.errors import ConfigError


class ModelLoadConfig(Section):
    """`model:` where the checkpoint lives and how to run it."""

    path: str | None = None  # HF checkpoint directory; None serves the embedded `tiny` model
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: the checkpoint's torch_dtype
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    moe_backend: str = "auto"  # one of moe_runtime.kernels.BACKEND_NAMES
    # RoPE + KV write + attention (kernels/attention.py). auto: triton on CUDA; on CPU `cpu` (fp32 decode
    # matmuls) unless `exact`, then `torch` (SDPA, the reference arithmetic). triton on a CPU host needs the
    # Triton interpreter (TRITON_INTERPRET=1, tests only).
    attention_backend: Literal["auto", "torch", "triton", "cpu"] = "auto"
    # auto: the checkpoint's safetensors. dummy (vLLM's name): only config.json is read; every weight is a
    # seeded random tensor made on the device (benchmarks of shapes whose weights are not on disk).
    load_format: Literal["auto", "dummy"] = "auto"
    # false (default): fast paths (engine/parts.py). On CPU with 16-bit weights: native kernels of
    # kernels/cpu for a few rows and whole decode steps, fp32 decode attention, fp32 weight copies for large
    # batches; on GPU the Triton kernels and CUDA graphs. They round where torch rounds but sum in another
    # order, so bf16 logits move by a few ulps. true: torch's kernels only, the arithmetic the parity tests
    # hold equal to transformers' bit for bit (the torch MoE backend still widens expert groups of >= 16
    # rows to fp32; moe_backend: reference avoids that too). Slower everywhere.
    exact: bool = False
    # Routed experts' weights (kernels/quant.py): none = the checkpoint's 16 bits; int8 = int8 with one fp32
    # scale per output row, quantized at load (half the bytes per token); fp8 = float8 e4m3, per-row scales.
    # Local and offloaded experts; attention and the LM head stay in `dtype` unless `quantize_dense`.
    quantization: Literal["none", "int8", "fp8"] = "none"
    # true: the dense projections too (attention's q/k/v and o, dense and shared-expert MLPs, the LM head
    # unless it is tied to the embedding) in the experts' 8-bit format, per-row scales. A decode step reads
    # every dense weight once: they are ~12% of Mixtral-8x7B's bytes per token in bf16 and ~23% of mini's,
    # and once the experts are 8-bit, ~21% and ~37%. Needs 8-bit experts (`quantization`, or an FP8
    # checkpoint's own).
    quantize_dense: bool = False

    @field_validator("moe_backend")
    @classmethod
    def _runnable_backend(cls, name: str) -> str:
        # Imported here, not at the top: the kernels bring torch, which the CLI's client commands (stats,
        # generate --server) never need; they import this module but build no config.
        from moe_runtime.kernels import BACKEND_NAMES, UNAVAILABLE_BACKENDS

        if name in UNAVAILABLE_BACKENDS:
            raise ValueError(f"not available in this build: {UNAVAILABLE_BACKENDS[name]}")
        if name not in BACKEND_NAMES:
            allowed = [n for n in BACKEND_NAMES if n not in UNAVAILABLE_BACKENDS]
            raise ValueError(f"not a MoE backend; allowed: {allowed}")
        return name


class EngineConfig(Section):
    """`engine:` batching limits of the scheduler."""

    max_num_seqs: int = Field(default=64, gt=0)  # running requests per step
    max_num_batched_tokens: int = Field(default=2048, gt=0)  # tokens per step (chunked prefill budget)
    max_model_len: int | None = Field(default=None, gt=0)  # None: the checkpoint's max_position_embeddings
    num_threads: int | None = Field(default=None, gt=0)  # torch intra-op threads on CPU; None: torch default
    seed: int | None = None  # draws of requests without their own seed; None: a fresh seed per engine
    # CUDA graphs for decode steps (engine/cuda_graphs.py), captured at start for batches of 1, 2, 4, 8, 16,
    # 24, ... up to cuda_graph_max_batch sequences (capped at max_num_seqs). On CUDA with the triton
    # kernels only; ignored elsewhere.
    cuda_graphs: bool = True
    cuda_graph_max_batch: int = Field(default=256, gt=0)
    # Where the CPU fast path keeps the plans it measures at start-up (which kernel runs each op at each row
    # count on this machine, engine/parts.py); None: ~/.cache/moe-runtime/cpu-plans. The second start on the
    # same machine reads the plan instead of measuring.
    cpu_plan_dir: str | None = None
    # Prompt tokens one step prefills, all prompts together (max_num_batched_tokens stays the cap of a step's
    # tokens, decodes included): running requests wait for each step, so this bounds their inter-token
    # latency while long prompts arrive. auto: on the CPU fast path the smallest chunk within 10% of the best
    # prefill throughput measured at the first start on the machine (engine/prefill_chunk.py, cached with the
    # CPU plan); elsewhere (GPU, exact, offloaded experts, executor: ray) max_num_batched_tokens. An int fixes it.
    prefill_chunk: Literal["auto"] | int = "auto"

    @field_validator("prefill_chunk", mode="before")
    @classmethod
    def _auto_or_tokens(cls, value: object) -> object:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ValueError('allowed: "auto" or a number of tokens from 1 to engine.max_num_batched_tokens')

    @model_validator(mode="after")
    def _chunk_within_cap(self) -> EngineConfig:
        chunk, cap = self.prefill_chunk, self.max_num_batched_tokens
        if chunk != "auto" and not 0 < chunk <= cap:
            raise ValueError(f"engine.prefill_chunk={chunk}: out of range; allowed: \"auto\" or 1..{cap} (at most "
                             f"engine.max_num_batched_tokens={cap}, the cap of a step's tokens)")
        return self


class CacheConfig(Section):
    """`cache:` the paged KV cache. Give `num_blocks` or `memory_bytes`, or neither: then it holds
    `engine.max_num_seqs` full contexts, capped at a share of the device's free memory (engine/kv_cache.py)."""

    block_size: int = Field(default=16, gt=0)  # tokens per KV block
    num_blocks: int | None = Field(default=None, gt=0)
    memory_bytes: ByteSize | None = Field(default=None, gt=0)  # "2GiB" ok
    # Automatic prefix caching (engine/block_manager.py): full KV blocks stay keyed by their prefix, and a new
    # request with the same leading tokens reuses them instead of computing them again.
    prefix_caching: bool = True

    @model_validator(mode="after")
    def _one_size(self) -> CacheConfig:
        if self.num_blocks is not None and self.memory_bytes is not None:
            raise ValueError("give cache.num_blocks or cache.memory_bytes, not both")
        return self


class SpeculativeConfig(Section):
    """`speculative:` speculative decoding (engine/spec/). Each step a running request gets up to
    `num_tokens` cheaply proposed tokens, verified by the model in the step's one forward; greedy outputs are
    identical to decoding without it, sampled ones follow the same distribution."""

    method: Literal["none", "ngram", "draft"] = "none"
    num_tokens: int = Field(default=4, gt=0, le=16)  # k: tokens proposed per request and step
    # ngram (prompt lookup): the longest n-gram, from ngram_max down to ngram_min tokens, that ends the
    # sequence and occurred earlier in it; propose what followed that occurrence.
    ngram_min: int = Field(default=1, gt=0)
    ngram_max: int = Field(default=4, gt=0)
    # draft: a small checkpoint with the same tokenizer and vocabulary (its own KV cache, same block tables).
    draft_model: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min={self.ngram_min} > ngram_max={self.ngram_max}; allowed: ngram_min <= "
                             "ngram_max")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("method='draft' needs draft_model: the directory of a small checkpoint with the "
                             "target's tokenizer")
        if self.draft_model and self.method != "draft":
            raise ValueError(f"draft_model={self.draft_model!r} is set but method={self.method!r}; allowed: "
                             "method: draft with a draft_model, or no draft_model")
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
    device_memory_bytes: ByteSize | None = Field(default=None, gt=0)  # all layers' slots; "2GiB" ok
    policy: Literal["lru", "lfu"] = "lru"  # which resident expert a miss evicts
    prefetch: bool = True  # guess the next layer's experts with its gate and load them ahead
    prefetch_experts: int | None = Field(default=None, gt=0)  # guesses per layer; None: num_experts_per_tok
    miss: Literal["fetch", "host_compute", "auto"] = "auto"  # auto: per expert, by the calibrated cost model
    host_tier: Literal["pinned", "mmap"] = "pinned"
    # mmap tier with 8-bit experts of a 16-bit checkpoint: where the spill file of every expert quantized
    # once lives (offload/spill.py; one per checkpoint and scheme, ~half the experts' 16-bit bytes, built at
    # the first start); None: ~/.cache/moe-runtime/quantized-experts
    spill_dir: str | None = None

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

    def resolve_slots(self, cfg: ModelConfig, expert_bytes: int) -> int:
        """Resident slots S per layer for this model, in [num_experts_per_tok, num_local_experts].

        expert_bytes: one expert's weight bytes in the run's dtype (`checkpoint.layout.expert_bytes`).
        Raises `ConfigError` naming the field, the value and the minimum when the budget cannot hold the
        experts of one token (the least any step needs). A budget above E is capped at E.
        """
        E, A, L = cfg.num_local_experts, cfg.num_experts_per_tok, len(cfg.moe_layers)  # L: layers with experts
        if self.resident_experts_per_layer is not None:
            if self.resident_experts_per_layer < A:
                raise ConfigError(
                    f"offload.resident_experts_per_layer={self.resident_experts_per_layer}: below the minimum "
                    f"{A} (num_experts_per_tok; one token's experts must fit); allowed: {A}..{E}"
                )
            return min(self.resident_experts_per_layer, E)
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

    address: str | None = None  # None: start a local cluster; "auto", "HOST:6379" or "ray://host:10001" join one
    # Joining: seconds to keep retrying (backoff 0.5 s doubling to 10 s) while the cluster is not up yet, e.g.
    # a Ray head starting beside the server in the same pod; then fail naming the address. A local cluster
    # whose start-up times out is retried within the same budget.
    connect_timeout_s: float = Field(default=120.0, gt=0)
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
    top. Expert and rank ranges need the model, so `moe_runtime.cluster.placement_config.build_placement` checks
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
    memory_per_rank: ByteSize | None = Field(default=None, gt=0)  # bytes of weights a rank may hold; "24GiB" ok
    # rank -> a custom Ray resource that only the intended node declares (`ray start --resources
    # '{"moe-node-a": 1}'`): the rank's bundle asks for a sliver of it, so it lands there. Unlisted ranks go
    # where the placement group's PACK strategy puts them.
    nodes: dict[int, str] = {}
    auto_rebalance: AutoRebalanceConfig = AutoRebalanceConfig()


class ServerConfig(Section):
    """`server:` the gRPC endpoint, and the OpenAI-compatible HTTP API beside it (same host, engine, token,
    TLS and limits)."""

    host: str = "127.0.0.1"  # loopback; another address warns at start unless auth and TLS are both on
    port: int = Field(default=50051, ge=0, le=65535)
    # The OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health) on this
    # port; None: off; 0 picks a free one.
    http_port: int | None = Field(default=None, ge=0, le=65535)
    # The model id /v1/models lists and requests' `model` must name; None: the checkpoint directory's name.
    served_model_name: str | None = Field(default=None, min_length=1)
    max_queued_requests: int = Field(default=256, gt=0)
    # Largest request read (bytes): a larger gRPC message is RESOURCE_EXHAUSTED, a larger HTTP body 413,
    # before it is parsed. Prompt text has its own, tighter bound from the model: what max_model_len tokens
    # of the tokenizer's longest could cover, refused before tokenizing (LLMEngine.encode).
    max_request_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, gt=0)  # largest response message sent (bytes)
    tls_cert: str | None = None  # PEM certificate chain path; TLS needs tls_cert and tls_key together
    tls_key: str | None = None  # PEM private key path
    drain_grace_s: float = Field(default=10.0, ge=0)  # SIGTERM: seconds in-flight streams get to finish

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give server.tls_cert and server.tls_key together (PEM paths), or neither")
        return self

    @model_validator(mode="after")
    def _two_ports(self) -> ServerConfig:
        if self.http_port is not None and self.http_port != 0 and self.http_port == self.port:
            raise ValueError(f"server.http_port={self.http_port} is also server.port (gRPC); allowed: another "
                             "port, 0 (a free one) or null (no HTTP API)")
        return self


class CostConfig(Section):
    """`telemetry.cost:` what the machine costs, to turn measured throughput into dollars per million tokens
    (telemetry/cost.py, `moe_runtime_cost_usd_per_million_tokens{kind}`, `moe-runtime stats`)."""

    # The price of the machine (or its GPUs) in US dollars per hour; None: no cost metric.
    usd_per_hour: float | None = None
    # Seconds of wall time the cost is measured over: the machine's cost for that time over the tokens of the
    # requests that finished in it. Idle time counts (the machine is paid for all the same).
    window_s: float = Field(default=300.0, ge=1.0, allow_inf_nan=False)

    @field_validator("usd_per_hour", mode="before")
    @classmethod
    def _price(cls, value: object) -> object:
        allowed = "allowed: a number of US dollars per hour >= 0 (e.g. 2.5), or null for no cost metric"
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"not a number; {allowed}")
        try:
            price = float(value)
        except ValueError:
            raise ValueError(f"not a number; {allowed}") from None
        if not 0 <= price < float("inf"):  # NaN fails this too
            raise ValueError(f"not a finite number >= 0; {allowed}")
        return price


class TelemetryConfig(Section):
    """`telemetry:` Prometheus export, the expert-load window and the cost per token."""

    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    per_expert_metrics: bool = False
    window_steps: int = Field(default=256, gt=0)
    cost: CostConfig = CostConfig()
