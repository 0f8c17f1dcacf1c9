"""Sampler and detokenizer units: truncation rules, seeding, UTF-8-safe deltas, stop strings held back."""

from __future__ import annotations

import doctest

import pytest
import torch

from moe_runtime.engine import sampler as sampler_module
from moe_runtime.engine.detokenizer import IncrementalDetokenizer
from moe_runtime.engine.draws import hash_uniform, seed_as_int64
from moe_runtime.engine.sampler import Sampler
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.tokenizer import Tokenizer

LOGITS = torch.tensor([[2.0, 1.9, 0.5, -1.0, 1.8, 0.0]])  # token 0 most likely, then 1, then 4


def sample(sampler, logits, params, positions):
    """The sampler's tokens and logprobs on the host, as the runner gets them."""
    return sampler(logits, params, positions).to_host()


@pytest.mark.parametrize(
    "params",
    (
        SamplingParams(temperature=5.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=0.01),
        SamplingParams(temperature=5.0, min_p=1.0),
        SamplingParams(temperature=5.0, top_k=1, seed=3),
    ),
)
def test_truncation_to_one_token_is_greedy(params):
    sampler = Sampler(seed=0)
    for pos in range(50):
        assert sample(sampler, LOGITS, [params], [pos])[0] == [0]


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    sampler = Sampler(seed=0)
    seen_k = {sample(sampler, LOGITS, [SamplingParams(temperature=3.0, top_k=3)], [0])[0][0] for _ in range(300)}
    assert seen_k == {0, 1, 4}
    # p(0), p(1) at temperature 1 sum to ~0.55: top_p=0.5 keeps exactly those two.
    seen_p = {sample(sampler, LOGITS, [SamplingParams(top_p=0.5)], [0])[0][0] for _ in range(300)}
    assert seen_p == {0, 1}
    seeded = [SamplingParams(temperature=3.0, top_k=3, seed=11)] * 300  # one batch, one position per row
    assert set(sample(sampler, LOGITS.expand(300, -1), seeded, list(range(300)))[0]) == {0, 1, 4}


