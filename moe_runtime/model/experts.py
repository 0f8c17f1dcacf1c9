"""The routed experts of one MoE layer: an interface whose implementation is chosen once, at construction.

`SparseMoeBlock` routes each token to its top-A experts and hands the tokens and their routing to its
`Experts`. Where the experts' weights live is the implementation's business:
  - `LocalExperts` (here): all E experts of the layer in this process, w13 [E, 2I, D] and w2 [E, D, I];
  - `moe_runtime.offload.OffloadedExperts`: a budget of resident slots on the device, the rest on the host;
  - `moe_runtime.cluster.expert_parallel.ShardedExperts`: this rank's share, summed over the process group.
All three give the same outputs. The model is built with an `ExpertsBuilder`, which makes each layer's
`Experts` (before any weight is read) and finishes whatever the implementation needs once the rest of the
model is loaded; `checkpoint.loader.load_model` fills the expert weights each `Experts` holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import nn

from moe_runtime.config import ModelConfig
from moe_runtime.kernels import RoutingResult, moe_kernel
from moe_runtime.kernels.cpu.dispatch import RowPlan
from moe_runtime.kernels.quant import SCHEMES, QuantizedWeight, keep_dtypes, new_weight

# T tokens, A activated experts (top-k), E experts, S expert slots held here, D hidden, I intermediate


class Experts(nn.Module, ABC):
    """One layer's routed experts. `forward(x [T, D], routing)` -> [T, D] in x's dtype.

    Also keeps the latest routing's expert ids (`last_routing` [T, A] int32, on the device), from which the
    step's runner counts the tokens routed to each expert for telemetry (`router_counts`), after the step
    and without a host sync (a captured graph's padding rows left out).
    """

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.last_routing: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, routing: RoutingResult) -> torch.Tensor:
        self.last_routing = routing.ids  # [T, A]
        return self.run(x, routing)

    @abstractmethod
    def run(self, x: torch.Tensor, routing: RoutingResult) -> torch.Tensor:
        """The weighted sum of each token's A experts' SwiGLU MLPs. x: [T, D]; returns [T, D] in x's dtype."""

    def held_experts(self) -> list[int]:
        """Expert ids whose weights this module holds in `w13`/`w2`, in slot order (the loader fills them from
        the checkpoint). None here by default: an implementation that keeps its weights elsewhere."""
        return []


def router_counts(routing_ids: list[torch.Tensor], num_experts: int, num_tokens: int) -> torch.Tensor:
    """Tokens routed to each expert, per layer: routing_ids L x [>= T, A] (rows past num_tokens are padding)
    -> [L, E] int64 on their device, in two launches and no host sync.

    >>> router_counts([torch.tensor([[0, 2], [2, 1], [3, 3]])], num_experts=4, num_tokens=2).tolist()
    [[1, 1, 2, 0]]
    """
    ids = torch.stack([r[:num_tokens] for r in routing_ids]).flatten(1).long()  # [L, T*A]
    counts = torch.zeros(ids.shape[0], num_experts, dtype=torch.long, device=ids.device)  # [L, E]
    return counts.scatter_add_(1, ids, torch.ones_like(ids))


class ExpertsBuilder(Protocol):
    """How a model gets its experts: `build` makes layer `layer`'s `Experts` on the meta device, before any
    weight is read; `finish` runs once the rest of the model is loaded (device, dtype and routers known)."""

    def build(self, cfg: ModelConfig, layer: int) -> Experts: ...

    def finish(self, model: nn.Module, model_dir: str, location: dict[str, str]) -> None: ...


class LocalExperts(Experts):
    """All E experts of the layer in this process, run by the fused MoE kernel of `backend` (the `cpu`
    backend with the measured `plan` for its expert groups, when given).

    w13: [E, 2I, D], gate rows (checkpoint w1) then up rows (w3); w2: [E, D, I].
    """

    def __init__(self, cfg: ModelConfig, backend: str = "auto", plan: RowPlan | None = None):
        super().__init__(cfg.num_local_experts)
        E, D, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, D), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, D, I), requires_grad=False)
        self.backend = backend
        self.moe = moe_kernel(backend, plan)  # fp32 partial sums

    def run(self, x: torch.Tensor, routing: RoutingResult) -> torch.Tensor:
        return self.moe(x, self.w13, self.w2, routing, None).to(x.dtype)  # [T, D], one rounding

    def held_experts(self) -> list[int]:
        return list(range(self.w13.shape[0]))


