"""Automatic rebalancing decides from the telemetry window alone: quiet below the threshold or without enough
tokens, moves to the planned placement above it (no Ray: the engine is a stand-in)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch

from moe_runtime.cluster.auto_rebalance import AutoRebalancer
from moe_runtime.cluster.expert_load import imbalance
from moe_runtime.cluster.planner import round_robin
from moe_runtime.config import AutoRebalanceConfig
from moe_runtime.telemetry import Telemetry

L, E, N = 2, 8, 2


class FakeEngine:
    """What the rebalancer uses of the `AsyncEngine`: the placement, and moving to a new one."""

    def __init__(self):
        self.placement = round_robin(L, E, N)

    async def apply_placement(self, placement):
        self.placement = placement


def _telemetry(counts: list[list[int]]) -> Telemetry:
    t = Telemetry(L, E, top_k=2, window_steps=8)
    t.observe_step(SimpleNamespace(steps=1, router_counts=counts))
    return t


def _check(counts, **cfg) -> tuple[bool, FakeEngine, Telemetry]:
    engine, telemetry = FakeEngine(), _telemetry(counts)
    rebalancer = AutoRebalancer(AutoRebalanceConfig(enabled=True, **cfg), engine, telemetry)
    return asyncio.run(rebalancer.check_once()), engine, telemetry


HOT_EVEN = [[400, 10, 300, 10, 200, 10, 100, 10]] * L  # round-robin puts every hot expert on rank 0


def test_moves_when_ranks_drift_apart():
    moved, engine, telemetry = _check(HOT_EVEN, min_tokens=100)
    assert moved
    load = torch.tensor(HOT_EVEN, dtype=torch.float64)
    assert imbalance(load, engine.placement)[0] < imbalance(load, round_robin(L, E, N))[0] - 0.05
    assert telemetry.snapshot().rank_imbalance < 1.1


def test_quiet_below_threshold_or_without_enough_tokens():
    assert not _check([[100] * E] * L, min_tokens=100)[0]  # balanced already
    assert not _check(HOT_EVEN, min_tokens=10_000)[0]  # too few tokens to trust
    assert not _check(HOT_EVEN, min_tokens=100, threshold=3.0)[0]
