"""Sampler and detokenizer units: truncation rules, seeding, UTF-8-safe deltas, stop strings held back."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.engine.detokenizer import IncrementalDetokenizer
from moe_runtime.engine.sampler import Sampler
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.tokenizer import Tokenizer

LOGITS = torch.tensor([[2.0, 1.9, 0.5, -1.0, 1.8, 0.0]])  # token 0 most likely, then 1, then 4


@pytest.mark.parametrize(
    "params",
    (
        SamplingParams(temperature=5.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=0.01),
        SamplingParams(temperature=5.0, min_p=1.0),
    ),
)
def test_truncation_to_one_token_is_greedy(params):
    sampler = Sampler(seed=0)
    for pos in range(50):
        assert sampler(LOGITS, [params], [pos])[0] == [0]


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    sampler = Sampler(seed=0)
    seen_k = {sampler(LOGITS, [SamplingParams(temperature=3.0, top_k=3)], [0])[0][0] for _ in range(300)}
    assert seen_k == {0, 1, 4}
    # p(0), p(1) at temperature 1 sum to ~0.55: top_p=0.5 keeps exactly those two.
    seen_p = {sampler(LOGITS, [SamplingParams(top_p=0.5)], [0])[0][0] for _ in range(300)}
    assert seen_p == {0, 1}


def test_sampling_follows_the_distribution():
    sampler = Sampler(seed=0)
    probs = torch.softmax(LOGITS[0], dim=-1)
    draws = torch.tensor([sampler(LOGITS, [SamplingParams()], [0])[0][0] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_seeded_rows_ignore_the_rest_of_the_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(seed=7)
    alone = Sampler(seed=1)(logits[1:2], [seeded], [10])[0]
    batch = Sampler(seed=2)(logits, [SamplingParams(), seeded, SamplingParams(temperature=0)], [3, 10, 4])[0]
    assert batch[1] == alone[0]
    assert batch[2] == int(logits[2].argmax())


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
