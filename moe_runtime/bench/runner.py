"""How a serving benchmark paces its requests: open loop at a request rate, or closed loop at a concurrency.

- Open loop (`rate`): request i is sent at its Poisson arrival time (workload.arrival_times) whether or not
  earlier ones have finished, as independent users would: queueing shows up as latency. Waiting for an
  arrival time is the load's shape, not synchronization.
- Closed loop (`concurrency`): C clients, each sending its next request when its previous one ends: the
  server is kept at C requests in flight.

`duration_s` runs from the first send to the last request's end. Warm-up requests (compiling, first
allocations) run first, the same way, and are not reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from moe_runtime.bench.report import RequestResult
from moe_runtime.bench.workload import WorkItem, arrival_times

Send = Callable[[WorkItem], Awaitable[RequestResult]]


async def open_loop(send: Send, items: list[WorkItem], rate: float, seed: int = 0) -> tuple[list[RequestResult], float]:
    """Send `items` at Poisson arrivals of `rate` per second; returns the results (in item order) and the
    duration in seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for item, at in zip(items, arrival_times(len(items), rate, seed), strict=True):
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(item)))
    results = await asyncio.gather(*tasks)
    return results, _duration(results)


async def closed_loop(send: Send, items: list[WorkItem], concurrency: int) -> tuple[list[RequestResult], float]:
    """Send `items` from `concurrency` clients, each one request at a time; results in item order."""
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency}: allowed: >= 1")
    results: list[RequestResult | None] = [None] * len(items)
    pending = iter(range(len(items)))

    async def client() -> None:
        for i in pending:  # the shared iterator hands each index to exactly one client
            results[i] = await send(items[i])

    await asyncio.gather(*(client() for _ in range(min(concurrency, len(items)))))
    done = [r for r in results if r is not None]
    return done, _duration(done)


def _duration(results: list[RequestResult]) -> float:
    if not results:
        return 0.0
    return max(r.end_s for r in results) - min(r.start_s for r in results)


async def run(send: Send, items: list[WorkItem], *, rate: float | None = None, concurrency: int | None = None,
              warmup: Sequence[WorkItem] = (), seed: int = 0) -> tuple[list[RequestResult], float]:
    """Warm up (unreported), then run `items` open loop (`rate`) or closed loop (`concurrency`): exactly one."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate (open loop) and concurrency (closed loop)")
    if warmup:
        await closed_loop(send, list(warmup), concurrency or len(warmup))
    if rate is not None:
        return await open_loop(send, items, rate, seed)
    return await closed_loop(send, items, concurrency)
