"""`moe-runtime stats --server HOST:PORT [--json]`: per-layer, per-expert load of a running server.

The table is a heatmap of each expert's share (%) of its layer's routed tokens over the telemetry window
(green near the fair share 1/E, red at twice it), with the layer's imbalance (max/mean, 1 = balanced) and
normalized router entropy (1 = uniform). With the Ray executor a second table shows the load per rank and
the imbalance across ranks. `--json` prints the snapshot that `moe-runtime plan-placement --stats` reads.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="show expert load of a running server", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="gRPC address, e.g. 127.0.0.1:50051")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    p.add_argument("--total", action="store_true", help="table of load since start instead of the window")
    p.add_argument("--tls-ca", help="PEM CA certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moe_runtime.server.client import GenerationClient

    with GenerationClient(args.server, args.env.get("auth_token"), args.tls_ca, args.timeout) as client:
        stats = client.expert_stats()
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        render(stats, "total_tokens_per_expert" if args.total else "tokens_per_expert")
    return 0


def render(stats: dict[str, Any], key: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    span = "since start" if key.startswith("total") else f"last {stats['window_steps']} steps"
    table = Table(title=f"% of each layer's routed tokens per expert ({span}; {stats['tokens_processed']} tokens, "
                        f"top-{stats['top_k']})", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", justify="right")
    for e in range(stats["experts"]):
        table.add_column(f"e{e}", justify="right")
    table.add_column("max/mean", justify="right")
    table.add_column("entropy", justify="right")
    for layer, row in enumerate(stats[key]):
        total = sum(row) or 1
        cells = [_heat(c / total, stats["experts"]) for c in row]
        table.add_row(str(layer), *cells, f"{stats['imbalance'][layer]:.2f}", f"{stats['entropy'][layer]:.3f}")
    console = Console()
    console.print(table)
    console.print(f"mean max/mean {stats['mean_imbalance']:.2f}, mean entropy {stats['mean_entropy']:.3f} "
                  f"(1 = uniform); running {stats['num_running']}, waiting {stats['num_waiting']}, KV blocks "
                  f"{stats['kv_blocks_used']}/{stats['kv_blocks_total']}")
    cache = stats.get("cache") or {}
    if cache.get("hits", 0) + cache.get("misses", 0):
        # `GetExpertStats` carries no prefetch counts (only `ExpertStatsSnapshot.to_dict()` does).
        counts = (f" ({cache['prefetch_used']}/{cache['prefetch_guessed']} guessed experts used)"
                  if "prefetch_used" in cache else "")
        console.print(f"expert cache (since start): {cache['hits']} hits, {cache['misses']} misses, hit rate "
                      f"{cache['hit_rate']:.2f}, {cache['bytes_moved'] / 2**20:.1f} MiB moved; prefetch accuracy "
                      f"{cache['prefetch_accuracy']:.2f}{counts}")
    if stats.get("rank_tokens"):
        render_ranks(console, stats)


def render_ranks(console: Any, stats: dict[str, Any]) -> None:
    """Per-rank load (Ray executor): pairs each rank computed over the window and its share."""
    from rich import box
    from rich.table import Table

    loads, total = stats["rank_tokens"], sum(stats["rank_tokens"]) or 1
    table = Table(title=f"load per rank (last {stats['window_steps']} steps, all layers; busiest/mean per layer "
                        f"{stats['rank_imbalance']:.2f})", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("rank", "pairs", "share %", "expert copies"):
        table.add_column(name, justify="right")
    for rank, (load, copies) in enumerate(zip(loads, stats["rank_expert_copies"], strict=True)):
        table.add_row(str(rank), f"{load:.0f}", _heat(load / total, len(loads)), str(copies))
    console.print(table)


def _heat(share: float, num_experts: int) -> str:
    """A share of the layer's tokens, coloured by how far it is from the fair share 1/E."""
    ratio = share * num_experts
    style = "green" if ratio < 1.25 else "yellow" if ratio < 2 else "bold red"
    return f"[{style}]{share * 100:.0f}[/]"
