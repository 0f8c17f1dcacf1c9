"""Paged KV cache bookkeeping: which fixed-size blocks each request owns, and which blocks hold a known
prefix. Pure Python, no torch. Only the scheduler calls this.

Token j of a request lives in block `table[j // block_size]` at offset `j % block_size`. Blocks carry
reference counts, so several requests can share one.

Automatic prefix caching (`prefix_caching=True`): once a block is full, it is registered under the key
(its parent's entry id, its own token ids), and gets an entry id of its own, never reused; so by induction a
key names a whole prefix, yet costs one block of tokens to hash, not the prefix. A new
request (or one resumed after preemption) looks up its full blocks in order and starts with the longest
run found: those blocks join its table, shared, and their tokens count as computed. A block whose count
drops to zero stays cached (and keeps its KV) until its space is needed: allocation takes never-used blocks
first, then evicts the least recently released cached block. Keys compare by value, so a hash collision can
never hand out the wrong KV.
"""

from __future__ import annotations

from collections import OrderedDict, deque

BlockKey = tuple[int, tuple[int, ...]]  # (the parent's entry id, or -1 at the start; the block's token ids)
_ROOT = -1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # never used, or evicted: hold no known prefix
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}  # request id -> its block ids, in token order
        self._cached: dict[BlockKey, int] = {}  # prefix key -> the block holding its last block of tokens
        self._key: dict[int, BlockKey] = {}  # block -> its key, for cached blocks
        self._entry: dict[int, int] = {}  # block -> its entry id, for cached blocks
        self._next_entry = 0  # entry ids only grow: a key naming an evicted parent never matches again
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with count 0, LRU first
        # request id -> (leading blocks of its table already keyed, the entry id of the last of them)
        self._keyed: dict[str, tuple[int, int]] = {}
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, tokens found

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never used ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some request holds."""
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_missing(self, request_id: str, num_tokens: int) -> int:
        """Blocks the request still lacks to hold `num_tokens` tokens."""
        return max(0, self.blocks_needed(num_tokens) - len(self.table(request_id)))

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.num_missing(request_id, num_tokens) <= self.num_free

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to hold `num_tokens` tokens; return the block ids added (maybe none)."""
        missing = self.num_missing(request_id, num_tokens)
        if missing > self.num_free:
            raise MemoryError(f"request {request_id!r} needs {missing} KV blocks, {self.num_free} free")
        new = [self._take() for _ in range(missing)]
        for b in new:
            self._ref_counts[b] += 1
        self._tables.setdefault(request_id, []).extend(new)
        return new

    def free(self, request_id: str) -> None:
        """Release every block of the request (no-op if it holds none); cached ones stay cached."""
        self._keyed.pop(request_id, None)
        for b in self._tables.pop(request_id, ()):
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                if b in self._key:
                    self._evictable[b] = None  # the most recently released: evicted last
                else:
                    self._free.append(b)

    # ---------------------------------------------------------------------------------------------------
    # Prefix cache
    # ---------------------------------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """The cached blocks that hold the longest run of full blocks at the start of `token_ids`, leaving
        at least one token to compute (its logits choose the next token). Takes nothing yet (`adopt`)."""
        if not self.prefix_caching:
            return []
        bs = self.block_size
        full = (len(token_ids) - 1) // bs  # whole blocks before the last token
        blocks, parent = [], _ROOT
        for i in range(full):
            block = self._cached.get((parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            if block is None:
                break
            blocks.append(block)
            parent = self._entry[block]
        return blocks

    def num_free_besides(self, blocks: list[int]) -> int:
        """`num_free` once `blocks` (cached ones a request is about to adopt) are taken out of it."""
        return self.num_free - sum(1 for b in blocks if self._ref_counts[b] == 0)

    def adopt(self, request_id: str, blocks: list[int], num_tokens: int) -> None:
        """Start the request's (empty) table with cached `blocks` from `match_prefix`, shared, and count the
        lookup of its `num_tokens` tokens (`queries`) and the tokens found (`hits`)."""
        assert not self.table(request_id), "adopt a prefix into an empty table only"
        if self.prefix_caching:
            self.queries += num_tokens
            self.hits += len(blocks) * self.block_size
        for b in blocks:
            if self._ref_counts[b] == 0:
                del self._evictable[b]
            self._ref_counts[b] += 1
        self._tables[request_id] = list(blocks)
        self._keyed[request_id] = (len(blocks), self._entry[blocks[-1]] if blocks else _ROOT)

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Key the request's blocks that are full of computed tokens (`num_computed` of `token_ids`), so
        later requests with the same prefix find them. Blocks keyed before are skipped."""
        if not self.prefix_caching:
            return
        table, bs = self.table(request_id), self.block_size
        done, parent = self._keyed.get(request_id, (0, _ROOT))
        full = min(num_computed // bs, len(table))
        for i in range(done, full):
            key = (parent, tuple(token_ids[i * bs : (i + 1) * bs]))
            b = table[i]
            if b not in self._key:
                twin = self._cached.get(key)
                if twin is not None:  # a twin computed the same prefix first: chain on through its entry
                    parent = self._entry[twin]
                    continue
                self._cached[key] = b
                self._key[b] = key
                self._entry[b] = self._next_entry
                self._next_entry += 1
            parent = self._entry[b]
        self._keyed[request_id] = (max(done, full), parent)

    def _take(self) -> int:
        """A block for new tokens: a never-used one, else the least recently released cached one."""
        if self._free:
            return self._free.popleft()
        b, _ = self._evictable.popitem(last=False)
        del self._cached[self._key.pop(b)]
        del self._entry[b]
        return b

    def check_invariants(self) -> None:
        """Exact accounting: every block is counted once per table holding it; a block with count 0 is
        either free or evictable (then cached), never both."""
        held = [0] * self.num_blocks
        for blocks in self._tables.values():
            for b in blocks:
                held[b] += 1
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            assert held[b] == self._ref_counts[b], f"block {b}: ref count {self._ref_counts[b]}, held {held[b]}"
            idle = held[b] == 0
            assert (b in free or b in self._evictable) == idle, f"block {b}: idle={idle} but not listed so"
            assert not (b in free and b in self._evictable), f"block {b}: free and evictable"
            assert (b in self._evictable) <= (b in self._key), f"block {b}: evictable but not cached"
        assert all(self._cached[k] == b for b, k in self._key.items()), "the key tables disagree"
        assert self._entry.keys() == self._key.keys(), "a cached block without an entry id, or the reverse"
