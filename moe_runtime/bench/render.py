"""The benchmark report as tables on the terminal (`moe-runtime bench serve` without `--json`)."""

from __future__ import annotations

from typing import Any

LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def render(report: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    c, req, thr = report["config"], report["requests"], report["throughput"]
    load = f"rate {c['rate']:g}/s (Poisson)" if c["rate"] is not None else f"concurrency {c['concurrency']}"
    console = Console()
    console.print(f"[bold]{c['protocol']}[/] {c['server']}: {c['num_requests']} requests, {load}; prompts "
                  f"{c['prompt_len']} (+{c['shared_prefix_tokens']} shared), outputs {c['output_len']}; seed {c['seed']}")
    summary = Table(box=box.SIMPLE_HEAD, show_header=False, pad_edge=False)
    summary.add_column(justify="left")
    summary.add_column(justify="right")
    rows = [("completed / failed", f"{req['completed']} / {req['failed']}"),
            ("duration s", _num(report["duration_s"])),
            ("requests/s", _num(thr["requests_per_s"])),
            ("prompt tok/s", _num(thr["prompt_tokens_per_s"], 1)),
            ("generated tok/s", _num(thr["generated_tokens_per_s"], 1)),
            ("total tok/s", _num(thr["total_tokens_per_s"], 1))]
    if report["goodput"] is not None:
        g = report["goodput"]
        slo = ", ".join(f"{name} <= {g[key]:g} ms" for name, key in (("TTFT", "slo_ttft_ms"), ("TPOT", "slo_tpot_ms"))
                        if g[key] is not None)
        rows.append((f"goodput ({slo})", f"{_num(g['requests_per_s'])} req/s ({100 * g['fraction']:.0f}%)"))
    if report["cost"] is not None:
        cost = report["cost"]
        rows += [(f"$ per 1M generated tokens (at ${cost['usd_per_hour']:g}/h)",
                  _num(cost["usd_per_million_generated_tokens"], 4)),
                 ("$ per 1M prompt tokens", _num(cost["usd_per_million_prompt_tokens"], 4)),
                 ("$ per 1M tokens (prompt + generated)", _num(cost["usd_per_million_tokens"], 4))]
    for row in rows:
        summary.add_row(*row)
    console.print(summary)
    latency = Table(title="latency (ms)", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("", "mean", "p50", "p90", "p99"):
        latency.add_column(col, justify="right")
    for name, key in LATENCIES:
        s = report[key]
        latency.add_row(name, *(_num(s[k]) for k in ("mean", "p50", "p90", "p99")))
    console.print(latency)
    for error, n in req["errors"].items():
        console.print(f"[red]{n} failed[/]: {error}")
