"""The proposer interface of speculative decoding: cheap guesses of each request's next k tokens.

The model runner asks once per step, for the requests the scheduler gave a speculation budget (k > 0),
right before the step's forward; it then verifies every proposal in that one forward (engine/spec/verify.py).
A proposal may be shorter than k, or empty (nothing to guess): the request then decodes one token as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ProposalRequest:
    """One request's view for a proposer."""

    request_id: str
    token_ids: list[int]  # every known token; the last one is not in the KV cache yet (computed this step)
    block_ids: list[int]  # its KV block table, covering len(token_ids) + k tokens
    k: int  # most tokens to propose


class Proposer(Protocol):
    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        """At most `r.k` proposed tokens for each request, aligned with `requests`."""

    def drop(self, request_id: str) -> None:
        """Forget a request: finished, aborted or preempted (it may come back under the same id)."""
