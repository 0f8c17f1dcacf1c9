"""Automatic prefix caching: requests that share leading tokens share their KV blocks, with the same outputs.

Block manager units (keys, adoption, LRU eviction, exact accounting) and the engine end to end: shared
prefixes, preemption and abort with shared blocks, eviction under a small cache; greedy tokens equal with
the cache on and off, and the prompt tokens computed drop.
"""

from __future__ import annotations

import pytest
from engine_cases import PROMPTS

from moe_runtime.engine.block_manager import BlockManager
from moe_runtime.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BS = 4


def _filled(bm: BlockManager, rid: str, tokens: list[int]) -> list[int]:
    """Allocate and key a request's blocks as if all of `tokens` had been computed."""
    bm.allocate(rid, len(tokens))
    bm.cache_full_blocks(rid, tokens, len(tokens))
    return bm.table(rid)


def test_a_shared_prefix_is_found_block_by_block_leaving_one_token():
    bm = BlockManager(16, BS, prefix_caching=True)
    first = _filled(bm, "a", list(range(10)))  # blocks of [0..3], [4..7]; [8, 9] is not full
    assert bm.match_prefix(list(range(10))) == first[:2]
    assert bm.match_prefix([*range(8), 99]) == first[:2]
    assert bm.match_prefix(list(range(8))) == first[:1]  # all 8 cached: the last block is computed again
    assert bm.match_prefix([0, 1, 2, 99, 4, 5, 6, 7, 8]) == []  # the first block differs
    assert bm.match_prefix([9, *range(1, 9)]) == []


def test_adopted_blocks_are_shared_and_stay_cached_until_evicted():
    bm = BlockManager(4, BS, prefix_caching=True)
    a = _filled(bm, "a", list(range(8)))  # 2 blocks
    hits = bm.match_prefix([*range(8), 50, 51])
    bm.adopt("b", hits, 10)
    bm.allocate("b", 10)
    assert bm.table("b")[:2] == a and bm.num_used == 3 and (bm.queries, bm.hits) == (10, 8)
    bm.free("a")
    bm.free("b")
    bm.check_invariants()
    assert bm.num_used == 0 and bm.num_free == 4  # cached blocks count as free: they can be evicted
    assert bm.match_prefix([*range(8), 7]) == a  # still cached after both requests ended
    bm.allocate("c", 4 * BS)  # needs every block: the never-used one first, then the cached ones
    bm.check_invariants()
    assert bm.match_prefix([*range(8), 7]) == []  # evicted


def test_eviction_takes_the_least_recently_released_block_first():
    bm = BlockManager(3, BS, prefix_caching=True)
    old = _filled(bm, "old", [1, 1, 1, 1, 9])  # keys one block; the second is partial
    new = _filled(bm, "new", [2, 2, 2, 2])
    bm.free("old")
    bm.free("new")
    assert bm.num_free == 3
    bm.allocate("x", 2 * BS)  # the never-used block (old's partial one), then the LRU cached one: old's
    assert bm.match_prefix([1, 1, 1, 1, 5]) == [] and bm.match_prefix([2, 2, 2, 2, 5]) == new[:1]
    assert old[0] in bm.table("x")
    bm.check_invariants()


def test_keys_compare_by_value_so_equal_hashes_never_share_kv():
    bm = BlockManager(8, BS, prefix_caching=True)
    _filled(bm, "a", [1, 2, 3, 4, 5])
    assert bm.match_prefix([1, 2, 3, 5, 9]) == []  # a block is found only for its own tokens and parents



def test_a_block_whose_parent_was_evicted_is_never_found_under_a_new_parent():
    """Keys chain through entry ids, which are never reused: evicting a parent orphans its children, even
    when the same tokens are cached again later in the parent's old block."""
    bm = BlockManager(3, BS, prefix_caching=True)
    tokens = [*range(8), 99]
    a = _filled(bm, "a", tokens)  # [0..3] -> [4..7]
    bm.free("a")
    bm.allocate("x", BS)  # takes the never-used block: the cached ones stay
    bm.free("x")
    bm.allocate("y", 2 * BS)  # evicts [0..3] first (released before [4..7]), then x's block
    assert a[0] in bm.table("y") and bm.match_prefix(tokens) == []
    bm.free("y")
    again = _filled(bm, "b", list(range(4)))  # [0..3] cached afresh, with a new entry id
    assert bm.match_prefix(tokens) == again[:1]  # [4..7] still keyed under the old parent: not found
    bm.check_invariants()

