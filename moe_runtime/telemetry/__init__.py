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
- `ranks.py`: with the Ray executor, its `RankStats` (through the same hook, after every step and placement
  change) give where each expert runs, each rank's step and all-reduce times and the worker restarts; the
  snapshot adds the rank view: window load per rank, the imbalance across ranks, the placement rank by
  rank, mean step times and expert bytes per rank.

- `cost.py`: with `telemetry.cost.usd_per_hour`, the machine's price over the tokens of the requests that
  completed in a sliding window of wall time: dollars per million prompt and generated tokens (the same
  definition `moe-runtime bench serve` reports).

The engine's prefix-cache and speculative-decoding counters come with its stats and are published as they
are (hit rate and acceptance rate derived). Expert-store counters are not mirrored: the snapshot carries the
latest `stats.offload` itself, and hit rate and prefetch accuracy come from `OffloadStats`. `Telemetry.snapshot()` (`telemetry.py`) returns an
`ExpertStatsSnapshot` (`snapshot.py`; JSON-able via `to_dict()`), which `server/metrics.py` exports to
Prometheus and `server/convert.py` to `GetExpertStats`.
"""

from moe_runtime.telemetry.cost import CostWindow, usd_per_million_tokens
from moe_runtime.telemetry.latency import LATENCY_BUCKETS, LatencyHistogram, LatencySummary
from moe_runtime.telemetry.load import ExpertLoadWindow, imbalance, normalized_entropy
from moe_runtime.telemetry.ranks import RankStats, rank_view
from moe_runtime.telemetry.snapshot import ExpertStatsSnapshot
from moe_runtime.telemetry.telemetry import Telemetry

__all__ = ["LATENCY_BUCKETS", "CostWindow", "ExpertLoadWindow", "ExpertStatsSnapshot", "LatencyHistogram",
           "LatencySummary", "RankStats", "Telemetry", "imbalance", "normalized_entropy", "rank_view", "usd_per_million_tokens"]