class QuantizedStacks:
    """Expert stacks in 8 bits for an `Experts` module: the parameters w13_data [S, 2I, D] and w2_data [S, D, I]
    (int8 or float8_e4m3fn, `scheme`) with w13_scale [S, 2I] and w2_scale [S, D] fp32, read as the
    `QuantizedWeight`s `w13` and `w2` (so `w13[slot]` is one expert's, as for 16 bits), and kept in those
    dtypes through `model.to(dtype)`. Mixed into `QuantizedLocalExperts` and the cluster's
    `QuantizedShardedExperts`."""

    scheme: str

    def _set_stacks(self, w13: QuantizedWeight, w2: QuantizedWeight) -> None:
        self.w13_data = nn.Parameter(w13.data, requires_grad=False)
        self.w13_scale = nn.Parameter(w13.scale, requires_grad=False)
        self.w2_data = nn.Parameter(w2.data, requires_grad=False)
        self.w2_scale = nn.Parameter(w2.scale, requires_grad=False)

    @property
    def w13(self) -> QuantizedWeight:
        return QuantizedWeight(self.w13_data, self.w13_scale)

    @property
    def w2(self) -> QuantizedWeight:
        return QuantizedWeight(self.w2_data, self.w2_scale)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        qdtype = SCHEMES[self.scheme]  # the values stay 8-bit and the scales fp32 through `model.to(dtype)`
        keep_dtypes(self, {"w13_data": qdtype, "w2_data": qdtype, "w13_scale": torch.float32,
                           "w2_scale": torch.float32})
        return self


class QuantizedLocalExperts(QuantizedStacks, LocalExperts):
    """All E experts of the layer in this process in 8 bits (`model.quantization`: int8 or fp8), each
    weight row with its fp32 scale beside it (kernels/quant.py), run by the same fused MoE kernel, which
    takes the `QuantizedWeight`s where it takes 16-bit stacks.

    w13_data [E, 2I, D] and w2_data [E, D, I] int8 or float8_e4m3fn; w13_scale [E, 2I], w2_scale [E, D] fp32.
    `w13` and `w2` read as `QuantizedWeight`s of them (so `w13[slot]` is one expert's, as for 16 bits).
    """

    def __init__(self, cfg: ModelConfig, scheme: str, backend: str = "auto", plan: RowPlan | None = None):
        Experts.__init__(self, cfg.num_local_experts)
        E, D, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.scheme = scheme
        self._set_stacks(new_weight((E, 2 * I, D), torch.float32, scheme), new_weight((E, D, I), torch.float32, scheme))
        self.backend = backend
        self.moe = moe_kernel(backend, plan)


class LocalExpertsBuilder:
    """Every layer's experts local, on the MoE kernel `backend` (`model.moe_backend`); `plan`: the measured
    expert plan for the `cpu` backend (kernels/cpu/dispatch.py); `quantization`: the experts' weights in
    16 bits ("none", the checkpoint's dtype) or 8 ("int8", "fp8": `QuantizedLocalExperts`)."""

    def __init__(self, backend: str = "auto", plan: RowPlan | None = None, quantization: str = "none"):
        self.backend, self.plan, self.quantization = backend, plan, quantization

    def quantized(self, scheme: str) -> LocalExpertsBuilder:
        """The same experts with weights in `scheme` (the loader asks, from `model.quantization` or an FP8
        checkpoint's `quantization_config`)."""
        return LocalExpertsBuilder(self.backend, self.plan, scheme)

    def build(self, cfg: ModelConfig, layer: int) -> Experts:
        if self.quantization != "none":
            return QuantizedLocalExperts(cfg, self.quantization, self.backend, self.plan)
        return LocalExperts(cfg, self.backend, self.plan)

    def finish(self, model: nn.Module, model_dir: str, location: dict[str, str]) -> None:
        pass
