"""Telemetry maths: imbalance, entropy, the sliding window, latency histograms, the snapshot shape."""

from __future__ import annotations

import doctest
import math
from types import SimpleNamespace

import pytest
import torch

from moe_runtime.telemetry import (
    ExpertLoadWindow,
    LatencyHistogram,
    Telemetry,
    imbalance,
    load,
    normalized_entropy,
    ranks,
)

LOADS = (  # (tokens per expert, imbalance, normalized entropy)
    ([4, 4, 4, 4], 1.0, 1.0),
    ([8, 0, 0, 0], 4.0, 0.0),
    ([2, 2, 0, 0], 2.0, 0.5),
    ([0, 0, 0, 0], 0.0, 0.0),
    ([3, 1], 1.5, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)),
)


@pytest.mark.parametrize("module", (load, ranks), ids=lambda m: m.__name__)
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize(("tokens", "want_imbalance", "want_entropy"), LOADS)
def test_imbalance_and_entropy(tokens, want_imbalance, want_entropy):
    assert imbalance(tokens) == pytest.approx(want_imbalance)
    assert normalized_entropy(tokens) == pytest.approx(want_entropy)


def test_window_slides_and_totals_accumulate():
    w = ExpertLoadWindow(num_layers=1, num_experts=2, window=2)
    for step in ([[1, 0]], [[0, 2]], [[3, 0]]):
        w.add(step)
    assert w.window == [[3, 2]]  # the first step fell out
    assert w.total == [[4, 2]]
    with pytest.raises(ValueError, match=r"expected \[1, 2\]"):
        w.add([[1, 2, 3]])


def test_histogram_buckets_and_percentiles():
    h = LatencyHistogram(buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 5.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 1), ("1.0", 3), ("+Inf", 4)]
    s = h.summary()
    assert (s.count, s.p50, s.p99) == (4, 0.5, 5.0) and s.mean == pytest.approx(1.5125)


def test_observe_step_counts_each_step_once_and_snapshot_is_json_shaped():
    t = Telemetry(num_layers=2, num_experts=2, top_k=1, window_steps=8)
    stats = SimpleNamespace(steps=1, router_counts=torch.tensor([[3, 1], [2, 2]]), step_num_tokens=4,
                            num_running=1, num_waiting=0, kv_blocks_total=10, kv_blocks_used=2, num_preemptions=0)
    t.observe_step(stats)
    t.observe_step(stats)  # the same step handed again (after an abort): not counted twice
    t.observe_request("length", queue_s=0.01, ttft_s=0.1, total_s=0.5, num_output_tokens=5)
    snap = t.snapshot().to_dict()
    assert snap["tokens_per_expert"] == [[3, 1], [2, 2]] and snap["tokens_processed"] == 4
    assert snap["imbalance"] == [1.5, 1.0] and snap["entropy"][1] == 1.0
    assert snap["layers"] == 2 and snap["experts"] == 2 and snap["kv_blocks_used"] == 2
    assert snap["time_per_output_token"]["p50"] == pytest.approx(0.1)  # (0.5 - 0.1) / 4
    assert t.tokens_computed == 4 and t.finished_counts() == {"length": 1}


def test_offload_counters_reach_the_snapshot():
    from moe_runtime.offload.stats import OffloadStats

    t = Telemetry(num_layers=1, num_experts=2, top_k=1)
    offload = OffloadStats(hits=3, misses=1, bytes_moved=4096, prefetch_guessed=4, prefetch_used=3)
    t.observe_step(SimpleNamespace(steps=1, router_counts=[[1, 0]], offload=offload))
    cache = t.snapshot().to_dict()["cache"]
    assert cache == {"hits": 3, "misses": 1, "bytes_moved": 4096, "prefetch_guessed": 4, "prefetch_used": 3,
                     "hit_rate": 0.75, "prefetch_accuracy": 0.75}
