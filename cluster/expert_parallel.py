"""Expert-parallel MoE on one rank: compute the (token, expert) pairs the placement gives this rank, then sum
every rank's partial output. The building block of the Ray executor's workers; no Ray import.

`ShardedExpertsBuilder` is what a worker hands `load_model(..., parts=ModelParts(experts=...))`: every layer's
`ShardedExperts` holds only the experts `placement` gives this rank (the loader reads just those), and
`apply(placement)` moves to a new placement between steps (keeping what stays, reading what arrives).

Every rank runs the whole step on the same flat batch (attention and routers are replicated), so every rank
sees the same x [T, D] and routing. Per MoE layer:
  1. `Placement.local_slots(rank, layer, ids)`: the slot of each (token, k) pair this rank computes, -1 for
     pairs computed elsewhere (a replicated expert's pairs are split by token index).
  2. One `fused_moe_fp32` call, with the model's backend, over the local slots: the routing's ids become
     local slot ids, and pairs computed elsewhere go to one extra id whose `slot_map` entry is -1
     (contributes zero). The output [T, D] is this rank's share, in fp32, not rounded yet.
  3. all_reduce(SUM) of the fp32 shares over the group, then one rounding to x's dtype.
Each pair is computed on exactly one rank and the others add exact zeros, so for top-2 routing (Mixtral)
each token's sum is the local run's single fp32 addition (a + b == b + a) and the rounded result has the
local run's bits in every dtype, unless an expert is replicated: its GEMM then runs on fewer rows and may
be blocked differently (or cross the torch backend's 16-bit upcast threshold), within the dtype's tolerance.

Quantized experts (`model.quantization`: int8, fp8; or an FP8 checkpoint's own): each rank holds its experts
in 8 bits with their row scales (`QuantizedShardedExperts`), quantized at load as the local engine does and
read again, quantized, when a new placement brings an expert: the same values on every rank as in the
local engine's `QuantizedLocalExperts`, so the same sums.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_runtime.checkpoint.layout import layout_of
from moe_runtime.checkpoint.reader import SafetensorsReader
from moe_runtime.cluster.placement import Placement
from moe_runtime.cluster.rank_group import CudaEventClock, HostClock, RankGroup
from moe_runtime.config import ModelConfig
from moe_runtime.kernels import RoutingResult, fused_moe_fp32
from moe_runtime.kernels.quant import QuantizedWeight, new_weight, weight_bytes
from moe_runtime.model.experts import Experts, QuantizedStacks

# T tokens, A activated (top-k), D hidden, I intermediate, S_r expert slots on this rank


class ShardedExperts(Experts):
    """One MoE layer's experts on one rank: w13 [S_r, 2I, D] and w2 [S_r, D, I] hold the experts
    `placement.local_experts(rank, layer)` gives it, in that (slot) order.

    group: the expert-parallel ranks (`RankGroup`: process group and all-reduce clock); None runs alone (the
    share is the output: tests, one rank).
    backend: the MoE kernel backend each share runs on (`model.moe_backend`).
    """

    def __init__(self, cfg: ModelConfig, placement: Placement, rank: int, layer: int,
                 group: RankGroup | None = None, backend: str = "auto"):
        super().__init__(cfg.num_local_experts)
        if placement.num_experts != cfg.num_local_experts or not 0 <= layer < placement.num_layers:
            raise ValueError(f"layer {layer}: placement is {placement.num_layers} layers x {placement.num_experts} "
                             f"experts, the model has {cfg.num_hidden_layers} x {cfg.num_local_experts}")
        self.placement, self.rank, self.layer, self.group, self.backend = placement, rank, layer, group, backend
        self.layout = layout_of(cfg)  # the checkpoint's expert names, for `hold`
        num_local = len(placement.local_experts(rank, layer))
        D, I = cfg.hidden_size, cfg.intermediate_size
        self._set_stacks(torch.empty(num_local, 2 * I, D), torch.empty(num_local, D, I))

    def _set_stacks(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Hold w13 [S_r, 2I, D] and w2 [S_r, D, I] as this rank's experts."""
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)

    def _new_stacks(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty stacks for n experts in this rank's format, dtype and device."""
        return (torch.empty(n, *self.w13.shape[1:], dtype=self.w13.dtype, device=self.w13.device),
                torch.empty(n, *self.w2.shape[1:], dtype=self.w2.dtype, device=self.w2.device))

    def held_experts(self) -> list[int]:
        return self.placement.local_experts(self.rank, self.layer)

    def share(self, x: torch.Tensor, routing: RoutingResult) -> torch.Tensor:
        """This rank's part of the layer output, before the sum over ranks. x: [T, D]. Returns fp32 [T, D].

        The routing's ids become local slots, and pairs computed elsewhere go to one extra id whose slot_map
        entry is -1 (they contribute zero).

        Example: with expert 1 on ranks (0, 1), rank 1 computes its pairs of odd tokens only:
            >>> p = Placement(2, (((0,), (0, 1)),))
            >>> p.local_slots(1, 0, torch.tensor([[1, 0], [0, 1], [1, 0]])).tolist()
            [[-1, -1], [-1, 0], [-1, -1]]
        """
        slots = self.placement.local_slots(self.rank, self.layer, routing.ids)  # [T, A], -1 = elsewhere
        num_local = self.w13.shape[0]
        ids = torch.where(slots >= 0, slots, num_local).to(routing.ids.dtype)  # [T, A] in [0, S_r]
        elsewhere = torch.full((1,), -1, device=x.device)
        slot_map = torch.cat([torch.arange(num_local, device=x.device), elsewhere])  # [S_r + 1]: s -> s, S_r -> -1
        local = RoutingResult(weights=routing.weights, ids=ids)
        return fused_moe_fp32(x, self.w13, self.w2, local, slot_map=slot_map, backend=self.backend)  # [T, D]

    def run(self, x: torch.Tensor, routing: RoutingResult) -> torch.Tensor:
        """The layer's MoE output, summed over the group in fp32. x: [T, D]. Returns [T, D] in x's dtype."""
        out = self.share(x, routing)  # [T, D] fp32
        if self.group is not None:
            self.group.all_reduce_sum(out)
        return out.to(x.dtype)  # one rounding, as the local kernels do

    def hold(self, placement: Placement, reader: SafetensorsReader) -> None:
        """Hold `placement`'s experts from now on: the ones already here are kept (moved to their new
        slots), the others are read through `reader` (the checkpoint's expert tensors)."""
        held = {e: s for s, e in enumerate(self.held_experts())}
        want = placement.local_experts(self.rank, self.layer)
        w13, w2 = self._new_stacks(len(want))  # [S_r, 2I, D], [S_r, D, I]
        # as the loader: 16-bit stacks get the tensor converted to their dtype on their device; quantized
        # ones get it quantized per row (an FP8 checkpoint's values as they are)
        read = reader.read_weight if isinstance(w13, QuantizedWeight) else reader.copy_into
        for slot, e in enumerate(want):
            if e in held:
                w13[slot].copy_(self.w13[held[e]])
                w2[slot].copy_(self.w2[held[e]])
            else:
                self.layout.read_expert(read, self.layer, e, w13[slot], w2[slot])
        self._set_stacks(w13, w2)
        self.placement = placement

    def expert_bytes(self) -> int:
        """Bytes of the expert weights this rank holds for this layer (values and scales)."""
        return weight_bytes(self.w13) + weight_bytes(self.w2)


class QuantizedShardedExperts(QuantizedStacks, ShardedExperts):
    """`ShardedExperts` in 8 bits (`model.quantization`): w13_data [S_r, 2I, D] and w2_data [S_r, D, I] int8
    or float8_e4m3fn, w13_scale [S_r, 2I] and w2_scale [S_r, D] fp32, read as `QuantizedWeight`s
    (`QuantizedStacks`, as `QuantizedLocalExperts` holds all E), which the fused MoE kernels take where they
    take 16-bit stacks."""

    def __init__(self, cfg: ModelConfig, placement: Placement, rank: int, layer: int, scheme: str,
                 group: RankGroup | None = None, backend: str = "auto"):
        self.scheme = scheme  # before the base class allocates the stacks in it
        super().__init__(cfg, placement, rank, layer, group, backend)

    def _set_stacks(self, w13: torch.Tensor | QuantizedWeight, w2: torch.Tensor | QuantizedWeight) -> None:
        if not isinstance(w13, QuantizedWeight):  # the base class's empty 16-bit stacks: their 8-bit form
            w13, w2 = (new_weight(tuple(w.shape), torch.float32, self.scheme, device=w.device) for w in (w13, w2))
        QuantizedStacks._set_stacks(self, w13, w2)

    def _new_stacks(self, n: int) -> tuple[QuantizedWeight, QuantizedWeight]:
        device = self.w13_data.device
        return (new_weight((n, *self.w13_data.shape[1:]), torch.float32, self.scheme, device=device),
                new_weight((n, *self.w2_data.shape[1:]), torch.float32, self.scheme, device=device))


class ShardedExpertsBuilder:
    """Every layer's experts as rank `rank`'s share of `placement`, summed over `group` (all-reduces timed
    on `clock`, read by the worker after each step; a host clock by default).

    After `load_model`, `layers` are the L `ShardedExperts` it built; `apply(placement)` re-places them.
    """

    def __init__(self, placement: Placement, rank: int, group: dist.ProcessGroup | None = None,
                 backend: str = "auto", clock: HostClock | CudaEventClock | None = None, quantization: str = "none"):
        self.placement, self.rank, self.backend, self.quantization = placement, rank, backend, quantization
        self.clock = clock if clock is not None else HostClock()
        self.group = None if group is None else RankGroup(group, self.clock)
        self.layers: list[ShardedExperts] = []
        self._experts_location: dict[str, str] = {}  # expert tensor name -> file, from the loader
        self._model_dir = ""
        self._group = group

    def quantized(self, scheme: str) -> ShardedExpertsBuilder:
        """The same shares with weights in `scheme` (int8, fp8: the loader asks, from `model.quantization`
        or an FP8 checkpoint's `quantization_config`); this builder itself when it already is."""
        if scheme == self.quantization:
            return self
        return ShardedExpertsBuilder(self.placement, self.rank, self._group, self.backend, self.clock, scheme)

    def build(self, cfg: ModelConfig, layer: int) -> Experts:
        if (self.placement.num_layers, self.placement.num_experts) != (cfg.num_hidden_layers, cfg.num_local_experts):
            raise ValueError(
                f"placement is {self.placement.num_layers} layers x {self.placement.num_experts} experts, "
                f"model {cfg.num_hidden_layers} x {cfg.num_local_experts}"
            )
        if self.quantization == "none":
            experts = ShardedExperts(cfg, self.placement, self.rank, layer, self.group, self.backend)
        else:
            experts = QuantizedShardedExperts(cfg, self.placement, self.rank, layer, self.quantization, self.group,
                                              self.backend)
        self.layers.append(experts)
        return experts

    def finish(self, model: nn.Module, model_dir: str, location: dict[str, str]) -> None:
        self._model_dir = model_dir
        layout = layout_of(model.config)
        self._experts_location = {n: f for n, f in location.items() if layout.is_expert_tensor(n)}

    def apply(self, placement: Placement) -> None:
        """Hold `placement`'s experts in every layer (call between steps, on every rank)."""
        with SafetensorsReader(self._model_dir, self._experts_location) as reader:  # pread: no mmap pages stay
            for experts in self.layers:
                experts.hold(placement, reader)
        self.placement = placement

    def expert_bytes(self) -> int:
        """Bytes of the expert weights this rank holds, all layers."""
        return sum(experts.expert_bytes() for experts in self.layers)
