"""`ExpertStatsSnapshot`: what `GetExpertStats` and `moe-runtime stats --json` return, as one dataclass (with
the prefix cache, speculative decoding and cost summaries it carries)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from moe_runtime.offload.stats import OffloadStats
from moe_runtime.telemetry.latency import LatencySummary

# The expert-store counters the snapshot publishes (derived ones included); the rest of `OffloadStats`
# (evictions, stall time, ...) stays in the process.
PUBLISHED_CACHE_KEYS = ("hits", "misses", "bytes_moved", "prefetch_guessed", "prefetch_used", "hit_rate",
                        "prefetch_accuracy")


@dataclass
class PrefixCacheSummary:
    """Automatic prefix caching since start, in prompt tokens (the engine's `EngineStats` counters)."""

    queries: int = 0  # prompt tokens of admitted requests looked up
    hits: int = 0  # of those, tokens whose KV the cache held (not computed again)
    hit_rate: float = 0.0  # hits / queries; 0 before any lookup


@dataclass
class SpeculativeSummary:
    """Speculative decoding since start (`speculative.method`); zeros when it is off."""

    proposed_tokens: int = 0  # proposed tokens the model verified
    accepted_tokens: int = 0  # of those, accepted: each saves a decode step
    verifications: int = 0  # request-steps that verified proposals
    acceptance_rate: float = 0.0  # accepted / proposed
    tokens_per_verification: float = 0.0  # 1 + accepted / verifications: tokens one verifying step yields


@dataclass
class CostSummary:
    """Cost per million tokens over the sliding window (telemetry/cost.py); `configured` False without
    `telemetry.cost.usd_per_hour`. A cost is None while the window holds no completed request's tokens."""

    configured: bool = False
    usd_per_hour: float = 0.0
    window_s: float = 0.0  # the window's span now (<= telemetry.cost.window_s)
    prompt_tokens: int = 0  # of the requests completed in the window
    generated_tokens: int = 0
    usd_per_million_prompt_tokens: float | None = None
    usd_per_million_generated_tokens: float | None = None


@dataclass
class ExpertStatsSnapshot:
    """Lists are `[L][E]` or `[L]` (L layers, E experts) or `[N]` (N ranks). The placement planner reads the
    `tokens_per_expert` / `layers` / `experts` keys of `to_dict()`."""

    layers: int
    experts: int
    top_k: int
    steps: int = 0
    window_steps: int = 0
    tokens_per_expert: list[list[int]] = field(default_factory=list)  # [L][E] over the window
    total_tokens_per_expert: list[list[int]] = field(default_factory=list)  # [L][E] since start
    imbalance: list[float] = field(default_factory=list)  # [L] max / mean over the window
    entropy: list[float] = field(default_factory=list)  # [L] normalized router entropy over the window
    mean_imbalance: float = 0.0
    mean_entropy: float = 0.0
    tokens_processed: int = 0  # tokens run through the model since start (= routed pairs / L / top_k)
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    num_preemptions: int = 0
    time_to_first_token: LatencySummary = field(default_factory=LatencySummary)
    time_per_output_token: LatencySummary = field(default_factory=LatencySummary)
    queue_time: LatencySummary = field(default_factory=LatencySummary)
    cache: OffloadStats = field(default_factory=OffloadStats)  # the engine stats' own; zeros without offloading
    rank_tokens: list[float] = field(default_factory=list)  # [N] pairs each rank computed over the window
    rank_expert_copies: list[int] = field(default_factory=list)  # [N] expert copies each rank holds
    rank_imbalance: float = 0.0  # sum over layers of max rank load / sum of mean rank load; 0 without ranks
    rank_experts: list[list[list[int]]] = field(default_factory=list)  # [N][L] expert ids each rank holds
    rank_step_s: list[float] = field(default_factory=list)  # [N] mean step wall time per rank over the window
    rank_collective_s: list[float] = field(default_factory=list)  # [N] of which in the MoE all-reduces
    rank_expert_bytes: list[int] = field(default_factory=list)  # [N] expert weight bytes each rank holds
    worker_restarts: int = 0  # worker-group rebuilds after a lost worker, since start
    prefix_cache: PrefixCacheSummary = field(default_factory=PrefixCacheSummary)
    speculative: SpeculativeSummary = field(default_factory=SpeculativeSummary)
    cost: CostSummary = field(default_factory=CostSummary)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        cache = self.cache.as_dict()
        out["cache"] = {key: cache[key] for key in PUBLISHED_CACHE_KEYS}
        return out
