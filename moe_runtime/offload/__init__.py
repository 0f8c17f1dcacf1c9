"""Expert offloading (DESIGN.md section 4): resident expert slots on the device, the rest in a host tier.

Enable with the `offload:` YAML section (`OffloadConfig`) and load with
`load_model(dir, ..., offload=cfg.offload)`; the store is then `model.expert_store` and its counters
`model.expert_store.stats()` (an `OffloadStats`).
"""

from moe_runtime.offload.attach import attach_expert_store
from moe_runtime.offload.cost_model import CostModel
from moe_runtime.offload.policy import LFUPolicy, LRUPolicy
from moe_runtime.offload.stats import OffloadStats
from moe_runtime.offload.store import ExpertStore, LayerExperts

__all__ = ["attach_expert_store", "CostModel", "ExpertStore", "LayerExperts", "LFUPolicy", "LRUPolicy",
           "OffloadStats"]
