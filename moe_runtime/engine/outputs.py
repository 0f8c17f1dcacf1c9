"""What the engine hands back: per-request output deltas, timings, logprobs, and per-step stats.

Plain dataclasses only; the server turns them into protobuf messages and Prometheus metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_runtime.offload.stats import OffloadStats

FinishReason = str  # "stop" (stop string or stop token id), "length", "eos", "abort"


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability (log_softmax of the raw logits, before temperature) of one generated token."""

    token_id: int  # the chosen token
    logprob: float  # its logprob
    top: tuple[tuple[int, float], ...] = ()  # the n most likely (token id, logprob), most likely first


@dataclass
class RequestMetrics:
    """Timestamps of one request, `time.monotonic()` seconds. None until the event happens."""

    arrival_time: float
    first_scheduled_time: float | None = None  # first step that computed any of its tokens
    first_token_time: float | None = None  # first generated token sampled
    finish_time: float | None = None

    @property
    def queue_time_s(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class RequestOutput:
    """One update of a request: what is new since the previous update, and the totals so far."""

    request_id: str
    new_token_ids: list[int]  # generated since the previous output
    new_text: str  # text delta; never ends inside a UTF-8 character or a possible stop string
    token_ids: list[int]  # all generated tokens so far (prompt excluded)
    text: str  # all generated text so far
    finished: bool
    finish_reason: FinishReason | None  # set when finished
    logprobs: list[TokenLogprob] | None  # one per new token, when the request asked for logprobs
    num_prompt_tokens: int
    num_output_tokens: int
    metrics: RequestMetrics


@dataclass
class EngineStats:
    """A snapshot after a step, read once per step by telemetry (STYLE.md point 17)."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    num_preemptions: int  # since start
    steps: int  # since start
    num_prompt_tokens: int = 0  # prompt tokens computed since start (recomputation after preemption included)
    num_generated_tokens: int = 0  # tokens sampled since start
    step_num_tokens: int = 0  # tokens computed by the last step
    prefix_cache_queries: int = 0  # tokens of admitted requests looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of those, tokens whose KV the cache held (not computed again)
    spec_proposed_tokens: int = 0  # speculative decoding: proposed tokens verified, since start
    spec_accepted_tokens: int = 0  # of those, accepted (each saves a decode step)
    spec_verifications: int = 0  # request-steps that verified proposals: tokens per one = 1 + accepted / this
    step_latency_s: float = 0.0  # wall time of the last step
    router_counts: torch.Tensor | None = field(default=None, repr=False)  # [L, E] int64, the last step's
    offload: OffloadStats | None = None  # expert-store counters since start; None without offloading