def test_sampling_follows_the_distribution():
    sampler = Sampler(seed=0)
    probs = torch.softmax(LOGITS[0], dim=-1)
    draws = torch.tensor([sample(sampler, LOGITS, [SamplingParams()], [0])[0][0] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


@pytest.mark.parametrize("vary", ("position", "seed"))
def test_seeded_sampling_follows_the_distribution(vary):
    """4000 seeded draws, one per position (or per seed): the hash's draws behave like Exp(1) ones."""
    n = 4000
    params = [SamplingParams(seed=7 if vary == "position" else 1000 + i) for i in range(n)]
    positions = list(range(n)) if vary == "position" else [5] * n
    draws = torch.tensor(sample(Sampler(seed=0), LOGITS.expand(n, -1), params, positions)[0])
    freq = torch.bincount(draws, minlength=6).float() / n
    torch.testing.assert_close(freq, torch.softmax(LOGITS[0], dim=-1), atol=0.03, rtol=0)


def test_seeded_rows_ignore_the_rest_of_the_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(seed=7)
    alone = sample(Sampler(seed=1), logits[1:2], [seeded], [10])[0]
    batch = sample(Sampler(seed=2), logits, [SamplingParams(), seeded, SamplingParams(temperature=0)], [3, 10, 4])[0]
    assert batch[1] == alone[0]
    assert batch[2] == int(logits[2].argmax())


def test_seeds_and_positions_change_the_draws():
    logits = torch.zeros(1, 1000)  # uniform: every draw is the hash's argmin of q
    tokens = {s: [sample(Sampler(), logits, [SamplingParams(seed=s)], [p])[0][0] for p in range(20)] for s in (1, 2)}
    assert tokens[1] != tokens[2]
    assert len(set(tokens[1])) > 15  # positions differ too
    assert tokens[1] == [sample(Sampler(), logits, [SamplingParams(seed=1)], [p])[0][0] for p in range(20)]


# One row of each kind: (params, position). Seeded and greedy rows must match the row sampled alone exactly.
MIXED_ROWS = (
    (SamplingParams(temperature=0), 3),
    (SamplingParams(temperature=0, logprobs=2), 9),
    (SamplingParams(seed=5), 17),
    (SamplingParams(temperature=0.7, top_k=4, seed=6, logprobs=0), 2),
    (SamplingParams(temperature=1.3, top_p=0.3, seed=2**70 + 1, logprobs=5), 40),
    (SamplingParams(min_p=0.2, seed=-8), 0),
    (SamplingParams(temperature=0.9), 5),
    (SamplingParams(top_k=3, logprobs=1), 6),
    (SamplingParams(top_p=0.5, min_p=0.1), 7),
)


def test_mixed_batch_gives_each_row_what_it_gets_alone():
    logits = 2 * torch.randn(len(MIXED_ROWS), 64, generator=torch.Generator().manual_seed(1))
    params, positions = [p for p, _ in MIXED_ROWS], [pos for _, pos in MIXED_ROWS]
    for trial in range(20):  # unseeded rows change between trials; the rest must not
        tokens, logprobs = sample(Sampler(seed=trial), logits, params, positions)
        for i, (p, pos) in enumerate(MIXED_ROWS):
            alone_tokens, alone_logprobs = sample(Sampler(seed=100 + trial), logits[i : i + 1], [p], [pos])
            if p.greedy or p.seed is not None:
                assert tokens[i] == alone_tokens[0], (i, p)
                assert logprobs[i] == alone_logprobs[0]
            if p.greedy:
                assert tokens[i] == int(logits[i].argmax())
            if p.top_k > 0:
                assert tokens[i] in logits[i].topk(p.top_k).indices.tolist()
            assert (logprobs[i] is None) == (p.logprobs is None)


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = 3 * torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.5, top_k=10, seed=1, logprobs=3), SamplingParams(),
              SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=2.0, logprobs=20)]
    tokens, logprobs = sample(Sampler(seed=0), logits, params, [1, 2, 3, 4])
    ref = torch.log_softmax(logits, dim=-1)  # before temperature
    assert logprobs[1] is None
    for i in (0, 2, 3):
        lp, n = logprobs[i], params[i].logprobs
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(ref[i, tokens[i]].item(), abs=1e-6)
        top_vals, top_ids = ref[i].topk(n)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-6)


def test_router_counts_ride_along():
    counts = torch.arange(6).view(2, 3)
    tokens, logprobs, host = Sampler(seed=0)(LOGITS, [SamplingParams(temperature=0)], [0]).to_host_with(counts)
    assert tokens == [0] and logprobs == [None] and torch.equal(host, counts)


def test_doctests():
    assert doctest.testmod(sampler_module).failed == 0


def _splitmix_u(seed: int, position: int, token: int) -> float:
    """hash_uniform in Python integers: splitmix64 (Vigna) with an explicit mod 2**64."""
    mask = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = mix(mix(seed & mask) ^ position)
    return ((mix((key + (token + 1) * 0x9E3779B97F4A7C15) & mask) >> 40) | 1) / 2**24


def test_hash_is_splitmix64():
    seeds, positions = (0, 7, -1, 2**70 + 5, 123456789), (0, 10, 3, 99, 2**40)
    u = hash_uniform(torch.tensor([seed_as_int64(s) for s in seeds]), torch.tensor(positions), 300)  # [5, 300]
    ref = [[_splitmix_u(s, p, t) for t in range(300)] for s, p in zip(seeds, positions, strict=True)]
    assert torch.equal(u, torch.tensor(ref, dtype=torch.float32))
    assert u[0, 0].item() == (0xE220A8397B1DCDAF >> 40 | 1) / 2**24  # splitmix64(0)'s first word
    assert 0 < u.min() and u.max() < 1


def _chi_square(buckets: torch.Tensor, num_buckets: int) -> float:
    counts = torch.bincount(buckets.flatten(), minlength=num_buckets).double()
    expected = buckets.numel() / num_buckets
    return ((counts - expected) ** 2 / expected).sum().item()


