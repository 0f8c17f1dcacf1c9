"""Paged KV layouts for the attention tests: each sequence's pages in shuffled blocks of the cache.

Importable from every test folder (tests/ is on pytest's pythonpath, pyproject.toml).
"""

from __future__ import annotations

import torch


def shuffled_pages(
    ctx: tuple[int, ...] | list[int], block_size: int, num_blocks: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence b gets ceil(ctx[b] / block_size) distinct blocks, taken in turn from one random permutation
    of `num_blocks` (one `randperm` draw from `gen`).

    Returns block_tables [B, W] (padded with block 0) and slots [B]: the cache slot of each sequence's
    newest token, position ctx[b] - 1.
    """
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for c in ctx:
        n = -(-c // block_size)
        tables.append(perm[used : used + n])
        used += n
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])  # [B, W]
    slots = torch.tensor(
        [
            t[(c - 1) // block_size] * block_size + (c - 1) % block_size
            for t, c in zip(tables, ctx, strict=True)
        ]
    )
    return block_tables, slots
