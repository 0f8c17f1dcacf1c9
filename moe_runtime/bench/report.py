"""The report of a serving benchmark, from each request's client-side timings: pure functions.

Per request (seconds, one clock, `time.perf_counter()`):
- TTFT (time to first token): sent -> first token received.
- TPOT (time per output token): (last token - first token) / (output tokens - 1); requests with one output
  token have none.
- ITL (inter-token latency): the gap between two successive token-bearing chunks (a chunk carries the
  tokens of one engine step: one per request per step here).
- E2E: sent -> last byte.
Over the run (the first send to the last request's end, `duration_s`): throughput in requests and tokens
per second; percentiles p50/p90/p99 with linear interpolation between the closest ranks (numpy's default);
goodput, the requests per second that met every SLO given (`slo_ttft_ms`, `slo_tpot_ms`); and with a
machine price (`usd_per_hour`), what a million tokens cost at the measured throughput: the whole machine's
time over the prompt tokens, over the generated tokens, and over both, of the completed requests (the
definition in moe_runtime/telemetry/cost.py, which the server's `moe_runtime_cost_usd_per_million_tokens`
uses over its window: one function computes both).
Failed requests count in `requests.failed` and in no latency.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What the client saw of one request."""

    prompt_tokens: int
    output_tokens: int = 0
    start_s: float = 0.0  # sent
    end_s: float = 0.0  # last byte received (or the error)
    token_times: list[float] = field(default_factory=list)  # when each token-bearing chunk arrived
    error: str | None = None  # None: it finished

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.start_s if self.token_times else None

    @property
    def tpot_s(self) -> float | None:
        if not self.token_times or self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of `values`, interpolating linearly between the closest ranks; None for
    no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q={q}: allowed: 0 to 100")
    if not values:
        return None
    s = sorted(values)
    rank = q / 100 * (len(s) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def summarize_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean and percentiles, in milliseconds, of values in seconds."""
    out: dict[str, float | None] = {"mean": 1000 * sum(values_s) / len(values_s) if values_s else None}
    for q in PERCENTILES:
        p = percentile(values_s, q)
        out[f"p{q}"] = None if p is None else 1000 * p
    return out


def meets_slo(r: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Whether a finished request met every SLO given (a request with no TPOT meets a TPOT SLO)."""
    if not r.ok:
        return False
    if slo_ttft_ms is not None and 1000 * r.ttft_s > slo_ttft_ms:
        return False
    tpot = r.tpot_s
    return slo_tpot_ms is None or tpot is None or 1000 * tpot <= slo_tpot_ms


def cost_per_million(usd_per_hour: float, duration_s: float, tokens: int) -> float | None:
    """Dollars per million tokens when the machine costs `usd_per_hour` and made `tokens` in `duration_s`:
    the server's definition (`usd_per_million_tokens`), imported here, when a price is given, because
    importing the telemetry package loads torch, which the client needs for nothing else."""
    from moe_runtime.telemetry.cost import usd_per_million_tokens

    return usd_per_million_tokens(usd_per_hour, duration_s, tokens)


def make_report(results: list[RequestResult], duration_s: float, slo_ttft_ms: float | None = None,
                slo_tpot_ms: float | None = None, usd_per_hour: float | None = None) -> dict[str, Any]:
    """The report as JSON-able data (times in ms, rates per second, None where nothing was measured)."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    prompt = sum(r.prompt_tokens for r in done)
    generated = sum(r.output_tokens for r in done)

    def rate(x: float) -> float:
        return x / duration_s if duration_s > 0 else 0.0

    report: dict[str, Any] = {
        "requests": {"completed": len(done), "failed": len(failed),
                     "errors": dict(Counter(r.error or "no tokens" for r in failed).most_common(5))},
        "duration_s": duration_s,
        "tokens": {"prompt": prompt, "generated": generated},
        "throughput": {"requests_per_s": rate(len(done)), "prompt_tokens_per_s": rate(prompt),
                       "generated_tokens_per_s": rate(generated), "total_tokens_per_s": rate(prompt + generated)},
        "ttft_ms": summarize_ms([r.ttft_s for r in done]),
        "tpot_ms": summarize_ms([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_ms": summarize_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": summarize_ms([r.e2e_s for r in done]),
        "goodput": None,
        "cost": None,
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in results)
        report["goodput"] = {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "requests": good,
                             "requests_per_s": rate(good), "fraction": good / len(results) if results else 0.0}
    if usd_per_hour is not None:
        report["cost"] = {"usd_per_hour": usd_per_hour,
                          "usd_per_million_prompt_tokens": cost_per_million(usd_per_hour, duration_s, prompt),
                          "usd_per_million_generated_tokens": cost_per_million(usd_per_hour, duration_s, generated),
                          "usd_per_million_tokens": cost_per_million(usd_per_hour, duration_s, prompt + generated)}
    return report
