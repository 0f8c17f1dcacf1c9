"""Benchmark workloads: length distributions parsed with clear errors, seeded prompts with the shared
prefix, Poisson arrivals at the asked rate; the open and closed loops pace requests as they say."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from moe_runtime.bench.report import RequestResult
from moe_runtime.bench.runner import closed_loop, run
from moe_runtime.bench.workload import TOKEN_ID_RANGE, LengthDist, arrival_times, make_workload


@pytest.mark.parametrize(("spec", "bad"), [("fixed:0", "N must be"), ("uniform:9:3", "LOW <= HIGH"),
                                           ("normal:0:1", "MEAN must be"), ("gamma:1:2", "allowed: fixed:N"),
                                           ("fixed:x", "allowed: fixed:N"), ("uniform:4", "allowed: fixed:N")])
def test_bad_length_specs(spec, bad):
    with pytest.raises(ValueError) as err:
        LengthDist.parse(spec, "--prompt-len")
    assert str(err.value).startswith(f"--prompt-len={spec!r}") and bad in str(err.value)


def test_lengths_follow_their_distribution():
    import random

    rng = random.Random(0)
    assert {LengthDist.parse("fixed:7", "x").sample(rng) for _ in range(10)} == {7}
    uniform = [LengthDist.parse("uniform:3:5", "x").sample(rng) for _ in range(300)]
    assert set(uniform) == {3, 4, 5}
    normal = [LengthDist.parse("normal:100:10", "x").sample(rng) for _ in range(2000)]
    assert abs(statistics.mean(normal) - 100) < 1.5 and abs(statistics.stdev(normal) - 10) < 1.5
    assert min(LengthDist.parse("normal:1:50", "x").sample(rng) for _ in range(200)) == 1  # clipped at 1
    assert str(LengthDist.parse("normal:128:32", "x")) == "normal:128:32"


def test_workload_is_seeded_with_a_shared_prefix():
    items = make_workload(20, LengthDist.parse("uniform:4:12", "p"), LengthDist.parse("fixed:9", "o"),
                          shared_prefix_tokens=6, seed=3)
    assert items == make_workload(20, LengthDist.parse("uniform:4:12", "p"), LengthDist.parse("fixed:9", "o"),
                                  shared_prefix_tokens=6, seed=3)
    assert len({tuple(i.prompt_token_ids[:6]) for i in items}) == 1
    assert len({tuple(i.prompt_token_ids[6:]) for i in items}) == 20
    assert all(10 <= len(i.prompt_token_ids) <= 18 and i.max_tokens == 9 for i in items)
    low, high = TOKEN_ID_RANGE
    assert all(low <= t < high for i in items for t in i.prompt_token_ids)
    assert make_workload(20, LengthDist.parse("fixed:4", "p"), LengthDist.parse("fixed:9", "o"), seed=4) != \
        make_workload(20, LengthDist.parse("fixed:4", "p"), LengthDist.parse("fixed:9", "o"), seed=3)


def test_poisson_arrivals():
    times = arrival_times(4000, rate=50.0, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.1)  # exponential: std = mean
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate=0"):
        arrival_times(3, 0)


def test_closed_loop_keeps_concurrency_requests_in_flight():
    items = make_workload(12, LengthDist.parse("fixed:2", "p"), LengthDist.parse("fixed:2", "o"))
    in_flight, peak = 0, 0

    async def send(item):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.005)
        in_flight -= 1
        return RequestResult(prompt_tokens=item.index, start_s=0.0, end_s=0.0)

    results, _ = asyncio.run(closed_loop(send, items, concurrency=3))
    assert peak == 3 and [r.prompt_tokens for r in results] == list(range(12))  # in item order
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(run(send, items, rate=1.0, concurrency=2))
