"""Expert-load and latency telemetry: the numbers placement and offloading decisions are made from.

The engine's hot path only fills its plain `Stats` dataclass (router counts `[L, E]` accumulated on the
device, engine gauges, the expert store's `OffloadStats` as `stats.offload` when offloading is on). Once per
step the engine's `on_step` hook hands that object to `Telemetry.observe_step`, which does the one host copy
of the counts and keeps:

- `load.py`: a sliding window of routed (token, expert) pairs per layer and expert (`telemetry.window_steps`
  steps) and the totals since start; per-layer imbalance (max / mean over experts) and normalized router
  entropy (H(p) / log E) of the window;
- `latency.py`: latency histograms (queue time, time to first token, time per output token) fed once per
  finished request by the server;
- `ranks.py`: with the Ray executor, `set_rank_shares` gives where each expert's pairs run, and the snapshot
  adds the rank view: window load per rank and the imbalance across ranks.

Expert-store counters are not mirrored: the snapshot carries the latest `stats.offload` itself, and hit rate
and prefetch accuracy come from `OffloadStats`. `Telemetry.snapshot()` (`telemetry.py`) returns an
`ExpertStatsSnapshot` (`snapshot.py`; JSON-able via `to_dict()`), which `server/metrics.py` exports to
Prometheus and `server/convert.py` to `GetExpertStats`.
"""

from moe_runtime.telemetry.latency import LATENCY_BUCKETS, LatencyHistogram, LatencySummary
from moe_runtime.telemetry.load import ExpertLoadWindow, imbalance, normalized_entropy
from moe_runtime.telemetry.ranks import rank_view
from moe_runtime.telemetry.snapshot import ExpertStatsSnapshot
from moe_runtime.telemetry.telemetry import Telemetry

__all__ = ["LATENCY_BUCKETS", "ExpertLoadWindow", "ExpertStatsSnapshot", "LatencyHistogram", "LatencySummary",
           "Telemetry", "imbalance", "normalized_entropy", "rank_view"]
