"""What the scheduler tells the executor each step, and what the executor answers.

Workers keep each running request's tokens and block table between steps, so a step sends only the diff:
whole data for requests the workers have not seen (or dropped), block ids added for the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_runtime.engine.outputs import TokenLogprob
from moe_runtime.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the workers hold no state for: first scheduled, or resumed after preemption."""

    request_id: str
    # Every token known so far: the prompt, plus the generated tokens when resumed after preemption.
    token_ids: list[int]
    # Its whole block table (KV blocks in token order).
    block_ids: list[int]
    # How the next tokens are sampled.
    params: SamplingParams


@dataclass(frozen=True)
class CachedRequestData:
    """A request the workers already hold: its token list grows by the tokens they sampled themselves."""

    request_id: str
    # Blocks appended to its table this step (often none).
    new_block_ids: list[int]


@dataclass
class SchedulerOutput:
    """One step: {request id: tokens to compute}, plus what the workers need to know to compute them."""

    # request id -> tokens to compute this step, in batch order. A request whose tokens end at its last
    # known token gets a new token sampled; one in the middle of its prompt (a chunk) does not.
    num_scheduled_tokens: dict[str, int]
    # request id -> tokens already in the KV cache; this step computes positions [computed, computed + n).
    num_computed_tokens: dict[str, int]
    # Requests scheduled for the first time since the workers last dropped them (send everything).
    new_requests: list[NewRequestData]
    # Requests scheduled in an earlier step too (send the diff only).
    cached_requests: list[CachedRequestData]
    # Requests finished, aborted or preempted since the previous step: workers drop their state.
    finished_request_ids: set[str] = field(default_factory=set)
    # Speculative decoding: request id -> most proposed tokens the runner may verify after its one scheduled
    # token (its KV blocks cover them). Only requests at their last token; absent: none.
    num_spec_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class ModelRunnerOutput:
    """What one step produced: new tokens for each request that reached the end of its tokens."""

    # Requests that got new tokens, in batch order.
    request_ids: list[str]
    # The new tokens of each, aligned with request_ids: one, or with speculative decoding the accepted
    # proposals and then one more token.
    sampled_token_ids: list[list[int]]
    # Logprobs of each new token, aligned with sampled_token_ids; None for requests that did not ask.
    logprobs: list[list[TokenLogprob] | None]
    # [L, E] int64: tokens routed to each expert in this step (telemetry).
    router_counts: torch.Tensor | None = None
    # Speculative decoding: proposals verified for each request, aligned with request_ids (accepted ones:
    # len(sampled_token_ids[i]) - 1). Empty when the step had none.
    num_proposed: list[int] = field(default_factory=list)
