"""Paged KV cache bookkeeping: which fixed-size blocks each request owns. Pure Python, no torch.

Token j of a request lives in block `table[j // block_size]` at offset `j % block_size`. Blocks carry
reference counts so that a later prefix cache can share them between requests; a block returns to the free
list when its count drops to zero. Only the scheduler calls this.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}  # request id -> its block ids, in token order

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_missing(self, request_id: str, num_tokens: int) -> int:
        """Blocks the request still lacks to hold `num_tokens` tokens."""
        return max(0, self.blocks_needed(num_tokens) - len(self.table(request_id)))

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.num_missing(request_id, num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to hold `num_tokens` tokens; return the block ids added (maybe none)."""
        missing = self.num_missing(request_id, num_tokens)
        if missing > len(self._free):
            raise MemoryError(f"request {request_id!r} needs {missing} KV blocks, {len(self._free)} free")
        new = [self._free.popleft() for _ in range(missing)]
        for b in new:
            self._ref_counts[b] += 1
        self._tables.setdefault(request_id, []).extend(new)
        return new

    def free(self, request_id: str) -> None:
        """Release every block of the request (no-op if it holds none)."""
        for b in self._tables.pop(request_id, ()):
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)

    def check_invariants(self) -> None:
        """Exact accounting: every block is either free (count 0) or counted once per table holding it."""
        held = [0] * self.num_blocks
        for blocks in self._tables.values():
            for b in blocks:
                held[b] += 1
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            assert held[b] == self._ref_counts[b], f"block {b}: ref count {self._ref_counts[b]}, held {held[b]}"
            assert (b in free) == (held[b] == 0), f"block {b}: free={b in free} but held {held[b]} times"
