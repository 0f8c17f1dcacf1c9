"""Eviction policies: which resident expert of a layer gives up its slot when another must come in.

Pure Python, one instance per layer. The store reports every use of an expert (`record_use`) and asks for a
victim among the experts it may evict (`victim`); the store alone decides what is protected (the experts
the current step still needs), so a policy can never evict one of those.

Example (LRU, experts 3, 5, 1 used in that order, then 3 again): the victim among {1, 3, 5} is 5.
    >>> p = LRUPolicy()
    >>> for e in (3, 5, 1, 3):
    ...     p.record_use(e)
    >>> p.victim([1, 3, 5])
    5
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class EvictionPolicy(Protocol):
    def record_use(self, expert: int) -> None: ...

    def victim(self, candidates: Sequence[int]) -> int: ...


class LRUPolicy:
    """Least recently used: evict the candidate whose last use is oldest (never used = oldest; ties by id)."""

    def __init__(self) -> None:
        self._clock = 0
        self._last_use: dict[int, int] = {}

    def record_use(self, expert: int) -> None:
        self._clock += 1
        self._last_use[expert] = self._clock

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda e: (self._last_use.get(e, 0), e))


class LFUPolicy:
    """Least frequently used: evict the candidate used fewest times so far (ties: least recent, then id).

    Counts are kept for the whole run, resident or not, so an expert that was hot before it was evicted
    comes back with its history.
    """

    def __init__(self) -> None:
        self._clock = 0
        self._uses: dict[int, int] = {}
        self._last_use: dict[int, int] = {}

    def record_use(self, expert: int) -> None:
        self._clock += 1
        self._uses[expert] = self._uses.get(expert, 0) + 1
        self._last_use[expert] = self._clock

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda e: (self._uses.get(e, 0), self._last_use.get(e, 0), e))


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}
