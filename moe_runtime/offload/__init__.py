"""Expert offloading (DESIGN.md section 4): resident expert slots on the device, the rest in a host tier.

Enable with the `offload:` YAML section (`OffloadConfig`) and load with
`load_model(dir, ..., parts=ModelParts(experts=OffloadedExpertsBuilder(cfg.offload, backend)))`; the builder's `store` is then
the open `ExpertStore` and its counters `store.stats()` (an `OffloadStats`).
"""

from moe_runtime.offload.cost_model import CostModel
from moe_runtime.offload.experts import OffloadedExperts, OffloadedExpertsBuilder
from moe_runtime.offload.policy import LFUPolicy, LRUPolicy
from moe_runtime.offload.stats import OffloadStats
from moe_runtime.offload.store import ExpertStore

__all__ = ["CostModel", "ExpertStore", "LFUPolicy", "LRUPolicy", "OffloadedExperts", "OffloadedExpertsBuilder",
           "OffloadStats"]
