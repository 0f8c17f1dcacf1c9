"""End to end on the tiny model: batching, chunking, preemption and abort never change greedy tokens."""

from __future__ import annotations

import pytest
import torch
from engine_cases import PROMPTS, reference_greedy, reference_logits

from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.errors import RequestError

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
CHUNK_BUDGETS = (1, 5, 16)  # max_num_batched_tokens: one token per step, odd chunks, a block per step


def _greedy_tokens(engine, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [out.token_ids for out in engine.generate(list(prompts), params)]


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    """Each prompt alone through the reference loop."""
    from moe_runtime.checkpoint.loader import load_model

    model = load_model(tiny_model_dir, device="cpu")
    return [reference_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]


def test_mixed_length_batch_equals_each_alone(make_engine, expected):
    engine = make_engine()
    assert _greedy_tokens(engine) == expected
    for prompt, want in zip(PROMPTS, expected, strict=True):
        assert _greedy_tokens(engine, [prompt]) == [want]


@pytest.mark.parametrize("budget", CHUNK_BUDGETS)
def test_chunked_prefill_equals_unchunked(make_engine, expected, budget):
    engine = make_engine(engine__max_num_batched_tokens=budget)
    assert _greedy_tokens(engine) == expected


def test_preemption_gives_the_same_tokens(make_engine, expected):
    # 6 blocks of 4 tokens: the 38-token prompt alone needs 10 once it has generated, so requests preempt
    # each other (newest first) and are recomputed.
    engine = make_engine(cache__num_blocks=14, cache__block_size=4)
    assert _greedy_tokens(engine) == expected
    assert engine.make_stats().num_preemptions > 0


def test_max_num_seqs_limits_the_batch(make_engine, expected):
    engine = make_engine(engine__max_num_seqs=1)
    assert _greedy_tokens(engine) == expected


def test_abort_in_the_middle_frees_every_block(make_engine):
    engine = make_engine()
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    bm = engine.scheduler.block_manager
    assert bm.num_used > 0
    out = engine.abort("r2")
    assert out.finished and out.finish_reason == "abort"
    bm.check_invariants()
    assert engine.abort("r2") is None  # unknown now
    for i in (0, 1, 3):
        engine.abort(f"r{i}")
    assert bm.num_used == 0 and not engine.has_unfinished()
    engine.step()  # the runner hears of the drop at the next step
    assert engine.executor.runner.num_requests == 0


def test_seed_gives_the_same_tokens_in_any_batch(make_engine):
    engine = make_engine()
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], seeded)[0].token_ids
    mixed = engine.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], [other, seeded, other])[1].token_ids
    twice = engine.generate([PROMPTS[0], PROMPTS[0]], seeded)
    assert alone == mixed == twice[0].token_ids == twice[1].token_ids
    assert engine.generate([PROMPTS[0]], SamplingParams(**{**seeded.__dict__, "seed": 99}))[0].token_ids != alone


def test_logprobs_equal_log_softmax_of_reference_logits(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=5, temperature=0.7, seed=5, logprobs=3, ignore_eos=True)
    out = engine.generate([PROMPTS[3]], params)[0]
    model = engine.executor.model
    ref = torch.log_softmax(reference_logits(model, PROMPTS[3] + out.token_ids), dim=-1)  # [n, V]
    assert len(out.logprobs) == len(out.token_ids) == 5
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[len(PROMPTS[3]) - 1 + i]
        assert lp.token_id == tok
        torch.testing.assert_close(lp.logprob, row[tok].item(), atol=1e-4, rtol=0)
        top_vals, top_ids = row.topk(3)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        torch.testing.assert_close([v for _, v in lp.top], top_vals.tolist(), atol=1e-4, rtol=0)


def test_stop_token_ids_eos_and_length(make_engine, expected):
    engine = make_engine()
    stop_at = expected[0][4]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_at,)))[0]
    first = expected[0].index(stop_at)
    assert out.token_ids == expected[0][: first + 1] and out.finish_reason == "stop"
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert out.finish_reason == "length" and out.num_output_tokens == 3


def test_eos_finishes_unless_ignored(make_engine, expected):
    engine = make_engine()
    engine.eos_token_ids = (expected[1][2],)  # pretend the third greedy token is EOS
    out = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out.finish_reason == "eos" and out.token_ids == expected[1][: expected[1].index(expected[1][2]) + 1]
    out = engine.generate([PROMPTS[1]], GREEDY)[0]
    assert out.finish_reason == "length" and out.token_ids == expected[1]


def test_stop_string_across_token_boundaries(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = engine.generate([PROMPTS[2]], params)[0]
    tok = engine.tokenizer
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    # A stop string that starts inside one token's text and ends inside a later one.
    cut = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) - len(pieces[i - 2]) >= 2)
    start = len(pieces[cut - 2]) + 1
    stop = full.text[start : len(pieces[cut - 1]) + 1]
    assert len(stop) >= 2 and full.text.find(stop) == start
    out = engine.generate([PROMPTS[2]], SamplingParams(**{**params.__dict__, "stop": (stop, "zzzzzz")}))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:start]
    assert out.token_ids == full.token_ids[: cut]


def test_streamed_deltas_add_up(make_engine):
    engine = make_engine()
    engine.add_request("a", PROMPTS[2], SamplingParams(max_tokens=20, temperature=0.8, seed=1, ignore_eos=True))
    ids, text = [], ""
    while engine.has_unfinished():
        for out in engine.step():
            ids += out.new_token_ids
            text += out.new_text
            assert out.token_ids == ids and out.text == text
    assert text == engine.tokenizer.decode(ids)


BAD_PARAMS = (
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.1}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"stop": tuple(f"s{i}" for i in range(17))}, "stop"),
    ({"stop_token_ids": (99999,)}, "stop_token_ids"),
    ({"logprobs": -1}, "logprobs"),
)


@pytest.mark.parametrize(("kwargs", "field"), BAD_PARAMS)
def test_bad_params_are_rejected_naming_the_field(make_engine, kwargs, field):
    engine = make_engine()
    with pytest.raises(RequestError, match=rf"^{field}"):
        engine.add_request("x", PROMPTS[0], SamplingParams(**kwargs))
    assert not engine.has_unfinished()


def test_bad_prompts_and_duplicates_are_rejected(make_engine):
    engine = make_engine(cache__num_blocks=4, cache__block_size=4)
    with pytest.raises(RequestError, match="prompt_token_ids: empty"):
        engine.add_request("x", [], SamplingParams())
    with pytest.raises(RequestError, match=r"prompt_token_ids\[1\]=5000"):
        engine.add_request("x", [1, 5000], SamplingParams())
    with pytest.raises(RequestError, match="KV blocks but the cache holds 4"):
        engine.add_request("x", list(range(1, 15)), SamplingParams(max_tokens=8))
    engine.add_request("x", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="already in flight"):
        engine.add_request("x", [1, 2], SamplingParams(max_tokens=2))
    engine.abort("x")
