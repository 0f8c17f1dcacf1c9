"""Prompt lookup ("n-gram") proposals: guess that the text continues as it did after the last time its
final n tokens appeared. Free to compute, and right surprisingly often where outputs copy from the context
(code edits, quoting, structured data, repetitive generations).

Each request keeps an index from every n-gram (n in [n_min, n_max]) of its tokens to where the most recent
occurrence followed by at least one token ends; it grows with the tokens, so a step costs O(k + n_max) per
request, not a scan of the context.
"""

from __future__ import annotations

from moe_runtime.engine.spec.proposer import ProposalRequest


class _NgramIndex:
    """n-gram -> position right after its most recent occurrence that some token follows."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.after: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in `after`

    def update(self, tokens: list[int]) -> None:
        """Index the n-grams ending at positions [indexed, len - 1): those a known token now follows."""
        for end in range(self.indexed + 1, len(tokens)):  # an n-gram tokens[end - n : end], followed by tokens[end]
            for n in range(self.n_min, min(self.n_max, end) + 1):
                self.after[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest suffix n-gram's most recent earlier occurrence."""
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            start = self.after.get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []


class NgramProposer:
    """`speculative.method: ngram`: proposals from each request's own tokens (prompt and output)."""

    def __init__(self, n_min: int, n_max: int):
        assert 1 <= n_min <= n_max, (n_min, n_max)
        self.n_min, self.n_max = n_min, n_max
        self._indexes: dict[str, _NgramIndex] = {}

    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        """Up to `r.k` draft tokens for each request (maybe none), aligned with `requests`."""
        out = []
        for r in requests:
            index = self._indexes.get(r.request_id)
            if index is None:
                index = self._indexes[r.request_id] = _NgramIndex(self.n_min, self.n_max)
            index.update(r.token_ids)
            out.append(index.propose(r.token_ids, r.k))
        return out

    def drop(self, request_id: str) -> None:
        """Forget a finished or preempted request (a resumed one starts a fresh index)."""
        self._indexes.pop(request_id, None)
