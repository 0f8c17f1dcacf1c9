"""Counters of the expert store: a plain dataclass the engine stats carry as `stats.offload` (STYLE rule 17).

Telemetry, `/metrics` and `GetExpertStats` read this object as it is (no mirror), and the derived values
(hit rate, prefetch accuracy) are computed here only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class OffloadStats:
    """Cumulative since the store was built (or since `ExpertStore.reset_stats`).

    An expert *use* is one (step, layer, expert) with at least one token routed to it: every use is exactly
    one hit or one miss, and every miss is exactly one demand fetch or one host computation.
    """

    hits: int = 0  # uses whose expert was already resident (including brought in by prefetch)
    misses: int = 0  # uses whose expert was not resident
    fetched: int = 0  # misses served by copying the expert into a slot
    host_computed: int = 0  # misses served by computing the expert on the host
    evictions: int = 0  # residents replaced (by demand fetches and prefetches)
    bytes_moved: int = 0  # expert bytes copied into slots (demand + prefetch) and read for host compute
    stall_s: float = 0.0  # host seconds the step waited for expert weights (demand copies, pending prefetches)
    prefetch_guessed: int = 0  # experts guessed for a layer by the previous layer's look-ahead
    prefetch_used: int = 0  # guessed experts that the layer then actually used
    prefetch_loaded: int = 0  # guessed experts that were not resident and were copied ahead
    prefetch_useful: int = 0  # of those loaded ahead, the ones the layer then used (misses avoided)

    @property
    def uses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Guessed experts that were used / guessed (0 when nothing was guessed)."""
        return self.prefetch_used / self.prefetch_guessed if self.prefetch_guessed else 0.0

    def copy(self) -> OffloadStats:
        return OffloadStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        """Every counter and the derived values, by name."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(hit_rate=self.hit_rate, prefetch_accuracy=self.prefetch_accuracy)
        return d
