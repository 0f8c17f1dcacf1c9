"""Offloaded experts: each MoE layer runs its experts through the `ExpertStore` (a budget of resident slots on
the device, the rest in a host tier), with outputs identical to the all-resident run.

`OffloadedExpertsBuilder` is what `load_model(..., parts=ModelParts(experts=...))` gets: it makes every layer's
`OffloadedExperts` (which hold no weights themselves, so no expert is ever materialized on the device
except in the store's slots and, with the `mmap` tier, none in host memory either), and opens the store
once the rest of the model is loaded (the store applies the next layer's router to prefetch).
"""

from __future__ import annotations

from torch import nn

from moe_runtime.checkpoint.layout import expert_names, is_expert_tensor
from moe_runtime.checkpoint.reader import SafetensorsReader
from moe_runtime.config import ModelConfig, OffloadConfig
from moe_runtime.kernels import RoutingResult
from moe_runtime.model.experts import Experts
from moe_runtime.offload.cost_model import CostModel
from moe_runtime.offload.host_tier import MmapTier, PinnedTier
from moe_runtime.offload.store import ExpertStore

# T tokens, D hidden


class OffloadedExperts(Experts):
    """One layer's experts, run by the store its builder opened (`ExpertStore.run`)."""

    def __init__(self, cfg: ModelConfig, builder: OffloadedExpertsBuilder, layer: int):
        super().__init__(cfg.num_local_experts)
        self.builder, self.layer = builder, layer

    def run(self, x, routing: RoutingResult):
        """x: [T, D]; returns the MoE output [T, D], identical to fused_moe over all experts."""
        return self.builder.store.run(self.layer, x, routing, self.builder.backend)


class OffloadedExpertsBuilder:
    """Experts behind an `ExpertStore` configured by `offload` (the YAML's `offload:` section), run by the
    MoE kernel `backend`. After `load_model`, `store` is the open store (`stats()`, `close()`).

    cost: the miss cost model; None calibrates one when `offload.miss == "auto"`.
    """

    def __init__(self, offload: OffloadConfig, backend: str = "auto", cost: CostModel | None = None):
        self.offload, self.backend, self.cost = offload, backend, cost
        self.store: ExpertStore | None = None

    def build(self, cfg: ModelConfig, layer: int) -> Experts:
        return OffloadedExperts(cfg, self, layer)

    def finish(self, model: nn.Module, model_dir: str, location: dict[str, str]) -> None:
        """Open the store for `model` (on its device, experts not loaded). location: tensor name -> file."""
        cfg, device, dtype = model.config, model.device, model.dtype
        reader = SafetensorsReader(model_dir, {n: f for n, f in location.items() if is_expert_tensor(n)})
        assert all(n in reader.locations for n in expert_names(cfg.num_hidden_layers - 1, cfg.num_local_experts - 1))
        if self.offload.host_tier == "mmap":
            tier = MmapTier(reader, cfg, dtype)
        else:
            tier = PinnedTier(reader, cfg, dtype, pin=device.type == "cuda")
            reader.close()
        routers = [layer.block_sparse_moe.gate for layer in model.layers]
        self.store = ExpertStore(cfg, self.offload, tier, routers, device, dtype, self.cost)
