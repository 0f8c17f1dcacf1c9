"""Automatic rebalancing: replan from the telemetry window when the ranks' load drifts apart.

Every `placement.auto_rebalance.interval_s` the server's rebalancer:
  1. reads the window's routed pairs [L, E] from telemetry (skips while it holds fewer than `min_tokens`);
  2. measures the current placement's imbalance across ranks (sum of per-layer max / mean, the planner's
     measure) and stops there unless it exceeds `threshold`;
  3. plans a placement from that load (`plan_placement`, `redundant` extra copies per layer) and stops
     unless it predicts at least `min_gain` less imbalance;
  4. moves the experts between two engine steps (`AsyncEngine.apply_placement`), exactly as the
     `ApplyPlacement` RPC does, points telemetry's rank view at the new plan, and logs the move as the RPC
     does (`placement_log`, by "auto_rebalance").
A failed move is logged and retried at the next interval; requests never see it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch

from moe_runtime.cluster.expert_load import imbalance
from moe_runtime.cluster.placement_log import log_accepted
from moe_runtime.cluster.planner import plan_placement
from moe_runtime.config import AutoRebalanceConfig

log = logging.getLogger(__name__)


class AutoRebalancer:
    """Owns nothing but its loop: the executor owns the placement, telemetry the load."""

    def __init__(self, cfg: AutoRebalanceConfig, engine: Any, telemetry: Any):
        """engine: the `AsyncEngine` (its `placement` and `apply_placement`); telemetry: the load window."""
        self.cfg, self.engine, self.telemetry = cfg, engine, telemetry
        self.applied = 0  # placements moved to so far (tests, logs)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 - never take the server down; try again next interval
                log.exception("automatic rebalancing failed; retrying in %.0f s", self.cfg.interval_s)

    async def check_once(self) -> bool:
        """Steps 1-4 once. Returns whether a new placement was applied."""
        snap = self.telemetry.snapshot()
        load = torch.tensor(snap.tokens_per_expert, dtype=torch.float64)  # [L, E]
        if load.numel() == 0 or load[0].sum().item() < self.cfg.min_tokens:
            return False
        current = self.engine.placement
        now, _ = imbalance(load, current)
        if now <= self.cfg.threshold:
            return False
        plan, report = plan_placement(load, current.workers, self.cfg.redundant, baseline=current)
        if plan == current or report.imbalance_after > now - self.cfg.min_gain:
            return False
        started = time.monotonic()
        await self.engine.apply_placement(plan)
        self.telemetry.set_rank_shares(plan.rank_shares())
        self.applied += 1
        log_accepted("auto_rebalance", current, plan, time.monotonic() - started,
                     rank_imbalance=round(now, 4), predicted_rank_imbalance=round(report.imbalance_after, 4))
        return True
