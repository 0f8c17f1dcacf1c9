"""`moe-runtime stats --server HOST:PORT [--json]`: per-layer, per-expert load of a running server.

The table is a heatmap of each expert's share (%) of its layer's routed tokens over the telemetry window
(green near the fair share 1/E, red at twice it), with the layer's imbalance (max/mean, 1 = balanced) and
normalized router entropy (1 = uniform); with more than 16 experts a layer's row shows one character per
expert and its hottest experts instead (stats_wide.py). With the Ray executor a second table shows each rank's load, the
imbalance across ranks, its mean step time and the part of it that is its own work (outside the MoE
all-reduces: the busiest rank has the most), its expert bytes and the worker restarts; a third shows the
placement (the ranks holding each expert). Below the load: the prefix cache's hit rate, speculative
decoding's acceptance rate and, with `telemetry.cost.usd_per_hour`, the cost per million tokens over the
cost window (telemetry/cost.py), for the features in use. `--json` prints the snapshot that `moe-runtime plan-placement
--stats` reads.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from moe_runtime.commands import stats_wide


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
    title = (f"% of each layer's routed tokens per expert ({span}; {stats['tokens_processed']} tokens, "
             f"top-{stats['top_k']})")
    console = Console()
    if stats["experts"] > stats_wide.WIDE:  # one character per expert (stats_wide.py)
        stats_wide.render_load(console, stats, key, title)
    else:
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("layer", justify="right")
        for e in range(stats["experts"]):
            table.add_column(f"e{e}", justify="right")
        table.add_column("max/mean", justify="right")
        table.add_column("entropy", justify="right")
        for layer, row in enumerate(stats[key]):
            total = sum(row) or 1
            cells = [_heat(c / total, stats["experts"]) for c in row]
            table.add_row(str(layer), *cells, f"{stats['imbalance'][layer]:.2f}", f"{stats['entropy'][layer]:.3f}")
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
    for line in engine_lines(stats):
        console.print(line)
    if stats.get("rank_tokens"):
        render_ranks(console, stats)


def engine_lines(stats: dict[str, Any]) -> list[str]:
    """The prefix cache's hit rate, speculative decoding's acceptance rate and the cost per million tokens,
    one line each, for the features in use (a counter still at zero, or no price, prints nothing).

    >>> engine_lines({"prefix_cache": {"queries": 64, "hits": 48, "hit_rate": 0.75}})
    ['prefix cache (since start): 48 of 64 prompt tokens found, hit rate 0.75']
    """
    lines = []
    prefix = stats.get("prefix_cache") or {}
    if prefix.get("queries"):
        lines.append(f"prefix cache (since start): {prefix['hits']} of {prefix['queries']} prompt tokens found, "
                     f"hit rate {prefix['hit_rate']:.2f}")
    spec = stats.get("speculative") or {}
    if spec.get("proposed_tokens"):
        lines.append(f"speculative decoding (since start): {spec['accepted_tokens']} of {spec['proposed_tokens']} "
                     f"proposed tokens accepted, acceptance rate {spec['acceptance_rate']:.2f}, "
                     f"{spec['tokens_per_verification']:.2f} tokens per verifying step")
    cost = stats.get("cost") or {}
    if cost.get("configured"):
        def usd(x: float | None) -> str:
            return "-" if x is None else f"${x:,.4f}"

        lines.append(f"cost at ${cost['usd_per_hour']:g}/h over the last {cost['window_s']:.0f} s: "
                     f"{usd(cost['usd_per_million_generated_tokens'])} per 1M generated tokens "
                     f"({cost['generated_tokens']} completed), {usd(cost['usd_per_million_prompt_tokens'])} per 1M "
                     f"prompt tokens ({cost['prompt_tokens']}); each kind carries the machine's whole price")
    return lines


def render_ranks(console: Any, stats: dict[str, Any]) -> None:
    """Per-rank load (Ray executor): pairs each rank computed over the window and its share, step times,
    expert bytes; then the placement."""
    from rich import box
    from rich.table import Table

    loads, total = stats["rank_tokens"], sum(stats["rank_tokens"]) or 1
    n = len(loads)
    step = stats.get("rank_step_s") or [0.0] * n
    collective = stats.get("rank_collective_s") or [0.0] * n
    held = stats.get("rank_expert_bytes") or [0] * n
    table = Table(title=f"load per rank (last {stats['window_steps']} steps, all layers; busiest/mean per layer "
                        f"{stats['rank_imbalance']:.2f}; worker restarts {stats.get('worker_restarts', 0)})",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("rank", "pairs", "share %", "expert copies", "expert MiB", "step ms", "own work ms"):
        table.add_column(name, justify="right")
    busiest = max(range(n), key=lambda r: step[r] - collective[r]) if any(step) else -1
    for rank in range(n):
        own = f"{(step[rank] - collective[rank]) * 1e3:.2f}"
        table.add_row(str(rank), f"{loads[rank]:.0f}", _heat(loads[rank] / total, n),
                      str(stats["rank_expert_copies"][rank]), f"{held[rank] / 2**20:.1f}",
                      f"{step[rank] * 1e3:.2f}", f"[bold]{own}[/]" if rank == busiest else own)
    console.print(table)
    if stats.get("rank_experts"):
        render_placement(console, stats["rank_experts"])


def render_placement(console: Any, rank_experts: list[list[list[int]]]) -> None:
    """The placement: for each layer and expert, the ranks holding a copy. rank_experts: [N][L] expert ids."""
    from rich import box
    from rich.table import Table

    num_layers = len(rank_experts[0]) if rank_experts else 0
    num_experts = 1 + max((e for layers in rank_experts for experts in layers for e in experts), default=-1)
    if num_experts > stats_wide.WIDE:
        stats_wide.render_placement(console, rank_experts)
        return
    table = Table(title="placement: the ranks holding each expert", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", justify="right")
    for e in range(num_experts):
        table.add_column(f"e{e}", justify="right")
    for layer in range(num_layers):
        owners = [",".join(str(r) for r, layers in enumerate(rank_experts) if e in layers[layer])
                  for e in range(num_experts)]
        table.add_row(str(layer), *owners)
    console.print(table)


def _heat(share: float, num_experts: int) -> str:
    """A share of the layer's tokens, coloured by how far it is from the fair share 1/E."""
    ratio = share * num_experts
    style = "green" if ratio < 1.25 else "yellow" if ratio < 2 else "bold red"
    return f"[{style}]{share * 100:.0f}[/]"
