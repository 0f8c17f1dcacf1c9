"""Offloaded experts: each MoE layer runs its experts through the `ExpertStore` (a budget of resident slots on
the device, the rest in a host tier), with outputs identical to the all-resident run.

`OffloadedExpertsBuilder` is what `load_model(..., parts=ModelParts(experts=...))` gets: it makes every layer's
`OffloadedExperts` (which hold no weights themselves, so no expert is ever materialized on the device
except in the store's slots and, with the `mmap` tier, none in host memory either), and opens the store
once the rest of the model is loaded (the store applies the next layer's router to prefetch). Only routed
experts are offloaded: a shared expert (Qwen2-MoE) and dense layers' MLPs are ordinary, always resident
weights of the model.
"""

from __future__ import annotations

from torch import nn

from moe_runtime.checkpoint.layout import layout_of
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

    def __init__(self, offload: OffloadConfig, backend: str = "auto", cost: CostModel | None = None,
                 quantization: str = "none"):
        self.offload, self.backend, self.cost, self.quantization = offload, backend, cost, quantization
        self.store: ExpertStore | None = None

    def quantized(self, scheme: str) -> OffloadedExpertsBuilder:
        """This builder, its store holding experts in `scheme` (int8, fp8: quantized as the tier reads them).
        The same object, not a copy: the executor reads `store` from the builder it made."""
        self.quantization = scheme
        return self

    def build(self, cfg: ModelConfig, layer: int) -> Experts:
        return OffloadedExperts(cfg, self, layer)

    def finish(self, model: nn.Module, model_dir: str, location: dict[str, str]) -> None:
        """Open the store for `model` (on its device, experts not loaded). location: tensor name -> file."""
        cfg, device, dtype, layout = model.config, model.device, model.dtype, layout_of(model.config)
        reader = SafetensorsReader(model_dir, {n: f for n, f in location.items() if layout.is_expert_tensor(n)})
        assert all(n in reader.locations for n in layout.expert_names(cfg.moe_layers[-1], cfg.num_local_experts - 1))
        if self.offload.host_tier == "mmap":
            tier = MmapTier(reader, cfg, dtype, self.quantization, self.offload.spill_dir)
        else:
            tier = PinnedTier(reader, cfg, dtype, pin=device.type == "cuda", scheme=self.quantization)
            reader.close()
        routers = {l: block.gate for l, block in model.moe_blocks().items()}  # sparse layers only
        self.store = ExpertStore(cfg, self.offload, tier, routers, device, dtype, self.cost, self.quantization)
