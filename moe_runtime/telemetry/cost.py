"""What a million tokens cost at the measured throughput, given the machine's price (`telemetry.cost`).

One definition, used by the server (`moe_runtime_cost_usd_per_million_tokens{kind}`, `moe-runtime stats`)
and by `moe-runtime bench serve`'s report:

    USD per million tokens of a kind = usd_per_hour * seconds / 3600 / tokens * 1e6

where `tokens` are the prompt tokens, or the generated tokens, of the requests that completed in those
`seconds` of wall time, as their usage reports them (prompt tokens found in the prefix cache count: the user
sent them; a preempted request's recomputed ones do not). Each kind carries the whole machine's cost, not a
share of it: "if this machine did nothing but make generated tokens, at the rate it made them". That is the
convention of the serving benchmarks operators compare against, and it needs no split of a step's time
between prefill and decode, which share every step. Idle time counts: the machine is paid for whether or
not it has work, so a quiet hour shows what a token really cost in it.

The server measures over a sliding window of wall time (`telemetry.cost.window_s`, default 5 minutes),
the benchmark over its run. Requests are counted when they finish, so the window should be long against a
request's duration; with no request finished in the window the cost is undefined and the server exports no
series for it (a dashboard shows "no data", not a misleading 0 or infinity).

Standard library only. Importing it still runs `moe_runtime.telemetry`'s `__init__` (which loads torch through
the expert store's stats), so the benchmark client imports it only when it is given a price.
"""

from __future__ import annotations

from collections import deque

KINDS = ("prompt", "generated")
_BUCKETS = 300  # the window is kept as this many time buckets: memory bounded whatever the request rate


def usd_per_million_tokens(usd_per_hour: float, seconds: float, tokens: int) -> float | None:
    """Dollars per million tokens when the machine costs `usd_per_hour` and made `tokens` in `seconds`; None
    when nothing was made (undefined, not infinite: no series, no table cell).

    >>> usd_per_million_tokens(2.0, 3600, 1_000_000), usd_per_million_tokens(3.6, 10, 500)
    (2.0, 20.0)
    >>> usd_per_million_tokens(2.0, 60, 0) is None
    True
    """
    if tokens <= 0 or seconds <= 0:
        return None
    return usd_per_hour * seconds / 3600 / tokens * 1e6


class CostWindow:
    """Tokens of completed requests over the last `window_s` seconds of wall time, in `_BUCKETS` buckets.

    Not thread-safe: `Telemetry` holds it under its lock. Times are `time.monotonic()` seconds, passed in
    (the tests drive the clock).
    """

    def __init__(self, usd_per_hour: float, window_s: float, now: float):
        if not usd_per_hour >= 0 or not window_s > 0:
            raise ValueError(f"usd_per_hour={usd_per_hour}, window_s={window_s}: allowed: usd_per_hour >= 0 "
                             "and window_s > 0")
        self.usd_per_hour, self.window_s = usd_per_hour, window_s
        self._width = window_s / _BUCKETS
        self._start = now  # the window never reaches before the server started
        self._buckets: deque[list[float]] = deque()  # [bucket index, prompt tokens, generated tokens]

    def add(self, prompt_tokens: int, generated_tokens: int, now: float) -> None:
        """One completed request's usage, counted at `now` (its finish)."""
        index = int(now // self._width)
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1][1] += prompt_tokens
            self._buckets[-1][2] += generated_tokens
        else:
            self._buckets.append([index, prompt_tokens, generated_tokens])
        self._trim(now)

    def tokens(self, now: float) -> tuple[int, int]:
        """(prompt, generated) tokens of the requests completed in the window ending at `now`."""
        self._trim(now)
        return int(sum(b[1] for b in self._buckets)), int(sum(b[2] for b in self._buckets))

    def span_s(self, now: float) -> float:
        """The window's length at `now`: `window_s`, or less in the server's first `window_s` seconds."""
        return max(0.0, min(self.window_s, now - self._start))

    def usd_per_million(self, now: float) -> dict[str, float | None]:
        """kind ("prompt", "generated") -> USD per million tokens over the window, None where undefined."""
        span = self.span_s(now)
        counts = self.tokens(now)
        return {kind: usd_per_million_tokens(self.usd_per_hour, span, n) for kind, n in zip(KINDS, counts,
                                                                                             strict=True)}

    def _trim(self, now: float) -> None:
        oldest = int((now - self.window_s) // self._width)  # buckets before this one are out of the window
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()