def test_without_prefix_caching_nothing_is_kept():
    bm = BlockManager(4, BS)
    _filled(bm, "a", list(range(8)))
    bm.free("a")
    assert bm.match_prefix(list(range(9))) == [] and bm.num_free == 4
    bm.check_invariants()


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------
PREFIX = [1, *range(100, 139)]  # 40 tokens: 2.5 blocks of 16
SHARED = [PREFIX + [7, 8, 9], PREFIX + [300], PREFIX + [42, 43, 44, 45, 46, 47, 48]]


def _run(make_engine, prompts, **overrides):
    engine = make_engine(**overrides)
    outs = []
    for p in prompts:  # one after another: each finds the blocks the earlier ones left
        outs.append(engine.generate([p], GREEDY)[0].token_ids)
    return outs, engine.make_stats()


@pytest.mark.parametrize("chunk", [2048, 16])
def test_shared_prefixes_give_the_same_tokens_and_compute_less(make_engine, chunk):
    off, off_stats = _run(make_engine, SHARED, cache__prefix_caching="false", engine__max_num_batched_tokens=chunk)
    on, on_stats = _run(make_engine, SHARED, engine__max_num_batched_tokens=chunk)
    assert on == off
    assert on_stats.prefix_cache_hits == 2 * 32  # the 2nd and 3rd prompts find 2 full blocks each
    assert on_stats.prefix_cache_queries == sum(len(p) for p in SHARED)
    assert off_stats.num_prompt_tokens - on_stats.num_prompt_tokens == 2 * 32
    assert off_stats.prefix_cache_hits == 0


def test_batched_requests_and_generated_tokens_are_cached_too(make_engine):
    """A batch sharing a prefix; then a follow-up whose prompt is a finished request's whole sequence
    (a second chat turn) finds the blocks its answer filled."""
    engine = make_engine()
    first = engine.generate(SHARED, GREEDY)
    turn = SHARED[0] + first[0].token_ids + [5, 6]
    hits = engine.make_stats().prefix_cache_hits
    again = engine.generate([turn], GREEDY)[0].token_ids
    assert engine.make_stats().prefix_cache_hits - hits == (len(turn) - 1) // 16 * 16
    reference = make_engine(cache__prefix_caching="false")
    assert again == reference.generate([turn], GREEDY)[0].token_ids
    assert [o.token_ids for o in first] == [o.token_ids for o in reference.generate(SHARED, GREEDY)]


def test_preemption_and_abort_with_shared_blocks(make_engine):
    """A cache too small for every request at once: preempted requests come back through the prefix cache,
    an aborted request gives back only its own blocks; tokens equal the run without caching."""
    prompts = [*SHARED, *PROMPTS]
    want = make_engine(cache__prefix_caching="false", cache__num_blocks=256).generate(prompts, GREEDY)
    engine = make_engine(cache__num_blocks=12)
    got = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert engine.make_stats().num_preemptions > 0
    engine.add_request("x", SHARED[1], SamplingParams(max_tokens=40, ignore_eos=True))
    engine.add_request("y", SHARED[2], SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()
    engine.abort("x")
    engine.scheduler.block_manager.check_invariants()
    while engine.has_unfinished():
        engine.step()


def test_offloaded_experts_with_the_prefix_cache(make_engine):
    """The cache holds attention KV only, so experts streamed from host memory change nothing: the same
    tokens as the all-resident engine without caching, with the prefix found."""
    want, _ = _run(make_engine, SHARED, cache__prefix_caching="false")
    got, stats = _run(make_engine, SHARED, offload__enabled="true", offload__resident_experts_per_layer=2,
                      offload__miss="fetch")
    assert got == want
    assert stats.prefix_cache_hits == 2 * 32 and stats.offload is not None and stats.offload.misses > 0
