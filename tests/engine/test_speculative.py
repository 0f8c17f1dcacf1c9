"""Speculative decoding: n-gram and draft-model proposals, verified in one forward.

Greedy outputs must equal decoding without speculation, token for token, through chunked prefill,
preemption, stop conditions and max_tokens; sampled tokens must keep the model's distribution (checked
statistically on a small vocabulary); the counters must add up.
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import load_config
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.sampler import Sampler
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.engine.spec.ngram import NgramProposer
from moe_runtime.engine.spec.proposer import ProposalRequest
from moe_runtime.errors import ConfigError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
# Prompts that repeat themselves, so prompt lookup has something to find.
REPEATING = ([1, *range(50, 70), *range(50, 60)], [1, 5, 6, 7, 8, 5, 6, 7], [1, *[300, 301, 302] * 6])


def _ask(tokens: list[int], k: int, rid: str = "r") -> ProposalRequest:
    return ProposalRequest(rid, tokens, [], k)


# ---------------------------------------------------------------------------------------------------------
# Proposals
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,k,want", [
    ([1, 2, 3, 4, 1, 2], 3, [3, 4, 1]),  # the suffix (1, 2) was followed by 3, 4, 1
    ([5, 1, 2, 9, 7, 2], 3, [9, 7, 2]),  # only (2,) matches: the longest n-gram that occurred
    ([1, 2, 7, 1, 2, 8, 1, 2], 2, [8, 1]),  # the most recent occurrence wins
    ([4, 4, 4], 5, [4]),  # what followed is all there is: shorter than k
    ([1, 2, 3], 2, []),  # nothing repeats
])
def test_ngram_proposals(tokens, k, want):
    assert NgramProposer(1, 2).propose([_ask(tokens, k)]) == [want]


def test_ngram_index_grows_with_the_tokens_as_a_fresh_one_would():
    """The incremental index, fed a sequence a few tokens at a time, proposes what a fresh index does."""
    seq = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    grown = NgramProposer(2, 4)
    for end in range(5, 300, 3):
        fresh = NgramProposer(2, 4)
        assert grown.propose([_ask(seq[:end], 4)]) == fresh.propose([_ask(seq[:end], 4)]), end
    grown.drop("r")
    assert grown._indexes == {}


# ---------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------
def test_greedy_verification_accepts_while_the_argmax_agrees():
    logits = torch.full((3, 10), -5.0)
    logits[0, 5] = logits[1, 9] = logits[2, 4] = 5.0
    out = Sampler(0).verify(logits, [SamplingParams(temperature=0.0)] * 3, [10, 11, 12], [5, 7, -1])
    tokens, accepted, logprobs, _ = out.to_host_verified(torch.zeros(1))
    assert tokens == [5, 9, 4] and accepted == [True, False, False] and logprobs == [None] * 3


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.8),
])
@pytest.mark.parametrize("draft", [1, 3, 5])  # likely, unlikely, and cut by top-k/top-p in some cases
def test_sampled_verification_keeps_the_distribution(params, draft):
    """The token a row emits (the draft when accepted, else the residual draw) is distributed as plain
    sampling would be: 200k rows in one call against the sampler's own distribution, within 0.006 (about 5
    standard errors at p = 0.5)."""
    V, N = 6, 200_000
    logits = torch.tensor([[0.5, 2.0, 1.0, 0.2, -1.0, 1.5]]).expand(N, V).contiguous()
    sampler = Sampler(seed=1)
    verified = sampler.verify(logits, [params] * N, [7] * N, [draft] * N)
    plain = sampler(logits, [params] * N, [7] * N)
    got = torch.bincount(verified.token_ids, minlength=V) / N
    want = torch.bincount(plain.token_ids, minlength=V) / N
    torch.testing.assert_close(got, want, atol=0.006, rtol=0)
    accept_rate = verified.accepted.float().mean()
    torch.testing.assert_close(accept_rate, want[draft], atol=0.006, rtol=0)  # accepted with p(draft)


def test_seeded_verification_is_reproducible_and_rows_without_a_draft_never_accept():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=1.0, seed=11)] * 4
    a = Sampler(0).verify(logits, params, [3, 4, 5, 6], [7, 8, 9, -1])
    b = Sampler(99).verify(logits, params, [3, 4, 5, 6], [7, 8, 9, -1])
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.accepted, b.accepted)
    assert not a.accepted[3]


# ---------------------------------------------------------------------------------------------------------
# The engine, on tiny-trained in float32: a trained model repeats itself (loops, copied code), which is what
# prompt lookup finds; the random tiny model's outputs never repeat. float32: greedy tokens are exact.
# ---------------------------------------------------------------------------------------------------------
CODE = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n"
        "def fibonacci_list(n):\n")


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    from moe_runtime.presets.tiny_trained import write_tiny_trained

    return write_tiny_trained(tmp_path_factory.mktemp("tiny-trained"))


@pytest.fixture
def engines(trained_dir):
    made = []

    def make(**sets):
        overrides = [f"model.path={trained_dir}", "model.dtype=float32", "cache.num_blocks=256", "engine.seed=0"]
        engine = LLMEngine(load_config(overrides=overrides + [f"{k.replace('__', '.')}={v}" for k, v in sets.items()]))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.scheduler.block_manager.check_invariants()
        assert engine.scheduler.block_manager.num_used == 0, "KV blocks leaked"
        engine.shutdown()


def _prompts(engine) -> list[list[int]]:
    return [list(p) for p in REPEATING] + [engine.encode(CODE), engine.encode("import os\nimport sys\n")]


def _generate(make, params=GREEDY, **sets):
    engine = make(**sets)
    outs = engine.generate(_prompts(engine), params)
    return [o.token_ids for o in outs], engine.make_stats(), engine


NGRAM = {"speculative__method": "ngram", "speculative__num_tokens": 4}


@pytest.mark.parametrize("sets", [
    {},
    {"engine__max_num_batched_tokens": 7},  # chunked prefill; a small budget also trims k
    {"cache__num_blocks": 10},  # preemption: speculation must never be its cause
    {"cache__prefix_caching": "false", "speculative__ngram_min": 2},
])
def test_ngram_greedy_outputs_equal_plain_decoding(engines, sets):
    want, _, _ = _generate(engines, **sets)
    got, stats, engine = _generate(engines, **NGRAM, **sets)
    assert got == want
    assert stats.spec_verifications > 0 and 0 < stats.spec_accepted_tokens <= stats.spec_proposed_tokens
    assert stats.num_generated_tokens == sum(len(t) for t in want)
    runner = engine.executor.runner  # a finished request is dropped at the next step: the last one is left
    assert set(runner.proposer._indexes) <= set(runner._states) and len(runner._states) <= 1
    if "cache__num_blocks" in sets:
        assert stats.num_preemptions > 0


def test_draft_equal_to_the_model_proposes_what_it_decodes(engines, trained_dir):
    """The model as its own draft: its greedy proposals are the model's greedy tokens, so nearly all are
    accepted (a near-tie between two logits may break differently in another batch shape) and the
    outputs equal plain decoding."""
    want, _, _ = _generate(engines)
    got, stats, _ = _generate(engines, speculative__method="draft", speculative__draft_model=str(trained_dir),
                              speculative__num_tokens=3)
    assert got == want
    assert stats.spec_accepted_tokens >= 0.9 * stats.spec_proposed_tokens > 0


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 6])
def test_max_tokens_and_stop_tokens_cut_accepted_proposals(engines, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    want, _, _ = _generate(engines, params)
    got, _, _ = _generate(engines, params, **NGRAM)
    assert got == want and all(len(t) == max_tokens for t in got)
    stop = want[1][-1]  # a token early in the second output: generation ends there, inclusive
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[stop])
    plain, _, _ = _generate(engines, params)
    spec, _, _ = _generate(engines, params, **NGRAM)
    assert spec == plain and spec[1][-1] == stop


def test_sampled_and_logprob_requests_speculate_too(engines):
    """Seeded sampling reproduces across runs with speculation on; every token gets its logprob."""
    params = SamplingParams(max_tokens=16, temperature=0.3, seed=5, logprobs=2, ignore_eos=True)
    engine = engines(**NGRAM)
    first = engine.generate(_prompts(engine), params)
    again = engines(**NGRAM).generate(_prompts(engine), params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    for out in first:
        assert len(out.token_ids) == 16 and [lp.token_id for lp in out.logprobs] == out.token_ids
    stats = engine.make_stats()
    assert stats.spec_verifications > 0 and stats.spec_accepted_tokens > 0


@pytest.mark.parametrize("sets,match", [
    (["speculative.method=draft"], "needs draft_model"),
    (["speculative.draft_model=/x"], "is set but method='none'"),
    (["speculative.method=ngram", "speculative.ngram_min=3", "speculative.ngram_max=2"], "ngram_min=3 > ngram_max=2"),
    (["speculative.num_tokens=0"], "num_tokens"),
    (["executor=ray", "speculative.method=ngram"], "Ray workers run no proposer"),
])
def test_config_errors_name_the_field(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=sets)
