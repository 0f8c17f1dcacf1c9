"""`moe-runtime stats` table rendering, including the expert-cache line shown when offloading is on."""

from __future__ import annotations

from types import SimpleNamespace

from moe_runtime.commands.stats import render
from moe_runtime.offload.stats import OffloadStats
from moe_runtime.server.convert import snapshot_to_proto, stats_to_dict
from moe_runtime.telemetry import Telemetry

SNAPSHOT = {
    "layers": 2, "experts": 4, "top_k": 2, "window_steps": 8, "tokens_processed": 10,
    "tokens_per_expert": [[5, 5, 5, 5], [10, 0, 10, 0]], "imbalance": [1.0, 2.0], "entropy": [1.0, 0.5],
    "mean_imbalance": 1.5, "mean_entropy": 0.75, "num_running": 0, "num_waiting": 0,
    "kv_blocks_used": 0, "kv_blocks_total": 64,
}
CACHE = {"hits": 30, "misses": 10, "bytes_moved": 3 * 2**20, "prefetch_guessed": 8, "prefetch_used": 6,
         "hit_rate": 0.75, "prefetch_accuracy": 0.75}


def test_cache_line_when_offloading(capsys):
    render({**SNAPSHOT, "cache": CACHE}, "tokens_per_expert")
    out = " ".join(capsys.readouterr().out.split())  # the console wraps at the terminal width
    assert "30 hits, 10 misses, hit rate 0.75, 3.0 MiB moved; prefetch accuracy 0.75 (6/8" in out


def test_no_cache_line_without_offloading(capsys):
    render({**SNAPSHOT, "cache": {**CACHE, "hits": 0, "misses": 0}}, "tokens_per_expert")
    out = capsys.readouterr().out
    assert "max/mean" in out and "expert cache" not in out


def test_cache_line_from_the_wire(capsys):
    """What `moe-runtime stats` renders: the snapshot through `GetExpertStats`, which has no prefetch counts."""
    t = Telemetry(num_layers=1, num_experts=2, top_k=1)
    offload = OffloadStats(hits=30, misses=10, bytes_moved=3 * 2**20, prefetch_guessed=8, prefetch_used=6)
    t.observe_step(SimpleNamespace(steps=1, router_counts=[[1, 0]], offload=offload))
    render(stats_to_dict(snapshot_to_proto(t.snapshot())), "tokens_per_expert")
    out = " ".join(capsys.readouterr().out.split())
    assert "30 hits, 10 misses, hit rate 0.75, 3.0 MiB moved; prefetch accuracy 0.75" in out
