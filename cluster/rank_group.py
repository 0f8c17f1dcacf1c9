"""`RankGroup`: the expert-parallel process group the MoE layers sum their shares over, with a clock of the
time one rank spends in those all-reduces (waiting for the slowest rank, then the transfer).

That time is what tells ranks apart: the all-reduces line every rank's step up, so step times are nearly
equal, and a rank's own work is its step time minus its all-reduce time. The clock is chosen once for the
device: on CPU (gloo) the all-reduce blocks, so host time measures it; on CUDA (NCCL) it is queued on the
stream, so CUDA events time it there and are read after the step, whose host copy of the sampled tokens
has synchronized the stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class HostClock:
    """All-reduce seconds by host time (blocking collectives: gloo)."""

    def __init__(self) -> None:
        self._seconds = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self._seconds += time.perf_counter() - t0

    def take(self) -> float:
        """Seconds timed since the last `take`."""
        seconds, self._seconds = self._seconds, 0.0
        return seconds


class CudaEventClock:
    """All-reduce seconds by CUDA events around each all-reduce on the current stream (NCCL)."""

    def __init__(self) -> None:
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def timing(self) -> Iterator[None]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((start, end))

    def take(self) -> float:
        """Seconds timed since the last `take`; call after the step has synchronized."""
        events, self._events = self._events, []
        return sum(start.elapsed_time(end) for start, end in events) / 1000  # ms -> s


def clock_for(device: torch.device) -> HostClock | CudaEventClock:
    return CudaEventClock() if device.type == "cuda" else HostClock()


@dataclass(frozen=True)
class RankGroup:
    """The process group of the expert-parallel ranks, and the clock of this rank's all-reduces."""

    process_group: dist.ProcessGroup
    clock: HostClock | CudaEventClock = field(default_factory=HostClock)

    def all_reduce_sum(self, x: torch.Tensor) -> None:
        """Sum `x` over the ranks in place (timed)."""
        with self.clock.timing():
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.process_group)
