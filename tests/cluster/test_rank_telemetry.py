"""Rank-level telemetry without Ray: the executor's `RankStats` through the telemetry hook become the
snapshot's rank view (placement rank by rank, mean step and all-reduce times, expert bytes, restarts),
Prometheus families, `GetExpertStats` fields and the `stats` tables; placement changes are one log line."""

from __future__ import annotations

import doctest
import json
import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_runtime.cluster import placement_log
from moe_runtime.cluster.placement import Placement
from moe_runtime.cluster.rank_group import HostClock
from moe_runtime.commands.stats import render
from moe_runtime.server.convert import snapshot_to_proto, stats_to_dict
from moe_runtime.server.metrics import TelemetryCollector
from moe_runtime.telemetry import RankStats, Telemetry
from moe_runtime.telemetry import ranks as ranks_module

L, E, N = 2, 4, 2
# layer 0: expert 0 on both ranks, 1 and 3 on rank 1, 2 on rank 0; layer 1: round robin
PLACEMENT = Placement(N, (((0, 1), (1,), (0,), (1,)), ((0,), (1,), (0,), (1,))))
STEPS = (((0.010, 0.012), (0.006, 0.001)), ((0.020, 0.022), (0.012, 0.002)))  # (step_s, collective_s) per step


class Stats:
    """An engine stats stand-in: one step's router counts [L, E]."""

    def __init__(self, steps: int, counts: list[list[int]]):
        self.steps, self.router_counts, self.step_num_tokens = steps, counts, 1


@pytest.fixture
def telemetry() -> Telemetry:
    t = Telemetry(L, E, top_k=2, window_steps=8)
    shares = PLACEMENT.rank_shares()
    t.observe_step(RankStats(shares, (100, 300)))  # after start: no step yet
    for i, (step_s, collective_s) in enumerate(STEPS, start=1):
        t.observe_step(Stats(i, [[4, 2, 2, 0], [1, 1, 1, 1]]))
        t.observe_step(RankStats(shares, (100, 300), step_s, collective_s, restarts=1))
    return t


def test_doctests():
    assert doctest.testmod(ranks_module).failed == 0
    assert doctest.testmod(placement_log).failed == 0


def test_snapshot_has_the_rank_view(telemetry):
    snap = telemetry.snapshot()
    assert snap.rank_experts == [[[0, 2], [0, 2]], [[0, 1, 3], [1, 3]]]  # [N][L] expert ids
    assert snap.rank_expert_copies == [4, 5]
    assert snap.rank_step_s == pytest.approx([0.015, 0.017])  # means over the window's steps
    assert snap.rank_collective_s == pytest.approx([0.009, 0.0015])
    assert snap.rank_expert_bytes == [100, 300] and snap.worker_restarts == 1
    # window load: layer 0 [8, 4, 4, 0] with expert 0 split in two, layer 1 [2, 2, 2, 2]
    assert snap.rank_tokens == pytest.approx([4 + 4 + 2 + 2, 4 + 4 + 0 + 2 + 2])


def test_prometheus_families(telemetry):
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(telemetry, per_expert=True))
    families = {f.name: f.samples for f in text_string_to_metric_families(generate_latest(registry).decode())}

    def value(family: str, sample: str, **labels) -> float:
        return next(s.value for s in families[family] if s.name == sample and s.labels == labels)

    assert value("moe_runtime_rank_step_seconds", "moe_runtime_rank_step_seconds_total", rank="1") == \
        pytest.approx(0.034)
    assert value("moe_runtime_rank_collective_seconds", "moe_runtime_rank_collective_seconds_total", rank="0") == \
        pytest.approx(0.018)
    assert value("moe_runtime_rank_step_latency_seconds", "moe_runtime_rank_step_latency_seconds", rank="0") == 0.020
    assert value("moe_runtime_rank_expert_bytes", "moe_runtime_rank_expert_bytes", rank="1") == 300
    assert value("moe_runtime_worker_restarts", "moe_runtime_worker_restarts_total") == 1
    placement = families["moe_runtime_expert_placement"]
    assert len(placement) == 9  # one series per copy
    assert value("moe_runtime_expert_placement", "moe_runtime_expert_placement", layer="0", expert="0",
                 rank="1") == 0.5
    only_ranks = CollectorRegistry()
    only_ranks.register(TelemetryCollector(telemetry, per_expert=False))
    names = {f.name for f in text_string_to_metric_families(generate_latest(only_ranks).decode())}
    assert "moe_runtime_rank_window_tokens" in names and "moe_runtime_expert_placement" not in names


def test_no_rank_families_on_a_local_server():
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(Telemetry(L, E, 2), per_expert=True))
    names = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert not {n for n in names if n.startswith("moe_runtime_rank_")} and "moe_runtime_worker_restarts" not in names


def test_wire_round_trip_and_stats_tables(telemetry, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps titles and headers at the console's width
    snap = telemetry.snapshot()
    stats = stats_to_dict(snapshot_to_proto(snap))
    own = snap.to_dict()
    assert stats["rank_experts"] == own["rank_experts"]
    for key in ("rank_step_s", "rank_collective_s", "rank_expert_bytes", "worker_restarts", "rank_tokens",
                "rank_expert_copies"):
        assert stats[key] == pytest.approx(own[key]), key
    render(stats, "tokens_per_expert")
    out = capsys.readouterr().out
    words = " ".join(out.split())  # rich wraps a title to its table's width
    assert "worker restarts 1" in words and "own work ms" in words and "step ms" in words
    assert "placement: the ranks holding each expert" in words
    row = next(line for line in out.splitlines() if line.strip().startswith("0 ") and "0,1" in line)
    assert row.split()[1:] == ["0,1", "1", "0", "1"]  # layer 0: the ranks holding each expert


def test_placement_log_lines(caplog):
    new = Placement(N, (((0, 1), (1,), (0,), (1,)), ((0,), (1,), (0, 1), (1,))))  # expert 2 of layer 1 doubled
    with caplog.at_level(logging.INFO, logger="moe_runtime.cluster.placement"):
        placement_log.log_accepted("ipv4:127.0.0.1:5000", PLACEMENT, new, 0.25)
        placement_log.log_rejected("ipv4:127.0.0.1:5001", "INVALID_ARGUMENT", "placement.workers=3: ...")
    accepted, rejected = (json.loads(r.getMessage()) for r in caplog.records)
    assert accepted == {"event": "apply_placement", "by": "ipv4:127.0.0.1:5000", "accepted": True, "status": "OK",
                        "workers": 2, "copies_added": 1, "copies_removed": 0, "expert_copies": [4, 6],
                        "seconds": 0.25}
    assert rejected["accepted"] is False and rejected["status"] == "INVALID_ARGUMENT"
    assert caplog.records[1].levelno == logging.WARNING


def test_host_clock_sums_and_resets():
    clock = HostClock()
    for _ in range(2):
        with clock.timing():
            sum(range(20000))
    first = clock.take()
    assert first > 0 and clock.take() == 0.0
