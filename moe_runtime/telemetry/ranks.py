"""The rank view (Ray executor): how the window's expert load lands on ranks under the current placement.

Dimension letters: L layers, E experts, N ranks. `shares[l][e][n]` is the fraction of expert e's pairs in
layer l that rank n computes (1/copies on each rank holding a copy; `Placement.rank_shares()`).
"""

from __future__ import annotations


def rank_view(window: list[list[int]], shares: list[list[list[float]]]) -> tuple[list[float], float]:
    """Load per rank and imbalance across ranks. window: [L][E] pairs; shares: [L][E][N] fraction of expert
    e's pairs that rank n computes. Returns ([N] pairs summed over layers, sum_l max_n / sum_l mean_n).

    >>> rank_view([[6, 2]], [[[1.0, 0.0], [0.5, 0.5]]])
    ([7.0, 1.0], 1.75)
    """
    num_ranks = _num_ranks(shares)
    totals, busiest, mean = [0.0] * num_ranks, 0.0, 0.0
    for row, layer_shares in zip(window, shares, strict=True):
        load = [sum(c * sh[n] for c, sh in zip(row, layer_shares, strict=True)) for n in range(num_ranks)]
        totals = [t + x for t, x in zip(totals, load, strict=True)]
        busiest += max(load, default=0.0)
        mean += sum(load) / max(num_ranks, 1)
    return totals, (busiest / mean if mean else 0.0)


def expert_copies(shares: list[list[list[float]]]) -> list[int]:
    """[N] expert copies each rank holds, over all layers.

    >>> expert_copies([[[1.0, 0.0], [0.5, 0.5]]])
    [2, 1]
    """
    return [sum(1 for layer in shares for sh in layer if sh[n] > 0) for n in range(_num_ranks(shares))]


def _num_ranks(shares: list[list[list[float]]]) -> int:
    return len(shares[0][0]) if shares and shares[0] else 0
