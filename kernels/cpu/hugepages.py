"""Weights on transparent huge pages (2 MiB) for the native CPU kernels, where Linux offers them.

Decode streams every weight once per step. With 4 KiB pages a streaming read takes a TLB miss every 4 KiB
(512 per MiB); on 2 MiB pages it takes one per 2 MiB. On the 2-core AVX2 EPYC a bf16 GEMV over
[7168, 1024] weights read 3-7% faster from huge pages than from 4 KiB pages in the same process
(docs/benchmarks.md, Engine).

`empty` maps fresh anonymous memory, aligns it to 2 MiB and asks the kernel for huge pages
(`madvise(MADV_HUGEPAGE)`) before anything touches it, so page faults allocate huge pages directly when
/sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`. Elsewhere (no THP, not Linux, small
tensors) it gives ordinary memory: the advice is best effort and never changes a value.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 2 * HUGE_PAGE  # smaller tensors: ordinary memory (a huge page would be mostly empty)


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor, on huge pages where the kernel gives them.

    The tensor keeps its mapping alive (it views the mmap's buffer) and frees it when collected.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    # private anonymous memory (Python's default for -1 is shared memory, which THP leaves alone here)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # untouched
    start = _address(buf)
    offset = -start % HUGE_PAGE
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, offset, nbytes + HUGE_PAGE - offset)
    except OSError:  # THP disabled or unsupported: ordinary pages, same values
        pass
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU tensor t on huge pages (see `empty`)."""
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out


def _address(buf: mmap.mmap) -> int:
    return torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
