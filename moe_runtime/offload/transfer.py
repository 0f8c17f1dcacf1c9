"""Asynchronous expert copies: a side CUDA stream with events on GPU, one worker thread on CPU.

Both movers have the same contract: `submit(fn)` starts `fn` (which copies into slot buffers) without
waiting for it and returns a handle; `wait(handle)` makes the caller's subsequent work see the copy's
result. The store submits only speculative prefetches here; demand copies run inline on the main stream.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class ThreadMover:
    """CPU: copies run on one worker thread (file reads and torch copies release the GIL)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch")

    def submit(self, fn: Callable[[], object]) -> Future:
        return self._pool.submit(fn)

    def wait(self, handle: Future) -> None:
        handle.result()  # re-raises a failed copy here, in the step that needs the expert

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class CudaMover:
    """GPU: copies are issued on a side stream; an event marks their end for the compute stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = torch.cuda.Stream(device)

    def submit(self, fn: Callable[[], object]) -> torch.cuda.Event:
        # The slot may still be read by kernels already queued on the compute stream (the previous step's
        # use of this layer), so the side stream starts only after everything queued so far.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            fn()
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def wait(self, handle: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(handle)  # no host sync: the GPU orders it

    def close(self) -> None:
        self._stream.synchronize()


def make_mover(device: torch.device) -> ThreadMover | CudaMover:
    return CudaMover(device) if device.type == "cuda" else ThreadMover()