def test_hash_is_uniform():
    """u over 64 seeds x 64 positions x 256 tokens: mean 1/2, flat over 256 buckets, and no dependence
    between neighbouring tokens, positions or seeds (pairs flat over 16 x 16 buckets). A chi-square with
    255 degrees of freedom has mean 255 and sd 22.6: 400 is 6 sd out, and a hash missing a mixing step
    (or shifting arithmetically) lands in the thousands."""
    seeds = torch.arange(64).repeat_interleave(64)  # [4096]
    positions = torch.arange(64).repeat(64)
    u = hash_uniform(seeds, positions, 256).view(64, 64, 256)  # [seed, position, token]
    assert abs(u.mean().item() - 0.5) < 0.002  # sd of the mean: 0.29 / sqrt(2**20) = 0.0003
    assert _chi_square((u * 256).long(), 256) < 400
    b = (u * 16).long()  # [64, 64, 256] in 0..15
    for dim in range(3):
        first, second = b.narrow(dim, 0, b.shape[dim] - 1), b.narrow(dim, 1, b.shape[dim] - 1)
        assert _chi_square(first * 16 + second, 256) < 400, dim


@pytest.mark.gpu
def test_cuda_draws_equal_cpu_draws_without_a_host_sync():
    seeds = torch.tensor([seed_as_int64(s) for s in (0, 1, -5, 2**63 + 9)])
    positions = torch.tensor([0, 1, 1000, 2**33])
    torch.testing.assert_close(hash_uniform(seeds.cuda(), positions.cuda(), 32000).cpu(),
                               hash_uniform(seeds, positions, 32000), rtol=0, atol=0)
    logits = 2 * torch.randn(64, 32000, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(seed=i, temperature=0.8, top_p=0.95, top_k=100 if i % 2 else -1,
                             logprobs=3 if i % 3 == 0 else None) for i in range(63)] + [SamplingParams()]
    positions = list(range(64))
    cpu_tokens, cpu_logprobs = sample(Sampler(seed=0), logits, params, positions)
    counts = torch.arange(12, device="cuda").view(3, 4)
    cuda_logits, sampler = logits.cuda(), Sampler(seed=0)
    sampler(cuda_logits, params, positions).to_host()  # warm-up: allocator pools, generator, lazy kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the sampler raises
    try:
        out = sampler(cuda_logits, params, positions)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens, logprobs, host_counts = out.to_host_with(counts)
    assert tokens[:63] == cpu_tokens[:63]
    assert torch.equal(host_counts, counts.cpu())
    for i in range(0, 63, 3):
        assert logprobs[i].token_id == cpu_logprobs[i].token_id
        assert logprobs[i].logprob == pytest.approx(cpu_logprobs[i].logprob, abs=1e-5)
        assert logprobs[i].logprob == out.chosen_logprobs[i // 3].item()  # the packed copy is bit-exact
        assert [t for t, _ in logprobs[i].top] == [t for t, _ in cpu_logprobs[i].top]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


def test_deltas_never_split_a_utf8_character(tokenizer):
    text = "naïve 日本語 ok → ∑ 🙂 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer.backend)
    deltas = []
    for t in ids:
        detok.append(t)
        deltas.append(detok.take_delta(finished=False))
    deltas.append(detok.take_delta(finished=True))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(ids) > len(text.encode()) // 4  # byte-level pieces: multi-byte characters span tokens


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tokenizer):
    text = "the cat sat on the mat"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer.backend, stop=("t on", "zebra"))
    streamed, stopped_at = "", None
    for i, t in enumerate(ids):
        if detok.append(t):
            stopped_at = i
            break
        streamed += detok.take_delta(finished=False)
        assert "the cat sa".startswith(streamed)  # nothing of the stop string was handed out
    assert stopped_at is not None
    streamed += detok.take_delta(finished=True)
    assert streamed == detok.text == "the cat sa"
