"""One log line per placement change asked of a server (the `ApplyPlacement` RPC or the automatic
rebalancer): accepted or rejected, by whom, and what moved. A JSON object on the logger
`moe_runtime.cluster.placement`, like the server's request lines, so log pipelines can filter on "event".

    {"event": "apply_placement", "by": "ipv4:10.0.0.7:53122", "accepted": true, "status": "OK", "workers": 4,
     "copies_added": 6, "copies_removed": 6, "expert_copies": [16, 16, 17, 15], "seconds": 0.84}
    {"event": "apply_placement", "by": "ipv4:10.0.0.7:53140", "accepted": false, "status": "INVALID_ARGUMENT",
     "error": "placement.workers=3: the running group has 4 workers; ..."}
"""

from __future__ import annotations

import json
import logging
from typing import Any

from moe_runtime.cluster.placement import Placement

log = logging.getLogger("moe_runtime.cluster.placement")


def moved_copies(old: Placement, new: Placement) -> tuple[int, int]:
    """(copies added, copies removed) going from `old` to `new`: (layer, expert, rank) triples held by
    one and not the other.

    >>> moved_copies(Placement(2, (((0,), (1,)),)), Placement(2, (((0, 1), (0,)),)))
    (2, 1)
    """
    a, b = old.mask(), new.mask()  # bool [L, E, N]
    return int((b & ~a).sum()), int((a & ~b).sum())


def log_accepted(by: str, old: Placement | None, new: Placement, seconds: float, **extra: Any) -> None:
    """`by`: who asked (the gRPC peer address, or "auto_rebalance"); extra: more fields for the line."""
    added, removed = moved_copies(old, new) if old is not None and old.workers == new.workers else (-1, -1)
    copies = new.experts_per_rank().sum(dim=0).tolist()  # [N] over all layers
    log.info(json.dumps({"event": "apply_placement", "by": by, "accepted": True, "status": "OK",
                         "workers": new.workers, "copies_added": added, "copies_removed": removed,
                         "expert_copies": copies, "seconds": round(seconds, 6), **extra}))


def log_rejected(by: str, status: str, error: str) -> None:
    """status: the gRPC status name (INVALID_ARGUMENT, FAILED_PRECONDITION, UNAVAILABLE, ...)."""
    log.warning(json.dumps({"event": "apply_placement", "by": by, "accepted": False, "status": status,
                            "error": error}))
