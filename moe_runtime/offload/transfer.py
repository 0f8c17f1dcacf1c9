"""Asynchronous expert copies: a side CUDA stream with events on GPU, one worker thread (or inline) on CPU.

Both movers have the same contract: `submit(fn)` starts `fn` (which copies into slot buffers) without
waiting for it and returns a handle; `wait(handle)` makes the caller's subsequent work see the copy's
result. The store submits only speculative prefetches here; demand copies run inline on the main stream.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class InlineMover:
    """CPU, no overlap: the copy runs at once on the calling thread (prefetch then only loads early)."""

    def submit(self, fn: Callable[[], object]) -> None:
        fn()

    def wait(self, handle: None) -> None:
        pass

    def close(self) -> None:
        pass


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


# Below this, handing a copy to the worker thread (queue, GIL hand-offs) costs more than the copy itself:
# on `tiny-trained` (250 KB experts) the thread made decode slower; `mini`'s 22 MB reads overlap well.
THREAD_MIN_EXPERT_BYTES = 1 << 20


def make_mover(device: torch.device, expert_bytes: int) -> InlineMover | ThreadMover | CudaMover:
    """Side stream on CUDA; on CPU a worker thread for experts big enough to be worth it, else inline."""
    if device.type == "cuda":
        return CudaMover(device)
    return ThreadMover() if expert_bytes >= THREAD_MIN_EXPERT_BYTES else InlineMover()
