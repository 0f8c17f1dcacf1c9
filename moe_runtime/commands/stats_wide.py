"""`moe-runtime stats` tables for many experts (more than `WIDE`: Qwen3-MoE's 128, OLMoE's 64, Qwen2-MoE's 60),
where one column per expert would not fit a terminal.

Load: one character per expert, e0 first, `PER_LINE` to a line in groups of 8; its height is the expert's
share of the layer's routed tokens against the fair share 1/E (▁ under a quarter of it, ▅ about fair, █ at
twice or more; · none), coloured as the narrow table's cells; then the layer's hottest experts. Placement:
for each layer, the expert ids each rank holds, as ranges. Pure Python (the client commands load no torch).
"""

from __future__ import annotations

from typing import Any

WIDE = 16  # more experts than this: the tables below
PER_LINE = 32  # experts per line of a layer's strip
LEVELS = "▁▂▃▄▅▆▇█"  # share / fair share in quarters: < 0.25, < 0.5, ..., >= 1.75


def strip(row: list[int]) -> str:
    """One layer's routed tokens per expert [E] as rich markup, one character per expert.

    >>> strip([0, 1, 1, 6])
    '[green]·[/][green]▃[/][green]▃[/][bold red]█[/]'
    """
    total, E = sum(row) or 1, len(row)
    cells = []
    for e, count in enumerate(row):
        ratio = count / total * E
        char = "·" if count == 0 else LEVELS[min(len(LEVELS) - 1, int(ratio * 4))]
        style = "green" if ratio < 1.25 else "yellow" if ratio < 2 else "bold red"
        sep = "" if e == 0 else "\n" if e % PER_LINE == 0 else " " if e % 8 == 0 else ""
        cells.append(f"{sep}[{style}]{char}[/]")
    return "".join(cells)


def hottest(row: list[int], n: int) -> str:
    """The layer's n busiest experts with their share (%) of its routed tokens, one a line.

    >>> hottest([0, 1, 1, 6], n=2).splitlines()
    ['e3 75.0', 'e1 12.5']
    """
    total = sum(row) or 1
    top = sorted(range(len(row)), key=lambda e: (-row[e], e))[:n]
    return "\n".join(f"e{e} {row[e] / total * 100:.1f}" for e in top if row[e])


def expert_ranges(ids: list[int]) -> str:
    """Sorted expert ids as ranges.

    >>> expert_ranges([0, 1, 2, 3, 8, 10, 11])
    '0-3,8,10-11'
    """
    runs: list[list[int]] = []
    for e in sorted(ids):
        if runs and e == runs[-1][1] + 1:
            runs[-1][1] = e
        else:
            runs.append([e, e])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def render_load(console: Any, stats: dict[str, Any], key: str, title: str) -> None:
    """The per-layer load table of `stats[key]` ([L][E] routed tokens) for E > WIDE."""
    from rich import box
    from rich.table import Table

    caption = (f"one character per expert, e0 first, {PER_LINE} a line: ▁ under 1/4 of the fair share 1/E, "
               "▅ about fair, █ twice or more, · none")
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", justify="right")
    table.add_column(f"e0..e{stats['experts'] - 1}", no_wrap=True, min_width=PER_LINE + PER_LINE // 8 - 1)
    for name in ("hottest %", "max/mean", "entropy"):
        table.add_column(name, justify="right", no_wrap=True)
    lines = max(2, -(-stats["experts"] // PER_LINE))  # the strip's lines: as many hottest experts
    for layer, row in enumerate(stats[key]):
        table.add_row(str(layer), strip(row), hottest(row, lines), f"{stats['imbalance'][layer]:.2f}",
                      f"{stats['entropy'][layer]:.3f}")
    console.print(table)


def render_placement(console: Any, rank_experts: list[list[list[int]]]) -> None:
    """The placement for E > WIDE: per layer, the expert ids each rank holds. rank_experts: [N][L] ids."""
    from rich import box
    from rich.table import Table

    table = Table(title="placement: the experts each rank holds", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", justify="right")
    for rank in range(len(rank_experts)):
        table.add_column(f"rank {rank}")
    for layer in range(len(rank_experts[0]) if rank_experts else 0):
        table.add_row(str(layer), *(expert_ranges(layers[layer]) for layers in rank_experts))
    console.print(table)
